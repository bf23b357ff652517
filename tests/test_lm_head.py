"""The 8-bit lm_head (``--lm-head int8``): the quantizer against numpy, the rewritten node through ONNX Runtime
against the float64 reference of what it computes (8-bit weights, int8-rounded activations), the options."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from acttail_export.errors import ActTailError
from acttail_export.lm_head import (
    BLOCK,
    ZERO_POINT,
    Int8Head,
    emulated_head,
    fake_quantize_activations,
    head_of_folder,
    quantize_head,
    rewrite_lm_head,
)
from acttail_export.options import ExportOptions


def _weight(K: int, N: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    w[rng.integers(0, K, 4), rng.integers(0, N, 4)] *= 20  # outliers: blocks with very different ranges
    w[:, 0] = 0  # an all-zero column: scale 0, codes 0
    return w


@pytest.mark.parametrize("K", [64, 40, 576])
def test_quantize_head_is_round_to_nearest_symmetric_blocks(K):
    w = _weight(K, 24)
    head = quantize_head(w)
    blocks = -(-K // BLOCK)
    assert head.B.shape == (24, blocks, BLOCK) and head.scales.shape == (24, blocks)
    padded = np.zeros((blocks * BLOCK, 24))
    padded[:K] = w
    amax = np.abs(padded.reshape(blocks, BLOCK, 24)).max(1).T  # [N, blocks]
    np.testing.assert_array_equal(head.scales, (amax / 127).astype(np.float32))
    codes = head.B.astype(np.int64) - ZERO_POINT
    assert codes.min() >= -127 and codes.max() <= 127
    assert (np.abs(codes).max(-1)[amax > 0] == 127).all()  # each block's largest weight takes the top code
    assert (codes.reshape(24, -1)[:, K:] == 0).all()  # padding past K is zero
    deq = head.dequantize()
    # round to nearest: within half a step of the weight (plus the float32 scale's rounding)
    step = np.repeat(head.scales.T.astype(np.float64), BLOCK, axis=0)[:K]
    assert (np.abs(deq - w) <= step / 2 * (1 + 1e-6) + 1e-12).all()


def test_quantize_head_reproduces_8bit_weights_exactly():
    """A weight that already is symmetric 8-bit blocks of 32 with float16 scales (GGUF's Q8_0, SmolLM2's tied
    embeddings) comes back to the bit."""
    rng = np.random.default_rng(1)
    K, N = 96, 16
    q = rng.integers(-127, 128, (K, N))
    q[0::BLOCK] = 127  # every block reaches the top code
    scales = np.repeat((rng.random((K // BLOCK, N)) * 0.01 + 1e-3).astype(np.float16), BLOCK, axis=0)
    w = (q * scales.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(quantize_head(w).dequantize(), w.astype(np.float64))


@pytest.mark.parametrize("bad", [np.ones(5), np.array([[1.0, np.nan]]), np.ones((2, 2), np.int32)])
def test_quantize_head_rejects_bad_weights(bad):
    with pytest.raises(ActTailError, match="lm_head weight must be a finite 2-D float array"):
        quantize_head(bad)


def test_fake_quantize_activations_matches_numpy():
    x = torch.randn(3, 5, 40, dtype=torch.float32)
    x[0, 0, :32] = 0  # an all-zero block stays zero
    got = fake_quantize_activations(x).numpy().astype(np.float64)
    xp = np.zeros((3, 5, 64))
    xp[..., :40] = x.numpy()
    xb = xp.reshape(3, 5, 2, BLOCK)
    s = (np.abs(xb).max(-1, keepdims=True) / 127).astype(np.float32).astype(np.float64)
    want = (np.round(xb / np.where(s == 0, 1, s)) * s).reshape(3, 5, 64)[..., :40]
    np.testing.assert_allclose(got, want, rtol=1e-7, atol=0)
    assert got.dtype == np.float64 and fake_quantize_activations(x).dtype == x.dtype


def _lm_head_graph(w: np.ndarray, tied: bool) -> onnx.ModelProto:
    """hidden [1, S, K] -> logits = hidden @ W; ``tied``: W is also read by a Transpose (embeddings, as the builder's
    graph of a tied model)."""
    K, N = w.shape
    dtype = helper.np_dtype_to_tensor_dtype(w.dtype)
    nodes = [helper.make_node("MatMul", ["hidden", "W"], ["logits"], name="/lm_head/MatMul")]
    outputs = [helper.make_tensor_value_info("logits", dtype, [1, None, N])]
    if tied:
        nodes.append(helper.make_node("Transpose", ["W"], ["embeddings"], name="/model/embed_tokens/Transpose"))
        outputs.append(helper.make_tensor_value_info("embeddings", dtype, [N, K]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("hidden", dtype, [1, None, K])], outputs,
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("K", "N"), [(64, 48), (40, 33), (576, 200)])
@pytest.mark.parametrize("tied", [False, True])
def test_rewritten_node_runs_like_the_reference(K, N, tied):
    """ONNX Runtime's CPU kernel (float32 graphs: the CPU exports) against the float64 reference."""
    dtype = np.float32
    w = _weight(K, N)
    graph = _lm_head_graph(w, tied)
    head = rewrite_lm_head(graph)
    onnx.checker.check_model(graph)
    nodes = {n.name: n for n in graph.graph.node}
    assert nodes["/lm_head/MatMul"].op_type == "MatMulNBits"
    assert ("W" in {i.name for i in graph.graph.initializer}) == tied  # the float weight stays only for its other reader
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(2).standard_normal((1, 7, K)).astype(dtype)
    x[0, 0, :] = 0
    got = session.run(["logits"], {"hidden": x})[0].astype(np.float64)
    xq = fake_quantize_activations(torch.from_numpy(x.astype(np.float32))).double().numpy()
    want = xq @ head.dequantize()
    # int8 products are exact; what is left is the float32 rescaling and sum of the blocks' integer sums, measured at
    # most 4e-7 of sum |x_q| |W| here (1e-5 leaves room for other CPUs' kernels, and an activation code that
    # x * (1 / s) rounds the other way than x / s at a tie). Without the activations' int8 rounding the same check
    # misses by 1e-3 .. 8e-3 of the sum (measured on these cases).
    terms = np.abs(xq) @ np.abs(head.dequantize())
    assert (np.abs(got - want) <= 1e-5 * terms + 1e-12).all(), np.abs(got - want).max()
    # and it is the 8-bit quantization: far closer to the float MatMul than a broken node could be
    exact = x.astype(np.float64) @ w.astype(np.float64)
    assert np.linalg.norm(got - exact) <= 0.05 * np.linalg.norm(exact)


def test_head_read_through_a_transpose_of_the_embeddings():
    """optimum's graph of a tied head: logits = hidden @ Transpose(E), E [N, K] also read by the embedding Gather. The
    8-bit node quantizes E^T; the Transpose goes, E stays."""
    E = _weight(64, 48).T.copy()  # [N, K]
    nodes = [helper.make_node("Transpose", ["E"], ["E_t"], name="/lm_head/Transpose", perm=[1, 0]),
             helper.make_node("MatMul", ["hidden", "E_t"], ["logits"], name="/lm_head/MatMul"),
             helper.make_node("Gather", ["E", "ids"], ["embeds"], name="/model/embed_tokens/Gather")]
    f32 = onnx.TensorProto.FLOAT
    graph = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("hidden", f32, [1, None, 64]),
                     helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", f32, [1, None, 48]),
         helper.make_tensor_value_info("embeds", f32, [1, None, 64])], [numpy_helper.from_array(E, "E")]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    head = rewrite_lm_head(graph)
    onnx.checker.check_model(graph)
    np.testing.assert_array_equal(head.B, quantize_head(E.T).B)
    assert [n.op_type for n in graph.graph.node] == ["MatMulNBits", "Gather"]
    assert [i.name for i in graph.graph.initializer][0] == "E"
    x = np.random.default_rng(3).standard_normal((1, 3, 64)).astype(np.float32)
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"hidden": x, "ids": np.array([[1, 2, 3]])})[0]
    want = fake_quantize_activations(torch.from_numpy(x)).double().numpy() @ head.dequantize()
    assert np.abs(got - want).max() <= 1e-5 * (np.abs(x) @ np.abs(E.T)).max()


def test_emulated_head_matches_the_node_and_restores_the_tied_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    original = model.get_output_embeddings()
    w = original.weight.detach().numpy().T.copy()
    head = quantize_head(w)
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad(), emulated_head(model, head):
        got = model.get_output_embeddings()(hidden).double().numpy()
    want = fake_quantize_activations(hidden).double().numpy() @ head.dequantize()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert model.get_output_embeddings() is original
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied
    with emulated_head(model, None):
        assert model.get_output_embeddings() is original


def test_head_of_folder_reads_the_saved_node(tmp_path):
    w = _weight(64, 48)
    graph = _lm_head_graph(w, tied=True)
    head = rewrite_lm_head(graph)
    onnx.save(graph, str(tmp_path / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    got = head_of_folder(tmp_path)
    assert isinstance(got, Int8Head) and (got.K, got.N) == (64, 48)
    np.testing.assert_array_equal(got.B, head.B)
    np.testing.assert_array_equal(got.scales, head.scales)
    onnx.save(_lm_head_graph(w, tied=False), str(tmp_path / "float.onnx"))
    assert head_of_folder(tmp_path, "float.onnx") is None


def test_rewrite_needs_a_float_matmul_to_logits():
    graph = _lm_head_graph(_weight(64, 8), tied=False)
    rewrite_lm_head(graph)
    with pytest.raises(ActTailError, match=r"^--lm-head int8: the graph's 'logits' output comes from a MatMulNBits"):
        rewrite_lm_head(graph)


@pytest.mark.parametrize(("kwargs", "head"), [
    (dict(weights="int4"), "int8"),  # the CPU default of 4-bit exports
    (dict(weights="int4", device="cuda"), "float"),  # not measured on a GPU: float unless asked
    (dict(weights="int4", device="cuda", lm_head="int8"), "int8"),
    (dict(weights="int4", lm_head="float"), "float"),
    (dict(), "float"),
])
def test_lm_head_default(kwargs, head):
    assert ExportOptions(**kwargs).head == head


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lm_head="int8"), r"^--lm-head int8 only applies to --weights int4 .*: add --weights int4 or drop --lm-head$"),
    (dict(lm_head="int4", weights="int4"), r"^--lm-head must be one of float, int8; got 'int4'$"),
    (dict(lm_head="int4"), r"^--lm-head must be one of float, int8; got 'int4'$"),
])
def test_bad_lm_head_options(kwargs, message):
    with pytest.raises(ActTailError, match=message):
        ExportOptions(**kwargs)


def test_config_round_trip_and_check(tmp_path):
    from acttail_export.config import ActTailConfig

    config = ActTailConfig(target_sparsity=0.5, weights="int4", block_size=32, quantizer="rtn", lm_head="int8")
    config.save(tmp_path)
    assert ActTailConfig.load(tmp_path).lm_head == "int8"
    with pytest.raises(ActTailError, match="lm_head=int8 only applies to weights=int4"):
        ActTailConfig(target_sparsity=0.5, weights="fp32", lm_head="int8")
    with pytest.raises(ActTailError, match="lm_head"):
        ActTailConfig(target_sparsity=0.5, lm_head="fp8")
