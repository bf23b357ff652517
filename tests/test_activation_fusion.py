"""The SwiGLU fold (:func:`acttail_export.activation_fusion.fuse_swiglu`) on small hand-built graphs.

Pure onnx, no ONNX Runtime and no op library: the graphs are checked with ``onnx.checker`` and run with
``onnx.reference.ReferenceEvaluator``, the ``com.acttail`` ops by a Python implementation on top of
:mod:`acttail_export.reference` (the op contract). Each graph is the builder's MLP tail,
``P = MatMul(h, W_gate_up)`` -> ``Split`` -> ``Sigmoid`` / ``Mul`` / ``Mul`` -> down op, in the forms an ONNX graph can
spell it (Split sizes as an attribute, an initializer, a ``Constant`` node, ``num_outputs``, or none at all; Mul
operands in either order) and for float32 and float16.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from acttail_export import reference as ref
from acttail_export.activation_fusion import activation_of, fuse_swiglu, fused_nodes

D, K, N = 6, 10, 7
ELEM = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}
SPLIT_FORMS = ("attribute", "initializer", "constant", "num_outputs", "equal")
#: the default-domain opset each Split form needs: sizes as an attribute before 13, as an input from 13, num_outputs from 18
OPSET = {"attribute": 11, "initializer": 13, "constant": 13, "num_outputs": 18, "equal": 13}


# --------------------------------------------------------------------------------------------
# the com.acttail ops for the ReferenceEvaluator: the contract of reference.py
# --------------------------------------------------------------------------------------------
class SparseMatMul(OpRun):
    op_domain = "com.acttail"

    def _run(self, x, w, t=None, mode=None, k=None, activation=None):  # noqa: D401 - OpRun's interface
        member = ref.Member(threshold=None if t is None else float(t), k=k)
        y, _ = ref.sparse_matmul(x, w, mode.decode() if isinstance(mode, bytes) else mode, [member],
                                 activation=(activation.decode() if isinstance(activation, bytes) else activation) or None)
        return (y.astype(x.dtype),)


class SparseMatMulNBits(OpRun):
    op_domain = "com.acttail"

    def _run(self, x, q, scales, offsets, t=None, K=None, N=None, block_size=None, bits=None, mode=None, k=None,  # noqa: N803
             activation=None):
        member = ref.Member(threshold=None if t is None else float(t), k=k)
        y, _ = ref.sparse_matmul_nbits(x, q, scales, offsets, N, block_size, mode.decode() if isinstance(mode, bytes) else mode,
                                       [member], activation=(activation.decode() if isinstance(activation, bytes) else activation) or None)
        return (y.astype(x.dtype),)


# --------------------------------------------------------------------------------------------
# graphs
# --------------------------------------------------------------------------------------------
def mlp_graph(dtype=np.float32, form: str = "num_outputs", swap_outer: bool = False, swap_inner: bool = False,
              down: str = "SparseMatMul", threshold: float = 0.5, layers: int = 1, seed: int = 0) -> onnx.ModelProto:
    """``layers`` MLP tails in a chain: h -> P -> Split -> silu(g) * u -> down op -> next h (D wide)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "h"
    for i in range(layers):
        base = f"/model/layers.{i}/mlp"
        wgu = rng.standard_normal((D, 2 * K)).astype(dtype)
        inits.append(numpy_helper.from_array(wgu, f"{base}/gate_up.weight"))
        p = f"{base}/gate_up_proj/MatMul/output_0"
        nodes.append(helper.make_node("MatMul", [h, f"{base}/gate_up.weight"], [p], name=f"{base}/gate_up_proj/MatMul"))
        g, u = f"{base}/gate_proj/MatMul/output_0", f"{base}/up_proj/MatMul/output_0"
        nodes += split_nodes(form, p, [g, u], f"{base}/gate_up_proj/Split", inits, sizes=[K, K])
        s, a, x = f"{base}/act_fn/Sigmoid/output_0", f"{base}/act_fn/Mul/output_0", f"{base}/Mul/output_0"
        nodes.append(helper.make_node("Sigmoid", [g], [s], name=f"{base}/act_fn/Sigmoid"))
        nodes.append(helper.make_node("Mul", [s, g] if swap_inner else [g, s], [a], name=f"{base}/act_fn/Mul"))
        nodes.append(helper.make_node("Mul", [u, a] if swap_outer else [a, u], [x], name=f"{base}/Mul"))
        y = f"{base}/down_proj/MatMul/output_0" if i + 1 < layers else "y"
        nodes.append(down_node(down, x, y, f"{base}/down_proj/MatMul", inits, dtype, threshold, rng))
        h = y
    return make_model(nodes, inits, dtype, OPSET[form])


def split_nodes(form: str, src: str, outs: list[str], name: str, inits: list, sizes: list[int], axis: int = -1) -> list:
    """One Split of ``src`` into ``outs`` in the given form (plus the Constant node of the "constant" form)."""
    if form == "attribute":
        return [helper.make_node("Split", [src], outs, name=name, axis=axis, split=sizes)]
    if form == "initializer":
        inits.append(numpy_helper.from_array(np.array(sizes, np.int64), f"{name}/sizes"))
        return [helper.make_node("Split", [src, f"{name}/sizes"], outs, name=name, axis=axis)]
    if form == "constant":
        const = helper.make_node("Constant", [], [f"{name}/sizes"], name=f"{name}/Constant",
                                 value=numpy_helper.from_array(np.array(sizes, np.int64)))
        return [const, helper.make_node("Split", [src, f"{name}/sizes"], outs, name=name, axis=axis)]
    if form == "num_outputs":
        return [helper.make_node("Split", [src], outs, name=name, axis=axis, num_outputs=len(outs))]
    return [helper.make_node("Split", [src], outs, name=name, axis=axis)]  # "equal": no sizes, equal parts


def down_node(kind: str, x: str, y: str, name: str, inits: list, dtype, threshold: float, rng) -> onnx.NodeProto:
    """The down projection [K -> D]: ``SparseMatMul``, ``SparseMatMulNBits`` (threshold mode) or a plain ``MatMul``."""
    t = f"{name}/threshold"
    if kind == "SparseMatMulNBits":
        q = rng.integers(0, 16, (K, D)).astype(np.uint8)
        inits += [numpy_helper.from_array(ref.pack_nibbles(q), f"{name}/Q"),
                  numpy_helper.from_array(rng.uniform(0.05, 0.2, (1, D)).astype(dtype), f"{name}/scales"),
                  numpy_helper.from_array(rng.uniform(-1.0, -0.5, (1, D)).astype(dtype), f"{name}/offsets"),
                  numpy_helper.from_array(np.array(threshold, np.float32), t)]
        return helper.make_node(kind, [x, f"{name}/Q", f"{name}/scales", f"{name}/offsets", t], [y], name=name,
                                domain="com.acttail", K=K, N=D, block_size=16, bits=4, mode="threshold")
    inits.append(numpy_helper.from_array(rng.standard_normal((K, D)).astype(dtype), f"{name}/weight"))
    if kind == "MatMul":
        return helper.make_node("MatMul", [x, f"{name}/weight"], [y], name=name)
    inits.append(numpy_helper.from_array(np.array(threshold, np.float32), t))
    return helper.make_node(kind, [x, f"{name}/weight", t], [y], name=name, domain="com.acttail", mode="threshold")


def make_model(nodes: list, inits: list, dtype, opset: int, outputs: tuple[str, ...] = ("y",)) -> onnx.ModelProto:
    elem = ELEM[dtype]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("h", elem, ["n", D])],
                              [helper.make_tensor_value_info(o, elem, ["n", D]) for o in outputs], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.acttail", 1)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def run(model: onnx.ModelProto, feeds: dict, outputs: list[str] | None = None) -> list[np.ndarray]:
    return ReferenceEvaluator(model, new_ops=[SparseMatMul, SparseMatMulNBits]).run(outputs, feeds)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return copy


def gap_threshold(x: np.ndarray, gap: float) -> float:
    """A threshold near the median of |x| in the middle of a gap of relative width > ``gap`` between sorted |x|: the
    two evaluations of the activation (the graph's Sigmoid / Mul / Mul, the op's float32 formula) round differently,
    and no value may cross the cut because of that."""
    s = np.unique(np.abs(x.astype(np.float64))[np.isfinite(x)])
    s = s[s > 0]
    mid = len(s) // 2
    for i in sorted(range(len(s) - 1), key=lambda j: abs(j - mid)):
        if s[i + 1] - s[i] > gap * s[i + 1]:
            return float(np.float32((s[i] + s[i + 1]) / 2))
    raise AssertionError("no gap wide enough for the cut")


# --------------------------------------------------------------------------------------------
# the fold
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("form", SPLIT_FORMS)
def test_every_split_form_is_fused_and_computes_the_same(form, dtype, caplog):
    model = mlp_graph(dtype, form)
    h = np.random.default_rng(1).standard_normal((5, D)).astype(dtype)
    p_name, x_name = "/model/layers.0/mlp/gate_up_proj/MatMul/output_0", "/model/layers.0/mlp/Mul/output_0"
    p, x = run(with_outputs(model, [p_name, x_name]), {"h": h}, [p_name, x_name])
    # the graph's own Sigmoid / Mul / Mul (ReferenceEvaluator, rounding after every op) against reference.swiglu
    # (float32, one rounding): a few ulps of the graph's type apart
    ulp = {np.float32: 2.0**-23, np.float16: 2.0**-10}[dtype]
    assert np.all(np.abs(x.astype(np.float64) - ref.swiglu(p)) <= 4 * ulp * np.abs(x.astype(np.float64)) + 1e-30)

    threshold = gap_threshold(ref.swiglu(p), 10 * ulp)
    model = mlp_graph(dtype, form, threshold=threshold)
    before = run(model, {"h": h})[0]
    with caplog.at_level(logging.INFO, logger="acttail_export.activation_fusion"):
        assert fuse_swiglu(model) == 1
    assert "SwiGLU folded into 1 down projection op" in caplog.text
    onnx.checker.check_model(model)
    down = model.graph.node[-1]
    assert (down.op_type, activation_of(down), down.input[0]) == ("SparseMatMul", "swiglu", p_name)
    assert ops(model) == ["MatMul", "SparseMatMul"]  # Split, Sigmoid, Mul, Mul (and a Constant of the sizes) gone
    assert not [t.name for t in model.graph.initializer if t.name.endswith("/sizes")]  # sizes initializer dropped
    after = run(model, {"h": h})[0]
    # same mask (the cut sits in a wide gap); the kept values differ by the activations' few ulps
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    y_want, bound = ref.sparse_matmul(x, weights["/model/layers.0/mlp/down_proj/MatMul/weight"], "threshold",
                                      [ref.Member(threshold=threshold)])
    tol = 8 * ulp * bound + (1e-7 if dtype == np.float16 else 1e-30)
    assert np.all(np.abs(before.astype(np.float64) - y_want) <= tol + 2 * ulp * np.abs(y_want))
    assert np.all(np.abs(after.astype(np.float64) - y_want) <= tol + 2 * ulp * np.abs(y_want))
    assert np.abs(y_want).max() > 0 and (ref.swiglu(p) != 0).any()


@pytest.mark.parametrize("swap_outer", [False, True])
@pytest.mark.parametrize("swap_inner", [False, True])
def test_mul_operands_in_either_order(swap_outer, swap_inner):
    model = mlp_graph(np.float32, "num_outputs", swap_outer=swap_outer, swap_inner=swap_inner)
    assert fuse_swiglu(model) == 1
    assert ops(model) == ["MatMul", "SparseMatMul"] and activation_of(model.graph.node[-1]) == "swiglu"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_nbits_down_op_is_fused(dtype):
    """SparseMatMulNBits: K from its attribute; the 4-bit node computes on [gate | up] what it computed on the Mul."""
    model = mlp_graph(dtype, "initializer", down="SparseMatMulNBits", threshold=0.0)
    h = np.random.default_rng(2).standard_normal((3, D)).astype(dtype)
    before = run(model, {"h": h})[0]
    assert fuse_swiglu(model) == 1
    onnx.checker.check_model(model)
    assert [(n.op_type, activation_of(n)) for n in model.graph.node] == [("MatMul", ""), ("SparseMatMulNBits", "swiglu")]
    after = run(model, {"h": h})[0]
    scale = np.abs(before.astype(np.float64)).max()
    np.testing.assert_allclose(after.astype(np.float64), before.astype(np.float64), rtol=0,
                               atol=(1e-6 if dtype == np.float32 else 1e-2) * scale)


def test_every_layer_is_fused_and_a_second_pass_changes_nothing():
    model = mlp_graph(np.float32, "num_outputs", layers=3)
    assert fuse_swiglu(model) == 3
    assert len(fused_nodes(model)) == 3 and "Sigmoid" not in ops(model)
    done = model.SerializeToString()
    assert fuse_swiglu(model) == 0  # already fused: the down ops read P, not a Mul
    assert model.SerializeToString() == done


# --------------------------------------------------------------------------------------------
# graphs that must stay as they are
# --------------------------------------------------------------------------------------------
def _unpacked() -> onnx.ModelProto:
    """gate and up as two MatMuls (the optimum base, or an unpacked builder graph): no Split."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((D, K)).astype(np.float32), n) for n in ("wg", "wu")]
    nodes = [helper.make_node("MatMul", ["h", "wg"], ["g"]), helper.make_node("MatMul", ["h", "wu"], ["u"]),
             helper.make_node("Sigmoid", ["g"], ["s"]), helper.make_node("Mul", ["g", "s"], ["a"]),
             helper.make_node("Mul", ["a", "u"], ["x"])]
    nodes.append(down_node("SparseMatMul", "x", "y", "down", inits, np.float32, 0.5, rng))
    return make_model(nodes, inits, np.float32, 18)


def _mask_kernel() -> onnx.ModelProto:
    """The mask kernel: the down projection stays a MatMul behind a Where."""
    model = mlp_graph(np.float32, "num_outputs", down="MatMul")
    g = model.graph
    down = g.node[-1]
    g.initializer.append(numpy_helper.from_array(np.array(0.5, np.float32), "t"))
    g.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero"))
    x = down.input[0]
    mask = [helper.make_node("Abs", [x], ["abs"]), helper.make_node("Greater", ["abs", "t"], ["keep"]),
            helper.make_node("Where", ["keep", x, "zero"], ["masked"])]
    down.input[0] = "masked"
    nodes = list(g.node[:-1]) + mask + [down]
    del g.node[:]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return model


def _edited(edit) -> onnx.ModelProto:
    model = mlp_graph(np.float32, "num_outputs")
    edit({n.op_type + ("/act" if n.name.endswith("act_fn/Mul") else ""): n for n in model.graph.node}, model)
    onnx.checker.check_model(model)
    return model


def _swap_split_outputs(n, _):
    n["Split"].output[0], n["Split"].output[1] = n["Split"].output[1], n["Split"].output[0]  # the activation on "up"


def _sigmoid_of_up(n, _):
    n["Sigmoid"].input[0] = n["Split"].output[1]  # g * sigmoid(u): not silu


def _split_axis_0(n, _):
    for a in n["Split"].attribute:
        if a.name == "axis":
            a.i = 0


def _three_outputs(n, model):
    n["Split"].output.append("third")
    for a in n["Split"].attribute:
        if a.name == "num_outputs":
            a.i = 3


def _unequal(n, model):
    split = n["Split"]
    model.graph.initializer.append(numpy_helper.from_array(np.array([K + 2, K - 2], np.int64), "sizes"))
    split.input.append("sizes")
    split.ClearField("attribute")
    split.attribute.append(helper.make_attribute("axis", -1))


def _sizes_not_constant(n, model):
    """Split sizes from a graph input: unknown when the graph is edited."""
    split = n["Split"]
    split.input.append("sizes")
    split.ClearField("attribute")
    split.attribute.append(helper.make_attribute("axis", -1))
    model.graph.input.append(helper.make_tensor_value_info("sizes", TensorProto.INT64, [2]))


def _add_not_mul(n, _):
    n["Mul"].op_type = "Add"


NON_MATCHING = {"unpacked gate/up": _unpacked, "mask kernel": _mask_kernel,
                "split outputs swapped": lambda: _edited(_swap_split_outputs),
                "sigmoid of up": lambda: _edited(_sigmoid_of_up), "split on axis 0": lambda: _edited(_split_axis_0),
                "three split outputs": lambda: _edited(_three_outputs), "unequal halves": lambda: _edited(_unequal),
                "sizes not constant": lambda: _edited(_sizes_not_constant), "add, not mul": lambda: _edited(_add_not_mul),
                "plain MatMul down": lambda: mlp_graph(np.float32, "num_outputs", down="MatMul")}


@pytest.mark.parametrize("name", list(NON_MATCHING))
def test_non_matching_graph_is_left_unchanged(name):
    model = NON_MATCHING[name]()
    before = model.SerializeToString()
    assert fuse_swiglu(model) == 0
    assert model.SerializeToString() == before


def test_equal_split_of_an_unknown_width_is_not_fused():
    """No sizes, no num_outputs and a P of unknown width (a graph input): the halves cannot be shown to be K."""
    model = mlp_graph(np.float32, "equal")
    g = model.graph
    p = g.node[0].output[0]
    del g.node[0]  # P becomes a graph input of unknown shape
    g.input.append(helper.make_tensor_value_info(p, TensorProto.FLOAT, None))
    before = model.SerializeToString()
    assert fuse_swiglu(model) == 0 and model.SerializeToString() == before
    g.input[-1].CopyFrom(helper.make_tensor_value_info(p, TensorProto.FLOAT, ["n", 2 * K]))  # declared width 2K
    assert fuse_swiglu(model) == 1


# --------------------------------------------------------------------------------------------
# other readers keep their nodes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("reader,kept", [
    ("/model/layers.0/mlp/Mul/output_0", ["Split", "Sigmoid", "Mul", "Mul"]),  # x itself: the whole chain stays
    ("/model/layers.0/mlp/act_fn/Sigmoid/output_0", ["Split", "Sigmoid"]),     # sigmoid(g): the Muls go
    ("/model/layers.0/mlp/up_proj/MatMul/output_0", ["Split"]),                # u: only the Split stays
])
@pytest.mark.parametrize("as_graph_output", [False, True])
def test_extra_readers_keep_what_they_read(reader, kept, as_graph_output):
    model = mlp_graph(np.float32, "num_outputs")
    g = model.graph
    if as_graph_output:
        g.output.append(helper.make_tensor_value_info(reader, TensorProto.FLOAT, ["n", K]))
    else:
        g.node.append(helper.make_node("Identity", [reader], ["other"], name="other_reader"))
        g.output.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, ["n", K]))
    g.value_info.append(helper.make_tensor_value_info("/model/layers.0/mlp/act_fn/Mul/output_0", TensorProto.FLOAT, ["n", K]))
    assert fuse_swiglu(model) == 1
    onnx.checker.check_model(model)
    body = [t for t in ops(model) if t not in ("MatMul", "SparseMatMul", "Identity")]
    assert body == kept
    assert fused_nodes(model)[0].input[0] == "/model/layers.0/mlp/gate_up_proj/MatMul/output_0"
    produced = {o for n in g.node for o in n.output}
    assert {v.name for v in g.value_info} <= produced  # no shape left for a removed tensor
    h = np.random.default_rng(3).standard_normal((2, D)).astype(np.float32)
    assert all(np.isfinite(v).all() for v in run(model, {"h": h}))  # still a runnable graph


def test_reader_inside_a_subgraph_keeps_the_chain():
    """An If branch reading the activated x from the outer scope counts as a reader."""
    model = mlp_graph(np.float32, "num_outputs")
    x = "/model/layers.0/mlp/Mul/output_0"
    branch = helper.make_graph([helper.make_node("Identity", [x], ["b"])], "branch", [],
                               [helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", K])])
    g = model.graph
    g.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    g.node.append(helper.make_node("If", ["cond"], ["from_if"], then_branch=branch, else_branch=branch))
    g.output.append(helper.make_tensor_value_info("from_if", TensorProto.FLOAT, ["n", K]))
    assert fuse_swiglu(model) == 1
    assert ops(model).count("Mul") == 2 and "Sigmoid" in ops(model) and "Split" in ops(model)
