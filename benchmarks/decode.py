"""End-to-end decode benchmark: PyTorch, the optimum ONNX export and the optimized (genai-builder) base,
dense and with ActTail masks / the fused SparseMatMul op, batch 1.

One command per model on a CUDA machine (fp16)::

    python benchmarks/decode.py --model llama2-7b --layers 8 --output docs/results/decode_llama2-7b-8l_h200.json

For each model it measures prefill of a ``--prompt-length`` token prompt and the per-token latency of
``--decode-tokens`` greedy decode steps (median, p90; tokens/s = 1000 / median ms), and the GPU memory
of the process, for

* ``torch-eager``: PyTorch, DynamicCache;
* ``torch-cuda-graph``: PyTorch, StaticCache, one decode step captured in a CUDA graph and replayed;
* ``ort-optimum``: the optimum-onnx export as the exporter writes it, ONNX Runtime CUDA EP, IO binding
  (KV cache stays on the GPU);
* ``genai-dense``: onnxruntime-genai model-builder graph (fused norms, GroupQueryAttention with rotary and
  a shared KV buffer), genai generator, with and without CUDA-graph capture;
* ``genai-mask`` / ``genai-fused``: the same graph rewritten by :func:`acttail_export.graph_rewrite.rewrite`
  (threshold mode, uniform budgets) at each ``--sparsity``;
* optionally ``ort-optimum-fused`` at ``--optimum-fused-sparsity``;
* ``genai-int4``: the builder's own 4-bit model (``-p int4``: MatMulNBits, block 32, its RTN quantizer), dense — the
  int4 model a user would otherwise deploy;
* ``acttail-export``: the folder a user gets — :func:`acttail_export.exporter.export` (default genai base, packed
  q/k/v and gate/up, fused op, thresholds calibrated by the exporter) for each ``--export-allocation`` (ActTail and
  uniform budgets) at each ``--export-sparsity``, loaded as ``og.Model(folder)`` and timed like ``genai-fused``.

Thresholds are calibrated on the model's own activations (random token windows for random-weight
models, WikiText-2 validation for SmolLM2) with the project's sequential calibration, so each
projection's kept fraction matches the target given the earlier masks; the effective sparsity is then
measured on the benchmark prompt and on the decoded tokens with the PyTorch reference.

Each ONNX Runtime configuration runs in a fresh subprocess (``--child``), so its GPU memory is its
own and a crash cannot end the run. Results are written to ``--output`` after every configuration.
``--table FILE`` prints the markdown tables of a results file.
On CPU (``--device cpu --dtype fp32``, tiny models) the same code paths run for tests.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.shapes import SHAPES as SHAPES_7B_13B  # noqa: E402

#: model shapes (random weights unless noted)
SHAPES = {
    "llama2-7b": dict(arch="llama", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, **SHAPES_7B_13B["llama2-7b"]),
    "mistral-7b": dict(arch="mistral", vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       rope_theta=1e6, sliding_window=None, **SHAPES_7B_13B["mistral-7b"]),
    "tiny-llama": dict(arch="llama", vocab_size=256, hidden_size=64, intermediate_size=160, num_attention_heads=4,
                       num_key_value_heads=2, num_hidden_layers=2, max_position_embeddings=1024, rms_norm_eps=1e-5),
    "tiny-mistral": dict(arch="mistral", vocab_size=256, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                         num_key_value_heads=1, num_hidden_layers=2, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         sliding_window=None),
}
DEFAULT_SPARSITIES = (0.0, 0.5, 0.7, 0.8, 0.9)
BACKENDS = ("torch-eager", "torch-cuda-graph", "ort-optimum", "genai-dense", "genai-mask", "genai-fused", "ort-optimum-fused",
            "genai-int4", "acttail-export")


# ----------------------------------------------------------------------------------------------
# small helpers (no torch)
# ----------------------------------------------------------------------------------------------
PREFILL_REPS = 5  # prefills timed per configuration (median reported): a single one sometimes pays a one-time cost


def latency_stats(prefill_ms: float | list[float], decode_ms: list[float]) -> dict:
    """Median / p90 / mean of per-token decode latencies, tokens/s (= 1000 / median), median of the prefill times."""
    arr = np.asarray(decode_ms, dtype=np.float64)
    med = float(np.median(arr))
    pre = np.atleast_1d(np.asarray(prefill_ms, dtype=np.float64))
    return {"prefill_ms": float(np.median(pre)), "prefill_ms_samples": [round(float(v), 3) for v in pre],
            "decode_ms_median": med, "decode_ms_p90": float(np.percentile(arr, 90)),
            "decode_ms_mean": float(arr.mean()), "decode_ms_min": float(arr.min()), "tokens_per_s": 1000.0 / med,
            "decode_tokens": int(arr.size)}


def timed_run(run, n: int, warm: int) -> tuple[dict, list[int]]:
    """``run(count) -> (prefill ms, per-step ms, tokens)``: PREFILL_REPS prefills (the last one followed by
    ``warm + n`` decode steps) -> (latency stats without the warm-up steps, tokens)."""
    extra = [run(0)[0] for _ in range(PREFILL_REPS - 1)]
    prefill, times, toks = run(warm + n)
    return latency_stats(extra + [prefill], times[warm:]), toks


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory used by process ``pid`` (default: this one) from nvidia-smi; None without a GPU."""
    pid = os.getpid() if pid is None else pid
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0] == str(pid):
            try:
                return float(parts[1])
            except ValueError:
                return None
    return None


def gpu_total_used_mb() -> float | None:
    """Memory used on GPU 0 by every process (nvidia-smi); None without a GPU."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return float(out.splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def machine_info() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        info["gpu"] = out
    except (OSError, subprocess.SubprocessError):
        info["gpu"] = None
    for mod in ("torch", "transformers", "onnx", "onnxruntime", "onnxruntime_genai", "optimum"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            info[mod] = None
    # the op library's switches (e.g. ACTTAIL_WEIGHT_CHECK=0): a run's environment is part of what it measured
    info["acttail_env"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith("ACTTAIL_")}
    return info


# ----------------------------------------------------------------------------------------------
# ONNX Runtime children (run in a subprocess; import no torch)
# ----------------------------------------------------------------------------------------------
def _threads_overlay(spec: dict) -> dict | None:
    """Session options giving every genai folder ``--threads`` intra-op threads alike (None: each folder's own)."""
    if spec.get("threads") is None:
        return None
    return {"model": {"decoder": {"session_options": {"intra_op_num_threads": int(spec["threads"])}}}}


def _child_genai(spec: dict) -> dict:
    import onnxruntime_genai as og

    from acttail_export.genai_base import genai_config

    prompt = np.load(spec["prompt"]).astype(np.int32).reshape(1, -1)
    n, warm = spec["decode_tokens"], spec["warmup_tokens"]
    t0 = time.perf_counter()
    model = og.Model(genai_config(spec["dir"], spec["filename"], spec["provider"], spec["cuda_graph"], _threads_overlay(spec)))
    load_s = time.perf_counter() - t0
    max_length = prompt.shape[1] + warm + n + 2

    def new_generator():
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False)
        return og.Generator(model, params)

    # warm-up generator: prefill + a few tokens (kernel selection, CUDA-graph capture)
    gen = new_generator()
    gen.append_tokens(prompt)
    for _ in range(min(8, n)):
        gen.generate_next_token()
        gen.get_next_tokens()
    del gen
    prefill_ms = []
    for _ in range(PREFILL_REPS):  # a fresh generator each; the last one decodes
        gen = None
        gen = new_generator()
        t = time.perf_counter()
        gen.append_tokens(prompt)
        logits = gen.get_logits()  # copies the last logits to the host: the prefill has finished
        prefill_ms.append((time.perf_counter() - t) * 1e3)
    times, tokens = [], []
    for _ in range(warm + n):
        t = time.perf_counter()
        gen.generate_next_token()
        tok = int(gen.get_next_tokens()[0])
        times.append((time.perf_counter() - t) * 1e3)
        tokens.append(tok)
    out = latency_stats(prefill_ms, times[warm:])
    out.update(load_s=load_s, tokens=tokens[: spec.get("keep_tokens", 32)], first_logit_argmax=int(np.argmax(np.asarray(logits).reshape(-1))),
               gpu_memory_mb=gpu_memory_mb(), gpu_total_used_mb=gpu_total_used_mb())
    return out


def _ort_session(path: str, provider: str, library: str | None, profile: str | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library:
        options.register_custom_ops_library(library)
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, options, providers=providers)


def _child_ort_optimum(spec: dict) -> dict:
    """optimum's graph (inputs input_ids, attention_mask, position_ids, past_key_values.*), IO binding."""
    import onnxruntime as ort

    prompt = np.load(spec["prompt"]).astype(np.int64).reshape(1, -1)
    n, warm = spec["decode_tokens"], spec["warmup_tokens"]
    device = "cuda" if spec["provider"] == "cuda" else "cpu"
    t0 = time.perf_counter()
    sess = _ort_session(spec["path"], spec["provider"], spec.get("library"))
    load_s = time.perf_counter() - t0
    inputs = {i.name: i for i in sess.get_inputs()}
    past_names = [name for name in inputs if name.startswith("past_key_values.")]
    out_names = [o.name for o in sess.get_outputs()]
    elem = np.float16 if inputs[past_names[0]].type == "tensor(float16)" else np.float32
    kv_heads, head_dim = spec["kv_heads"], spec["head_dim"]

    def empty_past():
        z = np.zeros((1, kv_heads, 0, head_dim), dtype=elem)
        return {name: ort.OrtValue.ortvalue_from_numpy(z, device, 0) for name in past_names}

    def step(ids: np.ndarray, start: int, past: dict):
        io = sess.io_binding()
        io.bind_cpu_input("input_ids", ids)
        if "attention_mask" in inputs:
            io.bind_cpu_input("attention_mask", np.ones((1, start + ids.shape[1]), dtype=np.int64))
        if "position_ids" in inputs:
            io.bind_cpu_input("position_ids", np.arange(start, start + ids.shape[1], dtype=np.int64).reshape(1, -1))
        for name, value in past.items():
            io.bind_ortvalue_input(name, value)
        for name in out_names:
            io.bind_output(name, device)
        sess.run_with_iobinding(io)
        outs = dict(zip(out_names, io.get_outputs()))
        logits = outs["logits"].numpy()
        new_past = {name.replace("present.", "past_key_values."): v for name, v in outs.items() if name.startswith("present.")}
        return int(np.argmax(logits[0, -1])), new_past

    def run(count: int):
        t = time.perf_counter()
        tok, past = step(prompt, 0, empty_past())
        prefill = (time.perf_counter() - t) * 1e3
        pos, times, toks = prompt.shape[1], [], [tok]
        for _ in range(count):
            t = time.perf_counter()
            tok, past = step(np.array([[tok]], dtype=np.int64), pos, past)
            times.append((time.perf_counter() - t) * 1e3)
            toks.append(tok)
            pos += 1
        return prefill, times, toks

    run(min(8, n))  # warm-up
    out, toks = timed_run(run, n, warm)
    out.update(load_s=load_s, tokens=toks[: spec.get("keep_tokens", 32)], gpu_memory_mb=gpu_memory_mb(),
               gpu_total_used_mb=gpu_total_used_mb())
    return out


def _child_profile(spec: dict) -> dict:
    """Placement check on a genai-builder graph run by plain ORT: one prefill + one decode step with profiling."""

    prompt = np.load(spec["prompt"]).astype(np.int64).reshape(1, -1)[:, :16]
    library = str(Path(spec["dir"]) / "libacttail_ops.so") if spec.get("fused") else None
    sess = _ort_session(str(Path(spec["dir"]) / spec["filename"]), spec["provider"], library, profile=spec["profile_prefix"])
    inputs = {i.name: i for i in sess.get_inputs()}
    elem = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32
    feeds = {"input_ids": prompt, "attention_mask": np.ones_like(prompt)}
    for name in inputs:
        if name.startswith("past_key_values."):
            feeds[name] = np.zeros((1, spec["kv_heads"], 0, spec["head_dim"]), dtype=elem)
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    feeds = {"input_ids": np.array([[int(np.argmax(outs["logits"][0, -1]))]], dtype=np.int64),
             "attention_mask": np.ones((1, prompt.shape[1] + 1), dtype=np.int64)}
    for name, value in outs.items():
        if name.startswith("present."):
            feeds[name.replace("present.", "past_key_values.")] = value
    sess.run(None, feeds)
    prof = sess.end_profiling()
    events = json.loads(Path(prof).read_text())
    nodes = [e for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    by_op: dict[str, dict[str, int]] = {}
    projection_providers: dict[str, int] = {}
    for e in nodes:
        args = e.get("args", {})
        op, prov = args.get("op_name", "?"), args.get("provider", "?")
        by_op.setdefault(op, {}).setdefault(prov, 0)
        by_op[op][prov] += 1
        name = e["name"]
        if "_proj/MatMul" in name:
            projection_providers[prov] = projection_providers.get(prov, 0) + 1
    memcpy = sum(c for op, provs in by_op.items() if "Memcpy" in op for c in provs.values())
    memcpy_nodes = sorted({e["name"].removesuffix("_kernel_time") for e in nodes if "Memcpy" in e.get("args", {}).get("op_name", "")})
    cpu_nodes = sorted({e["name"].removesuffix("_kernel_time") for e in nodes
                        if e.get("args", {}).get("provider") == "CPUExecutionProvider"})[:40]
    return {"ops_by_provider": by_op, "projection_events_by_provider": projection_providers, "memcpy_events": memcpy,
            "memcpy_nodes": memcpy_nodes, "cpu_nodes": cpu_nodes,
            "profile_file": Path(prof).name}


def _child_perplexity(spec: dict) -> dict:
    """Next-token perplexity of non-overlapping windows through a genai-builder graph run by plain ORT (empty past)."""
    windows = np.load(spec["windows"]).astype(np.int64)
    library = str(Path(spec["dir"]) / "libacttail_ops.so") if spec.get("fused") else None
    sess = _ort_session(str(Path(spec["dir"]) / spec["filename"]), spec["provider"], library)
    inputs = {i.name: i for i in sess.get_inputs()}
    elem = np.float16 if "float16" in inputs["past_key_values.0.key"].type else np.float32
    nll, count = 0.0, 0
    t = time.perf_counter()
    for w in windows:
        feeds = {"input_ids": w[None, :], "attention_mask": np.ones((1, w.size), dtype=np.int64)}
        for name in inputs:
            if name.startswith("past_key_values."):
                feeds[name] = np.zeros((1, spec["kv_heads"], 0, spec["head_dim"]), dtype=elem)
        logits = sess.run(["logits"], feeds)[0][0, :-1].astype(np.float64)
        m = logits.max(axis=-1, keepdims=True)
        logz = (m[:, 0] + np.log(np.exp(logits - m).sum(axis=-1)))
        nll += float((logz - logits[np.arange(w.size - 1), w[1:]]).sum())
        count += w.size - 1
    return {"perplexity": float(np.exp(nll / count)), "tokens_scored": count, "windows": int(len(windows)),
            "seconds": time.perf_counter() - t, "provider": spec["provider"], "graph": spec["filename"]}


#: CUDA kernels of the projections in a CUPTI profile, by whose op launched them (substrings of the demangled names).
#: Ours: every kernel in the acttail namespace (csrc/sparse_matmul*/, csrc/common/cuda/: SplitKGemv, MaskedGemm,
#: NBitsGemv, NBitsClusterGemv, PrefillPrep, StoreChunk, TopKSelect, MaskRows, SwiGlu, ScratchIsZero), plus the names
#: themselves in case a profiler shortens them. ONNX Runtime's MatMulNBits (CUDA EP): its 4-bit GEMV
#: (MatMulFloat4BitsKernelM1 in onnxruntime-gpu 1.31.1, MatMulFloatInt4Kernel in older releases), the dequantize + GEMM
#: path of prefill, and the fpA_intB weight-only kernels. In genai's ``-p int4`` model the lm_head is a MatMulNBits too
#: (129 calls per token: see ``last_step``). Everything else (attention, norms, rotary, elementwise, lm_head of a float graph, sampling, copies) is
#: "other"; the full kernel list is recorded so that the classification can be checked.
ACTTAIL_KERNELS = ("acttail::", "SplitKGemvKernel", "SparseGemv", "MaskedGemm", "NBitsGemvKernel", "NBitsClusterGemvKernel",
                   "PrefillPrepKernel", "StoreChunkKernel", "TopKSelect", "MaskRows", "SwiGluKernel", "ScratchIsZeroKernel",
                   "FlagNonFiniteKernel")
MATMUL_NBITS_KERNELS = ("MatMulFloat4Bits", "MatMulFloat8Bits", "MatMulFloatInt4", "MatMul4Bits", "MatMulNBits", "matmul_nbits",
                        "Dequantize", "fpA_intB", "weight_only", "weightOnly")


def kernel_class(name: str) -> str:
    """"acttail" (our ops' kernels), "matmul_nbits" (ONNX Runtime's MatMulNBits) or "other"."""
    if any(x in name for x in ACTTAIL_KERNELS):
        return "acttail"
    if any(x in name for x in MATMUL_NBITS_KERNELS):
        return "matmul_nbits"
    return "other"


def cupti_split(c: dict) -> dict:
    """Projection / other kernel ms and projection calls per token of a ``cupti`` result, classified again from its
    kernel list with the current :func:`kernel_class` when that list holds every kernel (files recorded before a
    kernel name was known); else as recorded."""
    top, total = c.get("top_kernels", []), c["gpu_kernel_ms_per_token"]
    if top and "class" in top[0] and abs(sum(k["ms_per_token"] for k in top) - total) <= 1e-6 * max(1.0, total):
        proj = [k for k in top if kernel_class(k["name"]) != "other"]
        p = sum(k["ms_per_token"] for k in proj)
        return {"projection_kernel_ms_per_token": p, "projection_calls_per_token": sum(k["calls_per_token"] for k in proj),
                "other_kernel_ms_per_token": total - p}
    return {k: c.get(k, float("nan")) for k in ("projection_kernel_ms_per_token", "projection_calls_per_token", "other_kernel_ms_per_token")}


def _child_cupti(spec: dict) -> dict:
    """GPU kernel time per decode token (CUPTI through torch.profiler, which sees ORT's kernels), genai runtime, no CUDA
    graph; split into the projections' kernels (:func:`kernel_class`) and the rest, with the kernel sequence of the last
    decode step."""
    import onnxruntime_genai as og
    import torch
    from torch.profiler import ProfilerActivity, profile

    from acttail_export.genai_base import genai_config

    prompt = np.load(spec["prompt"]).astype(np.int32).reshape(1, -1)
    steps = spec.get("steps", 32)
    model = og.Model(genai_config(spec["dir"], spec["filename"], spec["provider"], False, _threads_overlay(spec)))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt.shape[1] + steps + 16, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(prompt)
    for _ in range(8):
        gen.generate_next_token()
        gen.get_next_tokens()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU][: 1 if torch.cuda.is_available() else 2]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            gen.generate_next_token()
            gen.get_next_tokens()
        wall = (time.perf_counter() - t) * 1e3 / steps
    kernels = []
    for evt in prof.key_averages():
        dev = getattr(evt, "device_time_total", None)
        if dev is None:
            dev = getattr(evt, "cuda_time_total", 0)
        if dev:
            kernels.append((evt.key, dev / 1e3 / steps, evt.count / steps))
    kernels.sort(key=lambda k: -k[1])
    total = sum(k[1] for k in kernels)
    sparse = sum(k[1] for k in kernels if any(x in k[0] for x in ("SplitKGemv", "SparseGemv", "MaskedGemm", "TopKSelect")))
    by_class: dict[str, dict[str, float]] = {}
    for name, ms, calls in kernels:
        c = by_class.setdefault(kernel_class(name), {"ms_per_token": 0.0, "calls_per_token": 0.0})
        c["ms_per_token"] += ms
        c["calls_per_token"] += calls
    proj = [by_class.get(c, {"ms_per_token": 0.0, "calls_per_token": 0.0}) for c in ("acttail", "matmul_nbits")]
    out = {"wall_ms_per_token": wall, "gpu_kernel_ms_per_token": total, "kernels_per_token": sum(k[2] for k in kernels),
           "sparse_op_kernel_ms_per_token": sparse,
           "projection_kernel_ms_per_token": sum(c["ms_per_token"] for c in proj),
           "projection_calls_per_token": sum(c["calls_per_token"] for c in proj),
           "other_kernel_ms_per_token": by_class.get("other", {}).get("ms_per_token", 0.0),
           "by_class": by_class, "graph": spec["filename"], "steps": steps,
           "top_kernels": [{"name": k[0][:160], "class": kernel_class(k[0]), "ms_per_token": k[1], "calls_per_token": k[2]}
                           for k in kernels[:60]]}
    # the kernels of the last decode step in launch order (each step launches the same sequence): which projection
    # call costs what, e.g. the lm_head of a graph that quantizes it too
    try:
        from torch.autograd import DeviceType

        evs = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA and e.time_range.elapsed_us() > 0),
                     key=lambda e: e.time_range.start)
        per_step = len(evs) // steps
        if per_step and len(evs) % steps == 0:
            out["last_step"] = [[e.name[:100], kernel_class(e.name), round(e.time_range.elapsed_us(), 2)] for e in evs[-per_step:]]
        else:
            out["last_step_note"] = f"{len(evs)} kernel events over {steps} steps: no equal split"
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        out["last_step_note"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return out


def child_main(spec: dict) -> None:
    kind = spec["kind"]
    try:
        result = {"genai": _child_genai, "ort-optimum": _child_ort_optimum, "profile": _child_profile,
                  "perplexity": _child_perplexity, "cupti": _child_cupti}[kind](spec)
    except Exception as exc:  # noqa: BLE001 - reported to the parent as a failed configuration
        result = {"error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    print("@@RESULT@@" + json.dumps(result), flush=True)


def run_child(spec: dict, timeout: float, env: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - t
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("@@RESULT@@"):
            result = json.loads(line[len("@@RESULT@@"):])
            result["child_wall_s"] = wall
            return result
    tail = (proc.stdout + proc.stderr)[-1500:]
    return {"error": f"child exited with {proc.returncode} without a result: {tail}"}


# ----------------------------------------------------------------------------------------------
# PyTorch side
# ----------------------------------------------------------------------------------------------
def make_random_model(shape: str, layers: int | None, dtype, device: str, seed: int = 0):
    import torch
    import transformers

    spec = dict(SHAPES[shape])
    arch = spec.pop("arch")
    if layers:
        spec["num_hidden_layers"] = layers
    cls_cfg = transformers.LlamaConfig if arch == "llama" else transformers.MistralConfig
    cls = transformers.LlamaForCausalLM if arch == "llama" else transformers.MistralForCausalLM
    cfg = cls_cfg(tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **spec)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(cfg).to(dtype)
    return model.eval()


def save_random_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2", unk_token="t0").save_pretrained(folder)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def torch_eager(model, prompt, n: int, warm: int, device: str) -> dict:
    import torch

    def run(count):
        with torch.inference_mode():
            sync(device)
            t = time.perf_counter()
            out = model(input_ids=prompt, use_cache=True)
            tok = out.logits[0, -1].argmax()
            toks = [int(tok)]
            prefill = (time.perf_counter() - t) * 1e3
            past, times = out.past_key_values, []
            for _ in range(count):
                t = time.perf_counter()
                out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
                past = out.past_key_values
                tok = out.logits[0, -1].argmax()
                toks.append(int(tok))  # host sync, as a generation loop needs the token
                times.append((time.perf_counter() - t) * 1e3)
        return prefill, times, toks

    run(min(8, n))
    return _timed_torch_run(run, n, warm, device)


def _timed_torch_run(run, n: int, warm: int, device: str) -> dict:
    """Time ``run(warm + n)`` after its warm-up: latency stats, first tokens, GPU memory."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out, toks = timed_run(run, n, warm)
    out["tokens"] = toks[:32]
    if device.startswith("cuda"):
        out["torch_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        out["gpu_memory_mb"] = gpu_memory_mb()
    return out


class StaticDecoder:
    """Greedy decoding with a StaticCache; one decode step (model + argmax) optionally replayed from a CUDA graph.

    The decode step gets a prepared 4-D additive attention mask (transformers returns a 4-D mask as is),
    so no mask is built from tensor values inside the step: it is capturable.
    """

    def __init__(self, model, max_len: int, device: str, cuda_graph: bool):
        import torch
        from transformers import StaticCache

        self.model, self.max_len, self.device, self.cuda_graph = model, max_len, device, cuda_graph
        dtype = next(model.parameters()).dtype
        self.cache = StaticCache(config=model.config, max_cache_len=max_len, max_batch_size=1, device=device, dtype=dtype)
        self.ids = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.cpos = torch.zeros((1,), dtype=torch.long, device=device)
        self.mask = torch.full((1, 1, 1, max_len), torch.finfo(dtype).min, dtype=dtype, device=device)
        self.next = torch.zeros((), dtype=torch.long, device=device)
        self.graph = None

    def _step(self):
        out = self.model(input_ids=self.ids, position_ids=self.pos, cache_position=self.cpos, attention_mask=self.mask,
                         past_key_values=self.cache, use_cache=True)
        self.next.copy_(out.logits[0, -1].argmax())

    def prefill(self, prompt) -> int:
        import torch

        self.cache.reset()
        length = prompt.shape[1]
        self.mask.fill_(torch.finfo(self.mask.dtype).min)
        self.mask[..., :length] = 0
        with torch.inference_mode():
            out = self.model(input_ids=prompt, cache_position=torch.arange(length, device=self.device),
                             past_key_values=self.cache, use_cache=True)
            self.next.copy_(out.logits[0, -1].argmax())
        self.length = length
        return int(self.next)

    def capture(self) -> None:
        """Capture the decode step (after a prefill: the cache is initialized)."""
        import torch

        if not self.cuda_graph:
            return
        self._set_position(self.length)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self._step()

    def _set_position(self, p: int) -> None:
        self.pos.fill_(p)
        self.cpos.fill_(p)
        self.mask[..., p] = 0

    def decode(self) -> int:
        import torch

        if self.length >= self.max_len:
            raise RuntimeError("static cache is full")
        self.ids.copy_(self.next.view(1, 1))
        self._set_position(self.length)
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.inference_mode():
                self._step()
        self.length += 1
        return int(self.next)


def torch_static(model, prompt, n: int, warm: int, device: str, cuda_graph: bool) -> dict:
    import torch

    dec = StaticDecoder(model, prompt.shape[1] + warm + n + 16, device, cuda_graph)

    @torch.inference_mode()
    def run(count, capture=False):
        sync(device)
        t = time.perf_counter()
        toks = [dec.prefill(prompt)]
        prefill = (time.perf_counter() - t) * 1e3
        if capture:
            dec.capture()
            dec.prefill(prompt)  # capture wrote into the cache at the next position; start over
        times = []
        for _ in range(count):
            t = time.perf_counter()
            toks.append(dec.decode())
            times.append((time.perf_counter() - t) * 1e3)
        return prefill, times, toks

    run(min(8, n), capture=True)
    return _timed_torch_run(run, n, warm, device)


def calibrate_configs(model, sparsities, windows) -> dict:
    """Uniform threshold configs per sparsity, calibrated sequentially on ``windows``; 0 -> threshold 0 (op kept)."""
    from acttail_export.allocation import build_config
    from acttail_export.calibration import calibrate_many

    configs = {}
    for s in sparsities:
        config = build_config(model, float(s), allocation="uniform", mode="threshold")
        if s > 0:
            calibrate_many(model, None, [config], windows=windows, sequential=True, progress=False)
        else:
            for p in config.projections:
                p.threshold = 0.0
        configs[float(s)] = config
    return configs


def measure_sparsity(model, config, prompt, n: int) -> dict:
    """Effective (parameter-weighted) sparsity of the PyTorch reference on the prompt and on n decoded tokens."""
    import torch

    from acttail_export.sparsify import apply_sparsity

    with torch.inference_mode(), apply_sparsity(model, config, "threshold") as hooks:
        out = model(input_ids=prompt, use_cache=True)
        prefill = hooks.weighted_effective_sparsity()
        hooks.reset()
        past, tok = out.past_key_values, out.logits[0, -1].argmax()
        for _ in range(n):
            out = model(input_ids=tok.view(1, 1), past_key_values=past, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
        decode = hooks.weighted_effective_sparsity()
    return {"prompt": prefill, "decode": decode}


# ----------------------------------------------------------------------------------------------
# orchestration
# ----------------------------------------------------------------------------------------------
class Results:
    def __init__(self, path: Path | None, header: dict):
        self.path, self.data = path, dict(header, runs=[])

    def add(self, backend: str, variant: str, sparsity: float | None, result: dict, **extra) -> None:
        row = {"backend": backend, "variant": variant, "sparsity": sparsity, **extra, **result}
        self.data["runs"].append(row)
        msg = result.get("error") or (f"prefill {result['prefill_ms']:.1f} ms, decode median {result['decode_ms_median']:.3f} ms "
                                      f"p90 {result['decode_ms_p90']:.3f} ms, {result['tokens_per_s']:.1f} tok/s, "
                                      f"mem {result.get('gpu_memory_mb')}")
        print(f"[{time.strftime('%H:%M:%S')}] {backend:18s} {variant:28s} {msg}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--table", nargs="+", help="print the markdown tables of a results JSON and exit; several JSONs of repeated "
                    "runs: the median over the runs of every configuration, speedups taken within each run")
    ap.add_argument("--plot", help="with --table: write a PNG of decode speedup vs sparsity (ideal line 1/(1-s))")
    ap.add_argument("--model", default="llama2-7b", help=f"one of {', '.join(SHAPES)} (random weights) or smollm2 / an HF folder")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers of a random-weight shape (default: the shape's)")
    ap.add_argument("--sparsity", type=float, nargs="+", default=list(DEFAULT_SPARSITIES))
    ap.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    ap.add_argument("--topk-sparsity", type=float, nargs="*", default=[0.5, 0.8, 0.9], help="fused top-k variants")
    ap.add_argument("--optimum-fused-sparsity", type=float, nargs="*", default=[0.8])
    ap.add_argument("--export-sparsity", type=float, nargs="*", default=[0.5, 0.8], help="acttail-export: target sparsities")
    ap.add_argument("--export-allocation", nargs="*", default=["acttail", "uniform"],
                    choices=("acttail", "htsr", "uniform", "teal-greedy", "acttail-greedy"),
                    help="acttail-export: budget allocations (ActTail: the exporter's default)")
    ap.add_argument("--export-mode", choices=("threshold", "topk"), default="threshold", help="acttail-export: mask mode")
    ap.add_argument("--export-validate", action="store_true", help="acttail-export: run the exporter's validation too")
    ap.add_argument("--export-weights", choices=("float", "int4"), default="float",
                    help="acttail-export: projection weights (float: the --dtype; int4: --weights int4, block 32)")
    from acttail_export.quantize import WEIGHT_QUANTIZERS

    # mse (data-free) by default: the exporter's default (gptq-mse-act) adds a Hessian pass over the calibration windows
    # to every 4-bit export; the weights' values do not change the timings
    ap.add_argument("--export-quantizer", choices=WEIGHT_QUANTIZERS, default="mse", help="acttail-export --weights int4: quantizer")
    ap.add_argument("--export-kernel", nargs="+", default=["fused"], choices=("fused", "mask"),
                    help="acttail-export: one folder per kernel (--kernel; default fused)")
    ap.add_argument("--export-lm-head", nargs="*", default=[], choices=("float", "int8"),
                    help="acttail-export --weights int4: one folder per lm_head (--lm-head; default: the exporter's, "
                         "int8 on --device cpu)")
    ap.add_argument("--export-perplexity", action="store_true",
                    help="perplexity of every acttail-export folder, genai-int4 and genai-dense on --ppl-split (pretrained models)")
    ap.add_argument("--ppl-split", choices=("valid", "test"), default="valid",
                    help="WikiText-2 split of --export-perplexity (default valid: a comparison, not a released number)")
    ap.add_argument("--export-margin", type=float, default=0.0,
                    help="acttail-export: start no export with fewer seconds than this left before --deadline")
    ap.add_argument("--ab-env", nargs="*", default=[], metavar="NAME=VALUE",
                    help="acttail-export: time each folder again with these environment variables set in the child (an "
                         "A/B of the same folder in the same call, e.g. ACTTAIL_WEIGHT_CHECK=0), alternating with "
                         "plain runs --ab-repeats times")
    ap.add_argument("--ab-repeats", type=int, default=1, help="with --ab-env: A/B pairs after the first plain run")
    ap.add_argument("--keep-exports", action="store_true", help="acttail-export: keep each folder (default: deleted after "
                    "its run, a 7B folder is 13 GB)")
    ap.add_argument("--cuda-graph", choices=("on", "off", "both"), default="both", help="genai runs with / without CUDA graphs")
    ap.add_argument("--threads", type=int, default=1,
                    help="genai backends: intra-op threads of every folder's session alike (default 1: onnxruntime-genai's "
                         "own default, as in every run recorded before this flag; 0: ONNX Runtime's choice, one per core); "
                         "plain ONNX Runtime sessions (ort-optimum, perplexity, profiles) keep ONNX Runtime's choice")
    ap.add_argument("--prompt-length", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--warmup-tokens", type=int, default=4, help="decode steps dropped before the measured ones")
    ap.add_argument("--calibration-windows", type=int, default=8)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    ap.add_argument("--workdir", default="runs/decode", help="scratch folder for the models and graphs (default: runs/decode)")
    ap.add_argument("--output", help="results JSON (written after every configuration)")
    ap.add_argument("--packed-qkv", action="store_true", help="also time the builder's default dense graph (q/k/v packed)")
    ap.add_argument("--pack", action="store_true", help="build the genai base with q/k/v and gate/up packed (builder "
                    "fuse_qkv, fuse_mlp_gate_up): dense, mask and fused variants all run on it, one mask / SparseMatMul "
                    "per input group (the uniform configs give the members equal thresholds)")
    ap.add_argument("--no-swiglu-fold", action="store_true", help="fused variants keep the builder's Split / Sigmoid / Mul / "
                    "Mul in front of the down op instead of activation=\"swiglu\" (an A/B of the fold; --pack only: an "
                    "unpacked base has nothing to fold)")
    ap.add_argument("--cupti", action="store_true", help="CUDA: after timing genai-dense (its last graph mode), genai-int4 and "
                    "each acttail-export folder, a CUPTI split of the same graph (genai, no CUDA graph, 32 decode steps): GPU "
                    "kernel ms per token, the projections' kernels (MatMulNBits / our ops) and the rest, stored as the row's "
                    "\"cupti\"")
    ap.add_argument("--profile", action="store_true", help="ORT profiling placement check of the fused graph at the highest sparsity")
    ap.add_argument("--deadline", type=float, default=0, help="skip the remaining configurations after this many seconds (0: none)")
    ap.add_argument("--child-timeout", type=float, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--wikitext", default=os.environ.get("ACTTAIL_WIKITEXT_DIR"),
                    help="(default $ACTTAIL_WIKITEXT_DIR) folder with wiki.valid.raw (calibration of pretrained models) and wiki.test.raw")
    ap.add_argument("--perplexity", type=float, default=None, metavar="SPARSITY",
                    help="quality check: WikiText-2 test perplexity of the fused threshold graph at SPARSITY, "
                         "fp16 on ORT CUDA vs the same config in an fp32 base on ORT CPU (pretrained models)")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--ppl-length", type=int, default=1024)
    args = ap.parse_args(argv)
    if any("=" not in v or not v.split("=", 1)[0] for v in args.ab_env):
        ap.error("--ab-env takes NAME=VALUE pairs, e.g. --ab-env ACTTAIL_WEIGHT_CHECK=0")
    if args.ab_repeats < 1:
        ap.error(f"--ab-repeats must be at least 1, got {args.ab_repeats}")
    if args.export_lm_head and args.export_weights != "int4":
        ap.error("--export-lm-head applies to --export-weights int4 (float exports keep a float lm_head)")
    if args.child:
        child_main(json.loads(args.child))
        return 0
    if args.table:
        datas = [json.loads(Path(f).read_text()) for f in args.table]
        print(repeat_table(datas) if len(datas) > 1 else tables(datas[0]))
        if args.plot:
            plot(datas, args.plot)
        return 0
    return run_benchmark(args)


def run_benchmark(args) -> int:
    import torch

    from acttail_export import genai_base

    start = time.perf_counter()
    args._start = start

    def out_of_time(margin: float = 0.0) -> bool:
        return bool(args.deadline) and time.perf_counter() - start > args.deadline - margin

    device, provider = args.device, ("cuda" if args.device.startswith("cuda") else "cpu")
    dtype = torch.float16 if args.dtype == "fp16" else torch.float32
    tag = Path(args.model).name.removesuffix(".gguf") if args.model not in SHAPES else args.model
    work = Path(args.workdir) / f"{tag}-{args.layers or 'all'}-{args.dtype}"
    work.mkdir(parents=True, exist_ok=True)
    hf_dir, optimum_dir, genai_dir = work / "hf", work / "optimum", work / ("genai-packed" if args.pack else "genai")
    packed_tag = " packed" if args.pack else ""

    # --- model ------------------------------------------------------------------------------
    t = time.perf_counter()
    if args.model in SHAPES:
        model = make_random_model(args.model, args.layers, dtype, device, args.seed)
        vocab = model.config.vocab_size
        gen = torch.Generator().manual_seed(args.seed + 1)
        prompt = torch.randint(3, vocab, (1, args.prompt_length), generator=gen)
        windows = torch.randint(3, vocab, (args.calibration_windows, args.prompt_length), generator=gen)
        tokenizer = None
        weights = "random (transformers' init, std 0.02)"
    else:
        from acttail_export.data import load_windows
        from acttail_export.modeling import default_model_path, load_model

        ref = default_model_path() if args.model == "smollm2" else args.model  # the bundled SmolLM2-135M GGUF
        model, tokenizer = load_model(ref, dtype=args.dtype, device=device)
        windows = load_windows(tokenizer, Path(args.wikitext) / "wiki.valid.raw", args.prompt_length, samples=args.calibration_windows)
        prompt = load_windows(tokenizer, Path(args.wikitext) / "wiki.test.raw", args.prompt_length, samples=1)[:1].clone()
        weights = "pretrained"
    prompt = prompt.to(device)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    header = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(),
        "model": {"name": args.model, "weights": weights, "architecture": type(model).__name__, "layers": cfg.num_hidden_layers,
                  "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
                  "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                  "vocab_size": cfg.vocab_size, "parameters": sum(p.numel() for p in model.parameters()), "dtype": args.dtype},
        "settings": {"prompt_length": args.prompt_length, "decode_tokens": args.decode_tokens, "warmup_tokens": args.warmup_tokens,
                     "batch": 1, "mode": "threshold", "allocation": "uniform", "calibration_windows": args.calibration_windows,
                     "device": device, "genai_packed": bool(args.pack), "swiglu_fold": not args.no_swiglu_fold,
                     "genai_intra_op_threads": args.threads},
        "timings_s": {},
    }
    results = Results(Path(args.output) if args.output else None, header)
    timings = results.data["timings_s"]
    timings["model"] = time.perf_counter() - t
    print(f"model {args.model}: {header['model']['parameters'] / 1e9:.3f} B parameters, {cfg.num_hidden_layers} layers", flush=True)

    # --- calibration ----------------------------------------------------------------------------
    t = time.perf_counter()
    sparsities = sorted(set(args.sparsity))
    configs = calibrate_configs(model, sparsities, windows.to(device))
    calib = {}
    for s, config in configs.items():
        entry = {"thresholds_mean": float(np.mean([p.threshold for p in config.projections]))}
        if s > 0:
            entry["effective_sparsity"] = measure_sparsity(model, config, prompt, min(args.decode_tokens, 64))
        calib[str(s)] = entry
        print(f"sparsity {s}: {entry}", flush=True)
    results.data["calibration"] = calib
    timings["calibration"] = time.perf_counter() - t
    results.save()

    n, warm = args.decode_tokens, args.warmup_tokens
    # --- PyTorch ----------------------------------------------------------------------------------
    if "torch-eager" in args.backends:
        try:
            results.add("torch-eager", "dense", 0.0, torch_eager(model, prompt, n, warm, device))
        except Exception as exc:  # noqa: BLE001
            results.add("torch-eager", "dense", 0.0, {"error": f"{type(exc).__name__}: {exc}"})
    if "torch-cuda-graph" in args.backends:
        graph = provider == "cuda"
        try:
            results.add("torch-cuda-graph" if graph else "torch-static", "dense", 0.0,
                        torch_static(model, prompt, n, warm, device, cuda_graph=graph), cuda_graph=graph)
        except Exception as exc:  # noqa: BLE001
            results.add("torch-cuda-graph", "dense", 0.0, {"error": f"{type(exc).__name__}: {str(exc)[:1500]}"})
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    np.save(work / "prompt.npy", prompt.cpu().numpy())
    common = {"prompt": str(work / "prompt.npy"), "decode_tokens": n, "warmup_tokens": warm, "provider": provider,
              "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim, "threads": args.threads}

    # --- exports: optimum (as the exporter writes it) and the genai-builder base -----------------------
    want_optimum = {"ort-optimum", "ort-optimum-fused"} & set(args.backends)
    optimum_ok = False
    if want_optimum and not out_of_time():
        t = time.perf_counter()
        try:
            from acttail_export.onnx_export import export_base_onnx

            if not (optimum_dir / "model.onnx").is_file():
                export_base_onnx(model, optimum_dir, dtype=args.dtype, device="cuda" if provider == "cuda" else "cpu")
            optimum_ok = True
        except Exception as exc:  # noqa: BLE001
            results.add("ort-optimum", "dense", 0.0, {"error": f"export: {type(exc).__name__}: {str(exc)[:1500]}"})
        timings["optimum_export"] = time.perf_counter() - t
    want_genai = {"genai-dense", "genai-mask", "genai-fused"} & set(args.backends)
    if (want_genai or {"genai-int4", "acttail-export"} & set(args.backends)) and not (hf_dir / "config.json").is_file():
        save_hf(model, tokenizer, hf_dir)  # the builder's and the exporter's input
    if want_genai and not out_of_time():
        t = time.perf_counter()
        try:
            if not (genai_dir / "model.onnx").is_file():
                genai_base.build_base(hf_dir, genai_dir, dtype=args.dtype, execution_provider=provider,
                                    fuse_qkv=args.pack, fuse_gate_up=args.pack)
        except Exception as exc:  # noqa: BLE001
            results.add("genai-dense", "dense", 0.0, {"error": f"build: {type(exc).__name__}: {str(exc)[:2000]}"})
            want_genai = set()
        timings["genai_build"] = time.perf_counter() - t
    if provider == "cuda":  # the ORT children get the GPU to themselves (the model is only needed for shapes now)
        model.to("cpu")
        torch.cuda.empty_cache()
        results.data["gpu_baseline_used_mb"] = gpu_total_used_mb()
    if optimum_ok and "ort-optimum" in args.backends and not out_of_time():
        results.add("ort-optimum", "dense", 0.0, run_child(dict(common, kind="ort-optimum", path=str(optimum_dir / "model.onnx")),
                                                           args.child_timeout), io_binding=True)
    if optimum_ok and "ort-optimum-fused" in args.backends:
        import onnx

        from acttail_export.graph_rewrite import rewrite
        from acttail_export.ops import get_library_path

        for s in args.optimum_fused_sparsity:
            if float(s) not in configs or out_of_time():
                continue
            try:
                graph = onnx.load(str(optimum_dir / "model.onnx"), load_external_data=False)
                rewrite(graph, configs[float(s)], mode="threshold", kernel="fused")
                path = optimum_dir / f"model.fused-{int(round(s * 100))}.onnx"
                onnx.save_model(graph, str(path))
                r = run_child(dict(common, kind="ort-optimum", path=str(path), library=get_library_path()), args.child_timeout)
            except Exception as exc:  # noqa: BLE001
                r = {"error": f"rewrite: {type(exc).__name__}: {exc}"}
            results.add("ort-optimum-fused", f"fused threshold {s:.0%}", float(s), r, io_binding=True, mode="threshold")
    graph_modes = {"on": [True], "off": [False], "both": [False, True]}[args.cuda_graph] if provider == "cuda" else [False]
    best_graph = graph_modes[-1]
    if "genai-dense" in want_genai:
        for cg in graph_modes:
            if out_of_time():
                break
            r = run_child(dict(common, kind="genai", dir=str(genai_dir), filename="model.onnx", cuda_graph=cg), args.child_timeout)
            if args.cupti and provider == "cuda" and cg == graph_modes[-1]:
                r["cupti"] = cupti_run(common, genai_dir, "model.onnx", args.child_timeout)
            results.add("genai-dense", "dense" + packed_tag + (" +cuda-graph" if cg else ""), 0.0, r, cuda_graph=cg)
            if cg and "error" in r:
                best_graph = False
    ppl = perplexity_runner(args, tokenizer, work, common)
    if "genai-dense" in want_genai and ppl is not None:
        results.data.setdefault("perplexity", {})["genai-dense"] = ppl(genai_dir, "model.onnx", fused=False)
    if "genai-int4" in args.backends and not out_of_time():
        t = time.perf_counter()
        int4_dir = work / "genai-int4"
        try:
            if not (int4_dir / "model.onnx").is_file():
                genai_base.build_base(hf_dir, int4_dir, dtype="int4", execution_provider=provider, fuse_qkv=True, fuse_gate_up=True)
            r = run_child(dict(common, kind="genai", dir=str(int4_dir), filename="model.onnx", cuda_graph=best_graph), args.child_timeout)
            if args.cupti and provider == "cuda":
                r["cupti"] = cupti_run(common, int4_dir, "model.onnx", args.child_timeout)
            if ppl is not None:
                results.data.setdefault("perplexity", {})["genai-int4"] = ppl(int4_dir, "model.onnx", fused=False)
        except Exception as exc:  # noqa: BLE001
            r = {"error": f"build: {type(exc).__name__}: {str(exc)[:1500]}"}
        results.add("genai-int4", "dense int4 (builder -p int4)" + (" +cuda-graph" if best_graph else ""), 0.0, r, cuda_graph=best_graph)
        timings["genai_int4"] = time.perf_counter() - t
    # most important first, in case --deadline cuts the run short: fused threshold, placement check, mask, fused top-k
    order = sorted(sparsities, key=lambda s: (s != 0.8, s != 0.5, s != 0.9, -s))
    variants: list = [("fused", "threshold", s, configs[s]) for s in order if "genai-fused" in want_genai]
    if args.profile and "genai-fused" in want_genai:
        variants.append(("profile", "threshold", max(sparsities), None))
    variants += [("mask", "threshold", s, configs[s]) for s in order if "genai-mask" in want_genai]
    if "genai-fused" in want_genai:
        from acttail_export.allocation import build_config

        variants += [("fused", "topk", float(s), build_config(model, float(s), allocation="uniform", mode="topk"))
                     for s in args.topk_sparsity]
    graph_ok: dict = {}
    for kernel, mode, s, config in variants:
        if kernel == "profile":
            if out_of_time():
                continue
            name = f"model.fused-threshold-{int(round(s * 100))}.onnx"
            if (genai_dir / name).is_file():
                prof = run_child(dict(common, kind="profile", dir=str(genai_dir), filename=name, fused=True,
                                      profile_prefix=str(work / "ort_profile")), args.child_timeout)
                results.data["placement_check"] = dict(prof, graph=name)
                print("placement:", json.dumps(prof)[:1500], flush=True)
                results.save()
            if provider == "cuda":
                cupti = {}
                for graph in ("model.onnx", "model.fused-threshold-80.onnx"):
                    if (genai_dir / graph).is_file() and not out_of_time():
                        cupti[graph] = run_child(dict(common, kind="cupti", dir=str(genai_dir), filename=graph), args.child_timeout)
                        print("cupti:", graph, json.dumps(cupti[graph])[:600], flush=True)
                results.data["cupti"] = cupti
                results.save()
            continue
        if out_of_time():
            print("deadline reached: skipping the remaining configurations", flush=True)
            break
        tag = f"{kernel}-{mode}-{int(round(s * 100))}"
        name, label, backend = f"model.{tag}.onnx", f"{kernel} {mode} {s:.0%}{packed_tag}", f"genai-{kernel}"
        try:
            genai_base.write_variant(genai_dir, config, name, mode=mode, kernel=kernel, fuse_activation=not args.no_swiglu_fold)
        except Exception as exc:  # noqa: BLE001
            results.add(backend, label, s, {"error": f"rewrite: {type(exc).__name__}: {exc}"}, mode=mode)
            continue
        use_graph = best_graph and graph_ok.get((kernel, mode), True)
        r = run_child(dict(common, kind="genai", dir=str(genai_dir), filename=name, cuda_graph=use_graph), args.child_timeout)
        if use_graph and "error" in r:  # retry without graph capture; later variants of this kind skip the graph
            graph_ok[(kernel, mode)] = False
            results.add(backend, label + " +cuda-graph", s, r, cuda_graph=True, mode=mode)
            r = run_child(dict(common, kind="genai", dir=str(genai_dir), filename=name, cuda_graph=False), args.child_timeout)
            results.add(backend, label, s, r, cuda_graph=False, mode=mode)
        else:
            results.add(backend, label + (" +cuda-graph" if use_graph else ""), s, r, cuda_graph=use_graph, mode=mode)
    if "acttail-export" in args.backends and not out_of_time():
        if args.model in SHAPES:  # random weights: calibration text = random token windows in the random tokenizer's words
            calibration = work / "calibration.txt"
            calibration.write_text("\n".join(" ".join(f"t{int(i)}" for i in w) for w in windows.cpu().numpy()) + "\n")
            ref = str(hf_dir)
        else:
            calibration = Path(args.wikitext) / "wiki.valid.raw"
            ref = str(ref)  # the model reference loaded above (the bundled SmolLM2 GGUF, a folder or a Hub id)
        timings["exports"] = export_folders(args, ref, calibration, work, common, results, best_graph, ppl, out_of_time)
    if args.packed_qkv and not args.pack and "genai-dense" in want_genai and not out_of_time(margin=150):  # a second builder run
        # the builder's default layout (q/k/v packed into one MatMul): a dense baseline only, the rewrite needs them apart
        t = time.perf_counter()
        packed = work / "genai-packed"
        try:
            if not (packed / "model.onnx").is_file():
                genai_base.build_base(hf_dir, packed, dtype=args.dtype, execution_provider=provider, fuse_qkv=True)
            r = run_child(dict(common, kind="genai", dir=str(packed), filename="model.onnx", cuda_graph=best_graph), args.child_timeout)
        except Exception as exc:  # noqa: BLE001
            r = {"error": f"build: {type(exc).__name__}: {str(exc)[:1500]}"}
        results.add("genai-dense", "dense packed-qkv" + (" +cuda-graph" if best_graph else ""), 0.0, r, cuda_graph=best_graph)
        timings["genai_packed"] = time.perf_counter() - t
    if args.perplexity is not None and "genai-fused" in want_genai and not out_of_time():
        t = time.perf_counter()
        results.data["quality"] = quality_check(args, model, tokenizer, configs, hf_dir, genai_dir, work, common)
        timings["quality"] = time.perf_counter() - t
        print("quality:", json.dumps(results.data["quality"]), flush=True)
    timings["total"] = time.perf_counter() - start
    results.save()
    print(tables(results.data))
    return 0


def save_hf(model, tokenizer, hf_dir: Path) -> None:
    """The benchmark's model as a Hugging Face folder (the builder's and the exporter's input)."""
    model.save_pretrained(hf_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(hf_dir)
    else:
        save_random_tokenizer(hf_dir, model.config.vocab_size)


def perplexity_runner(args, tokenizer, work: Path, common: dict):
    """``--export-perplexity``: a function (folder, graph, fused) -> perplexity result on ``--ppl-split`` windows, run in a
    child on the CPU provider (fp32 graphs) or the benchmark's provider; None when not asked or no tokenizer."""
    if not args.export_perplexity or tokenizer is None:
        return None
    from acttail_export.data import load_windows

    path = work / f"ppl_windows_{args.ppl_split}.npy"
    windows = load_windows(tokenizer, Path(args.wikitext) / f"wiki.{args.ppl_split}.raw", args.ppl_length, max_tokens=args.ppl_tokens)
    np.save(path, windows.numpy())

    def run(folder: Path, graph: str, fused: bool) -> dict:
        spec = dict(common, kind="perplexity", dir=str(folder), filename=graph, fused=fused, windows=str(path))
        return dict(run_child(spec, max(args.child_timeout, 600.0)), split=args.ppl_split, window_length=args.ppl_length)
    return run


def cupti_run(common: dict, folder: Path, graph: str, timeout: float) -> dict:
    """``--cupti``: the CUPTI split (:func:`_child_cupti`) of one genai graph, in its own child."""
    r = run_child(dict(common, kind="cupti", dir=str(folder), filename=graph), timeout)
    if "error" not in r:
        print(f"cupti {folder.name}/{graph}: wall {r['wall_ms_per_token']:.3f} ms, GPU kernels {r['gpu_kernel_ms_per_token']:.3f} ms "
              f"({r['kernels_per_token']:.0f}/token), projections {r['projection_kernel_ms_per_token']:.3f} ms "
              f"({r['projection_calls_per_token']:.0f} calls), other {r['other_kernel_ms_per_token']:.3f} ms", flush=True)
    else:
        print(f"cupti {folder.name}/{graph}: {r['error'][:300]}", flush=True)
    return r


def export_folders(args, model_ref: str, calibration: Path, work: Path, common: dict, results: Results,
                   cuda_graph: bool, ppl=None, out_of_time=lambda margin=0.0: False) -> float:
    """``acttail-export``: time the exporter's own folders (one per allocation and sparsity); returns the seconds spent.

    Each folder is what ``acttail-export export --model MODEL --sparsity S --allocation A --kernel K`` (``--export-kernel``,
    default fused) writes on the
    default base (packed builder graph, calibrated thresholds), run as ``og.Model(folder)``; it is deleted after its
    run unless ``--keep-exports``. No export starts with less than ``--export-margin`` seconds left before ``--deadline``.
    """
    import shutil

    import onnx

    from acttail_export.config import ActTailConfig
    from acttail_export.exporter import export
    from acttail_export.graph_rewrite import CUSTOM_OP
    from acttail_export.int4_rewrite import NBITS_OP

    start = time.perf_counter()
    int4 = args.export_weights == "int4"
    for allocation, s, head, kernel in itertools.product(args.export_allocation, args.export_sparsity,
                                                         (args.export_lm_head or [None]) if int4 else [None], args.export_kernel):
        suffix = f"{'-int4' if int4 else ''}{f'-head-{head}' if head else ''}{'-mask' if kernel == 'mask' else ''}"
        folder = work / f"export-{allocation}-{args.export_mode}-{int(round(s * 100))}{suffix}"
        label = (f"export {allocation} {args.export_mode} {s:.0%}{' int4' if int4 else ''}{f' lm_head {head}' if head else ''}"
                 f"{' mask kernel' if kernel == 'mask' else ''}")
        extra = dict(mode=args.export_mode, allocation=allocation, weights=args.export_weights, kernel=kernel)
        if out_of_time(args.export_margin):
            print(f"deadline: {label} not started", flush=True)
            continue
        t = time.perf_counter()
        try:
            export(model_ref, folder, sparsity=s, allocation=allocation, mode=args.export_mode, kernel=kernel, base="genai",
                   dtype=args.dtype, device=args.device, calibration_data=str(calibration),
                   calibration_samples=args.calibration_windows, sequence_length=args.prompt_length,
                   validate=args.export_validate, eval_tokens=0, overwrite=True, progress=False,
                   **({"weights": "int4", "block_size": 32, "quantizer": args.export_quantizer, "lm_head": head}
                      if int4 else {}))
        except Exception as exc:  # noqa: BLE001
            results.add("acttail-export", label, s, {"error": f"export: {type(exc).__name__}: {str(exc)[:1500]}"}, **extra)
            continue
        config = ActTailConfig.load(folder)
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        extra.update(export_s=time.perf_counter() - t,
                     sparse_ops=sum(n.op_type in (CUSTOM_OP, NBITS_OP) for n in graph.graph.node),
                     budgets=[min(p.sparsity for p in config.projections), max(p.sparsity for p in config.projections)],
                     export_command=f"acttail-export export --model MODEL --sparsity {s} --allocation {allocation} "
                                    f"--mode {args.export_mode} --kernel {kernel} --dtype {args.dtype} --device {args.device}"
                                    + (f" --weights int4 --block-size 32 --quantizer {args.export_quantizer}"
                                       f" --lm-head {config.lm_head}" if int4 else ""))
        extra["lm_head"] = config.lm_head
        spec = dict(common, kind="genai", dir=str(folder), filename="model.onnx", cuda_graph=cuda_graph)
        variant = label + (" +cuda-graph" if cuda_graph else "")
        r = run_child(spec, args.child_timeout)
        if args.cupti and common["provider"] == "cuda":
            r["cupti"] = cupti_run(common, folder, "model.onnx", args.child_timeout)
        if ppl is not None:
            extra["perplexity"] = ppl(folder, "model.onnx", fused=kernel == "fused")
        results.add("acttail-export", variant, s, r, cuda_graph=cuda_graph, **extra)
        if args.ab_env:  # the same folder with the variables set, alternating with plain runs
            env = dict(os.environ, **dict(v.split("=", 1) for v in args.ab_env))
            for rep in range(args.ab_repeats):
                for tag, child_env in ((" ".join(args.ab_env), env), ("plain", None)):
                    r = run_child(spec, args.child_timeout, env=child_env)
                    results.add("acttail-export", f"{variant} [{tag} #{rep + 1}]", s, r, cuda_graph=cuda_graph, ab=tag, **extra)
        if not args.keep_exports:
            shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - start


def quality_check(args, model, tokenizer, configs, hf_dir: Path, genai_dir: Path, work: Path, common: dict) -> dict:
    """Perplexity of the fused threshold graph at ``args.perplexity``: fp16 base on ORT CUDA vs fp32 base on ORT CPU,
    both rewritten with the same calibrated config; dense fp16/fp32 alongside."""
    from acttail_export import genai_base
    from acttail_export.data import load_windows

    s = float(args.perplexity)
    if s not in configs:
        return {"error": f"--perplexity {s} is not among --sparsity {sorted(configs)}"}
    if tokenizer is None:
        return {"error": "perplexity needs a pretrained model with a tokenizer"}
    windows = load_windows(tokenizer, Path(args.wikitext) / "wiki.test.raw", args.ppl_length, max_tokens=args.ppl_tokens)
    np.save(work / "ppl_windows.npy", windows.numpy())
    cpu_dir = work / "genai-fp32-cpu"
    try:
        if not (cpu_dir / "model.onnx").is_file():
            genai_base.build_base(hf_dir, cpu_dir, dtype="fp32", execution_provider="cpu")
    except Exception as exc:  # noqa: BLE001
        return {"error": f"fp32 base: {type(exc).__name__}: {str(exc)[:1500]}"}
    name = f"model.fused-threshold-{int(round(s * 100))}.onnx"
    out: dict = {"sparsity": s, "windows": int(windows.shape[0]), "window_length": args.ppl_length}
    key = f"{args.dtype}_{common['provider']}"
    for folder in (genai_dir, cpu_dir):
        genai_base.write_variant(folder, configs[s], name, mode="threshold", kernel="fused",
                                 fuse_activation=not args.no_swiglu_fold)
    runs = [("fused", name, True, genai_dir, common["provider"], key), ("fused", name, True, cpu_dir, "cpu", "fp32_cpu"),
            ("dense", "model.onnx", False, genai_dir, common["provider"], key), ("dense", "model.onnx", False, cpu_dir, "cpu", "fp32_cpu")]
    for tag, graph, fused, folder, provider, label in runs:
        if args.deadline and time.perf_counter() - args._start > args.deadline:
            out[f"{tag}_{label}"] = {"error": "skipped: --deadline reached"}
            continue
        spec = dict(common, kind="perplexity", dir=str(folder), filename=graph, fused=fused, provider=provider,
                    windows=str(work / "ppl_windows.npy"))
        left = args.deadline + 120 - (time.perf_counter() - args._start) if args.deadline else 600
        out[f"{tag}_{label}"] = run_child(spec, max(30.0, min(600.0, left)))
    for tag in ("fused", "dense"):
        try:
            a, b = out[f"{tag}_{key}"]["perplexity"], out[f"{tag}_fp32_cpu"]["perplexity"]
            out[f"{tag}_relative_difference"] = abs(a - b) / b
        except KeyError:
            pass
    return out


def plot(datas: list[dict], path: str) -> None:
    """Decode tokens/s relative to the best dense ORT configuration, per kernel, against sparsity. Several JSONs of
    one command: the median of the runs' ratios, with bars from the lowest to the highest run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple, dict[float, list[float]]] = {}
    lines: dict[str, list[float]] = {}
    base = None
    for data in datas:
        runs = [r for r in data["runs"] if "error" not in r]
        dense = [r for r in runs if r["backend"] in ("ort-optimum", "genai-dense")]
        if not dense:
            continue
        base = max(dense, key=lambda r: r["tokens_per_s"])
        for r in runs:
            ratio = r["tokens_per_s"] / base["tokens_per_s"]
            if r["backend"] in ("genai-fused", "genai-mask", "ort-optimum-fused"):
                series.setdefault((r["backend"], r.get("mode", "threshold")), {}).setdefault(r["sparsity"], []).append(ratio)
            if r["backend"] in ("torch-cuda-graph", "ort-optimum") or r is base:
                lines.setdefault(f"{r['backend']} {r['variant']}", []).append(ratio)
    if base is None:
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    xs = np.linspace(0, 0.9, 50)
    ax.plot(xs, 1 / (1 - xs), "k--", lw=1, label="ideal for the projections, 1/(1-s)")
    for backend, mode, marker in (("genai-fused", "threshold", "o-"), ("genai-fused", "topk", "s-"), ("genai-mask", "threshold", "^-"),
                                  ("ort-optimum-fused", "threshold", "x")):
        pts = sorted(series.get((backend, mode), {}).items())
        if not pts:
            continue
        sp = [p for p, _ in pts]
        med = np.array([float(np.median(v)) for _, v in pts])
        lo, hi = med - np.array([min(v) for _, v in pts]), np.array([max(v) for _, v in pts]) - med
        ax.errorbar(sp, med, yerr=[lo, hi] if len(datas) > 1 else None, fmt=marker, capsize=2, label=f"{backend} ({mode})")
    for name, vals in lines.items():
        y = float(np.median(vals))
        ax.axhline(y, lw=0.8, alpha=0.5, color="gray")
        ax.annotate(name, (0.0, y), fontsize=7)
    m = datas[-1]["model"]
    runs_note = f", median of {len(datas)} runs" if len(datas) > 1 else ""
    ax.set(xlabel="target activation sparsity (threshold mode; top-k exact)", ylabel="decode tokens/s ÷ best dense ORT",
           title=f"{Path(m['name']).name} ({m['layers']} layers, {m['dtype']}), batch 1{runs_note}; 1.0 = {base['backend']} {base['variant']}",
           ylim=(0, 4))
    ax.title.set_fontsize(8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _family(row: dict) -> str:
    """Whose dense run a row is compared with: the exporter's folders run on the genai base."""
    return "genai" if row["backend"] == "acttail-export" else row["backend"].split("-")[0]


def repeat_table(datas: list[dict]) -> str:
    """Median over repeated runs (several JSONs of one command, e.g. on a noisy CPU machine): decode ms, tokens/s and
    the speedup over the same run's best dense configuration of its base, each run's ratio first, then the median."""
    by: dict[tuple, list] = {}
    for data in datas:
        runs = [r for r in data["runs"] if "error" not in r]
        dense: dict[str, float] = {}  # backend family (genai, ort, torch) -> its best dense float tokens/s in this run
        for d in runs:
            if d["variant"].startswith("dense") and d["backend"] != "genai-int4":
                dense[_family(d)] = max(dense.get(_family(d), 0.0), d["tokens_per_s"])
        int4 = next((d["tokens_per_s"] for d in runs if d["backend"] == "genai-int4"), None)
        for r in runs:
            best = dense.get(_family(r))
            by.setdefault((r["backend"], r["variant"]), []).append(
                (r["decode_ms_median"], r["prefill_ms"], r["tokens_per_s"] / best if best else None,
                 r["tokens_per_s"] / int4 if int4 else None))
    first = datas[0]
    with_int4 = any(v[3] is not None for vals in by.values() for v in vals)
    lines = [f"model {first['model']['name']} ({first['model']['layers']} layers, {first['model']['dtype']}), prompt "
             f"{first['settings']['prompt_length']}, {first['settings']['decode_tokens']} decode tokens, batch 1; {len(datas)} runs, "
             f"GPU {first['machine'].get('gpu')}, CPU {first['machine'].get('cpu', '?')} × {first['machine'].get('cpu_count', '?')}", "",
             "| backend | configuration | decode ms (median of runs) | per run | prefill ms | × dense, per run | × dense (median) |"
             + (" × genai int4, per run |" if with_int4 else ""),
             "|---|---|---:|---|---:|---|---:|" + ("---|" if with_int4 else "")]

    def per_run(ratios: list) -> str:
        return " / ".join(f"{x:.2f}" for x in ratios) if ratios else "–"

    for (backend, variant), vals in by.items():
        ms = [v[0] for v in vals]
        ratios = [v[2] for v in vals if v[2] is not None]
        median_ratio = f"{statistics.median(ratios):.2f}×" if ratios else "–"
        lines.append(f"| {backend} | {variant} | {statistics.median(ms):.2f} | {' / '.join(f'{m:.2f}' for m in ms)} | "
                     f"{statistics.median(v[1] for v in vals):.0f} | {per_run(ratios)} | {median_ratio} |"
                     + (f" {per_run([v[3] for v in vals if v[3] is not None])} |" if with_int4 else ""))
    return "\n".join(lines)


def tables(data: dict) -> str:
    """Markdown tables: every configuration, then speedups against the dense baselines."""
    runs = [r for r in data["runs"] if "error" not in r]
    lines = [f"model {data['model']['name']} ({data['model']['layers']} layers, {data['model']['dtype']}), "
             f"prompt {data['settings']['prompt_length']}, {data['settings']['decode_tokens']} decode tokens, batch 1; "
             f"GPU {data['machine'].get('gpu')}", ""]
    lines += ["| backend | configuration | sparsity (target → measured, decode) | prefill ms | decode ms median | p90 | tokens/s | GPU MiB |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    calib = data.get("calibration", {})
    for r in data["runs"]:
        s = r.get("sparsity")
        eff = calib.get(str(s), {}).get("effective_sparsity", {}).get("decode") if s else None
        if r["variant"].startswith("dense"):
            sp = "dense"
        elif r["backend"] == "acttail-export":
            sp = f"{s:.2f} ({r.get('allocation')}, the exporter's calibration)"
        elif r.get("mode") == "topk":
            sp = f"{s:.2f} (top-k: exact)"
        else:
            sp = f"{s:.2f} → {eff:.3f}" if eff is not None else f"{s:.2f}"
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['variant']} | {sp} | failed: {r['error'][:120].replace('|', '/')} | | | | |")
            continue
        mem = r.get("gpu_memory_mb")
        if mem is None and r.get("gpu_total_used_mb") is not None and data.get("gpu_baseline_used_mb") is not None:
            mem = r["gpu_total_used_mb"] - data["gpu_baseline_used_mb"]
        if mem is None:
            mem = r.get("torch_max_allocated_mb")
        lines.append(f"| {r['backend']} | {r['variant']} | {sp} | {r['prefill_ms']:.1f} | {r['decode_ms_median']:.3f} | "
                     f"{r['decode_ms_p90']:.3f} | {r['tokens_per_s']:.1f} | {'' if mem is None else f'{mem:.0f}'} |")

    def best(pred):
        cands = [r for r in runs if pred(r)]
        return max(cands, key=lambda r: r["tokens_per_s"]) if cands else None

    optimum = best(lambda r: r["backend"] == "ort-optimum")
    dense_ort = best(lambda r: r["backend"] in ("ort-optimum", "genai-dense"))
    torch_graph = best(lambda r: r["backend"] in ("torch-cuda-graph", "torch-static"))
    int4 = best(lambda r: r["backend"] == "genai-int4")  # the int4 model a user would otherwise deploy
    lines += ["", "| configuration | tokens/s | × optimum export | × best dense ORT | × PyTorch CUDA graph |"
              + (" × genai int4 |" if int4 else ""), "|---|---:|---:|---:|---:|" + ("---:|" if int4 else "")]
    for r in sorted(runs, key=lambda r: (r["backend"], r.get("mode") or "", r.get("sparsity") or 0)):
        def ratio(base):
            return f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}×" if base else "–"
        lines.append(f"| {r['backend']} {r['variant']} | {r['tokens_per_s']:.1f} | {ratio(optimum)} | {ratio(dense_ort)} | "
                     f"{ratio(torch_graph)} |" + (f" {ratio(int4)} |" if int4 else ""))
    ppl_rows = list(data.get("perplexity", {}).items())
    ppl_rows += [(f"{r['backend']} {r['variant']}", r["perplexity"]) for r in data["runs"] if isinstance(r.get("perplexity"), dict)]
    if ppl_rows:
        lines += ["", "| configuration | perplexity | split | tokens scored |", "|---|---:|---|---:|"]
        for name, p in ppl_rows:
            lines.append(f"| {name} | {p['perplexity']:.2f} | {p.get('split')} | {p.get('tokens_scored')} |" if "perplexity" in p
                         else f"| {name} | failed: {str(p.get('error'))[:100]} | | |")
    for graph, c in data.get("cupti", {}).items():
        if "error" not in c:
            lines.append(f"CUPTI ({graph}, genai, no CUDA graph): wall {c['wall_ms_per_token']:.3f} ms/token, GPU kernels "
                         f"{c['gpu_kernel_ms_per_token']:.3f} ms/token in {c['kernels_per_token']:.0f} kernels, SparseMatMul kernels "
                         f"{c['sparse_op_kernel_ms_per_token']:.3f} ms")
    cupti_rows = [r for r in runs if isinstance(r.get("cupti"), dict)]
    if cupti_rows:
        lines += ["", "CUPTI, same graph on the genai runtime without CUDA graph (GPU kernel time per decode token):", "",
                  "| configuration | timed decode ms | CUPTI wall ms | GPU kernels ms | kernels / token | projection kernels ms "
                  "| projection calls / token | other kernels ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in cupti_rows:
            c = r["cupti"]
            if "error" in c:
                lines.append(f"| {r['backend']} {r['variant']} | {r['decode_ms_median']:.3f} | failed: {c['error'][:100].replace('|', '/')} "
                             "| | | | | |")
                continue
            sp = cupti_split(c)
            lines.append(f"| {r['backend']} {r['variant']} | {r['decode_ms_median']:.3f} | {c['wall_ms_per_token']:.3f} | "
                         f"{c['gpu_kernel_ms_per_token']:.3f} | {c['kernels_per_token']:.0f} | "
                         f"{sp['projection_kernel_ms_per_token']:.3f} | {sp['projection_calls_per_token']:.0f} | "
                         f"{sp['other_kernel_ms_per_token']:.3f} |")
    if "placement_check" in data:
        pc = data["placement_check"]
        lines += ["", f"placement ({pc.get('graph')}): projection node events by provider {pc.get('projection_events_by_provider')}, "
                      f"Memcpy events {pc.get('memcpy_events')}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
