"""benchmarks/kernel_bench_nbits.py --table on a sweep with and without programmatic dependent launch (--sweep-pdl): the
table ranks variants by the CUDA-graph time per call when the rows carry a PDL flag (a dependent launch's CUPTI kernel
time includes its wait on the previous kernel), by the CUPTI kernel time otherwise; and benchmarks/fused_select_bench.py
--table. Synthetic rows, no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"gpu": "test", "torch": "-", "copy_tb_s": 4.0}


def _row(kernel_us: float, graph_us: float, pdl: int | None, sparsity: float, prefetch: int = 0) -> dict:
    row = {"K": 64, "N": 32, "M": 1, "sparsity": sparsity, "kernel": "pipe", "cols_per_lane": 16, "blocks_per_sm": 3, "splits": 0,
           "prefetch": prefetch, "stage": 0, "kernel_us": kernel_us, "graph_us": graph_us, "effective_tb_s": 1.0}
    return row | ({"pdl": pdl} if pdl is not None else {})


def _table(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"env": ENV, "rows": rows}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_bench_nbits.py"), "--table", str(path)], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_pdl_rows_rank_by_graph_time(tmp_path):
    # PDL on: larger kernel time (it includes the wait), smaller graph time; it must win
    rows = [_row(12.0, 10.0, 1, s) for s in (0.0, 0.5)] + [_row(11.0, 11.5, 0, s) for s in (0.0, 0.5)]
    text = _table(tmp_path, rows)
    assert "| PDL |" in text and "graph µs at 0 / 50 %" in text
    best = [line for line in text.splitlines() if line.startswith("| 64→32 | ('pipe'")]
    assert best == ["| 64→32 | ('pipe', 16, 3, 0, 0, 0, 1) | 10.00 / 10.00 |"], best


def test_rows_without_pdl_rank_by_kernel_time(tmp_path):
    rows = [_row(9.0, 12.0, None, s, prefetch=1) for s in (0.0, 0.9)] + [_row(10.0, 11.0, None, s) for s in (0.0, 0.9)]
    text = _table(tmp_path, rows)
    assert "kernel µs at 0 / 90 %" in text
    best = [line for line in text.splitlines() if line.startswith("| 64→32 | ('pipe'")]
    assert best == ["| 64→32 | ('pipe', 16, 3, 0, 1, 0) | 9.00 / 9.00 |"], best


def test_fused_select_table_medians_and_ratio(tmp_path):
    """benchmarks/fused_select_bench.py --table: per shape the median graph time of each variant over the rounds, the
    kept fraction averaged over the members, and fused / kernel."""
    def row(name, fused, us, ks):
        return {"shape": name, "K": 100, "N": 64, "ks": ks, "swiglu": False, "fused": fused, "round": 0, "graph_us": us,
                "kernel_us": us}

    rows = [row("qkv", 1, us, [60, 40]) for us in (12.0, 13.0, 30.0)] + [row("qkv", 0, us, [60, 40]) for us in (10.0, 9.0, 10.5)]
    path = tmp_path / "fused.json"
    path.write_text(json.dumps({"command": "-", "env": ENV, "rows": rows}))
    bench = str(ROOT / "benchmarks" / "fused_select_bench.py")
    out = subprocess.run([sys.executable, bench, "--table", str(path)], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "| qkv | 100 -> 64 | 0.50 | 10.00 | 13.00 | 1.30x |" in out.stdout.splitlines(), out.stdout
    bad = subprocess.run([sys.executable, bench, "--out", str(tmp_path / "x.json")], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--harness and --out are required" in bad.stderr
