"""The SwiGLU fold in the default export: the tiny Llama through ``export`` on the genai base (packed gate/up), once
with ``--kernel fused`` (every down op reads the gate|up output with ``activation="swiglu"``) and once with
``--kernel mask`` (the builder's Split / Sigmoid / Mul / Mul untouched), same budgets and calibration.

A hard mask is numerically chaotic (tests/test_smollm2_kernels.py): the fused op's float32 ``silu(g) * u`` rounds
differently from the graph's Sigmoid / Mul / Mul, so a value at a threshold could flip. The comparisons are therefore
the ones the existing fused-vs-mask tests use: the export validation's forced-mask checks (every projection output
against its rule on the input ORT computed, ``x = swiglu(P)`` for the folded down ops), prompt logits within the
fused-vs-PyTorch tolerance of tests/test_optimize.py (1e-4 relative; the tiny model has no near-boundary values in a
short prompt), and perplexity compared statistically (paired per-window NLL differences).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
import torch

from acttail_export import genai_base as gbase
from acttail_export.activation_fusion import activation_of
from acttail_export.config import CONFIG_NAME, ActTailConfig
from acttail_export.errors import ActTailError
from acttail_export.graph_rewrite import find_projections

pytestmark = pytest.mark.skipif("not (gbase.genai_available() and gbase.builder_problem() is None)",
                                reason="onnxruntime-genai's model builder does not import")

FAST = dict(calibration_samples=2, sequence_length=32, eval_tokens=0, progress=False, base="genai", allocation="uniform",
            sparsity=0.5)
TOKENS, LENGTH = 2048, 128  # 16 windows for the paired perplexity comparison


@pytest.fixture(scope="module", params=["threshold", "topk"])
def exports(request, tiny_llama_dir, tmp_path_factory, wikitext_valid):
    """(mode, {kernel: folder}) of the tiny Llama on the default base, fused and mask kernel."""
    from acttail_export.exporter import export
    from acttail_export.ops import get_library_path

    try:
        get_library_path()
    except ActTailError:
        pytest.skip("op library not built (make ops)")
    mode = request.param
    root = tmp_path_factory.mktemp(f"swiglu-{mode}")
    return mode, {kernel: export(str(tiny_llama_dir), root / kernel, kernel=kernel, mode=mode,
                                 calibration_data=str(wikitext_valid), **FAST) for kernel in ("fused", "mask")}


def _graph(folder) -> onnx.ModelProto:
    return onnx.load(str(folder / "model.onnx"), load_external_data=False)


def test_every_down_op_applies_swiglu(exports):
    mode, folders = exports
    config = ActTailConfig.load(folders["fused"])
    layers = len({p.layer for p in config.projections})
    graph = _graph(folders["fused"])
    found = find_projections(graph, config.spec)
    producers = {o: n for n in graph.graph.node for o in n.output}
    for layer in range(layers):
        down = found[f"model.layers.{layer}.mlp.down_proj"]
        gate_up = found[f"model.layers.{layer}.mlp.gate_proj"]
        assert (down.op_type, down.domain, activation_of(down)) == ("SparseMatMul", "com.acttail", "swiglu")
        assert gate_up.name.endswith("/gate_up_proj/MatMul") and activation_of(gate_up) == ""
        assert down.input[0] == gate_up.output[0] and producers[down.input[0]] is gate_up
    ops = [n.op_type for n in graph.graph.node]
    assert "Sigmoid" not in ops and not [n for n in graph.graph.node if n.op_type in ("Split", "Mul") and "/mlp/" in n.name]
    assert sum(activation_of(n) == "swiglu" for n in graph.graph.node) == layers  # only the down ops
    # the mask kernel keeps the builder's activation: no pattern for the pass to fold
    mask = _graph(folders["mask"])
    assert [n.op_type for n in mask.graph.node].count("Sigmoid") == layers
    assert not [n for n in mask.graph.node if activation_of(n)]
    assert mode == config.mode


def test_folder_records_the_fold_and_keeps_the_config_format(exports):
    _, folders = exports
    import json

    assert 'activation="swiglu"' in (folders["fused"] / "README.md").read_text()
    assert "swiglu" not in (folders["mask"] / "README.md").read_text()
    keys = {k: set(json.loads((f / CONFIG_NAME).read_text())) for k, f in folders.items()}
    assert keys["fused"] == keys["mask"]  # no new field: older readers load the fused folder's config
    configs = {k: ActTailConfig.load(f) for k, f in folders.items()}
    key = (lambda p: p.threshold) if configs["fused"].mode == "threshold" else (lambda p: p.keep_k())
    assert [key(p) for p in configs["fused"].projections] == [key(p) for p in configs["mask"].projections]  # same budgets


def test_validation_checked_the_folded_ops(exports):
    """The export validation computed x = swiglu(P) for the folded down ops: projection, forced-mask and cached-step
    errors within the fp32 tolerance, every ORT top-1 equal to PyTorch's on the same masks."""
    _, folders = exports
    for kernel, folder in folders.items():
        v = ActTailConfig.load(folder).perplexity["validation"]
        assert max(v["forced_mask_rel_error"], v["projection_rel_error"], v["cached_step_rel_error"]) < 1e-4, (kernel, v)
        assert v["forced_top1_agreement"] == 1.0, (kernel, v)


def test_prompt_logits_agree_with_the_mask_export_and_the_reference(exports, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from acttail_export.runtime import create_session, decoder_feeds
    from acttail_export.sparsify import apply_sparsity

    mode, folders = exports
    prompt = torch.randint(3, 49152, (1, 24), generator=torch.Generator().manual_seed(17))
    logits = {}
    for kernel, folder in folders.items():
        session = create_session(folder)
        logits[kernel] = session.run(["logits"], decoder_feeds(session, prompt.numpy()))[0][0]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode(), apply_sparsity(model, ActTailConfig.load(folders["fused"]), mode):
        want = model(prompt).logits[0].numpy()
    scale = np.abs(want).max()
    assert np.abs(logits["fused"] - logits["mask"]).max() / scale < 1e-4
    assert np.abs(logits["fused"] - want).max() / scale < 1e-4
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        assert np.abs(dense(prompt).logits[0].numpy() - want).max() / scale > 1e-2  # the masks change the logits
    assert gbase.generate(folders["fused"], prompt.numpy(), 8) == gbase.generate(folders["mask"], prompt.numpy(), 8)


def test_perplexity_agrees_with_the_mask_export(exports, wikitext_valid):
    """Paired per-window mean NLL differences (same text): a wrong op or budget moves every window the same way, chaos
    moves them at random. |mean| must stay within 4 standard errors (tests/test_smollm2_kernels.py's rule) plus 1e-4
    nats, a floor for two graphs that agree to float rounding (a 0.01 % perplexity unit; their differences are then
    ~1e-7 with a standard error that small too, and a systematic rounding difference of that size is not a defect)."""
    from acttail_export.runtime import create_session, export_windows, window_nlls

    _, folders = exports
    windows = export_windows(folders["mask"], wikitext_valid, LENGTH, TOKENS)
    nll = {k: np.array([total / n for total, n in window_nlls(create_session(f), windows)]) for k, f in folders.items()}
    diff = nll["fused"] - nll["mask"]
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    assert len(diff) == TOKENS // LENGTH
    assert se <= 0.02, (se, diff)
    assert abs(diff.mean()) <= 4 * se + 1e-4, (diff.mean(), se, math.exp(nll["mask"].mean()), math.exp(nll["fused"].mean()))


def test_without_the_fold_the_fused_graph_computes_the_same(tiny_llama_dir, tmp_path):
    """``fuse_activation=False`` writes the fused graph with the builder's activation nodes; both variants of one base
    give the same logits through the genai runtime (the fold changes how silu(g) * u is rounded, nothing else)."""
    import onnxruntime_genai as og
    from transformers import AutoModelForCausalLM

    from acttail_export.allocation import build_config

    try:
        from acttail_export.ops import get_library_path

        get_library_path()
    except ActTailError:
        pytest.skip("op library not built (make ops)")
    base = gbase.build_base(tiny_llama_dir, tmp_path / "base", dtype="fp32", execution_provider="cpu", fuse_qkv=True,
                            fuse_gate_up=True, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    config = build_config(model, 0.5, allocation="uniform", mode="topk")
    gbase.write_variant(base, config, "model.folded.onnx", kernel="fused")
    gbase.write_variant(base, config, "model.unfolded.onnx", kernel="fused", fuse_activation=False)
    assert "Sigmoid" not in {n.op_type for n in gbase.load_graph(base, "model.folded.onnx").graph.node}
    assert "Sigmoid" in {n.op_type for n in gbase.load_graph(base, "model.unfolded.onnx").graph.node}
    prompt = torch.randint(3, model.config.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4)).numpy()

    def logits(name):
        m = og.Model(gbase.genai_config(base, name))
        params = og.GeneratorParams(m)
        params.set_search_options(max_length=32)
        gen = og.Generator(m, params)
        gen.append_tokens(prompt.astype(np.int32))
        return np.asarray(gen.get_logits(), dtype=np.float32).reshape(-1)

    folded, unfolded = logits("model.folded.onnx"), logits("model.unfolded.onnx")
    assert np.abs(folded - unfolded).max() / np.abs(unfolded).max() < 1e-5
