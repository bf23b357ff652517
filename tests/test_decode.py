"""benchmarks/decode.py, run as the command a user runs (a subprocess; no test imports a benchmark): every backend on
tiny models on CPU, its calibration, its tables (CUDA parts skip without a GPU)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "decode.py"


def _bench(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, str(BENCH), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _run(tmp_path: Path, name: str, *args: str, model: str = "tiny-llama", device: str = "cpu", dtype: str = "fp32") -> dict:
    """The benchmark on a tiny model; returns its results JSON."""
    out = tmp_path / f"{name}.json"
    _bench("--model", model, "--device", device, "--dtype", dtype, "--prompt-length", "24", "--decode-tokens", "10",
           "--warmup-tokens", "1", "--calibration-windows", "3", "--workdir", str(tmp_path / "w"), "--output", str(out), *args)
    data = json.loads(out.read_text())
    errors = [r["error"] for r in data["runs"] if "error" in r]
    assert not errors, errors
    return data


def _stats(prefill_ms: float, decode_ms: list[float]) -> dict:
    """What the benchmark records per configuration (median decode step, tokens/s = 1000 / median)."""
    med = sorted(decode_ms)[len(decode_ms) // 2]
    return {"prefill_ms": prefill_ms, "decode_ms_median": med, "decode_ms_p90": med, "decode_ms_mean": med, "tokens_per_s": 1000 / med,
            "decode_tokens": len(decode_ms)}


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-mistral"])
def test_static_decoder_matches_eager_greedy(shape, tmp_path):
    """PyTorch eager (DynamicCache) and the static-cache decoder decode the same greedy tokens, and the calibrated
    thresholds give the target sparsity on the prompt and the decoded tokens (PyTorch reference)."""
    data = _run(tmp_path, shape, "--sparsity", "0", "0.5", "--topk-sparsity", "--backends", "torch-eager", "torch-cuda-graph",
                model=shape)
    runs = {(r["backend"], r["variant"]): r for r in data["runs"]}
    eager = runs[("torch-eager", "dense")]["tokens"]
    assert len(eager) == 12 and runs[("torch-static", "dense")]["tokens"] == eager
    eff = data["calibration"]["0.5"]["effective_sparsity"]
    assert abs(eff["prompt"] - 0.5) < 0.05 and abs(eff["decode"] - 0.5) < 0.08
    for r in runs.values():
        assert r["decode_ms_median"] > 0 and r["tokens_per_s"] == pytest.approx(1000 / r["decode_ms_median"])


def test_tables_ratios(tmp_path):
    data = {
        "model": {"name": "m", "layers": 2, "dtype": "fp16"}, "settings": {"prompt_length": 8, "decode_tokens": 4},
        "machine": {"gpu": "X"}, "calibration": {"0.8": {"effective_sparsity": {"decode": 0.79}}},
        "runs": [
            {"backend": "ort-optimum", "variant": "dense", "sparsity": 0.0, **_stats(5, [4.0, 4.0])},
            {"backend": "genai-dense", "variant": "dense", "sparsity": 0.0, **_stats(5, [2.0, 2.0])},
            {"backend": "torch-cuda-graph", "variant": "dense", "sparsity": 0.0, **_stats(5, [2.5, 2.5])},
            {"backend": "genai-fused", "variant": "fused threshold 80%", "sparsity": 0.8, "mode": "threshold",
             **_stats(5, [1.0, 1.0])},
            {"backend": "genai-mask", "variant": "mask threshold 80%", "sparsity": 0.8, "error": "boom"},
        ],
    }
    (tmp_path / "r.json").write_text(json.dumps(data))
    text = _bench("--table", str(tmp_path / "r.json")).stdout
    row = next(line for line in text.splitlines() if line.startswith("| genai-fused fused threshold 80%"))
    assert row == "| genai-fused fused threshold 80% | 1000.0 | 4.00× | 2.00× | 2.50× |"
    assert "0.80 → 0.790" in text and "failed: boom" in text


def test_repeat_table_takes_ratios_within_each_run(tmp_path):
    def run(dense_ms, fused_ms):
        return {"model": {"name": "m", "layers": 2, "dtype": "fp32"}, "settings": {"prompt_length": 8, "decode_tokens": 4},
                "machine": {"gpu": None, "cpu": "C", "cpu_count": 2},
                "runs": [{"backend": "genai-dense", "variant": "dense", "sparsity": 0.0, **_stats(5, [dense_ms] * 3)},
                         {"backend": "genai-fused", "variant": "fused threshold 80%", "sparsity": 0.8, **_stats(5, [fused_ms] * 3)},
                         {"backend": "genai-mask", "variant": "mask threshold 80%", "sparsity": 0.8, "error": "boom"}]}

    # a slow machine in run 2 slows both configurations: the per-run ratio stays 2
    files = []
    for i, (dense_ms, fused_ms) in enumerate([(2.0, 1.0), (8.0, 4.0), (4.0, 1.0)]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(run(dense_ms, fused_ms)))
    text = _bench("--table", *map(str, files)).stdout
    row = next(line for line in text.splitlines() if line.startswith("| genai-fused | fused threshold 80%"))
    assert row == "| genai-fused | fused threshold 80% | 1.00 | 1.00 / 4.00 / 1.00 | 5 | 2.00 / 2.00 / 4.00 | 2.00× |"
    assert "3 runs" in text and "CPU C × 2" in text and "mask" not in text


def test_exporter_rows_compare_with_genai_fp16_dense_and_int4(tmp_path):
    """The exporter's folders run on the genai base: their ratio is against genai's fp16 dense model, never against
    the faster int4 build (which is its own column), in the single-run and the repeat tables."""
    def run(dense_ms, int4_ms, export_ms):
        return {"model": {"name": "m", "layers": 2, "dtype": "fp16"}, "settings": {"prompt_length": 8, "decode_tokens": 4},
                "machine": {"gpu": "X"},
                "runs": [{"backend": "genai-dense", "variant": "dense", "sparsity": 0.0, **_stats(5, [dense_ms] * 3)},
                         {"backend": "genai-int4", "variant": "dense int4", "sparsity": 0.0, **_stats(5, [int4_ms] * 3)},
                         {"backend": "acttail-export", "variant": "export acttail threshold 80%", "sparsity": 0.8,
                          "allocation": "acttail", **_stats(5, [export_ms] * 3)}]}

    files = []
    for i, ms in enumerate([(4.0, 2.0, 1.0), (8.0, 4.0, 4.0)]):
        files.append(tmp_path / f"r{i}.json")
        files[-1].write_text(json.dumps(run(*ms)))
    single = _bench("--table", str(files[0])).stdout
    row = next(line for line in single.splitlines() if line.startswith("| acttail-export export acttail threshold 80%"))
    assert row == "| acttail-export export acttail threshold 80% | 1000.0 | – | 4.00× | – | 2.00× |"
    text = _bench("--table", *map(str, files)).stdout
    row = next(line for line in text.splitlines() if line.startswith("| acttail-export |"))
    assert row.endswith("| 4.00 / 2.00 | 3.00× | 2.00 / 1.00 |")
    int4_row = next(line for line in text.splitlines() if line.startswith("| genai-int4 |"))
    assert int4_row.endswith("| 2.00 / 2.00 | 2.00× | 1.00 / 1.00 |")



def test_table_prints_the_cupti_split(tmp_path):
    """--cupti rows (genai-int4, the exporter's folders) get a line each in the CUPTI table: timed decode, CUPTI wall, GPU
    kernel time, kernels per token, the projections' kernels and the rest."""
    cupti = {"wall_ms_per_token": 9.5, "gpu_kernel_ms_per_token": 2.25, "kernels_per_token": 700.0,
             "sparse_op_kernel_ms_per_token": 0.0, "projection_kernel_ms_per_token": 1.5, "projection_calls_per_token": 129.0,
             "other_kernel_ms_per_token": 0.75}
    data = {"model": {"name": "m", "layers": 2, "dtype": "fp16"}, "settings": {"prompt_length": 8, "decode_tokens": 4},
            "machine": {"gpu": "X"},
            "runs": [{"backend": "genai-int4", "variant": "dense int4", "sparsity": 0.0, **_stats(5, [2.5] * 3), "cupti": cupti},
                     {"backend": "acttail-export", "variant": "export acttail threshold 80% int4", "sparsity": 0.8,
                      "allocation": "acttail", **_stats(5, [2.0] * 3), "cupti": {"error": "boom"}}]}
    (tmp_path / "r.json").write_text(json.dumps(data))
    text = _bench("--table", str(tmp_path / "r.json")).stdout
    assert "| genai-int4 dense int4 | 2.500 | 9.500 | 2.250 | 700 | 1.500 | 129 | 0.750 |" in text
    assert "| acttail-export export acttail threshold 80% int4 | 2.000 | failed: boom" in text

def _builder_works():
    from tests.test_optimize import _builder_works as works

    return works()


def _check_end_to_end(data: dict, backends: list[str]) -> None:
    runs = {(r["backend"], r["variant"]): r for r in data["runs"]}
    eager = runs[("torch-eager", "dense")]["tokens"]
    assert len(eager) == 12  # the prefill token, 1 warm-up and 10 measured steps
    assert runs[("torch-static", "dense")]["tokens"] == eager
    if "ort-optimum" in backends:
        assert runs[("ort-optimum", "dense")]["tokens"] == eager
    if "genai-dense" in backends:
        assert runs[("genai-dense", "dense")]["tokens"] == eager[:11]  # genai: the prefill token + 11 steps, the last unread
        assert runs[("genai-fused", "fused threshold 0%")]["tokens"] == eager[:11]  # threshold 0 keeps every non-zero
        assert ("genai-fused", "fused topk 50%") in runs
    assert abs(data["calibration"]["0.5"]["effective_sparsity"]["decode"] - 0.5) < 0.1
    for r in runs.values():
        assert r["decode_ms_median"] > 0 and r["tokens_per_s"] == pytest.approx(1000 / r["decode_ms_median"])


@pytest.mark.skipif("not _builder_works()", reason="onnxruntime-genai builder not importable")
def test_benchmark_end_to_end_on_cpu(tmp_path):
    """The whole command on a tiny model (the default environment's backends): every backend runs and the dense
    backends agree token for token."""
    backends = ["torch-eager", "torch-cuda-graph", "genai-dense", "genai-fused"]
    _check_end_to_end(_run(tmp_path, "r", "--sparsity", "0", "0.5", "--topk-sparsity", "0.5", "--backends", *backends), backends)


@pytest.mark.optimum  # the benchmark's ort-optimum backend
def test_benchmark_ort_optimum_backend_on_cpu(tmp_path):
    backends = ["torch-eager", "torch-cuda-graph", "ort-optimum"]
    _check_end_to_end(_run(tmp_path, "r", "--sparsity", "0", "0.5", "--topk-sparsity", "0.5", "--backends", *backends), backends)


@pytest.mark.skipif("not _builder_works()", reason="onnxruntime-genai builder not importable")
def test_benchmark_packed_base_decodes_like_unpacked(tmp_path):
    """--pack: q/k/v and gate/up packed in the genai base, one SparseMatMul per input group, same tokens as apart."""
    tokens = {}
    for pack in (False, True):
        data = _run(tmp_path, f"r{int(pack)}", "--sparsity", "0.5", "--topk-sparsity", "0.5", "--backends", "genai-dense", "genai-fused",
                    *(["--pack"] if pack else []))
        assert data["settings"]["genai_packed"] is pack
        runs = {r["variant"]: r for r in data["runs"]}
        tag = " packed" if pack else ""
        tokens[pack] = (runs[f"fused threshold 50%{tag}"]["tokens"], runs[f"fused topk 50%{tag}"]["tokens"], runs[f"dense{tag}"]["tokens"])
    graph = onnx.load(str(next((tmp_path / "w").glob("*/genai-packed/model.fused-threshold-50.onnx"))), load_external_data=False)
    layers = 2
    assert sum(n.op_type == "SparseMatMul" for n in graph.graph.node) == 4 * layers
    assert tokens[True][:2] == tokens[False][:2]  # the op's CPU kernel sums each column in the same order, packed or not
    assert tokens[True][2] == tokens[False][2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoder_matches_eager_on_gpu(tmp_path):
    data = _run(tmp_path, "gpu", "--sparsity", "0", "--topk-sparsity", "--backends", "torch-eager", "torch-cuda-graph", device="cuda",
                dtype="fp16")
    runs = {(r["backend"], r["variant"]): r for r in data["runs"]}
    eager, graph = runs[("torch-eager", "dense")]["tokens"], runs[("torch-cuda-graph", "dense")]["tokens"]
    assert graph[:8] == eager[:8]  # fp16: SDPA kernels differ between the two paths, so late flips are possible


@pytest.mark.skipif("not _builder_works()", reason="onnxruntime-genai builder not importable")
def test_benchmark_times_the_exporters_own_folders(tmp_path):
    """acttail-export backend: export() writes the folder (packed genai base, fused op or --export-kernel mask, its own
    calibration) for each allocation and kernel; HT-SR gives the projections different budgets, uniform one; the folder
    is removed after its run.
    (htsr: the default at 50 % searches on 8 windows of 128 calibration tokens, more than this run's text holds.)"""
    data = _run(tmp_path, "x", "--sparsity", "0", "--topk-sparsity", "--backends", "genai-dense", "acttail-export",
                "--export-sparsity", "0.5", "--export-allocation", "htsr", "uniform", "--export-kernel", "fused", "mask")
    runs = {r["variant"]: r for r in data["runs"] if r["backend"] == "acttail-export"}
    assert set(runs) == {"export htsr threshold 50%", "export uniform threshold 50%",
                         "export htsr threshold 50% mask kernel", "export uniform threshold 50% mask kernel"}
    layers = 2
    for r in runs.values():
        mask = r["kernel"] == "mask"
        # fused: q/k/v packed, o, gate/up packed, down, one SparseMatMul each; mask: standard ops only
        assert r["sparse_ops"] == (0 if mask else 4 * layers) and mask == r["variant"].endswith("mask kernel")
        assert len(r["tokens"]) == 11 and r["tokens_per_s"] > 0 and r["export_s"] > 0
        assert "--allocation " + r["allocation"] in r["export_command"]
        assert "--kernel " + r["kernel"] in r["export_command"]
    low, high = runs["export htsr threshold 50%"]["budgets"]
    assert low < 0.5 < high  # HT-SR budgets differ per projection around the target
    assert runs["export uniform threshold 50%"]["budgets"] == [0.5, 0.5]
    assert not list((tmp_path / "w").glob("*/export-*"))
    table = _bench("--table", str(tmp_path / "x.json")).stdout
    assert "| acttail-export | export htsr threshold 50% | 0.50 (htsr, the exporter's calibration) |" in table


@pytest.mark.skipif("not _builder_works()", reason="onnxruntime-genai builder not importable")
def test_benchmark_compares_the_int4_export_with_the_builders_int4_model(tmp_path, tiny_llama_dir, wikitext_valid):
    """genai-int4 (the builder's -p int4 model) and the exporter's --weights int4 folder in the same run, with the
    perplexity of both (and of the dense base) on the same validation windows; the tiny Llama has a real tokenizer."""
    data = _run(tmp_path, "q", "--sparsity", "0", "--topk-sparsity", "--backends", "genai-dense", "genai-int4", "acttail-export",
                "--export-sparsity", "0.5", "--export-allocation", "acttail", "--export-weights", "int4", "--export-perplexity",
                "--ppl-tokens", "512", "--ppl-length", "64", "--wikitext", str(wikitext_valid.parent), model=str(tiny_llama_dir))
    runs = {r["backend"]: r for r in data["runs"]}
    assert runs["genai-int4"]["variant"] == "dense int4 (builder -p int4)" and len(runs["genai-int4"]["tokens"]) == 11
    export = runs["acttail-export"]
    assert export["weights"] == "int4" and export["sparse_ops"] == 4 * 2 and "--weights int4" in export["export_command"]
    ppl = {"genai-dense": data["perplexity"]["genai-dense"], "genai-int4": data["perplexity"]["genai-int4"],
           "export": export["perplexity"]}
    for p in ppl.values():
        assert p["split"] == "valid" and p["tokens_scored"] == 8 * 63 and np.isfinite(p["perplexity"]) and p["perplexity"] > 1
    # the random tiny model is near-uniform over its 49152-token vocabulary: 4-bit weights and 50 % masks move it little
    assert abs(np.log(ppl["genai-int4"]["perplexity"] / ppl["genai-dense"]["perplexity"])) < 0.1
    table = _bench("--table", str(tmp_path / "q.json")).stdout
    assert "| genai-int4 | " in table and "| configuration | perplexity | split | tokens scored |" in table
