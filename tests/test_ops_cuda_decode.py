"""The split-K decode GEMV (M <= 8) of com.acttail::SparseMatMul on CUDA: its scratch and its two grids.

The kernel accumulates into a float32 scratch owned by the CUDA stream and zeroed once: every launch must
leave it zero again, also when shapes change, when sessions run concurrently on their own streams and
when ONNX Runtime replays the node from a captured CUDA graph. Skipped without onnxruntime-gpu and a
usable CUDA device, like tests/test_ops_cuda.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from test_ops import Case, make_model, run_op
from test_ops_cuda import assert_close, assert_matches  # the exact tolerance on the decode GEMV

from acttail_export import ops

CUDA = "CUDAExecutionProvider"
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not ops.cuda_available(), reason="needs onnxruntime-gpu and a usable CUDA device"),
]


def _inputs(rng, m: int, K: int, N: int, dtype=np.float16):
    x = rng.standard_normal((m, K)).astype(dtype)
    w = (rng.standard_normal((K, N)) * 0.05).astype(dtype)
    return x, w


@pytest.mark.parametrize("mode", ["threshold", "topk"])
@pytest.mark.parametrize("m", [1, 2, 5, 8])
@pytest.mark.parametrize("K,N", [(4096, 8192), (11008, 4096), (4096, 11008), (300, 257)])
def test_both_grids_match_numpy(K, N, m, mode):
    """Large grids run the plain kernel, small ones pool each block's kept channels (LaunchDecode)."""
    rng = np.random.default_rng(K + N + m)
    x, w = _inputs(rng, m, K, N)
    threshold, k = (0.8, None) if mode == "threshold" else (None, K // 5)
    assert_matches(run_op(CUDA, x, w, mode, threshold, k), x, w, mode, threshold, k)


def test_scratch_is_left_zero_across_calls_and_shapes():
    """The same inputs give the same, correct output (to the last bit's rounding) on every call, in
    between calls of other shapes that use (and grow) the same per-stream scratch."""
    import onnxruntime as ort

    sess = ort.InferenceSession(make_model(np.float16, "threshold", None, threshold_input=True), ops.session_options(), providers=[CUDA])
    rng = np.random.default_rng(7)
    t = np.array(0.5, np.float32)
    first = _inputs(rng, 1, 4096, 4096)
    outputs = []
    for m, K, N in [(1, 64, 80), (3, 4096, 11008), (8, 1000, 30000), (1, 4096, 4096)]:
        x, w = _inputs(rng, m, K, N)
        y = sess.run(None, {"X": x, "W": w, "t": t})[0]
        assert_matches(y, x, w, "threshold", 0.5, None)
        outputs.append(sess.run(None, {"X": first[0], "W": first[1], "t": t})[0])
    assert_matches(outputs[0], first[0], first[1], "threshold", 0.5, None)
    # The split-K blocks add into the float32 scratch with atomics, so the order of the partial sums (and
    # the last bit of a float16 result) may change from call to call; a scratch left non-zero would add a
    # whole earlier output instead. Every repeat must agree with the first to one float16 ulp.
    ulp = np.spacing(np.abs(outputs[0])).astype(np.float32)
    for y in outputs[1:]:
        diff = np.abs(y.astype(np.float32) - outputs[0].astype(np.float32))
        assert (diff <= ulp).all(), f"repeat differs by up to {diff.max():.3g} (more than one float16 ulp)"


def test_concurrent_sessions_on_their_own_streams():
    """Four threads, each with its own session (and CUDA stream), run different shapes at once."""
    import onnxruntime as ort

    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            sess = ort.InferenceSession(make_model(np.float16, "threshold", None, threshold_input=True), ops.session_options(),
                                        providers=[CUDA])
            rng = np.random.default_rng(seed)
            for i in range(12):
                x, w = _inputs(rng, 1 + (seed + i) % 4, 2048 + 256 * seed, 3000 + 512 * i)
                y = sess.run(None, {"X": x, "W": w, "t": np.array(0.6, np.float32)})[0]
                assert_matches(y, x, w, "threshold", 0.6, None)
        except BaseException as exc:  # noqa: BLE001 (re-raised in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_cuda_graph_replay_with_new_inputs(mode):
    """enable_cuda_graph: ORT captures the node once and replays it; outputs follow the bound inputs."""
    import onnxruntime as ort

    K, N = 4096, 4096
    k = 1024 if mode == "topk" else None
    sess = ort.InferenceSession(make_model(np.float16, mode, k, threshold_input=mode == "threshold"), ops.session_options(),
                                providers=[(CUDA, {"enable_cuda_graph": "1"})])
    rng = np.random.default_rng(11)
    x, w = _inputs(rng, 1, K, N)
    xs = ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0)
    ws = ort.OrtValue.ortvalue_from_numpy(w, "cuda", 0)
    ts = ort.OrtValue.ortvalue_from_numpy(np.array(0.7, np.float32), "cuda", 0)
    ys = ort.OrtValue.ortvalue_from_shape_and_type([1, N], np.float16, "cuda", 0)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("X", xs)
    binding.bind_ortvalue_input("W", ws)
    if mode == "threshold":
        binding.bind_ortvalue_input("t", ts)
    binding.bind_ortvalue_output("Y", ys)
    for step in range(5):
        x = rng.standard_normal((1, K)).astype(np.float16)
        xs.update_inplace(x)
        sess.run_with_iobinding(binding)
        assert_matches(ys.numpy(), x, w, mode, 0.7, k)


def test_cuda_graph_replay_packed_members():
    """Per-member thresholds, scale and ramp in a captured graph: the per-stream scratch is sized for the member
    tiles before capture and left zero by every replay."""
    import onnxruntime as ort

    K, widths = 4096, (4096, 1024, 1024)
    N = sum(widths)
    segments = tuple(np.cumsum(widths).tolist())
    sess = ort.InferenceSession(make_model(np.float16, "threshold", segments=segments, ramp=0.25, scale_input=True), ops.session_options(),
                                providers=[(CUDA, {"enable_cuda_graph": "1"})])
    rng = np.random.default_rng(12)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float16)
    t = np.array([0.5, 0.8, 1.1], np.float32)
    scale = rng.uniform(0.5, 2.0, (3, K)).astype(np.float32)
    values = {"X": rng.standard_normal((1, K)).astype(np.float16), "W": w, "t": t, "scale": scale}
    bound = {name: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for name, v in values.items()}
    ys = ort.OrtValue.ortvalue_from_shape_and_type([1, N], np.float16, "cuda", 0)
    binding = sess.io_binding()
    for name, v in bound.items():
        binding.bind_ortvalue_input(name, v)
    binding.bind_ortvalue_output("Y", ys)
    for _ in range(4):
        x = rng.standard_normal((1, K)).astype(np.float16)
        bound["X"].update_inplace(x)
        sess.run_with_iobinding(binding)
        assert_close(ys.numpy(), Case(x, w, "threshold", t, segments=segments, ramp=0.25, scale=scale))


@pytest.mark.parametrize("pdl", ["1", "0"])
@pytest.mark.parametrize("mode", ["threshold", "topk"])
def test_chained_nodes_in_a_cuda_graph(mode, pdl, monkeypatch):
    """Two nodes, the second reading the first's Y (K -> N -> K), captured in one CUDA graph and replayed with new X.
    On sm_90+ each decode GEMV is a programmatic dependent launch (ACTTAIL_PDL, on by default) whose blocks may start
    while the previous kernel runs: the second node's GEMV (and its top-k selection) reading Y1, its selection or the
    per-stream scratch before the first node's kernels finished would see the last replay's values (the first node's X
    is copied in before the replay). Each link is checked against the reference of this replay's inputs;
    ACTTAIL_PDL=0 (plain launches) is the control."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    monkeypatch.setenv("ACTTAIL_PDL", pdl)  # read when the graph is captured
    K, N = 4096, 11008
    f16 = TensorProto.FLOAT16
    attrs = [{"mode": "threshold"}, {"mode": "threshold"}] if mode == "threshold" else [{"mode": "topk", "k": K // 2}, {"mode": "topk", "k": N // 2}]
    t_in = [["t1"], ["t2"]] if mode == "threshold" else [[], []]
    nodes = [helper.make_node(ops.OP_TYPE, ["X", "W1"] + t_in[0], ["Y1"], domain=ops.DOMAIN, name="a", **attrs[0]),
             helper.make_node(ops.OP_TYPE, ["Y1", "W2"] + t_in[1], ["Y2"], domain=ops.DOMAIN, name="b", **attrs[1])]
    inputs = [helper.make_tensor_value_info("X", f16, [1, K]), helper.make_tensor_value_info("W1", f16, [K, N]),
              helper.make_tensor_value_info("W2", f16, [N, K])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, []) for n in t_in[0] + t_in[1]]
    graph = helper.make_graph(nodes, "chain", inputs, [helper.make_tensor_value_info("Y1", f16, [1, N]),
                                                       helper.make_tensor_value_info("Y2", f16, [1, K])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ops.DOMAIN, 1)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), ops.session_options(), providers=[(CUDA, {"enable_cuda_graph": "1"})])
    rng = np.random.default_rng(13)
    w1, w2 = (rng.standard_normal((K, N)) * 0.05).astype(np.float16), (rng.standard_normal((N, K)) * 0.05).astype(np.float16)
    t1, t2 = 0.67, 1.5  # about half of |x| and of |y1| at the first replay (y1 ~ 2.3 for these weights)
    values = {"X": rng.standard_normal((1, K)).astype(np.float16), "W1": w1, "W2": w2}
    if mode == "threshold":
        values |= {"t1": np.array(t1, np.float32), "t2": np.array(t2, np.float32)}
    bound = {name: ort.OrtValue.ortvalue_from_numpy(v, "cuda", 0) for name, v in values.items()}
    out = {"Y1": ort.OrtValue.ortvalue_from_shape_and_type([1, N], np.float16, "cuda", 0),
           "Y2": ort.OrtValue.ortvalue_from_shape_and_type([1, K], np.float16, "cuda", 0)}
    binding = sess.io_binding()
    for name, v in bound.items():
        binding.bind_ortvalue_input(name, v)
    for name, v in out.items():
        binding.bind_ortvalue_output(name, v)
    for step in range(4):
        x = (rng.standard_normal((1, K)) * (1 + step)).astype(np.float16)
        bound["X"].update_inplace(x)
        sess.run_with_iobinding(binding)
        y1, y2 = out["Y1"].numpy(), out["Y2"].numpy()
        if mode == "threshold":
            assert_matches(y1, x, w1, mode, t1, None)
            assert_matches(y2, y1, w2, mode, t2, None)
        else:
            assert_matches(y1, x, w1, mode, None, K // 2)
            assert_matches(y2, y1, w2, mode, None, N // 2)
