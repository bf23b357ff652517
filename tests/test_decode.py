"""benchmarks/decode.py: its measurement pieces on CPU with tiny models (CUDA parts skip without a GPU)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("decode_bench", REPO / "benchmarks" / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def test_latency_stats_numbers():
    out = bench.latency_stats(12.5, [1.0, 2.0, 3.0, 4.0, 10.0])
    assert out["prefill_ms"] == 12.5
    assert out["prefill_ms_samples"] == [12.5]
    # several prefills: the median, so that one run paying a one-time cost does not set the number
    assert bench.latency_stats([5.0, 31.0, 4.0, 4.5, 5.5], [1.0])["prefill_ms"] == 5.0
    assert out["decode_ms_median"] == 3.0
    assert out["decode_ms_p90"] == pytest.approx(7.6)  # numpy linear interpolation between 4 and 10
    assert out["decode_ms_mean"] == pytest.approx(4.0)
    assert out["tokens_per_s"] == pytest.approx(1000 / 3)
    assert out["decode_tokens"] == 5


@pytest.mark.parametrize("shape", ["tiny-llama", "tiny-mistral"])
def test_static_decoder_matches_eager_greedy(shape):
    model = bench.make_random_model(shape, None, torch.float32, "cpu", seed=1)
    prompt = torch.randint(3, model.config.vocab_size, (1, 17), generator=torch.Generator().manual_seed(3))
    eager = bench.torch_eager(model, prompt, 12, 0, "cpu")["tokens"]
    static = bench.torch_static(model, prompt, 12, 0, "cpu", cuda_graph=False)["tokens"]
    with torch.inference_mode():
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=13, do_sample=False,
                             pad_token_id=2)[0, prompt.shape[1]:].tolist()
    assert eager == ref
    assert static == ref


def test_calibrated_thresholds_give_the_target_sparsity():
    model = bench.make_random_model("tiny-llama", None, torch.float32, "cpu", seed=2)
    gen = torch.Generator().manual_seed(4)
    windows = torch.randint(3, 256, (6, 64), generator=gen)
    configs = bench.calibrate_configs(model, [0.0, 0.5, 0.8], windows)
    assert all(p.threshold == 0.0 for p in configs[0.0].projections)
    for s in (0.5, 0.8):
        # on the calibration windows themselves the sequential calibration hits the target
        from acttail_export.sparsify import apply_sparsity

        with torch.inference_mode(), apply_sparsity(model, configs[s], "threshold") as hooks:
            model(input_ids=windows)
            assert hooks.weighted_effective_sparsity() == pytest.approx(s, abs=0.01)
        prompt = torch.randint(3, 256, (1, 64), generator=gen)
        eff = bench.measure_sparsity(model, configs[s], prompt, 16)
        assert abs(eff["prompt"] - s) < 0.05 and abs(eff["decode"] - s) < 0.08


def test_tables_ratios():
    data = {
        "model": {"name": "m", "layers": 2, "dtype": "fp16"}, "settings": {"prompt_length": 8, "decode_tokens": 4},
        "machine": {"gpu": "X"}, "calibration": {"0.8": {"effective_sparsity": {"decode": 0.79}}},
        "runs": [
            {"backend": "ort-optimum", "variant": "dense", "sparsity": 0.0, **bench.latency_stats(5, [4.0, 4.0])},
            {"backend": "genai-dense", "variant": "dense", "sparsity": 0.0, **bench.latency_stats(5, [2.0, 2.0])},
            {"backend": "torch-cuda-graph", "variant": "dense", "sparsity": 0.0, **bench.latency_stats(5, [2.5, 2.5])},
            {"backend": "genai-fused", "variant": "fused threshold 80%", "sparsity": 0.8, "mode": "threshold",
             **bench.latency_stats(5, [1.0, 1.0])},
            {"backend": "genai-mask", "variant": "mask threshold 80%", "sparsity": 0.8, "error": "boom"},
        ],
    }
    text = bench.tables(data)
    row = next(line for line in text.splitlines() if line.startswith("| genai-fused fused threshold 80%"))
    assert row == "| genai-fused fused threshold 80% | 1000.0 | 4.00× | 2.00× | 2.50× |"
    assert "0.80 → 0.790" in text and "failed: boom" in text


def test_repeat_table_takes_ratios_within_each_run():
    def run(dense_ms, fused_ms):
        return {"model": {"name": "m", "layers": 2, "dtype": "fp32"}, "settings": {"prompt_length": 8, "decode_tokens": 4},
                "machine": {"gpu": None, "cpu": "C", "cpu_count": 2},
                "runs": [{"backend": "genai-dense", "variant": "dense", "sparsity": 0.0, **bench.latency_stats(5, [dense_ms] * 3)},
                         {"backend": "genai-fused", "variant": "fused threshold 80%", "sparsity": 0.8,
                          **bench.latency_stats(5, [fused_ms] * 3)},
                         {"backend": "genai-mask", "variant": "mask threshold 80%", "sparsity": 0.8, "error": "boom"}]}

    # a slow machine in run 2 slows both configurations: the per-run ratio stays 2
    text = bench.repeat_table([run(2.0, 1.0), run(8.0, 4.0), run(4.0, 1.0)])
    row = next(line for line in text.splitlines() if line.startswith("| genai-fused | fused threshold 80%"))
    assert row == "| genai-fused | fused threshold 80% | 1.00 | 1.00 / 4.00 / 1.00 | 5 | 2.00 / 2.00 / 4.00 | 2.00× |"
    assert "3 runs" in text and "CPU C × 2" in text and "mask" not in text


def _builder_works():
    from tests.test_optimize import _builder_works as works

    return works()


def test_benchmark_end_to_end_on_cpu(tmp_path):
    """The whole command on a tiny model: every backend runs and the dense backends agree token for token."""
    backends = ["torch-eager", "torch-cuda-graph", "ort-optimum"]
    genai = _builder_works()
    if genai:
        backends += ["genai-dense", "genai-fused"]
    out = tmp_path / "r.json"
    rc = bench.main(["--model", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--prompt-length", "24", "--decode-tokens", "10",
                     "--warmup-tokens", "1", "--calibration-windows", "3", "--sparsity", "0", "0.5", "--topk-sparsity", "0.5",
                     "--workdir", str(tmp_path / "w"), "--output", str(out), "--backends", *backends])
    assert rc == 0
    data = json.loads(out.read_text())
    runs = {(r["backend"], r["variant"]): r for r in data["runs"]}
    assert not [r for r in runs.values() if "error" in r], [r["error"] for r in runs.values() if "error" in r]
    eager = runs[("torch-eager", "dense")]["tokens"]
    assert len(eager) == 12  # the prefill token, 1 warm-up and 10 measured steps
    assert runs[("torch-static", "dense")]["tokens"] == eager
    assert runs[("ort-optimum", "dense")]["tokens"] == eager
    if genai:
        assert runs[("genai-dense", "dense")]["tokens"] == eager[:11]  # genai: the prefill token + 11 steps, the last unread
        assert runs[("genai-fused", "fused threshold 0%")]["tokens"] == eager[:11]  # threshold 0 keeps every non-zero
        assert ("genai-fused", "fused topk 50%") in runs
    assert abs(data["calibration"]["0.5"]["effective_sparsity"]["decode"] - 0.5) < 0.1
    for r in runs.values():
        assert r["decode_ms_median"] > 0 and r["tokens_per_s"] == pytest.approx(1000 / r["decode_ms_median"])


@pytest.mark.skipif("not _builder_works()", reason="onnxruntime-genai builder not importable")
def test_benchmark_packed_base_decodes_like_unpacked(tmp_path):
    """--pack: q/k/v and gate/up packed in the genai base, one SparseMatMul per input group, same tokens as apart."""
    tokens = {}
    for pack in (False, True):
        out = tmp_path / f"r{int(pack)}.json"
        rc = bench.main(["--model", "tiny-llama", "--device", "cpu", "--dtype", "fp32", "--prompt-length", "24", "--decode-tokens", "10",
                         "--warmup-tokens", "1", "--calibration-windows", "3", "--sparsity", "0.5", "--topk-sparsity", "0.5",
                         "--workdir", str(tmp_path / "w"), "--output", str(out), "--backends", "genai-dense", "genai-fused",
                         *(["--pack"] if pack else [])])
        assert rc == 0
        data = json.loads(out.read_text())
        assert data["settings"]["genai_packed"] is pack
        runs = {r["variant"]: r for r in data["runs"]}
        assert not [r for r in runs.values() if "error" in r], [r["error"] for r in runs.values() if "error" in r]
        tag = " packed" if pack else ""
        tokens[pack] = (runs[f"fused threshold 50%{tag}"]["tokens"], runs[f"fused topk 50%{tag}"]["tokens"], runs[f"dense{tag}"]["tokens"])
    graph = onnx.load(str(next((tmp_path / "w").glob("*/genai-packed/model.fused-threshold-50.onnx"))), load_external_data=False)
    layers = 2
    assert sum(n.op_type == "SparseMatMul" for n in graph.graph.node) == 4 * layers
    assert tokens[True][:2] == tokens[False][:2]  # the op's CPU kernel sums each column in the same order, packed or not
    assert tokens[True][2] == tokens[False][2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_decoder_matches_eager_on_gpu():
    model = bench.make_random_model("tiny-llama", None, torch.float16, "cuda", seed=1)
    prompt = torch.randint(3, 256, (1, 33), generator=torch.Generator().manual_seed(3)).cuda()
    eager = bench.torch_eager(model, prompt, 16, 0, "cuda")["tokens"]
    graph = bench.torch_static(model, prompt, 16, 0, "cuda", cuda_graph=True)["tokens"]
    assert graph[:8] == eager[:8]  # fp16: SDPA kernels differ between the two paths, so late flips are possible
    assert np.isfinite(bench.latency_stats(1.0, [1.0])["tokens_per_s"])
