"""The real model through both rewrites: SmolLM2-135M exported with ``--kernel mask`` and ``--kernel fused``.

A hard-masked model is numerically chaotic: float rounding that differs between MLAS's MatMul and the fused op
moves the odd activation across the k-th value, and from then on the two graphs see different inputs (a 1e-6
perturbation of the embeddings flips about a quarter of the top-1 predictions of a 512-token window at 50 %).
Comparing the two exports token for token, or their perplexities to a fixed 0.5 %, therefore fails on some CPUs
(0.51 % on an AVX2-only EPYC) while both are right. So:

* each rewritten projection is checked where it is well defined: inside the real exported graph, its output
  given the input it actually received, against :func:`acttail_export.reference.sparse_matmul` (the mask is
  forced to the reference's by construction: both decide it from the same input; a fused down op receives
  ``[gate | up]`` and applies SwiGLU itself, whose float32 ``exp`` may round an ulp away from numpy's, so its rows
  with a value within a few ulps of the cut are left out);
* the two exports' perplexities are compared statistically: a paired comparison of per-window mean NLLs, with
  a tolerance from the spread of those differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from acttail_export.config import ActTailConfig

pytestmark = pytest.mark.slow

SPARSITY = 0.5
FAST = dict(calibration_samples=8, sequence_length=256, validate=False, eval_tokens=0, progress=False)
PROBE_TOKENS = 96
TOKENS, LENGTH = 8192, 512


@pytest.fixture(scope="module", params=["topk", "threshold"])
def smollm2_exports(request, tmp_path_factory):
    """(mode, {kernel: export folder}) of SmolLM2 at 50 % (HT-SR budgets)."""
    from acttail_export.exporter import export
    from acttail_export.ops import get_library_path

    get_library_path()  # a clear failure here if the op library was not built (make ops)
    mode = request.param
    root = tmp_path_factory.mktemp(f"smollm2-kernels-{mode}")
    # htsr: these tests check the kernels, and their perplexity tolerance was measured with these budgets; the
    # default allocation (a greedy search at 50 %, minutes on SmolLM2) is tested on the tiny models
    return mode, {kernel: export("smollm2", root / kernel, sparsity=SPARSITY, allocation="htsr", mode=mode, kernel=kernel,
                                 **FAST) for kernel in ("mask", "fused")}


def _probe_session(export_dir, model, tensors: list[str]):
    """An ORT session of the export's graph ``model`` that also returns ``tensors`` (projection inputs and outputs)."""
    import onnx
    import onnxruntime as ort

    from acttail_export.runtime import load_session_options

    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                              for t in tensors if t not in known)
    return ort.InferenceSession(model.SerializeToString(), load_session_options(export_dir),
                                providers=["CPUExecutionProvider"])


def _projection_tensors(model, config: ActTailConfig, fused: bool) -> dict[str, tuple[str, str, str, tuple | None, str]]:
    """{projection: (input before masking, output, weight initializer, its columns in a packed MatMul or None, the
    op's activation)}: a fused down op reads the packed gate|up output and applies SwiGLU itself ("swiglu")."""
    from acttail_export.activation_fusion import activation_of
    from acttail_export.graph_rewrite import find_projections, packed_columns

    producers = {o: n for n in model.graph.node for o in n.output}
    nodes = find_projections(model, config.spec)  # the default base packs q/k/v and gate/up: members share a node
    columns = packed_columns(nodes, config)
    found = {}
    for p in config.projections:
        node = nodes[p.name]
        if fused:
            assert node.op_type == "SparseMatMul" and node.domain == "com.acttail", node
            x = node.input[0]
        else:
            assert node.op_type == "MatMul", node
            where = producers[node.input[0]]  # the masking subgraph ends in Where(keep, x, 0)
            assert where.op_type == "Where" and where.name.startswith("/acttail/"), where
            x = where.input[1]
        found[p.name] = (x, node.output[0], node.input[1], columns.get(p.name), activation_of(node))
    if fused:  # the default base packs gate/up, so every down op folds the SwiGLU in
        assert {a for name, (*_, a) in found.items() if name.endswith("down_proj")} == {"swiglu"}
    return found


def _at_the_cut(x: np.ndarray, mode: str, member, rel: float = 1e-6) -> np.ndarray:
    """Rows of ``x`` [..., K] where a score lies within ``rel`` (8 float32 ulps) of the cut: the threshold, or the
    boundary between the k-th and (k+1)-th largest scores. One ulp of such a value can flip its channel."""
    from acttail_export.reference import scores, topk_keep

    s = scores(x).astype(np.float64)
    if mode == "threshold":
        return (np.abs(s - member.threshold) <= rel * member.threshold).any(-1)
    keep, t = topk_keep(x, member.k)
    kth = np.where(keep, s, np.inf).min(-1)  # the smallest kept score
    return (kth - t <= rel * kth) & np.isfinite(kth)


def test_every_projection_matches_the_reference_inside_the_graph(smollm2_exports, wikitext_valid):
    """Both graphs, every projection: ORT's output for the input it received equals reference.sparse_matmul."""
    import onnx
    from onnx import numpy_helper
    from transformers import AutoTokenizer

    from acttail_export.data import load_windows
    from acttail_export.reference import Member, sparse_matmul, swiglu
    from acttail_export.runtime import decoder_feeds

    mode, exports = smollm2_exports
    for kernel, export_dir in exports.items():
        config = ActTailConfig.load(export_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
        ids = load_windows(tokenizer, wikitext_valid, PROBE_TOKENS, max_tokens=PROBE_TOKENS).numpy()
        model = onnx.load(str(export_dir / "model.onnx"))
        weights = {i.name: i for i in model.graph.initializer}
        found = _projection_tensors(model, config, fused=kernel == "fused")
        names = sorted({t for x, y, _, _, _ in found.values() for t in (x, y)})
        session = _probe_session(export_dir, model, names)
        values = dict(zip(names, session.run(names, decoder_feeds(session, ids))))
        by_name = config.by_name()
        kept = []
        for name, (x_name, y_name, w_name, cols, activation) in found.items():
            p = by_name[name]
            member = Member(threshold=p.threshold) if mode == "threshold" else Member(k=p.keep_k())
            x, y, w = values[x_name], values[y_name], numpy_helper.to_array(weights[w_name])
            if cols is not None:  # this member's output columns of the packed MatMul, and its weight columns
                y, w = y[..., cols[0]:cols[1]], w[:, cols[0]:cols[1]]
            # a down op with activation="swiglu" reads [gate | up]: the reference applies silu(gate) * up first
            ref, bound = sparse_matmul(x, w, mode, [member], activation=activation or None)
            # float32 accumulation over K <= 1536 terms (MLAS or the op): measured max |error| / bound 1.3e-6
            # (fused) and 5.3e-7 (mask) with the AVX-512 and the AVX2 kernels; 1e-5 leaves a 7x margin
            err = np.abs(y - ref) / (bound + 1e-12)
            rows = np.ones(err.shape[:-1], bool)
            if activation:  # rows with an activated value at the cut: the op's expf and numpy's exp may round it apart
                rows = ~_at_the_cut(swiglu(x), mode, member)
                assert rows.mean() > 0.95, (name, float(rows.mean()))
            assert err[rows].max() <= 1e-5, (kernel, name, float(err[rows].max()))
            kept.append(float((np.abs(ref) > 0).mean()))
        # the masks are not trivial: about half of the channels go (the output of a projection that kept
        # nothing would be all zero)
        assert all(k > 0 for k in kept), kernel


def _window_nlls(export_dir, data) -> np.ndarray:
    """Mean next-token NLL of each window of the first TOKENS tokens of ``data``."""
    from acttail_export.runtime import create_session, export_windows, window_nlls

    windows = export_windows(export_dir, data, LENGTH, TOKENS)
    return np.array([nll / n for nll, n in window_nlls(create_session(export_dir), windows)])


def test_fused_export_perplexity_matches_mask_export(smollm2_exports, wikitext_valid):
    """Same budgets, graphs differ in the projections only, and perplexities alike within their paired spread."""
    import onnx

    mode, exports = smollm2_exports
    configs = {k: ActTailConfig.load(d) for k, d in exports.items()}
    key = (lambda p: p.threshold) if mode == "threshold" else (lambda p: p.keep_k())
    assert [key(p) for p in configs["mask"].projections] == [key(p) for p in configs["fused"].projections]
    ops = {k: {n.op_type for n in onnx.load(str(d / "model.onnx"), load_external_data=False).graph.node}
           for k, d in exports.items()}
    assert "SparseMatMul" in ops["fused"] and "SparseMatMul" not in ops["mask"]

    nll = {k: _window_nlls(d, wikitext_valid) for k, d in exports.items()}
    diff = nll["fused"] - nll["mask"]  # per-window log-perplexity differences (paired: same text)
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    # Chaos makes each window's difference a random draw around 0: benchmarks/paired_spread.py measured, on these
    # exports and 16 validation windows, top-k: mean +0.006 nats, standard error 0.011, sd 0.043 with the AVX-512 and
    # the AVX2 kernels (bit-identical sums), mean -0.004, se 0.009 with the scalar kernel, whose rounding differs
    # (docs/results/fused_vs_mask_spread_topk.json). A wrong op or budget
    # moves every window the same way: the mean leaves 4 standard errors (false alarm < 1e-4 for a normal mean).
    # The standard error itself must stay small enough for that to mean something (0.02 nats: a 2 % perplexity
    # unit; measured 0.011).
    assert se <= 0.02, (se, diff)
    assert abs(diff.mean()) <= 4 * se, (diff.mean(), se, math.exp(nll["mask"].mean()), math.exp(nll["fused"].mean()))
