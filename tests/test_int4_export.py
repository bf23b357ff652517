"""``--weights int4`` exports of the tiny Llama / Mistral models: ops in the graph, every rewritten projection's
ORT output against reference.py on the same inputs, whole-model logits at sparsity 0 against PyTorch with the
dequantized weights, the folder size, the config round trip and bad flag combinations."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from acttail_export import reference as ref
from acttail_export.cli import main
from acttail_export.config import CONFIG_NAME, ActTailConfig
from acttail_export.graph_rewrite import find_projections
from acttail_export.runtime import create_session, decoder_feeds, load_session_options

FAST = dict(calibration_samples=2, sequence_length=32, eval_tokens=0, progress=False)
# float32 accumulation of <= 160 terms: ~sqrt(n) 2^-24 typical, n 2^-24 worst (1e-5) of the bound
# sum |v| (|s| q + |o|) (csrc/sparse_matmul_nbits/README.md, "Accumulation"); the op tests use 2e-5
TOL = 2e-5


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """A small English-like calibration text (the exports read nothing else)."""
    rng = np.random.default_rng(0)
    words = ("the of and to in is was for on that with as by at from his an were are which this be it has had not "
             "river city music history station game army season album film church school system team war king").split()
    lines = [" ".join(rng.choice(words, 40)).capitalize() + " ." for _ in range(200)]
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


pytestmark = pytest.mark.optimum  # --weights int4 is written on the optimum base


def _export(model_dir, out, text, **kw):
    from acttail_export.exporter import export

    return export(str(model_dir), out, calibration_data=text, **{**FAST, "base": "optimum", **kw})


# htsr: budgets inside (0, 1) on every projection, so every case has the op under test on all 14 projections and
# no kept set of one channel (the default's greedy search leaves some projections dense and takes others to s_max,
# where the per-projection bound below, sum |v| |W|, ignores MatMulNBits' scale / zero-point rounding)
CASES = {  # name: (model fixture, export arguments)
    "llama-fused-topk": ("tiny_llama_dir", dict(kernel="fused", mode="topk", sparsity=0.5, block_size=32, quantizer="mse",
                                                allocation="htsr")),
    "mistral-fused-threshold": ("tiny_mistral_dir", dict(kernel="fused", mode="threshold", sparsity=0.5, block_size=64,
                                                         quantizer="rtn", allocation="uniform")),
    "llama-mask-threshold": ("tiny_llama_dir", dict(kernel="mask", mode="threshold", sparsity=0.5, block_size=128, quantizer="mse",
                                                    allocation="htsr", lm_head="float")),
    "mistral-mask-topk": ("tiny_mistral_dir", dict(kernel="mask", mode="topk", sparsity=0.6, block_size=32, quantizer="rtn",
                                                   allocation="htsr")),
    "llama-dense": ("tiny_llama_dir", dict(kernel="mask", mode="topk", sparsity=0.0, block_size=64, quantizer="mse")),
}
# every case but one has the CPU default's 8-bit lm_head (acttail_export.lm_head); llama-mask-threshold keeps it float


@pytest.fixture(scope="module")
def exports(request, tmp_path_factory, text_file):
    """Each case exported once (lazily)."""
    done: dict = {}

    def get(name):
        if name not in done:
            fixture, kw = CASES[name]
            model_dir = request.getfixturevalue(fixture)
            done[name] = (_export(model_dir, tmp_path_factory.mktemp("int4") / name, text_file, weights="int4", **kw), model_dir)
        return done[name]
    return get


def _probe(folder, tmp_path):
    """Session on the export with every projection node's inputs and output as extra outputs; the graph."""
    import onnxruntime as ort

    graph = onnx.load(str(folder / "model.onnx"))
    nodes = {n.name: n for n in find_projections(graph).values()}
    producers = {o: n for n in graph.graph.node for o in n.output}
    names = {t for n in nodes.values() for t in (n.input[0], n.output[0])}
    names |= {producers[n.input[0]].input[1] for n in nodes.values() if n.op_type == "MatMulNBits"
              and n.input[0] in producers and producers[n.input[0]].op_type == "Where"}
    graph.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in sorted(names))
    path = tmp_path / "probe.onnx"
    onnx.save_model(graph, str(path))
    session = ort.InferenceSession(str(path), load_session_options(folder), providers=["CPUExecutionProvider"])
    return session, graph, nodes, producers


def _attrs(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@pytest.mark.parametrize("name", list(CASES))
def test_graph_ops_and_projection_outputs(exports, name, tmp_path):
    folder, _ = exports(name)
    config = ActTailConfig.load(folder)
    kw = CASES[name][1]
    assert (config.weights, config.block_size, config.quantizer) == ("int4", kw["block_size"], kw["quantizer"])
    session, graph, nodes, producers = _probe(folder, tmp_path)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    ops = {n.op_type for n in nodes.values()}
    want = {"MatMulNBits"} if kw["kernel"] == "mask" or kw["sparsity"] == 0 else {"SparseMatMulNBits"}
    assert ops == want, ops
    # no float projection weight left: every [K, N] float initializer of the graph is the embedding / lm_head
    shapes = {(p.in_features, p.out_features) for p in config.projections}
    assert not [n for n, a in inits.items() if a.dtype == np.float32 and a.shape in shapes]
    ids = np.random.default_rng(1).integers(0, 49152, (2, 24))
    outs = dict(zip([o.name for o in session.get_outputs()], session.run(None, decoder_feeds(session, ids))))
    by_name = config.by_name()
    kept_fraction = []
    for pname, node in find_projections(graph).items():
        p, a = by_name[pname], _attrs(node)
        x, y = outs[node.input[0]], outs[node.output[0]]
        if node.op_type == "SparseMatMulNBits":
            q = ref.unpack_nibbles(inits[node.input[1]], a["N"])
            s, o = inits[node.input[2]], inits[node.input[3]]
            mode = a["mode"].decode()
            member = ref.Member(threshold=float(inits[node.input[4]])) if mode == "threshold" else ref.Member(k=a["k"])
            want_y, _ = ref.sparse_matmul_nbits(x, inits[node.input[1]], s, o, a["N"], a["block_size"], mode, [member])
            values, keep = ref.member_values(x, mode, member)
            kept_fraction.append(keep.mean())
            # the decode-loop hint: the kept fraction of this projection's budget
            assert a["density"] == pytest.approx(1.0 - p.sparsity, abs=1e-4), pname
        else:  # MatMulNBits: ORT's layout, float zero points; its input is the masked x (or x when dense)
            from acttail_export.quantize import MatMulNBitsWeight, dequantize_matmul_nbits

            w = dequantize_matmul_nbits(MatMulNBitsWeight(inits[node.input[1]], inits[node.input[2]], inits[node.input[3]],
                                                          a["K"], a["N"], a["block_size"]))
            where = producers.get(node.input[0])
            if where is not None and where.op_type == "Where":
                _check_mask(outs[where.input[1]], x, p, config.mode)
            values = x.astype(np.float64)
            want_y = values @ w
            s, o = None, None
            q = np.abs(w)  # bound below: sum |v| |W|
        wabs = q if s is None else ref.dequantize_blocks(q, np.abs(s), np.abs(o), a["block_size"])
        bound = np.abs(values) @ wabs
        assert (np.abs(y - want_y) <= TOL * bound + 1e-30).all(), pname
    if kept_fraction:  # the fused ops really skip channels at the configured budgets
        assert 0.2 < float(np.mean(kept_fraction)) < 0.8


def _check_mask(x: np.ndarray, masked: np.ndarray, p, mode: str) -> None:
    """The mask subgraph's output follows the rule (reference.py) on its own input; ties may pick either index."""
    member = ref.Member(threshold=p.threshold) if mode == "threshold" else ref.Member(k=p.keep_k())
    values, _ = ref.member_values(x, mode, member)
    np.testing.assert_array_equal(np.sort(np.abs(masked), -1), np.sort(np.abs(values), -1).astype(np.float32))


def test_dense_int4_logits_match_dequantized_pytorch(exports):
    """Sparsity 0: ORT's MatMulNBits graph == PyTorch with the same dequantized weights (no mask, no chaos)."""
    import torch

    from acttail_export.int4_rewrite import quantize_model
    from acttail_export.lm_head import emulated_head, head_of_folder, quantize_head
    from acttail_export.modeling import load_model

    folder, model_dir = exports("llama-dense")
    model, _ = load_model(str(model_dir))
    quantize_model(model, 64, "mse")
    head = head_of_folder(folder)  # the 8-bit lm_head: the codes of the model's weight, PyTorch emulates its int8 path
    assert ActTailConfig.load(folder).lm_head == "int8" and head is not None
    weight = model.get_output_embeddings().weight.detach().numpy().T
    np.testing.assert_array_equal(head.B, quantize_head(weight).B)
    ids = np.random.default_rng(2).integers(0, 49152, (2, 40))
    with torch.no_grad(), emulated_head(model, head):
        want = model(torch.from_numpy(ids)).logits.double().numpy()
    session = create_session(folder)
    got = session.run(["logits"], decoder_feeds(session, ids))[0]
    # measured ~2e-7 of max |logit| (float32 summation order, ORT vs PyTorch); a wrong code or block is ~1e-2, and
    # PyTorch without the int8 activations of the 8-bit lm_head ~1e-3
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def test_folder_shrinks_by_the_projection_bytes(exports, tiny_llama_dir, tmp_path, text_file):
    """The float projection weights are gone: model.onnx shrinks by their bytes less the 4-bit tensors' bytes."""
    folder, _ = exports("llama-mask-threshold")
    fp32 = _export(tiny_llama_dir, tmp_path / "fp32", text_file, kernel="mask", mode="threshold", sparsity=0.5)
    config = ActTailConfig.load(folder)
    block = config.block_size
    float_bytes = sum(4 * p.in_features * p.out_features for p in config.projections)
    # MatMulNBits (mask kernel): codes [N, blocks, B / 2] (K padded to whole blocks), float32 scales and zero points
    int4_bytes = sum(-(-p.in_features // block) * p.out_features * (block // 2 + 2 * 4) for p in config.projections)
    saved = (fp32 / "model.onnx").stat().st_size - (folder / "model.onnx").stat().st_size
    # the rest of the two graphs is the same up to node / tensor names (a few KB)
    assert abs(saved - (float_bytes - int4_bytes)) < 0.02 * float_bytes


def test_config_round_trip_and_old_configs(exports):
    folder, _ = exports("llama-fused-topk")
    raw = json.loads((folder / CONFIG_NAME).read_text())
    assert (raw["weights"], raw["block_size"], raw["quantizer"], raw["lm_head"]) == ("int4", 32, "mse", "int8")
    assert ActTailConfig.from_dict(raw).to_dict() == raw
    for key in ("weights", "block_size", "quantizer", "lm_head"):  # written before 4-bit weights existed
        raw.pop(key)
    old = ActTailConfig.from_dict(raw)
    assert (old.weights, old.block_size, old.quantizer, old.lm_head) == (None, None, None, None)
    from acttail_export.errors import ActTailError

    with pytest.raises(ActTailError, match="block_size"):
        ActTailConfig.from_dict({**raw, "weights": "int4", "block_size": 48, "quantizer": "rtn"})
    with pytest.raises(ActTailError, match="only apply to weights=int4"):
        ActTailConfig.from_dict({**raw, "weights": "fp32", "block_size": 32})


@pytest.mark.parametrize("args,needle", [
    (["--weights", "int8"], "--weights must be one of fp32, fp16, int4"),
    (["--weights", "int4", "--block-size", "48"], "--block-size must be one of 32, 64, 128"),
    (["--weights", "int4", "--block-size", "big"], "--block-size must be"),
    (["--weights", "int4", "--quantizer", "awq"], "--quantizer must be one of rtn, mse, gptq, gptq-mse, gptq-act, gptq-mse-act"),
    (["--block-size", "64"], "only apply to --weights int4"),
    (["--quantizer", "rtn"], "only apply to --weights int4"),
    (["--weights", "fp16"], "needs --dtype fp16"),
    (["--lm-head", "int8"], "--lm-head int8 only applies to --weights int4"),
    (["--weights", "int4", "--lm-head", "fp8"], "--lm-head must be one of float, int8"),
])
def test_bad_flags_exit_2_one_line(capsys, tmp_path, tiny_llama_dir, args, needle):
    out = tmp_path / "out"
    rc = main(["export", "--model", str(tiny_llama_dir), *args, str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("acttail-export: error: ") and needle in err[0], err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".acttail-" in p.name]


def test_external_data_base_is_compacted(tiny_llama_dir, tmp_path):
    """A base with external weights (models over 2 GB): the removed float weights leave no bytes behind."""
    from acttail_export import allocation
    from acttail_export.graph_rewrite import rewrite
    from acttail_export.int4_rewrite import quantize_model, rewrite_int4, rewrite_onnx_int4
    from acttail_export.modeling import load_model
    from acttail_export.onnx_export import export_base_onnx

    model, _ = load_model(str(tiny_llama_dir))
    weights = quantize_model(model, 32, "rtn")
    base = export_base_onnx(model, tmp_path / "base")
    graph = onnx.load(str(base))
    onnx.save_model(graph, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.onnx_data", size_threshold=0)
    config = allocation.build_config(model, 0.5, allocation="uniform", mode="topk")
    out = tmp_path / "out"
    out.mkdir()
    rewrite_onnx_int4(tmp_path / "ext.onnx", out / "model.onnx",
                      lambda g: (rewrite(g, config, mode="topk", kernel="mask"), rewrite_int4(g, config, weights)))
    float_bytes = sum(4 * p.in_features * p.out_features for p in config.projections)
    before = (tmp_path / "ext.onnx").stat().st_size + (tmp_path / "ext.onnx_data").stat().st_size
    after = sum(f.stat().st_size for f in out.iterdir())
    assert before - after > 0.5 * float_bytes  # int4 tensors are 1/8 + scales of the float bytes
    new = onnx.load(str(out / "model.onnx"))  # self-contained again (small), loads with its weights
    assert {n.op_type for n in find_projections(new).values()} == {"MatMulNBits"}


@pytest.mark.parametrize("name", ["llama-fused-topk", "llama-mask-threshold"])
def test_runtime_loads_and_generates(exports, name):
    """runtime.load_model (ORTModelForCausalLM, KV cache) runs the 4-bit graph; greedy decoding with the cache
    gives the tokens of full-prompt passes of the same graph (create_session)."""
    from acttail_export.runtime import load_model

    folder, _ = exports(name)
    model = load_model(folder)
    ids = np.random.default_rng(3).integers(0, 49152, (1, 12))
    import torch

    out = model.generate(torch.from_numpy(ids), max_new_tokens=4, do_sample=False).numpy()
    session = create_session(folder)
    seq = ids
    for _ in range(4):  # the same greedy steps without the cache
        logits = session.run(["logits"], decoder_feeds(session, seq))[0]
        seq = np.concatenate([seq, logits[:, -1:].argmax(-1)], axis=1)
    np.testing.assert_array_equal(out, seq)


def test_expected_density_weights_members_by_columns():
    """A packed node's density: its members' kept fractions weighted by their output columns (q | k | v)."""
    from acttail_export.config import ProjectionConfig
    from acttail_export.int4_rewrite import expected_density

    q = ProjectionConfig("model.layers.0.self_attn.q_proj", 0, "q_proj", 64, 64, sparsity=0.4, effective_sparsity=0.5)
    k = ProjectionConfig("model.layers.0.self_attn.k_proj", 0, "k_proj", 64, 16, sparsity=0.8)
    assert expected_density([q, k], [64, 16]) == pytest.approx((0.6 * 64 + 0.2 * 16) / 80, abs=1e-4)
    assert expected_density([k], [16]) == pytest.approx(0.2)


def test_concat_columns_packs_members_side_by_side():
    """Packed q/k/v or gate/up: the members' 4-bit weights side by side along N (odd widths straddle a byte)."""
    from acttail_export.int4_rewrite import concat_columns
    from acttail_export.quantize import quantize

    rng = np.random.default_rng(4)
    parts = [quantize(rng.standard_normal((70, n)).astype(np.float32), 32, "rtn") for n in (5, 3, 8)]
    packed = concat_columns(parts)
    assert (packed.K, packed.N) == (70, 16)
    np.testing.assert_array_equal(packed.dequantize(), np.concatenate([p.dequantize() for p in parts], axis=1))
