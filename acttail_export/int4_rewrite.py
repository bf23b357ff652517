"""4-bit projection weights in the export: quantize the PyTorch model, then put the 4-bit ops into the graph.

Pipeline (``--weights int4``, :func:`acttail_export.exporter.export`):

1. :func:`quantize_model` right after loading: every projection's weight is quantized
   (:func:`acttail_export.quantize.quantize`; ``gptq*``: :func:`acttail_export.quantize.quantize_gptq`
   with the input Hessians of the calibration text, :func:`input_hessians`) and *replaced by its dequantized
   values*, so the spectral analysis,
   the calibrated thresholds, the base ONNX export and the validation all see the model that is deployed.
2. the usual rewrite (:func:`acttail_export.graph_rewrite.rewrite`), then :func:`rewrite_int4` on the same graph:

   * ``com.acttail::SparseMatMul(x, W[, t])`` -> ``com.acttail::SparseMatMulNBits(x, Q, scales, offsets[, t])``
     (fused kernel; packed q/k/v or gate/up MatMuls get their members' weights side by side along N);
   * a projection ``MatMul`` (the mask kernel's, after its masking subgraph, or one left dense: sparsity 0,
     top-k with k = K) -> ``com.microsoft::MatMulNBits`` with float zero points (ORT's 4-bit layout,
     :func:`acttail_export.quantize.to_matmul_nbits`): the dense int4 baseline at sparsity 0;
   * the float weight initializers of rewritten projections are removed.
3. :func:`check_int4_export` (export validation): the graph's 4-bit tensors dequantize to the PyTorch weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .architectures import spec_of_model
from .config import ActTailConfig
from .errors import ActTailError, ExportValidationError
from .quantize import GPTQ_QUANTIZERS, QuantizedWeight, dequantize_tensor, gptq_options, quantize_gptq, quantize_tensor, to_matmul_nbits

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

NBITS_OP = "SparseMatMulNBits"
ORT_DOMAIN, ORT_OP = "com.microsoft", "MatMulNBits"


def input_hessians(model, windows, progress: bool = False, dtype=None) -> dict:
    """``Σ x xᵀ`` (``dtype``, float32 by default, on the input's device) of every projection's input over ``windows``
    ([n, L] token ids, one forward per window): module name -> [K, K]. Readers of one input (q/k/v, gate/up) share
    one tensor."""
    import torch
    from tqdm.auto import tqdm

    spec, modules = spec_of_model(model), dict(model.named_modules())
    readers = {}  # first reader of an input -> every projection reading it
    for i in range(len(model.model.layers)):
        for group in spec.shared_input_groups:
            names = [spec.projection_name(i, kind) for kind in group]
            readers[names[0]] = names
    sums: dict = {}

    def hook(name):
        def add(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(dtype or torch.float32)
            sums[name] = sums[name].addmm_(x.T, x) if name in sums else x.T @ x
        return add

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in readers]
    try:
        with torch.inference_mode():
            for row in tqdm(windows, desc="input Hessians", unit="window", disable=not progress):
                model(row[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: sums[first] for first, names in readers.items() for name in names}


def quantize_model(model, block_size: int, quantizer: str, dtype: str = "fp32", progress: bool = False,
                   hessians: dict | None = None, **gptq) -> dict[str, QuantizedWeight]:
    """Quantize every projection of ``model`` in place (weights := dequantized values); returns the 4-bit weights.

    With ``dtype="fp16"`` scales and offsets are rounded to float16 first (what the fp16 graph stores).
    ``hessians`` (:func:`input_hessians`): needed by the GPTQ-style quantizers (``gptq``, ``gptq-mse``,
    ``gptq-act``, ``gptq-mse-act``); ``gptq``: further keyword arguments of
    :func:`acttail_export.quantize.quantize_gptq` (``damp``, ``refit``; ``params`` and ``order`` follow the name).
    """
    from tqdm.auto import tqdm

    modules = dict(model.named_modules())
    spec = spec_of_model(model)
    names = [spec.projection_name(i, kind) for i in range(len(model.model.layers)) for kind in spec.kinds]
    if quantizer in GPTQ_QUANTIZERS and hessians is None:
        raise ValueError(f"quantizer {quantizer!r} needs the projections' input Hessians (input_hessians)")
    out: dict[str, QuantizedWeight] = {}
    for name in tqdm(names, desc=f"int4 {quantizer} B={block_size}", disable=not progress):
        out[name] = _quantize_projection(modules[name], block_size, quantizer, dtype,
                                         hessians[name] if quantizer in GPTQ_QUANTIZERS else None, gptq)
    logger.info("quantized %d projections to 4 bits (%s, block %d)", len(out), quantizer, block_size)
    return out


def _quantize_projection(module, block_size: int, quantizer: str, dtype: str, hessian, gptq: dict) -> QuantizedWeight:
    """Quantize one projection in place (weight := dequantized values), where it lives (a GPU: seconds for 7B)."""
    import torch

    weight = module.weight
    if quantizer in GPTQ_QUANTIZERS:
        codes, scales, offsets = quantize_gptq(weight.detach().T, hessian, block_size,
                                               **{**gptq_options(quantizer), **gptq})
    else:
        codes, scales, offsets = quantize_tensor(weight.detach().T, block_size, quantizer)
    if dtype == "fp16":
        scales, offsets = scales.half().float(), offsets.half().float()
    with torch.no_grad():
        weight.copy_(dequantize_tensor(codes, scales, offsets, block_size).T.to(weight.dtype))
    return QuantizedWeight.from_tensors(codes, scales, offsets, block_size, quantizer)


class _StopForward(Exception):
    pass


def quantize_model_sequential(model, windows, block_size: int, quantizer: str, dtype: str = "fp32",
                              progress: bool = False, hessian_dtype=None, **gptq) -> dict[str, QuantizedWeight]:
    """GPTQ layer by layer (a ``gptq`` quantizer of :data:`~acttail_export.quantize.GPTQ_QUANTIZERS`): the
    calibration ``windows`` ([n, L] token ids) go through the decoder layers one at a time, and every projection's
    Hessian ``Σ x xᵀ`` is summed from the inputs it receives from the *already quantized* model: layer ``l``'s
    projections see the outputs of the quantized layers before it, and inside a layer each shared-input group
    (q/k/v, o, gate/up, down, in that order) sees the earlier groups quantized. Only one layer's inputs are held
    (``n × L × hidden`` floats). Quantizes ``model`` in place like :func:`quantize_model` and returns the same dict.
    """
    import torch
    from tqdm.auto import tqdm

    if quantizer not in GPTQ_QUANTIZERS:
        raise ValueError(f"sequential quantization is GPTQ-style: quantizer must be one of {', '.join(GPTQ_QUANTIZERS)}")
    spec, modules = spec_of_model(model), dict(model.named_modules())
    layers = model.model.layers
    calls: list = []  # (args, kwargs) of layer 0 per window

    def grab(module, args, kwargs):
        calls.append((args, kwargs))
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for row in windows:
                try:
                    model(row[None], use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    hidden = [args[0] if args else kwargs["hidden_states"] for args, kwargs in calls]
    rest = [(args[1:], {k: v for k, v in kwargs.items() if k != "hidden_states"}) for args, kwargs in calls]

    def run(layer):
        outputs = []
        with torch.inference_mode():
            for x, (args, kwargs) in zip(hidden, rest):
                y = layer(x, *args, **kwargs)
                outputs.append(y[0] if isinstance(y, tuple) else y)
        return outputs

    out: dict[str, QuantizedWeight] = {}
    for i in tqdm(range(len(layers)), desc=f"int4 {quantizer} B={block_size} sequential", disable=not progress):
        for group in spec.shared_input_groups:
            names = [spec.projection_name(i, kind) for kind in group]
            sums: list = []

            def add(module, inputs):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(hessian_dtype or torch.float32)
                if sums:
                    sums[0].addmm_(x.T, x)
                else:
                    sums.append(x.T @ x)

            handle = modules[names[0]].register_forward_pre_hook(add)
            try:
                run(layers[i])
            finally:
                handle.remove()
            for name in names:
                out[name] = _quantize_projection(modules[name], block_size, quantizer, dtype, sums[0], gptq)
        hidden = run(layers[i])
    logger.info("quantized %d projections to 4 bits (%s, block %d, layer by layer)", len(out), quantizer, block_size)
    return out


def concat_columns(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """The members of a packed MatMul side by side along N (same K and block size)."""
    if len(parts) == 1:
        return parts[0]
    from .reference import pack_nibbles

    first = parts[0]
    q = np.concatenate([p.codes() for p in parts], axis=1)
    return QuantizedWeight(pack_nibbles(q), np.concatenate([p.scales for p in parts], 1),
                           np.concatenate([p.offsets for p in parts], 1), first.K, q.shape[1], first.block_size, first.quantizer)


def rewrite_int4(graph: onnx.ModelProto, config: ActTailConfig, weights: dict[str, QuantizedWeight]) -> int:
    """Replace every projection of an ActTail-rewritten ``graph`` by its 4-bit op (in place); returns the count."""
    from onnx import helper

    from .graph_rewrite import CUSTOM_DOMAIN, CUSTOM_OP, CUSTOM_OPSET, UNPACKED_SLICE, find_projections

    found = find_projections(graph, config.spec)
    members: dict[str, list[str]] = {}
    nodes: dict[str, onnx.NodeProto] = {}
    for name, node in found.items():  # a packed MatMul's members come in its column order (ArchSpec.packed)
        members.setdefault(node.name, []).append(name)
        nodes[node.name] = node
    inits = {i.name: i for i in graph.graph.initializer}
    # the mask kernel's unpacked members (graph_rewrite._unpacked_members) read a Slice of the packed weight
    slices = {n.output[0]: n for n in graph.graph.node if n.op_type == "Slice" and n.name.endswith(UNPACKED_SLICE)}
    by_name = config.by_name()
    replaced: dict[str, onnx.NodeProto] = {}
    dropped: set[str] = set()  # Slice nodes whose member now carries its own 4-bit weight
    new_inits: list[onnx.TensorProto] = []
    for node_name, names in members.items():
        node = nodes[node_name]
        if node.op_type not in ("MatMul", CUSTOM_OP):
            raise ActTailError(f"{node_name} is a {node.op_type}: the graph was already quantized; start from the base export")
        qw = concat_columns([weights[n] for n in names])
        sliced = slices.get(node.input[1])
        if sliced is not None and node.op_type == "MatMul" and _slice_shape(sliced, inits) == [qw.K, qw.N]:
            dropped.add(sliced.name)
            w = inits[sliced.input[0]]
        else:
            w = inits.get(node.input[1])
            if w is None or list(w.dims) != [qw.K, qw.N]:
                raise ActTailError(f"{node_name}: weight {node.input[1]!r} is not a [{qw.K}, {qw.N}] initializer")
        np_dtype = helper.tensor_dtype_to_np_dtype(w.data_type)
        fused = node.op_type == CUSTOM_OP
        if fused:
            density = expected_density([by_name[n] for n in names], [weights[n].N for n in names])
            tensors, new = _nbits_node(node, qw, np_dtype, density)
        else:
            tensors, new = _ort_node(node, qw, np_dtype)
        new_inits.extend(tensors)
        replaced[node_name] = new
    gone = [n for n in graph.graph.node if n.name in dropped]
    used = {i for n in graph.graph.node if n.name not in replaced and n.name not in dropped for i in n.input}
    old = (({nodes[n].input[1] for n in replaced} | {i for n in gone for i in n.input}) & set(inits)) - used
    kept = [i for i in graph.graph.initializer if i.name not in old]
    del graph.graph.initializer[:]
    graph.graph.initializer.extend(kept + new_inits)
    new_nodes = [replaced.get(n.name, n) for n in graph.graph.node if n.name not in dropped]
    del graph.graph.node[:]
    graph.graph.node.extend(new_nodes)
    domains = {o.domain for o in graph.opset_import}
    for domain in {n.domain for n in replaced.values()} - domains:
        graph.opset_import.append(helper.make_opsetid(domain, CUSTOM_OPSET if domain == CUSTOM_DOMAIN else 1))
    logger.info("4-bit weights: %d projection MatMuls rewritten, %d float weights removed", len(replaced), len(old))
    return len(replaced)


def _slice_shape(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> list[int] | None:
    """[K, columns] of an unpacked member's ``Slice(W, start, stop, axes=1)`` of a packed initializer; None if not."""
    from onnx import numpy_helper

    if len(node.input) != 4 or any(i not in inits for i in node.input):
        return None
    start, stop, axis = (int(numpy_helper.to_array(inits[i]).reshape(-1)[0]) for i in node.input[1:])
    dims = list(inits[node.input[0]].dims)
    if axis != 1 or len(dims) != 2 or not 0 <= start < stop <= dims[1]:
        return None
    return [dims[0], stop - start]


def expected_density(members: list, widths: list[int]) -> float:
    """The ``density`` attribute of a 4-bit op: the fraction of input channels its members keep by their budgets
    (1 - sparsity), weighted by their output columns. The CUDA op takes its one-row decode loop for nodes kept at 35 %
    or more (docs/kernels.md); results do not depend on it."""
    kept = sum((1.0 - p.sparsity) * w for p, w in zip(members, widths))
    return round(min(1.0, max(0.0, kept / sum(widths))), 4)


def _nbits_node(node: onnx.NodeProto, qw: QuantizedWeight, np_dtype, density: float) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """``SparseMatMul(x, W[, t, ...])`` -> ``SparseMatMulNBits(x, Q, scales, offsets[, t, ...])``, same attributes, plus
    ``density`` (:func:`expected_density`)."""
    from onnx import helper, numpy_helper

    from .graph_rewrite import CUSTOM_DOMAIN

    base = f"/acttail_int4{node.name}"
    tensors = [numpy_helper.from_array(qw.packed, f"{base}/Q"),
               numpy_helper.from_array(qw.scales.astype(np_dtype), f"{base}/scales"),
               numpy_helper.from_array(qw.offsets.astype(np_dtype), f"{base}/offsets")]
    new = helper.make_node(NBITS_OP, [node.input[0], *(t.name for t in tensors), *node.input[2:]], list(node.output),
                           name=node.name, domain=CUSTOM_DOMAIN, K=qw.K, N=qw.N, block_size=qw.block_size, bits=4, density=density)
    new.attribute.extend(node.attribute)
    return tensors, new


def _ort_node(node: onnx.NodeProto, qw: QuantizedWeight, np_dtype) -> tuple[list[onnx.TensorProto], onnx.NodeProto]:
    """``MatMul(x, W)`` -> ``com.microsoft::MatMulNBits(x, B, scales, zero_points)`` (float zero points)."""
    from onnx import helper, numpy_helper

    mw = to_matmul_nbits(qw)
    base = f"/acttail_int4{node.name}"
    tensors = [numpy_helper.from_array(mw.B, f"{base}/B"),
               numpy_helper.from_array(mw.scales.astype(np_dtype), f"{base}/scales"),
               numpy_helper.from_array(mw.zero_points.astype(np_dtype), f"{base}/zero_points")]
    new = helper.make_node(ORT_OP, [node.input[0], *(t.name for t in tensors)], list(node.output), name=node.name,
                           domain=ORT_DOMAIN, K=qw.K, N=qw.N, bits=4, block_size=qw.block_size)
    return tensors, new


def rewrite_onnx_int4(source: Path, target: Path, edit, loaded=None) -> Path:
    """:func:`acttail_export.onnx_export.rewrite_onnx` for edits that drop weights: the graph is edited without its
    weights, then only the weights it still uses are read and saved anew, so the removed float projection weights
    are never loaded and leave no bytes behind in an external data file. ``loaded``: a further edit that reads
    weights (the 8-bit lm_head), run once they are loaded."""
    from onnx.external_data_helper import load_external_data_for_model

    from .onnx_export import load_onnx, save_onnx

    source, target = Path(source), Path(target)
    graph = load_onnx(source, load_external_data=False)
    edit(graph)
    load_external_data_for_model(graph, str(source.parent))
    if loaded is not None:
        loaded(graph)
    return save_onnx(graph, target)


def dequantize_node(node: onnx.NodeProto, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """float64 [K, N] weight of a 4-bit projection node (either layout) from its initializer arrays."""
    from . import reference as ref
    from .quantize import MatMulNBitsWeight, dequantize_matmul_nbits

    a = {x.name: x.i for x in node.attribute if x.name in ("K", "N", "block_size")}
    K, N, B = a["K"], a["N"], a["block_size"]
    first, scales, third = (tensors[i] for i in node.input[1:4])
    if node.op_type == NBITS_OP:
        return ref.dequantize_blocks(ref.unpack_nibbles(first, N), scales, third, B)
    return dequantize_matmul_nbits(MatMulNBitsWeight(first, scales.reshape(-1), third.reshape(-1), K, N, B))


def check_int4_export(model, export_dir: Path, config: ActTailConfig, tolerance: float) -> float:
    """Worst relative difference between each 4-bit node's dequantized weight and PyTorch's (dequantized) weight.

    Raises :class:`ExportValidationError` beyond ``tolerance``, or when a projection still has a float weight.
    """
    import onnx
    from onnx import numpy_helper

    from .graph_rewrite import NBITS_OPS, find_projections, packed_columns

    graph = onnx.load(str(Path(export_dir) / "model.onnx"))
    tensors = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    found = find_projections(graph, config.spec)
    columns = packed_columns(found, config)
    modules = dict(model.named_modules())
    worst = 0.0
    cache: dict[str, np.ndarray] = {}
    for name, node in found.items():
        if node.op_type not in NBITS_OPS:
            raise ExportValidationError(f"{name} kept its float weight ({node.op_type}) in a --weights int4 export; this is a bug")
        w = cache.setdefault(node.name, dequantize_node(node, tensors))
        if name in columns:
            w = w[:, columns[name][0]:columns[name][1]]
        want = modules[name].weight.detach().double().cpu().numpy().T
        worst = max(worst, float(np.abs(w - want).max() / (np.abs(want).max() or 1.0)))
    if worst > tolerance:
        raise ExportValidationError(f"4-bit weights of the graph differ from the quantized PyTorch model by {worst:.3g} "
                                    f"(tolerance {tolerance:.0e}); this is a bug, please report it")
    logger.info("validation: 4-bit weights of %d projections match PyTorch's (worst relative difference %.2g)", len(found), worst)
    return worst


#: ``--weights int4`` defaults (filled in by :attr:`acttail_export.options.ExportOptions.int4`). The quantizer is
#: GPTQ in act-order with static groups and ``mse`` block ranges: its input Hessians come from the export's
#: calibration windows, which every export reads (``--calibration-data``; the thresholds use the same ones), so
#: there is no export without them; ``mse`` is the data-free choice (docs/quantization.md)
DEFAULT_BLOCK_SIZE = 32
DEFAULT_QUANTIZER = "gptq-mse-act"
