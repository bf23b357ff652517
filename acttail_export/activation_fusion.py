"""Fold the SwiGLU activation between a packed gate|up projection and the down projection into the down op.

onnxruntime-genai's model builder, with ``fuse_mlp_gate_up`` (the exporter's packed default base), writes per layer::

    P = gate_up_proj/MatMul(h)                 # [..., 2I]: [gate | up]
    g, u = Split(P, axis=-1)                   # two equal halves, gate first
    act = Mul(g, Sigmoid(g))                   # silu(gate)
    x = Mul(act, u)
    down_proj/MatMul(x)

After the ActTail rewrite the down MatMul is ``com.acttail::SparseMatMul`` (or ``SparseMatMulNBits``). On a GPU the
3-4 elementwise kernels between the two projections cost ~8 µs per layer at batch 1; the ops' ``activation``
attribute computes ``x = silu(g) * u`` inside the down op instead (:func:`acttail_export.reference.swiglu`: float32,
rounded once to the graph's type). :func:`fuse_swiglu` finds that pattern in front of every fused down op, feeds
``P`` to the op with ``activation="swiglu"`` and removes the Split / Sigmoid / Mul / Mul that nothing else reads.

Pure onnx (no onnxruntime): the pass only edits the graph. Graphs without the pattern (unpacked gate/up, the mask
kernel, the optimum base, an already fused graph) are left unchanged.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

DOMAIN = "com.acttail"
#: ops that take the ``activation`` attribute
ACTIVATION_OPS = ("SparseMatMul", "SparseMatMulNBits")
SWIGLU = "swiglu"
_ONNX_DOMAINS = ("", "ai.onnx")


def activation_of(node: onnx.NodeProto) -> str:
    """The node's ``activation`` attribute ("" when absent)."""
    for a in node.attribute:
        if a.name == "activation":
            value = helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def fused_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The ``com.acttail`` nodes of ``model`` that apply SwiGLU to their input (``activation="swiglu"``)."""
    return [n for n in model.graph.node if n.domain == DOMAIN and n.op_type in ACTIVATION_OPS and activation_of(n) == SWIGLU]


def fuse_swiglu(model: onnx.ModelProto) -> int:
    """Fold ``Mul(Mul(g, Sigmoid(g)), u)`` (``g, u = Split(P)``) into each ``SparseMatMul`` / ``SparseMatMulNBits``
    that reads it (in place); returns the number of ops fused.

    Matched: input 0 of a ``com.acttail`` op without an activation produced by ``Mul(a, b)``, one of ``a`` / ``b``
    being ``Mul(g, Sigmoid(g))`` (either operand order) and the other ``u``, where ``g`` and ``u`` are outputs 0 and
    1 of one ``Split`` of ``P`` on its last axis into two halves of ``K`` (the op's input features: rows of ``W``, or
    its ``K`` attribute). The op then reads ``P`` with ``activation="swiglu"``; the Split, Sigmoid and both Muls are
    removed when no other node, subgraph or graph output reads their outputs.
    """
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output if out}
    inits = {t.name: t for t in graph.initializer}
    shapes = _ShapeInfo(model, producers, inits)
    chain: list[onnx.NodeProto] = []
    fused = 0
    for node in graph.node:
        if node.domain != DOMAIN or node.op_type not in ACTIVATION_OPS or activation_of(node) or not node.input:
            continue
        K = _input_features(node, inits, shapes)
        match = _match(node.input[0], K, producers, inits, shapes) if K is not None else None
        if match is None:
            continue
        packed, nodes = match
        node.input[0] = packed
        node.attribute.append(helper.make_attribute("activation", SWIGLU))
        chain.extend(nodes)
        fused += 1
    removed = _remove_unused(model, chain)
    if fused:
        logger.info("SwiGLU folded into %d down projection op(s) (activation=\"swiglu\"); %d elementwise nodes removed",
                    fused, removed)
    else:
        logger.debug("no Split/Sigmoid/Mul/Mul SwiGLU pattern in front of a com.acttail op: graph unchanged")
    return fused


# --------------------------------------------------------------------------------------------
# matching
# --------------------------------------------------------------------------------------------
def _is(node: onnx.NodeProto | None, op_type: str, inputs: int) -> bool:
    return node is not None and node.op_type == op_type and node.domain in _ONNX_DOMAINS and len(node.input) == inputs


def _match(x: str, K: int, producers: dict, inits: dict,
           shapes: _ShapeInfo) -> tuple[str, list[onnx.NodeProto]] | None:
    """(P, [Mul, Mul, Sigmoid, Split(, the Constant of its sizes)]) when ``x = Mul(Mul(g, Sigmoid(g)), u)`` with
    ``g, u = Split(P)`` in two halves of ``K`` on the last axis; else None."""
    mul = producers.get(x)
    if not _is(mul, "Mul", 2):
        return None
    for act_name, u in ((mul.input[0], mul.input[1]), (mul.input[1], mul.input[0])):
        act = producers.get(act_name)
        if not _is(act, "Mul", 2):
            continue
        for g, sig_name in ((act.input[0], act.input[1]), (act.input[1], act.input[0])):
            sig = producers.get(sig_name)
            if not (_is(sig, "Sigmoid", 1) and sig.input[0] == g):
                continue
            split = producers.get(g)
            if split is None or split.op_type != "Split" or split.domain not in _ONNX_DOMAINS:
                continue
            if list(split.output) != [g, u] or g == u:
                continue
            if _halves_of(split, K, inits, producers, shapes):
                sizes = producers.get(split.input[1]) if len(split.input) > 1 and split.input[1] else None
                return split.input[0], [mul, act, sig, split] + ([sizes] if sizes is not None else [])
    return None


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _halves_of(split: onnx.NodeProto, K: int, inits: dict, producers: dict, shapes: _ShapeInfo) -> bool:
    """True when ``split`` cuts its input on the last axis into two parts of ``K``.

    Opset < 13 gives the sizes as attribute ``split``, 13+ as input 1, 18+ may give ``num_outputs`` instead; without
    sizes the split is into equal parts, which are ``K`` each only when the input's last dimension is ``2K``.
    """
    attrs = _attrs(split)
    packed = split.input[0]
    axis = int(attrs.get("axis", 0))
    if axis != -1:
        rank = shapes.rank(packed)
        if rank is None or axis != rank - 1:
            return False
    sizes = None
    if "split" in attrs:
        sizes = [int(v) for v in attrs["split"]]
    elif len(split.input) > 1 and split.input[1]:
        value = _constant(split.input[1], inits, producers)
        if value is None:
            return False
        sizes = [int(v) for v in value.reshape(-1)]
    elif "num_outputs" in attrs and int(attrs["num_outputs"]) != 2:
        return False
    if sizes is not None:
        return sizes == [K, K]
    return shapes.last_dim(packed) == 2 * K


def _constant(name: str, inits: dict, producers: dict) -> np.ndarray | None:
    """The value of ``name`` when it is an initializer or a ``Constant`` node's tensor; else None."""
    if name in inits:
        return numpy_helper.to_array(inits[name])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant" and node.domain in _ONNX_DOMAINS:
        attrs = _attrs(node)
        if isinstance(attrs.get("value"), onnx.TensorProto):
            return numpy_helper.to_array(attrs["value"])
        if "value_ints" in attrs:
            return np.asarray(attrs["value_ints"], dtype=np.int64)
    return None


def _input_features(node: onnx.NodeProto, inits: dict, shapes: _ShapeInfo) -> int | None:
    """K of a ``com.acttail`` op: its ``K`` attribute (``SparseMatMulNBits``), or the rows of ``W``."""
    if node.op_type == "SparseMatMulNBits":
        k = _attrs(node).get("K")
        return int(k) if k is not None else None
    if len(node.input) < 2:
        return None
    w = inits.get(node.input[1])
    if w is not None:
        return int(w.dims[0]) if len(w.dims) == 2 else None
    dims = shapes.dims(node.input[1])
    return dims[0] if dims is not None and len(dims) == 2 and dims[0] is not None else None


class _ShapeInfo:
    """Rank and last dimension of a tensor, from the graph's declared shapes or its producer (a projection's weight),
    and from ONNX shape inference as a last resort (run once, only when needed)."""

    def __init__(self, model: onnx.ModelProto, producers: dict, inits: dict):
        self.model, self.producers, self.inits = model, producers, inits
        self.declared = self._declared(model.graph)
        self.inferred: dict[str, list[int | None]] | None = None

    @staticmethod
    def _declared(graph: onnx.GraphProto) -> dict[str, list[int | None]]:
        out: dict[str, list[int | None]] = {}
        for v in [*graph.input, *graph.value_info, *graph.output]:
            t = v.type.tensor_type
            if t.HasField("shape"):
                out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        for t in graph.initializer:
            out[t.name] = list(t.dims)
        return out

    def dims(self, name: str) -> list[int | None] | None:
        if name in self.declared:
            return self.declared[name]
        if self.inferred is None:
            self.inferred = self._infer()
        return self.inferred.get(name)

    def rank(self, name: str) -> int | None:
        dims = self.dims(name)
        return len(dims) if dims is not None else None

    def last_dim(self, name: str) -> int | None:
        """Last dimension of ``name``: declared, else the output width of the projection that writes it."""
        dims = self.declared.get(name)
        if dims and dims[-1]:
            return dims[-1]
        node = self.producers.get(name)
        if node is not None and len(node.input) > 1:
            if node.op_type == "SparseMatMulNBits" or (node.op_type == "MatMulNBits" and node.domain == "com.microsoft"):
                n = _attrs(node).get("N")
                if n is not None:
                    return int(n)
            elif node.op_type in ("MatMul", "SparseMatMul") and node.input[1] in self.inits:
                w = self.inits[node.input[1]]
                if len(w.dims) >= 2:
                    return int(w.dims[-1])
        dims = self.dims(name)
        return dims[-1] if dims else None

    def _infer(self) -> dict[str, list[int | None]]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception as exc:  # noqa: BLE001 - a graph shape inference cannot handle: shapes stay unknown
            logger.debug("shape inference failed (%s): SwiGLU fusion only uses declared shapes", exc)
            return {}
        return self._declared(inferred.graph)


# --------------------------------------------------------------------------------------------
# removal
# --------------------------------------------------------------------------------------------
def _subgraph_inputs(node: onnx.NodeProto) -> Iterable[str]:
    """Names read by a node's subgraphs (If / Loop / Scan bodies may read outer-scope tensors)."""
    for a in node.attribute:
        graphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []
        for g in graphs:
            for inner in g.node:
                yield from inner.input
                yield from _subgraph_inputs(inner)


def _remove_unused(model: onnx.ModelProto, candidates: list[onnx.NodeProto]) -> int:
    """Remove the ``candidates`` none of whose outputs is read (by a node, a subgraph or a graph output), repeatedly,
    and the initializers only they read (a Split's sizes); returns how many nodes were removed."""
    if not candidates:
        return 0
    graph = model.graph
    uses: Counter[str] = Counter(o.name for o in graph.output)
    for node in graph.node:
        uses.update(i for i in node.input if i)
        uses.update(_subgraph_inputs(node))
    pending = {id(n): n for n in candidates}
    removed: set[int] = set()
    changed = True
    while changed:
        changed = False
        for key, node in list(pending.items()):
            if any(uses[o] for o in node.output if o):
                continue
            removed.add(key)
            del pending[key]
            uses.subtract(i for i in node.input if i)
            changed = True
    if not removed:
        return 0
    gone = {o for n in graph.node if id(n) in removed for o in n.output}
    read = {i for n in graph.node if id(n) in removed for i in n.input}
    kept = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    info = [v for v in graph.value_info if v.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(info)
    graph_inputs = {v.name for v in graph.input}
    unused = {name for name in read if not uses[name] and name not in graph_inputs}
    if unused & {t.name for t in graph.initializer}:
        inits = [t for t in graph.initializer if t.name not in unused]
        del graph.initializer[:]
        graph.initializer.extend(inits)
    return len(removed)
