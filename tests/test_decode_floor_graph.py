"""benchmarks/device/decode_floor_graph.py without a GPU: the bytes each format reads per decode step (against the
parameter count of the 7B shapes, worked out independently here), and --table on synthetic rows."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device" / "decode_floor_graph.py"


def _module():
    spec = importlib.util.spec_from_file_location("decode_floor_graph", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _token_bytes(mod, model: str, kind: str, s: float) -> int:
    return mod.LAYERS * sum(mod.floor_bytes(kind, K, N, s) for _, K, N, _, _ in mod.projections(model))


def test_llama2_7b_bytes_per_token():
    mod = _module()
    # LLaMA-2-7B per layer: q, k, v, o 4096 x 4096, gate and up 4096 x 11008, down 11008 x 4096
    params = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert sum(K * N for _, K, N, _, _ in mod.projections("llama2-7b")) * 32 == params
    assert _token_bytes(mod, "llama2-7b", "kept_rows", 0.0) == params // 2  # 4 bits a weight
    assert _token_bytes(mod, "llama2-7b", "op_layout", 0.0) == params // 2 + params // 32 * 4  # float16 scale + offset per 32
    assert _token_bytes(mod, "llama2-7b", "matmulnbits", 0.0) == params // 2 + params // 32 * 5 // 2  # + 4-bit zero point
    for s in (0.5, 0.8):
        kept = _token_bytes(mod, "llama2-7b", "kept_rows", s)
        assert kept == pytest.approx((1 - s) * params / 2, rel=1e-6)
        # the op's layout reads every block's scales whatever is kept; rows with their own scales drop them too
        assert _token_bytes(mod, "llama2-7b", "op_layout", s) == pytest.approx(kept + params / 8, rel=1e-6)
        assert _token_bytes(mod, "llama2-7b", "own_scales_b128", s) == pytest.approx((1 - s) * (params / 2 + params / 32), rel=1e-6)


def test_mistral_members_and_swiglu():
    mod = _module()
    qkv, o, gate_up, down = mod.projections("mistral-7b")
    assert qkv[1:4] == (4096, 6144, (4096, 5120, 6144)) and not qkv[4]  # 8 KV heads of 128
    assert gate_up[1:4] == (4096, 28672, (14336, 28672))
    assert down[1:3] == (14336, 4096) and down[4]  # the down op reads [gate | up]


def test_table_and_usage_errors(tmp_path):
    rows = [{"method": "op", "sparsity": 0.5, "launch": "dependent", "graph_us_per_call": 10.0, "kernel_us_per_call": 9.0,
             "ms_per_token": 1.28},
            {"method": "floor_kept_rows", "sparsity": 0.5, "launch": "plain", "blocks_per_sm": 2, "bytes_per_token": 1.6e9, "graph_us_per_call": 20.0,
             "kernel_us_per_call": 18.0, "ms_per_token": 0.64, "tb_s": 2.5, "calls_per_token": 32}]
    path = tmp_path / "floor.json"
    path.write_text(json.dumps({"model": "llama2-7b", "device": "test", "sms": 132, "layers": 32, "calls_per_token": 128,
                                "copy_tb_s": 3.0, "rows": rows}))
    out = subprocess.run([sys.executable, str(SCRIPT), "--table", str(path)], capture_output=True, text=True, check=True).stdout
    assert "| 0.50 | op | dependent | 128 |  |  | 1.280 | 10.00 | 9.00 |  |" in out
    assert "| 0.50 | floor_kept_rows | plain | 32 | 2 | 1.600 | 0.640 | 20.00 | 18.00 | 2.50 |" in out
    for argv in ([], ["--table", str(tmp_path / "missing.json")]):
        r = subprocess.run([sys.executable, str(SCRIPT), *argv], capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "error:" in r.stderr
