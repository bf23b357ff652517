"""What a 4-bit or 8-bit lm_head gives SmolLM2 on the CPU: its time as ORT nodes and its cost in perplexity (validation).

Time: SmolLM2's lm_head shape (576 → 49152, one row) as a float32 ``MatMul`` and as ``com.microsoft::MatMulNBits``
(4 bits, blocks of 32, symmetric codes; accuracy level 0 and 4, the latter with int8 activations as the builder's
``-p int4`` model runs it; and 8 bits at accuracy level 4, the exporter's ``--lm-head int8``,
:mod:`acttail_export.lm_head`), median of ``--calls`` calls each on ``--threads`` threads. Quality: perplexity of the
dense model on the first ``--max-tokens`` validation tokens (windows of 1024) with the lm_head replaced by its
dequantized 4-bit weights (``quantize_tensor``, blocks of 32 along the input dimension, each ``--quantizers``), and by
the 8-bit head with the int8 activations of its CPU kernel (``lm_head.emulated_head``)::

    python benchmarks/lm_head_probe.py --data DATA/wiki.valid.raw --output docs/results/int4/lm_head_probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def node_model(K: int, N: int, kind: str, rng) -> bytes:
    from onnx import TensorProto, helper

    f32 = TensorProto.FLOAT
    x = helper.make_tensor_value_info("X", f32, [1, K])
    y = helper.make_tensor_value_info("Y", f32, None)
    if kind == "float32":
        w = rng.standard_normal((K, N)).astype(np.float32)
        inits = [helper.make_tensor("W", f32, w.shape, w.tobytes(), raw=True)]
        node = helper.make_node("MatMul", ["X", "W"], ["Y"])
        opsets = [helper.make_opsetid("", 17)]
    else:
        blocks = K // 32
        codes = rng.integers(0, 256, (N, blocks, 16), dtype=np.uint8)
        scales = (rng.random(N * blocks) * 0.01).astype(np.float32)
        inits = [helper.make_tensor("B", TensorProto.UINT8, codes.shape, codes.tobytes(), raw=True),
                 helper.make_tensor("S", f32, scales.shape, scales.tobytes(), raw=True)]
        node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=K, N=N, bits=4,
                                block_size=32, accuracy_level=int(kind[-1]))
        opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(helper.make_graph([node], "lm_head", [x], [y], initializer=inits), opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


def int8_node_model(K: int, N: int, rng) -> bytes:
    """The exporter's 8-bit lm_head node (``lm_head.rewrite_lm_head`` of a float32 ``MatMul`` writing ``logits``)."""
    from onnx import TensorProto, helper

    from acttail_export.lm_head import rewrite_lm_head

    f32 = TensorProto.FLOAT
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["logits"], name="/lm_head/MatMul")], "lm_head",
                              [helper.make_tensor_value_info("X", f32, [1, K])],
                              [helper.make_tensor_value_info("logits", f32, [1, N])],
                              initializer=[helper.make_tensor("W", f32, w.shape, w.tobytes(), raw=True)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    rewrite_lm_head(model)
    return model.SerializeToString()


def time_node(model: bytes, K: int, threads: int, calls: int, rng) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    feeds = {"X": rng.standard_normal((1, K)).astype(np.float32)}
    for _ in range(10):
        session.run(None, feeds)
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="WikiText-2 wiki.valid.raw")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--quantizers", nargs="+", default=["rtn", "mse"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--output", type=Path)
    args = ap.parse_args()
    import torch

    from acttail_export.data import load_windows
    from acttail_export.evaluation import perplexity_windows
    from acttail_export.modeling import default_model_path, load_model
    from acttail_export.quantize import dequantize_tensor, quantize_tensor

    rng = np.random.default_rng(0)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    head = model.get_output_embeddings()
    N, K = head.weight.shape
    timing = {kind: time_node(node_model(K, N, kind, rng), K, args.threads, args.calls, rng)
              for kind in ("float32", "int4 accuracy 0", "int4 accuracy 4")}
    timing["int8 accuracy 4"] = time_node(int8_node_model(K, N, rng), K, args.threads, args.calls, rng)
    for kind, ms in timing.items():
        print(f"lm_head {K} -> {N} as {kind}: {ms:.2f} ms per call", flush=True)
    windows = load_windows(tokenizer, args.data, 1024, max_tokens=args.max_tokens)
    dense = perplexity_windows(model, windows, progress=False)["perplexity"]
    print(f"dense: perplexity {dense:.3f}", flush=True)
    original = head.weight.detach().clone()
    quality = {}
    for quantizer in args.quantizers:
        codes, scales, offsets = quantize_tensor(original.T.contiguous(), 32, quantizer)
        # a tied lm_head shares its weight with the embeddings: replace the head alone, put the original back after
        replacement = torch.nn.Linear(K, N, bias=False)
        replacement.weight.data = dequantize_tensor(codes, scales, offsets, 32).T.contiguous().float()
        model.set_output_embeddings(replacement)
        try:
            ppl = perplexity_windows(model, windows, progress=False)["perplexity"]
        finally:
            model.set_output_embeddings(head)
        quality[quantizer] = ppl
        print(f"lm_head 4-bit ({quantizer}, block 32): perplexity {ppl:.3f} ({100 * (ppl / dense - 1):+.2f} %)", flush=True)
    from acttail_export.lm_head import emulated_head, quantize_head

    with emulated_head(model, quantize_head(original.T.contiguous().numpy())):
        int8 = perplexity_windows(model, windows, progress=False)["perplexity"]
    print(f"lm_head 8-bit (rtn, block 32, int8 activations): perplexity {int8:.3f} ({100 * (int8 / dense - 1):+.2f} %)",
          flush=True)
    if args.output:
        args.output.write_text(json.dumps({"threads": args.threads, "calls": args.calls, "shape": [K, N], "ms": timing,
                                           "tokens": int(windows.numel()), "dense_perplexity": dense,
                                           "lm_head_4bit_perplexity": quality, "lm_head_8bit_perplexity": int8},
                                          indent=1) + "\n")


if __name__ == "__main__":
    main()
