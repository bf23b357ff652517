"""acttail_export.quantize: block-wise 4-bit weights against numpy, reference.py and ORT's MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from acttail_export import quantize as qz
from acttail_export import reference as ref

SHAPES = [(64, 6), (100, 7), (576, 48), (17, 3), (1, 1)]


def _weight(K: int, N: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((K, N)) * 0.05).astype(np.float32)


@pytest.mark.parametrize("quantizer", qz.QUANTIZERS)
@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
@pytest.mark.parametrize("K,N", SHAPES)
def test_layout_and_round_trip_bound(K, N, block, quantizer):
    w = _weight(K, N)
    qw = qz.quantize(w, block, quantizer)
    blocks = -(-K // block)
    assert qw.packed.shape == (K, (N + 1) // 2) and qw.packed.dtype == np.uint8
    assert qw.scales.shape == qw.offsets.shape == (blocks, N)
    assert (qw.scales > 0).all()
    deq = qw.dequantize()
    np.testing.assert_array_equal(deq, ref.dequantize_blocks(ref.unpack_nibbles(qw.packed, N), qw.scales, qw.offsets, block))
    # every weight lies within half a step of its block's grid (rtn), or of the refit grid's range (mse: the
    # grid covers [o, o + 15 s]; values outside are clipped to the nearest end)
    rows = np.arange(K) // block
    s, o = qw.scales.astype(np.float64)[rows], qw.offsets.astype(np.float64)[rows]
    inside = (w >= o - 0.5 * s) & (w <= o + qz.LEVELS * s + 0.5 * s)
    err = np.abs(deq - w)
    # 1e-6 of the step: the float32 rounding of the stored s and o (relative 2^-24, times code <= 15)
    assert (err[inside] <= (0.5 + 1e-6) * s[inside]).all()
    if quantizer == "rtn":
        assert inside.all()


@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
def test_partial_last_block_ignores_padding(block):
    """The last (partial) block's range comes from its real rows only: appending rows does not change earlier blocks."""
    w = _weight(block + 5, 4)
    qw = qz.quantize(w, block, "rtn")
    tail = w[block:]
    np.testing.assert_allclose(qw.offsets[1], tail.min(0), rtol=0, atol=0)
    np.testing.assert_allclose(qw.scales[1], (tail.max(0).astype(np.float64) - tail.min(0)) / 15, rtol=1e-6)


@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
def test_rtn_exact_on_a_4bit_grid(block):
    """A weight already on a 4-bit grid per block (each block uses codes 0 and 15) comes back exactly."""
    rng = np.random.default_rng(1)
    K, N = 3 * block - 7, 9
    q = rng.integers(0, 16, (K, N))
    q[0::block][:, :] = 0  # first row of each block: code 0, second: 15, so [min, max] is the grid's range
    q[1::block][:, :] = 15
    blocks = -(-K // block)
    s = (rng.uniform(0.5, 2.0, (blocks, N)) * 2.0 ** -8).astype(np.float32)  # powers-of-two-friendly: exact products
    o = (rng.integers(-64, 0, (blocks, N)) * 2.0 ** -8).astype(np.float32)
    w = ref.dequantize_blocks(q.astype(np.uint8), s, o, block).astype(np.float32)
    qw = qz.quantize(w, block, "rtn")
    np.testing.assert_array_equal(qw.codes(), q)
    # s recomputed as (max - min) / 15 from float32 weights (each within half an ulp of the exact grid value),
    # then rounded to float32: one ulp of s plus 2 half-ulps of max |w| over 15
    np.testing.assert_allclose(qw.scales, s, rtol=2 ** -23, atol=2 ** -24 * 2 * float(np.abs(w).max()) / 15)
    np.testing.assert_array_equal(qw.offsets, o)  # min of each block: code 0, exactly o
    np.testing.assert_allclose(qw.dequantize(), w, rtol=0, atol=16 * 2 ** -23 * float(np.abs(w).max()))


@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
@pytest.mark.parametrize("seed", range(3))
def test_mse_never_worse_than_rtn(block, seed):
    for w in (_weight(200, 40, seed), np.random.default_rng(seed).standard_t(3, (200, 40)).astype(np.float32)):
        e_rtn = ((qz.quantize(w, block, "rtn").dequantize() - w) ** 2).sum(0)
        e_mse = ((qz.quantize(w, block, "mse").dequantize() - w) ** 2).sum(0)
        # per column (rtn's range is a candidate); 1e-9 relative: float32 storage of s, o changes a few codes' rounding
        assert (e_mse <= e_rtn * (1 + 1e-9) + 1e-18).all()
        assert e_mse.sum() < 0.95 * e_rtn.sum()  # and clearly better in total on gaussian / heavy-tailed weights


def test_constant_block_is_exact():
    w = np.full((40, 3), 0.25, np.float32)
    w[:, 1] = -1.5
    for quantizer in qz.QUANTIZERS:
        np.testing.assert_array_equal(qz.quantize(w, 32, quantizer).dequantize(), w)


def test_bad_arguments():
    with pytest.raises(ValueError, match="block size"):
        qz.quantize(_weight(8, 2), 48)
    with pytest.raises(ValueError, match="quantizer"):
        qz.quantize(_weight(8, 2), 32, "gptq")
    with pytest.raises(ValueError, match="finite"):
        qz.quantize(np.full((8, 2), np.nan), 32)


# --------------------------------------------------------------------------------------------
# ORT com.microsoft::MatMulNBits
# --------------------------------------------------------------------------------------------
def _matmul_nbits_session(mw: qz.MatMulNBitsWeight) -> ort.InferenceSession:
    inits = [helper.make_tensor("B", TensorProto.UINT8, mw.B.shape, mw.B.tobytes(), raw=True),
             helper.make_tensor("scales", TensorProto.FLOAT, mw.scales.shape, mw.scales.tobytes(), raw=True),
             helper.make_tensor("zp", TensorProto.FLOAT, mw.zero_points.shape, mw.zero_points.tobytes(), raw=True)]
    node = helper.make_node("MatMulNBits", ["X", "B", "scales", "zp"], ["Y"], domain="com.microsoft", K=mw.K, N=mw.N,
                            bits=4, block_size=mw.block_size)
    graph = helper.make_graph([node], "mnb", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, mw.K])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, mw.N])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("quantizer", qz.QUANTIZERS)
@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
@pytest.mark.parametrize("K,N", [(64, 6), (100, 7), (576, 48)])
def test_matmul_nbits_layout_matches(K, N, block, quantizer):
    qw = qz.quantize(_weight(K, N), block, quantizer)
    mw = qz.to_matmul_nbits(qw)
    deq = qw.dequantize()
    # (q - z) s with z = -o / s in float32: a few ulp of |o| + 15 s per element
    np.testing.assert_allclose(qz.dequantize_matmul_nbits(mw), deq, rtol=0, atol=1e-6 * np.abs(deq).max())
    x = np.random.default_rng(2).standard_normal((5, K)).astype(np.float32)
    y = _matmul_nbits_session(mw).run(None, {"X": x})[0]
    want = x.astype(np.float64) @ deq
    bound = np.abs(x).astype(np.float64) @ np.abs(deq)
    # float32 accumulation over K terms: <= ~K * 2^-24 of sum |x||w| in the worst case; 1e-5 covers K <= 576 with room
    assert (np.abs(y - want) <= 1e-5 * bound + 1e-30).all()


@pytest.mark.slow
def test_rtn_block32_reproduces_smollm2_gguf(smollm2):
    """SmolLM2's GGUF is Q4_1 (blocks of 32 along K): RTN block 32 finds the same grid, so it loses nothing."""
    model, _ = smollm2
    for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
        w = getattr(model.model.layers[3], kind.split(".")[0])
        w = getattr(w, kind.split(".")[1]).weight.detach().float().numpy().T  # [K, N]
        for quantizer in qz.QUANTIZERS:  # mse keeps rtn's range where no candidate beats it: here, nowhere does
            deq = qz.quantize(w, 32, quantizer).dequantize_f32()
            # float32 rounding of the recomputed scale (1 ulp, times code <= 15) and of s q + o: a few ulp of the
            # block's largest |w|; a different code would be off by a whole step (~|w| / 8)
            step = np.abs(w).max() * 2.0 ** -20
            assert np.abs(deq - w).max() <= step, (kind, quantizer)
        # and block 64 does re-quantize (the check above can fail)
        assert np.abs(qz.quantize(w, 64, "rtn").dequantize_f32() - w).max() > 100 * step


@pytest.mark.parametrize("quantizer", qz.QUANTIZERS)
def test_torch_tensor_input_and_devices_agree(quantizer):
    """A torch tensor (fp16 as a model holds it) quantizes like its numpy copy; on a GPU like on the CPU (the search
    is float64 elementwise maths and 32-element sums, so the devices agree to the last bit on these sizes)."""
    import torch

    w = torch.randn(200, 96, generator=torch.Generator().manual_seed(3)).half() * 0.02
    ref_q = qz.quantize(w.float().numpy(), 64, quantizer)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        got = qz.quantize(w.to(device), 64, quantizer)
        np.testing.assert_array_equal(got.packed, ref_q.packed)
        np.testing.assert_array_equal(got.scales, ref_q.scales)
        np.testing.assert_array_equal(got.offsets, ref_q.offsets)


@pytest.mark.parametrize("params", qz.QUANTIZERS)
@pytest.mark.parametrize(("K", "N", "block"), [(96, 40, 32), (100, 37, 64), (200, 24, 128)])
def test_gptq_with_an_identity_hessian_is_the_plain_quantizer(K, N, block, params):
    """Nothing to spread when the Hessian is the identity: GPTQ's codes, scales and offsets are quantize()'s."""
    import torch

    w = torch.randn(K, N, generator=torch.Generator().manual_seed(K), dtype=torch.float64) * 0.02
    got = qz.QuantizedWeight.from_tensors(*qz.quantize_gptq(w, torch.eye(K), block, damp=0.0, params=params), block, params)
    want = qz.quantize(w.numpy(), block, params)
    np.testing.assert_array_equal(got.packed, want.packed)
    np.testing.assert_array_equal(got.scales, want.scales)
    np.testing.assert_array_equal(got.offsets, want.offsets)


@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
def test_gptq_lowers_the_output_error_on_correlated_inputs(block):
    """||X (Ŵ − W)||² against the same-range plain quantizers, inputs with correlated channels (what GPTQ is for).
    Measured with these seeds: GPTQ 0.48–0.54 × rtn's error, GPTQ with mse ranges 0.41–0.47 × (mse alone 0.78–0.83 ×);
    float64 throughout, so the margin to the 0.7 bound is far above any BLAS summation-order effect."""
    import torch

    g = torch.Generator().manual_seed(block)
    K, N = 256, 48
    w = torch.randn(K, N, generator=g, dtype=torch.float64) * 0.02
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) / K ** 0.5 + 0.3 * torch.eye(K, dtype=torch.float64)
    x = torch.randn(4000, K, generator=g, dtype=torch.float64) @ mix
    x[:, 7] = 0.0  # a channel never active: weight 0, no NaN from the singular Hessian
    hessian = x.T @ x

    def error(quantized) -> float:
        return float(((x @ (qz.dequantize_tensor(*quantized, block).double() - w)) ** 2).sum())

    rtn, mse = error(qz.quantize_tensor(w, block, "rtn")), error(qz.quantize_tensor(w, block, "mse"))
    gptq = qz.quantize_gptq(w, hessian, block)
    assert error(gptq) < 0.7 * rtn
    assert error(qz.quantize_gptq(w, hessian, block, params="mse")) < 0.7 * mse
    assert bool(torch.isfinite(gptq[1]).all() and torch.isfinite(gptq[2]).all())  # the singular Hessian factored
    with pytest.raises(ValueError, match="hessian"):
        qz.quantize_gptq(w, hessian[:-1, :-1], block)


def test_input_hessians_are_the_sums_of_x_xt_per_shared_input(tiny_llama_dir):
    """``int4_rewrite.input_hessians`` against float64 sums of the inputs each projection receives (captured by its
    own hook); readers of one input (q/k/v, gate/up) get the same tensor."""
    import torch
    from transformers import AutoModelForCausalLM

    from acttail_export.int4_rewrite import input_hessians

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    windows = torch.randint(3, model.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(0))
    seen: dict = {}
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
               for n, m in model.named_modules() if n in names]
    with torch.inference_mode():
        for row in windows:
            model(row[None], use_cache=False)
    for h in handles:
        h.remove()
    got = input_hessians(model, windows)
    assert sorted(got) == sorted(names)
    for name in names:
        x = torch.cat(seen[name]).double().numpy()
        want = x.T @ x
        np.testing.assert_allclose(got[name].double().numpy(), want, rtol=0, atol=1e-5 * np.abs(want).max())
    for layer in range(model.config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        assert got[prefix + "self_attn.q_proj"] is got[prefix + "self_attn.v_proj"]
        assert got[prefix + "mlp.gate_proj"] is got[prefix + "mlp.up_proj"]
        assert got[prefix + "mlp.gate_proj"] is not got[prefix + "mlp.down_proj"]


def test_quantize_model_gptq_needs_hessians(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    from acttail_export.int4_rewrite import quantize_model

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="needs the projections' input Hessians"):
        quantize_model(model, 32, "gptq-mse")


def _correlated(block: int, K: int = 256, N: int = 48):
    """(w [K, N], x [4000, K]) float64: channels mixed and of unequal scale (so diag(H) orders them), one channel
    never active."""
    import torch

    g = torch.Generator().manual_seed(block)
    w = torch.randn(K, N, generator=g, dtype=torch.float64) * 0.02
    mix = torch.randn(K, K, generator=g, dtype=torch.float64) / K ** 0.5 + 0.3 * torch.eye(K, dtype=torch.float64)
    x = torch.randn(4000, K, generator=g, dtype=torch.float64) @ mix
    x = x * torch.linspace(0.2, 3.0, K, dtype=torch.float64)[torch.randperm(K, generator=g)]
    x[:, 7] = 0.0
    return w, x


@pytest.mark.parametrize("params", qz.QUANTIZERS)
@pytest.mark.parametrize(("K", "N", "block"), [(96, 40, 32), (100, 37, 64), (200, 24, 128)])
def test_gptq_act_order_with_a_diagonal_hessian_is_the_plain_quantizer(K, N, block, params):
    """A diagonal Hessian couples no channels: whatever order act-order takes (here a shuffled one: distinct
    diagonal entries), each channel is rounded on its block's static range, i.e. quantize()'s result; equal
    entries (c I) keep the natural order."""
    import torch

    g = torch.Generator().manual_seed(K)
    w = torch.randn(K, N, generator=g, dtype=torch.float64) * 0.02
    want = qz.quantize(w.numpy(), block, params)
    for diag in (torch.rand(K, generator=g, dtype=torch.float64) + 0.5, torch.full((K,), 3.0, dtype=torch.float64)):
        got = qz.QuantizedWeight.from_tensors(*qz.quantize_gptq(w, torch.diag(diag), block, damp=0.0, params=params,
                                                                order="act"), block, params)
        np.testing.assert_array_equal(got.packed, want.packed)
        np.testing.assert_array_equal(got.scales, want.scales)
        np.testing.assert_array_equal(got.offsets, want.offsets)


@pytest.mark.parametrize("block", qz.BLOCK_SIZES)
@pytest.mark.parametrize("params", qz.QUANTIZERS)
def test_gptq_act_order_static_groups_and_output_error(block, params):
    """Act-order keeps the layout: its scales and offsets are the plain quantizer's on the original weights (static
    groups, original channel order), whatever the Hessian; on correlated inputs of unequal scale its output error
    ``‖X (Ŵ − W)‖²`` is not above plain (natural-order) GPTQ's."""
    import torch

    w, x = _correlated(block)
    hessian = x.T @ x
    w_live = w.clone()
    w_live[7] = 0.0  # the never-active channel's weight is set to 0 before anything else
    _, want_s, want_o = qz.quantize_tensor(w_live, block, params)
    codes, scales, offsets = qz.quantize_gptq(w, hessian, block, params=params, order="act")
    torch.testing.assert_close(scales, want_s, rtol=0, atol=0)
    torch.testing.assert_close(offsets, want_o, rtol=0, atol=0)
    assert codes.shape == w.shape and codes.dtype == torch.uint8 and int(codes.max()) <= qz.LEVELS

    def error(quantized) -> float:
        return float(((x @ (qz.dequantize_tensor(*quantized, block).double() - w)) ** 2).sum())

    assert error((codes, scales, offsets)) <= error(qz.quantize_gptq(w, hessian, block, params=params))
    with pytest.raises(ValueError, match="order"):
        qz.quantize_gptq(w, hessian, block, order="descending")


@pytest.mark.parametrize("order", qz.GPTQ_ORDERS)
@pytest.mark.parametrize("block", [32, 128])
def test_gptq_refit_is_the_hessian_least_squares_fit(block, order):
    """``refit=True`` keeps the codes and, per column, either keeps the unrefit (scale, offset) or takes the least
    squares ``min ‖X (B θ − w)‖`` over every block's (scale, offset) θ (numpy lstsq on the explicit design B of the
    codes); it never raises a column's output error."""
    import torch

    w, x = _correlated(block, K=200, N=12)
    hessian = x.T @ x
    plain = qz.quantize_gptq(w, hessian, block, params="mse", order=order)
    codes, scales, offsets = qz.quantize_gptq(w, hessian, block, params="mse", order=order, refit=True)
    torch.testing.assert_close(codes, plain[0], rtol=0, atol=0)
    xn, wn = x.numpy(), w.numpy().copy()
    wn[7] = 0.0
    rows = np.arange(w.shape[0]) // block
    blocks = scales.shape[0]

    def col_error(c, s, o) -> float:
        d = (s.double().numpy()[rows, c] * codes[:, c].double().numpy() + o.double().numpy()[rows, c]) - w[:, c].numpy()
        return float(((xn @ d) ** 2).sum())

    refit_columns = 0
    for c in range(w.shape[1]):
        assert col_error(c, scales, offsets) <= col_error(c, plain[1], plain[2]) * (1 + 1e-9)
        if torch.equal(scales[:, c], plain[1][:, c]) and torch.equal(offsets[:, c], plain[2][:, c]):
            continue
        refit_columns += 1
        design = np.zeros((w.shape[0], 2 * blocks))
        design[np.arange(w.shape[0]), rows] = codes[:, c].numpy()
        design[np.arange(w.shape[0]), blocks + rows] = 1.0
        theta = np.linalg.lstsq(xn @ design, xn @ wn[:, c], rcond=None)[0]
        np.testing.assert_allclose(scales[:, c].numpy(), theta[:blocks], rtol=1e-4)
        np.testing.assert_allclose(offsets[:, c].numpy(), theta[blocks:], rtol=1e-4, atol=1e-4 * np.abs(theta[blocks:]).max())
    assert refit_columns > w.shape[1] // 2  # the refit does something on most columns


def test_sequential_gptq_uses_the_hessians_of_the_quantized_model(tiny_llama_dir, monkeypatch):
    """``quantize_model_sequential``: every projection is quantized with ``Σ x xᵀ`` of the inputs it receives in the
    model as finally quantized (what feeds it is quantized before it: earlier layers, earlier groups of its layer),
    i.e. ``input_hessians`` of the quantized model; layer 0's q/k/v see the float model. The weights are the
    dequantized codes of the returned 4-bit weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from acttail_export import int4_rewrite
    from acttail_export.int4_rewrite import input_hessians, quantize_model_sequential

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    windows = torch.randint(3, model.config.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    float_hessians = input_hessians(model, windows, dtype=torch.float64)
    used: list = []
    real = int4_rewrite.quantize_gptq

    def spy(w, hessian, *args, **kwargs):
        used.append(hessian.clone())
        return real(w, hessian, *args, **kwargs)

    monkeypatch.setattr(int4_rewrite, "quantize_gptq", spy)
    got = quantize_model_sequential(model, windows, 32, "gptq-mse", hessian_dtype=torch.float64, order="act")
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    assert list(got) == names == list(float_hessians)  # layer order, then q, k, v, o, gate, up, down
    final = input_hessians(model, windows, dtype=torch.float64)
    modules = dict(model.named_modules())
    for name, hessian in zip(names, used):
        torch.testing.assert_close(hessian, final[name], rtol=1e-9, atol=1e-9 * float(final[name].abs().max()))
        np.testing.assert_array_equal(modules[name].weight.detach().double().numpy().T, got[name].dequantize_f32())
    torch.testing.assert_close(used[0], float_hessians[names[0]], rtol=1e-9, atol=1e-9 * float(used[0].abs().max()))
    later = names.index("model.layers.1.self_attn.q_proj")
    assert not torch.allclose(used[later], float_hessians[names[later]], rtol=1e-6, atol=0)  # not the float model's
    with pytest.raises(ValueError, match="GPTQ-style"):
        quantize_model_sequential(model, windows, 32, "mse")


def test_quantize_model_act_order_quantizers(tiny_llama_dir):
    """``gptq-act`` / ``gptq-mse-act`` through ``quantize_model``: every projection is ``quantize_gptq(W, H,
    order="act")`` with its range rule, and the weight becomes its dequantized value."""
    import torch
    from transformers import AutoModelForCausalLM

    from acttail_export.int4_rewrite import input_hessians, quantize_model

    assert qz.gptq_options("gptq-mse-act") == {"params": "mse", "order": "act"}
    assert qz.gptq_options("gptq") == {"params": "rtn", "order": "natural"}
    with pytest.raises(ValueError, match="GPTQ-style"):
        qz.gptq_options("mse")
    for quantizer, params in (("gptq-act", "rtn"), ("gptq-mse-act", "mse")):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
        windows = torch.randint(3, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        hessians = input_hessians(model, windows)
        modules = dict(model.named_modules())
        want = {n: qz.quantize_gptq(modules[n].weight.detach().T, hessians[n], 32, params=params, order="act")
                for n in hessians}
        got = quantize_model(model, 32, quantizer, hessians=hessians)
        for name, (codes, scales, offsets) in want.items():
            np.testing.assert_array_equal(got[name].codes(), codes.numpy())
            np.testing.assert_array_equal(got[name].scales, scales.numpy())
            np.testing.assert_array_equal(got[name].offsets, offsets.numpy())
            np.testing.assert_array_equal(modules[name].weight.detach().numpy().T, got[name].dequantize_f32())
