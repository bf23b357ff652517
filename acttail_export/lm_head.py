"""An 8-bit lm_head (``--lm-head int8``): ``com.microsoft::MatMulNBits`` with 8-bit codes and int8 activations.

On the CPU a float32 lm_head is the largest single read of a 4-bit export's decode step (SmolLM2: 576 → 49152, 113 MB,
a quarter of the step at two threads, docs/quantization.md), and a 4-bit one costs SmolLM2 5 % perplexity. Here the
weight ``W`` [K, N] is quantized to symmetric 8-bit codes in blocks of :data:`BLOCK` along K, round to nearest
(``s = max |w| / 127`` per block, ``q = round(w / s)`` in −127..127; SmolLM2's tied embeddings are 8-bit blocks of 32
in its GGUF, so this reproduces them exactly), and the node runs at accuracy level 4: ONNX Runtime's CPU kernel
quantizes the activation to int8 in the same blocks and sums integer products, the fast 8-bit path of its CPU
kernel. The CUDA kernel ignores the level.

Pure numbers here (:func:`quantize_head`, :func:`fake_quantize_activations`); :func:`rewrite_lm_head` edits a graph,
:func:`emulated_head` gives the PyTorch reference the same arithmetic for the export's validation.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ActTailError

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

LM_HEADS = ("float", "int8")
BLOCK = 32  # along K, the activation's blocks too (ONNX Runtime's int8 path quantizes A per weight block)
ACCURACY_LEVEL = 4  # int8 activations: the fast CPU path
ZERO_POINT = 128  # MatMulNBits' default zero point of 8-bit codes (no zero_points input)
LOGITS = "logits"


@dataclass(frozen=True)
class Int8Head:
    """8-bit lm_head in MatMulNBits' layout: ``B`` uint8 [N, blocks, BLOCK] (code + 128, K padded with 128, i.e. 0),
    ``scales`` float32 [N, blocks]."""

    B: np.ndarray
    scales: np.ndarray
    K: int
    N: int

    def dequantize(self) -> np.ndarray:
        """float64 [K, N]."""
        w = (self.B.astype(np.float64) - ZERO_POINT) * self.scales.astype(np.float64)[..., None]
        return w.reshape(self.N, -1)[:, :self.K].T


def quantize_head(w: np.ndarray) -> Int8Head:
    """Symmetric 8-bit blocks of :data:`BLOCK` along K of a finite float weight ``w`` [K, N] (round to nearest); the
    scales of a float16 ``w`` are float16 values (the graph stores them in its dtype)."""
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating) or not np.isfinite(w).all():
        raise ActTailError(f"lm_head weight must be a finite 2-D float array [K, N], got {w.dtype} {w.shape}")
    K, N = w.shape
    blocks = -(-K // BLOCK)
    wb = np.zeros((blocks * BLOCK, N), np.float64)
    wb[:K] = w
    wb = wb.reshape(blocks, BLOCK, N)
    # [blocks, N], rounded to what the graph stores (float16 scales in float16 graphs): the stored value decides the codes
    scales = (np.abs(wb).max(axis=1) / 127).astype(np.float16 if w.dtype == np.float16 else np.float32).astype(np.float32)
    safe = np.where(scales == 0, 1.0, scales.astype(np.float64))
    codes = np.clip(np.rint(wb / safe[:, None, :]), -127, 127) + ZERO_POINT
    return Int8Head(np.ascontiguousarray(codes.astype(np.uint8).transpose(2, 0, 1)), np.ascontiguousarray(scales.T), K, N)


def fake_quantize_activations(x):
    """``x`` [..., K] (torch) as ONNX Runtime's int8 path sees it: per block of :data:`BLOCK` along K, scale
    ``max |x| / 127``, ``round(x / scale)`` (ties to even), times the scale again; same dtype."""
    import torch

    K = x.shape[-1]
    blocks = -(-K // BLOCK)
    xf = torch.nn.functional.pad(x.double(), (0, blocks * BLOCK - K)).reshape(*x.shape[:-1], blocks, BLOCK)
    scale = (xf.abs().amax(dim=-1, keepdim=True) / 127).float().double()
    q = torch.round(xf / torch.where(scale == 0, torch.ones_like(scale), scale))
    return (q * scale).reshape(*x.shape[:-1], blocks * BLOCK)[..., :K].to(x.dtype)


@contextlib.contextmanager
def emulated_head(model, head: Int8Head | None):
    """The PyTorch ``model`` with its lm_head computing what the exported node computes on ONNX Runtime's CPU
    (dequantized 8-bit weights, int8-rounded activations; the CUDA kernel ignores the accuracy level) inside the block;
    the original (possibly tied) head is put back after. ``None``: as is."""
    import torch

    if head is None:
        yield model
        return
    original = model.get_output_embeddings()
    replacement = torch.nn.Linear(head.K, head.N, bias=False, device=original.weight.device, dtype=original.weight.dtype)
    with torch.no_grad():
        replacement.weight.copy_(torch.from_numpy(head.dequantize().T.copy()))
    handle = replacement.register_forward_pre_hook(lambda module, args: (fake_quantize_activations(args[0]), *args[1:]))
    model.set_output_embeddings(replacement)
    try:
        yield model
    finally:
        handle.remove()
        model.set_output_embeddings(original)


def logits_node(graph: onnx.ModelProto) -> onnx.NodeProto | None:
    """The node that writes the graph's ``logits`` output (the lm_head on both bases), None if there is none."""
    return next((n for n in graph.graph.node if LOGITS in n.output), None)


def find_lm_head(graph: onnx.ModelProto) -> onnx.NodeProto:
    """The float ``MatMul`` that writes the graph's ``logits`` output (both bases)."""
    node = logits_node(graph)
    if node is None or node.op_type != "MatMul":
        found = "no node" if node is None else f"a {node.op_type}"
        raise ActTailError(f"--lm-head int8: the graph's {LOGITS!r} output comes from {found}, not a float MatMul; "
                           "start from the base export or drop --lm-head int8")
    return node


def rewrite_lm_head(graph: onnx.ModelProto) -> Int8Head:
    """Replace the lm_head ``MatMul`` by an 8-bit ``MatMulNBits`` (in place; the float weight stays only if another
    node reads it, e.g. tied embeddings); returns the quantized head. The weight must be loaded."""
    from onnx import helper, numpy_helper

    from .int4_rewrite import ORT_DOMAIN, ORT_OP

    node = find_lm_head(graph)
    inits = {i.name: i for i in graph.graph.initializer}
    weight, old = _weight_of(graph, node.input[1], inits)  # old: dropped below unless another node reads them
    if weight is None:
        raise ActTailError(f"--lm-head int8: {node.name}'s weight {node.input[1]!r} is neither a 2-D initializer nor "
                           "its Transpose")
    head = quantize_head(weight)
    base = f"/acttail_int8{node.name}"
    tensors = [numpy_helper.from_array(head.B, f"{base}/B"),
               numpy_helper.from_array(head.scales.reshape(-1).astype(weight.dtype), f"{base}/scales")]
    new = helper.make_node(ORT_OP, [node.input[0], *(t.name for t in tensors)], list(node.output), name=node.name,
                           domain=ORT_DOMAIN, K=head.K, N=head.N, bits=8, block_size=BLOCK,
                           accuracy_level=ACCURACY_LEVEL)
    nodes = [new if n is node else n for n in graph.graph.node]
    if not any(node.input[1] in n.input for n in nodes):  # a Transpose that fed only the old head goes too (optimum)
        nodes = [n for n in nodes if not (n.op_type == "Transpose" and node.input[1] in n.output)]
    used = {i for n in nodes for i in n.input} | {o.name for o in graph.graph.output}
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    kept = [i for i in graph.graph.initializer if i.name in used or i.name not in old]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept + tensors)
    if ORT_DOMAIN not in {o.domain for o in graph.opset_import}:
        graph.opset_import.append(helper.make_opsetid(ORT_DOMAIN, 1))
    logger.info("lm_head: 8-bit MatMulNBits (%d -> %d, blocks of %d, accuracy level %d)%s", head.K, head.N, BLOCK,
                ACCURACY_LEVEL, "; its float weight stays for the tied embeddings" if old & used else "")
    return head


def _weight_of(graph: onnx.ModelProto, name: str, inits: dict) -> tuple[np.ndarray | None, set[str]]:
    """([K, N] float array, the names it comes from) of the head's weight input: a 2-D initializer, or a 2-D Transpose
    of one (its output and the initializer); (None, {name}) otherwise."""
    from onnx import helper, numpy_helper

    if name in inits:
        return (numpy_helper.to_array(inits[name]) if len(inits[name].dims) == 2 else None), {name}
    producer = next((n for n in graph.graph.node if name in n.output), None)
    if producer is None or producer.op_type != "Transpose" or producer.input[0] not in inits:
        return None, {name}
    perm = {a.name: helper.get_attribute_value(a) for a in producer.attribute}.get("perm", [1, 0])
    source = inits[producer.input[0]]
    if len(source.dims) != 2 or list(perm) != [1, 0]:
        return None, {name}
    return numpy_helper.to_array(source).T, {name, source.name}


def head_of_folder(folder: str | Path, filename: str = "model.onnx") -> Int8Head | None:
    """The 8-bit head of an exported graph (only its two tensors are read), None when its lm_head is float."""
    import onnx
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    from .int4_rewrite import ORT_OP

    graph = onnx.load(str(Path(folder) / filename), load_external_data=False)
    node = logits_node(graph)
    if node is None or node.op_type != ORT_OP:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    inits = {i.name: i for i in graph.graph.initializer}
    arrays = []
    for name in node.input[1:3]:
        if uses_external_data(inits[name]):
            load_external_data_for_tensor(inits[name], str(folder))
        arrays.append(numpy_helper.to_array(inits[name]))
    B, scales = arrays
    return Int8Head(B, scales.astype(np.float32).reshape(int(attrs["N"]), -1), int(attrs["K"]), int(attrs["N"]))
