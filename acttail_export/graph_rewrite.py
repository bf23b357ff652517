"""Rewrite an exported decoder graph so every projection sees a sparsified input.

The 7 projection MatMuls of each layer (``/model/layers.{i}/self_attn/{q,k,v,o}_proj/MatMul``,
``/model/layers.{i}/mlp/{gate,up,down}_proj/MatMul``) get, with ``kernel="mask"``, a masking
subgraph of standard ONNX ops on their activation input:

* threshold mode: ``Where(Abs(x) > t, x, 0)`` (keep ``|x| > t``)
* top-k mode: ``TopK(Abs(x), k)`` on the last axis, its indices scattered into a boolean mask,
  ``Where(mask, x, 0)``: exactly k entries per row; among equal ``|x|`` the lower channel index
  wins (ONNX TopK semantics). A k-th-value comparison would keep every tie, and ties are systematic
  with grouped-query attention (at a position attending only to itself, each value of the
  ``o_proj`` input appears once per query head of the group). ``k = 0`` zeroes the input,
  ``k = d`` leaves it alone.

With ``kernel="fused"`` the MatMul is replaced by ``com.acttail::SparseMatMul(x, W[, t])``.
Projections that share an input (q/k/v, gate/up) get one mask each. Attention MatMuls are never
touched.

Packed projections: onnxruntime-genai's model builder can write q/k/v as one ``qkv_proj`` MatMul
(``fuse_qkv``) and gate/up as one ``gate_up_proj`` MatMul (``fuse_mlp_gate_up``), with the members'
weights side by side in column order. When the members' masks are identical (the same threshold or k:
:func:`packable`; allocations that give an input group one budget) the MatMul gets one mask (or one
``SparseMatMul``). Otherwise every member keeps its own rule: the fused kernel writes one ``SparseMatMul``
with ``segments`` (the members' column ends) and a threshold or k per member (``thresholds[G]`` / ``ks``), so
the default ActTail allocation runs packed at every sparsity; the mask kernel gives each member its own
masked input and MatMul on a ``Slice`` of the packed weight (named as an unpacked projection; ONNX Runtime
folds the slices at session creation) and concatenates the outputs.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .architectures import DEFAULT_SPEC, ArchSpec
from .config import KERNELS, MODES, ActTailConfig, ProjectionConfig, _check_choice
from .errors import ActTailError

logger = logging.getLogger(__name__)

CUSTOM_DOMAIN = "com.acttail"
CUSTOM_OP = "SparseMatMul"
CUSTOM_OPSET = 1
#: 4-bit projection ops (:mod:`acttail_export.int4_rewrite`): the weight is described by the K / N attributes
NBITS_OPS = ("SparseMatMulNBits", "MatMulNBits")
MIN_OPSET = 13  # TopK with K as input, Where, GreaterOrEqual (12+)

#: compatibility alias: packed projection MatMuls of the genai builder -> their members (see ``ArchSpec.packed``)
PACKED_KINDS = DEFAULT_SPEC.packed


def onnx_node_name(layer: int, kind: str, spec: ArchSpec = DEFAULT_SPEC) -> str:
    """ONNX node name of a projection MatMul as written by the PyTorch exporter (optimum-onnx)."""
    return spec.onnx_node_name(layer, kind, "optimum")


@dataclass
class RewriteSummary:
    """What :func:`rewrite` changed."""

    projections: int
    layers: int
    mode: str
    kernel: str
    skipped_dense: int  # projections left untouched: top-k with k = d, or uncalibrated threshold at sparsity 0


def _is_identity(p: ProjectionConfig, mode: str) -> bool:
    """True when the projection's mask keeps everything (same rule as the PyTorch reference)."""
    if mode == "topk":
        return p.keep_k() >= p.in_features
    return p.threshold is None and p.sparsity == 0


def find_projections(model: onnx.ModelProto, spec: ArchSpec = DEFAULT_SPEC) -> dict[str, onnx.NodeProto]:
    """Map projection names (``model.layers.3.mlp.down_proj``) to their MatMul nodes.

    The members of a packed MatMul (``qkv_proj``, ``gate_up_proj``) all map to that one node; see
    :func:`packed_columns` for their columns. Raises ActTailError when any layer that appears in the
    graph lacks one of its projections (``spec.kinds``).
    """
    found: dict[str, onnx.NodeProto] = {}
    layers: set[int] = set()
    for node in model.graph.node:
        layer = spec.layer_of(node.name)
        if layer is not None:
            layers.add(layer)
        match = spec.match_node(node.name)
        if match is not None and node.op_type in ("MatMul", CUSTOM_OP, *NBITS_OPS):
            for member in match.members:
                found[spec.projection_name(match.layer, member)] = node
    if not layers:
        raise ActTailError("no /model/layers.N/ nodes in the ONNX graph: not a LLaMA/Mistral decoder export")
    missing = [spec.projection_name(i, k) for i in sorted(layers) for k in spec.kinds
               if spec.projection_name(i, k) not in found]
    if missing:
        raise ActTailError(f"ONNX graph lacks {len(missing)} projection MatMul(s), e.g. "
                           f"{onnx_node_name(*_split(missing[0]), spec)}; "
                           "the export is not a LLaMA/Mistral decoder graph (re-export with optimum-onnx)")
    if sorted(layers) != list(range(len(layers))):
        raise ActTailError(f"ONNX graph layers are not contiguous: {sorted(layers)}")
    return found


def packed_columns(found: dict[str, onnx.NodeProto], config: ActTailConfig) -> dict[str, tuple[int, int]]:
    """Columns ``[start, stop)`` of each packed member's output inside its packed MatMul's output.

    Only members of packed MatMuls appear; widths come from the config, in ``config.spec.packed`` order.
    """
    by_name = config.by_name()
    columns: dict[str, tuple[int, int]] = {}
    for node, members in _packed_groups(found, config.spec).items():
        start = 0
        for name in members:
            width = by_name[name].out_features
            columns[name] = (start, start + width)
            start += width
    return columns


def _packed_groups(found: dict[str, onnx.NodeProto], spec: ArchSpec) -> dict[str, list[str]]:
    """Packed MatMul node name -> its member projection names in column order."""
    groups: dict[str, list[str]] = {}
    for name, node in found.items():
        if spec.match_node(node.name).packed:
            groups.setdefault(node.name, []).append(name)
    order = {k: i for members in spec.packed.values() for i, k in enumerate(members)}
    return {n: sorted(names, key=lambda x: order[x.rsplit(".", 1)[1]]) for n, names in groups.items()}


def _mask_key(p: ProjectionConfig, mode: str) -> tuple:
    """What decides a projection's mask: equal keys give equal masks on the same input."""
    if _is_identity(p, mode):
        return ("dense",)
    return ("topk", p.keep_k()) if mode == "topk" else ("threshold", p.threshold)


def packable(config: ActTailConfig, mode: str | None = None) -> bool:
    """True when q/k/v and gate/up of every layer have identical masks (one mask per packed MatMul); otherwise
    :func:`rewrite` gives the members their own rules."""
    mode = mode or config.mode
    by_layer: dict[tuple[int, tuple[str, ...]], set] = {}
    for p in config.projections:
        for members in config.spec.packed.values():
            if p.kind in members:
                by_layer.setdefault((p.layer, members), set()).add(_mask_key(p, mode))
    return all(len(keys) == 1 for keys in by_layer.values())


def _split(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return int(parts[2]), parts[-1]


def _float_type(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    weight = inits.get(node.input[1])
    if weight is None:
        raise ActTailError(f"{node.name}: weight {node.input[1]!r} is not an initializer; re-export without weight sharing tricks")
    return weight.data_type


def check_against_config(model: onnx.ModelProto, config: ActTailConfig) -> dict[str, onnx.NodeProto]:
    """Projections of the graph, checked to match ``config`` one to one (names and shapes)."""
    found = find_projections(model, config.spec)
    names = [p.name for p in config.projections]
    if set(names) != set(found):
        raise ActTailError(f"acttail config has {len(names)} projections but the ONNX graph has {len(found)}; "
                           "the config does not belong to this model (re-run the export)")
    inits = {i.name: i for i in model.graph.initializer}
    by_name = config.by_name()
    groups = _packed_groups(found, config.spec)
    for p in config.projections:
        node = found[p.name]
        members = [by_name[n] for n in groups.get(node.name, [p.name])]
        want = [p.in_features, sum(m.out_features for m in members)]
        w = inits.get(node.input[1])
        dims = _nbits_dims(node) if node.op_type in NBITS_OPS else list(w.dims) if w is not None else None
        if dims is not None and (dims != want or any(m.in_features != p.in_features for m in members)):
            what = f"{node.name} packs {', '.join(m.name.rsplit('.', 1)[1] for m in members)}: " if len(members) > 1 else f"{p.name}: "
            raise ActTailError(f"{what}ONNX weight is {dims} but the config says {want}; "
                               "the config does not belong to this model")
    return found


def _nbits_dims(node: onnx.NodeProto) -> list[int]:
    """[K, N] of a 4-bit projection node, from its attributes."""
    attrs = {a.name: a.i for a in node.attribute if a.name in ("K", "N")}
    return [attrs.get("K", -1), attrs.get("N", -1)]


class _Builder:
    """Adds uniquely named nodes and initializers to a graph."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, name))
        return name


def _np_dtype(elem_type: int):
    return helper.tensor_dtype_to_np_dtype(elem_type)


def _mask_nodes(b: _Builder, p: ProjectionConfig, x: str, elem_type: int, mode: str) -> tuple[list[onnx.NodeProto], str]:
    """Masking subgraph for one projection; returns (nodes, name of the masked tensor)."""
    base = f"/acttail/{p.name}"
    dt = _np_dtype(elem_type)
    zero = b.const(f"{base}/zero", np.zeros((), dtype=dt))
    out = f"{base}/masked_input"
    absx = f"{base}/abs"
    cond = f"{base}/keep"
    if mode == "threshold":
        if p.threshold is None:
            raise ActTailError(f"{p.name} has no calibrated threshold; calibrate before exporting in threshold mode")
        thr = b.const(f"{base}/threshold", np.array(p.threshold, dtype=dt))
        nodes = [
            helper.make_node("Abs", [x], [absx], name=f"{base}/Abs"),
            helper.make_node("Greater", [absx, thr], [cond], name=f"{base}/Greater"),
        ]
    else:
        k = p.keep_k()
        if k == 0:
            never = b.const(f"{base}/never", np.zeros((), dtype=np.bool_))
            return [helper.make_node("Where", [never, x, zero], [out], name=f"{base}/Where")], out
        kk = b.const(f"{base}/k", np.array([k], dtype=np.int64))
        false = b.const(f"{base}/false", np.zeros((1,), dtype=np.bool_))
        true = b.const(f"{base}/true", np.ones((1,), dtype=np.bool_))
        nodes = [
            helper.make_node("Abs", [x], [absx], name=f"{base}/Abs"),
            # ONNX TopK: among equal values the lower index comes first, so exactly k are selected
            helper.make_node("TopK", [absx, kk], [f"{base}/topk_values", f"{base}/topk_indices"],
                             name=f"{base}/TopK", axis=-1, largest=1, sorted=1),
            helper.make_node("Shape", [x], [f"{base}/shape"], name=f"{base}/Shape"),
            helper.make_node("Shape", [f"{base}/topk_indices"], [f"{base}/kept_shape"], name=f"{base}/KeptShape"),
            helper.make_node("Expand", [false, f"{base}/shape"], [f"{base}/none"], name=f"{base}/None"),
            helper.make_node("Expand", [true, f"{base}/kept_shape"], [f"{base}/ones"], name=f"{base}/Ones"),
            helper.make_node("ScatterElements", [f"{base}/none", f"{base}/topk_indices", f"{base}/ones"], [cond],
                             name=f"{base}/ScatterElements", axis=-1),
        ]
    nodes.append(helper.make_node("Where", [cond, x, zero], [out], name=f"{base}/Where"))
    return nodes, out


def _mixed(groups: dict[str, list[str]], by_name: dict[str, ProjectionConfig], mode: str) -> set[str]:
    """Packed MatMuls whose members have different masks (each member then keeps its own rule)."""
    return {node for node, members in groups.items() if len({_mask_key(by_name[m], mode) for m in members}) > 1}


def _fused_members(b: _Builder, node: onnx.NodeProto, members: list[ProjectionConfig], mode: str) -> onnx.NodeProto:
    """One ``SparseMatMul`` for a packed MatMul whose members keep their own threshold / k over their own columns
    (``segments``); a member without sparsity keeps everything (k = d, threshold -inf)."""
    ends = list(np.cumsum([m.out_features for m in members]))
    base = f"/acttail/{node.name.strip('/').rsplit('/', 1)[0]}"
    attrs: dict = {"mode": mode, "segments": [int(e) for e in ends]}
    inputs = [node.input[0], node.input[1]]
    if mode == "threshold":
        for m in members:
            if m.threshold is None and not _is_identity(m, mode):
                raise ActTailError(f"{m.name} has no calibrated threshold; calibrate before exporting in threshold mode")
        t = np.array([-np.inf if _is_identity(m, mode) else m.threshold for m in members], dtype=np.float32)
        inputs.append(b.const(f"{base}/thresholds", t))
    else:
        attrs["ks"] = [int(min(m.keep_k(), m.in_features)) for m in members]
    return helper.make_node(CUSTOM_OP, inputs, list(node.output), name=node.name, domain=CUSTOM_DOMAIN, **attrs)


#: name suffix of the ``Slice`` that gives an unpacked member its columns of the packed weight (the 4-bit rewrite
#: replaces it by the member's own weight, :func:`acttail_export.int4_rewrite.rewrite_int4`)
UNPACKED_SLICE = "/acttail_Slice"


def _unpacked_members(b: _Builder, node: onnx.NodeProto, members: list[ProjectionConfig], elem_type: int, mode: str,
                      spec: ArchSpec) -> list[onnx.NodeProto]:
    """Mask kernel, members with different masks: one MatMul per member, named as an unpacked projection, on a
    ``Slice`` of the packed weight (constant-folded by ONNX Runtime at session creation), outputs concatenated."""
    nodes, outs, start = [], [], 0
    for m in members:
        layer, kind = _split(m.name)
        name = spec.onnx_node_name(layer, kind, "optimum")
        cols = [b.const(f"{name}/acttail_{what}", np.array([v], dtype=np.int64))
                for what, v in (("start", start), ("stop", start + m.out_features), ("axis", 1))]
        weight = f"{name}/acttail_weight"
        nodes.append(helper.make_node("Slice", [node.input[1], *cols], [weight], name=f"{name}{UNPACKED_SLICE}"))
        x = node.input[0]
        if not _is_identity(m, mode):
            mask, x = _mask_nodes(b, m, x, elem_type, mode)
            nodes.extend(mask)
        outs.append(f"{name}/acttail_output_0")
        nodes.append(helper.make_node("MatMul", [x, weight], [outs[-1]], name=name))
        start += m.out_features
    nodes.append(helper.make_node("Concat", outs, list(node.output), name=f"{node.name}/acttail_Concat", axis=-1))
    return nodes


def rewrite(model: onnx.ModelProto, config: ActTailConfig, mode: str | None = None, kernel: str | None = None) -> RewriteSummary:
    """Insert ActTail sparsification before every projection of ``model`` (in place)."""
    mode = mode or config.mode
    kernel = kernel or config.kernel
    _check_choice(mode, MODES, "mode")
    _check_choice(kernel, KERNELS, "kernel")
    found = check_against_config(model, config)
    if any(n.op_type != "MatMul" for n in found.values()):
        raise ActTailError("the ONNX graph was already rewritten; start from the base export")
    by_name = config.by_name()
    groups = _packed_groups(found, config.spec)
    mixed = _mixed(groups, by_name, mode)
    b = _Builder(model)
    before: dict[int, list[onnx.NodeProto]] = {}  # id(node) -> nodes to insert before it
    replace: dict[int, onnx.NodeProto | None] = {}
    skipped = 0
    done: set[str] = set()
    for p in config.projections:
        node = found[p.name]
        if node.name in done:  # a packed MatMul, rewritten with its first member
            skipped += _is_identity(p, mode)
            continue
        done.add(node.name)
        if node.name in mixed:  # members keep their own rules: per-member segments (fused), unpacked (mask)
            members = [by_name[m] for m in groups[node.name]]
            if kernel == "fused":
                replace[id(node)] = _fused_members(b, node, members, mode)
            else:
                before[id(node)] = _unpacked_members(b, node, members, _float_type(model, node), mode, config.spec)
                replace[id(node)] = None
            skipped += _is_identity(p, mode)  # the other members count when the loop reaches them
            continue
        if node.name in groups:  # one mask for the packed members: name it after the packed MatMul
            p = dataclasses.replace(p, name=p.name.rsplit(".", 1)[0] + "." + config.spec.match_node(node.name).kind)
        elem_type = _float_type(model, node)
        if _is_identity(p, mode):
            skipped += 1
            continue
        if kernel == "fused":
            attrs: dict = {"mode": mode}
            inputs = [node.input[0], node.input[1]]
            if mode == "threshold":
                if p.threshold is None:
                    raise ActTailError(f"{p.name} has no calibrated threshold; calibrate before exporting in threshold mode")
                inputs.append(b.const(f"/acttail/{p.name}/threshold", np.array(p.threshold, dtype=np.float32)))
            else:
                attrs["k"] = int(p.keep_k())
            replace[id(node)] = helper.make_node(CUSTOM_OP, inputs, list(node.output), name=node.name,
                                                 domain=CUSTOM_DOMAIN, **attrs)
            continue
        nodes, masked = _mask_nodes(b, p, node.input[0], elem_type, mode)
        before[id(node)] = nodes
        node.input[0] = masked
    new_nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        new_nodes.extend(before.get(id(node), ()))
        new = replace.get(id(node), node)
        if new is not None:  # None: replaced by the nodes before it (an unpacked packed MatMul)
            new_nodes.append(new)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)
    model.graph.initializer.extend(b.inits)
    _ensure_opsets(model, fused=kernel == "fused")
    layers = len({p.layer for p in config.projections})
    logger.info("rewrote %d projections in %d layers (%s, %s kernel%s)", len(config.projections), layers, mode, kernel,
                f"; {len(groups)} packed MatMuls" if groups else "")
    return RewriteSummary(len(config.projections), layers, mode, kernel, skipped)


def _ensure_opsets(model: onnx.ModelProto, fused: bool) -> None:
    default = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not default:
        model.opset_import.append(helper.make_opsetid("", MIN_OPSET))
    elif default[0].version < MIN_OPSET:
        raise ActTailError(f"ONNX opset {default[0].version} is too old for the masking ops; export with opset >= {MIN_OPSET}")
    if fused and not any(o.domain == CUSTOM_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CUSTOM_DOMAIN, CUSTOM_OPSET))
