"""``--weights int4`` on the default base (onnxruntime-genai's builder graph, packed q/k/v and gate/up): the 4-bit
ops replace every projection, the float projection weights leave the folder, each node's dequantized weight is the
4-bit quantization of the model's weight (members side by side), and the folder runs (plain ONNX Runtime and
``og.Model``) like the PyTorch sparse reference of the dequantized model."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from acttail_export import genai_base as gbase
from acttail_export.activation_fusion import activation_of
from acttail_export.config import ActTailConfig
from acttail_export.graph_rewrite import NBITS_OPS, find_projections, packed_columns
from acttail_export.int4_rewrite import dequantize_node
from acttail_export.quantize import quantize

pytestmark = pytest.mark.skipif("not (gbase.genai_available() and gbase.builder_problem() is None)",
                                reason="onnxruntime-genai's model builder does not import")

FAST = dict(calibration_samples=2, sequence_length=32, eval_tokens=0, progress=False, base="genai")
CASES = {  # name: export arguments
    "fused-threshold": dict(kernel="fused", mode="threshold", sparsity=0.5, block_size=32, quantizer="mse"),
    "mask-topk": dict(kernel="mask", mode="topk", sparsity=0.5, block_size=64, quantizer="rtn", allocation="uniform"),
    "dense": dict(kernel="mask", mode="topk", sparsity=0.0, block_size=32, quantizer="rtn", allocation="uniform"),
    "fused-gptq": dict(kernel="fused", mode="topk", sparsity=0.5, block_size=64, quantizer="gptq-mse", lm_head="float"),
    # no block size / quantizer: the defaults, block 32 and gptq-mse-act (Hessians of the calibration windows)
    "mask-default": dict(kernel="mask", mode="topk", sparsity=0.5, allocation="uniform"),
    # the default allocation gives q/k/v and gate/up members their own budgets: the mask kernel unpacks them into one
    # MatMul per member on a Slice of the packed weight, which the 4-bit rewrite replaces by the member's own weight
    "mask-acttail": dict(kernel="mask", mode="topk", sparsity=0.5, block_size=32, quantizer="rtn"),
}


def _int4(kw: dict) -> tuple[int, str]:
    """(block size, quantizer) of a case, the defaults filled in as the export fills them."""
    from acttail_export.options import ExportOptions

    return ExportOptions(weights="int4", block_size=kw.get("block_size"), quantizer=kw.get("quantizer")).int4


def test_default_int4_quantizer_is_gptq_mse_act():
    assert _int4(CASES["mask-default"]) == (32, "gptq-mse-act")


def _expected_weights(model_dir, kw: dict, text) -> dict[str, np.ndarray]:
    """Projection name -> the float32 weight the export must carry: ``quantize(W)``, or for the GPTQ-style quantizers
    ``quantize_gptq(W, H)`` with ``H`` the input Hessians of the float model on the export's calibration windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from acttail_export.data import load_windows
    from acttail_export.int4_rewrite import input_hessians
    from acttail_export.quantize import GPTQ_QUANTIZERS, QuantizedWeight, gptq_options, quantize_gptq

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    spec_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    block, quantizer = _int4(kw)
    if quantizer not in GPTQ_QUANTIZERS:
        return {n: quantize(dict(model.named_modules())[n].weight.detach().numpy().T, block, quantizer).dequantize_f32()
                for n in spec_names}
    windows = load_windows(AutoTokenizer.from_pretrained(model_dir), text, FAST["sequence_length"],
                           samples=FAST["calibration_samples"])
    hessians = input_hessians(model, windows)
    modules = dict(model.named_modules())
    return {n: QuantizedWeight.from_tensors(*quantize_gptq(modules[n].weight.detach().T, hessians[n], block,
                                                           **gptq_options(quantizer)), block, quantizer).dequantize_f32()
            for n in spec_names}


@pytest.fixture(scope="module")
def exports(tiny_llama_dir, tmp_path_factory, wikitext_valid):
    from acttail_export.exporter import export

    done: dict = {}

    def get(name):
        if name not in done:
            out = tmp_path_factory.mktemp("int4-genai") / name
            done[name] = export(str(tiny_llama_dir), out, weights="int4", calibration_data=str(wikitext_valid),
                                **{**FAST, **CASES[name]})
        return done[name]
    return get


@pytest.mark.parametrize("name", list(CASES))
def test_every_projection_is_a_4bit_op_with_the_models_quantized_weight(exports, name, tiny_llama_dir, wikitext_valid):
    folder, kw = exports(name), CASES[name]
    config = ActTailConfig.load(folder)
    assert (config.weights, config.block_size, config.quantizer) == ("int4", *_int4(kw))
    assert not (folder / "model.onnx.data").exists()  # the builder's float weights are not shipped
    graph = onnx.load(str(folder / "model.onnx"))
    # the lm_head: 8-bit blocks of 32 (the CPU default of int4 exports), its codes those of the model's weight
    head = next(n for n in graph.graph.node if "logits" in n.output)
    assert config.lm_head == kw.get("lm_head", "int8")
    if config.lm_head == "int8":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in head.attribute}
        assert (head.op_type, attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == ("MatMulNBits", 8, 32, 4)
        from transformers import AutoModelForCausalLM

        from acttail_export.lm_head import head_of_folder, quantize_head

        weight = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).get_output_embeddings().weight.detach().numpy()
        np.testing.assert_array_equal(head_of_folder(folder).B, quantize_head(weight.T).B)
    else:
        assert head.op_type == "MatMul"
    found = find_projections(graph, config.spec)
    assert len(found) == len(config.projections)
    sparse = kw["kernel"] == "fused" and kw["sparsity"] > 0
    assert {n.op_type for n in found.values()} == ({"SparseMatMulNBits"} if sparse else {"MatMulNBits"})
    assert {n.op_type for n in found.values()} <= set(NBITS_OPS)
    if name == "mask-acttail":  # a group whose members have different k: one MatMulNBits per member, the others packed
        ks: dict[tuple, set] = {}
        for p in config.projections:
            layer, kind = p.name.rsplit(".", 1)
            group = next((g for g, kinds in config.spec.packed.items() if kind in kinds), kind)
            ks.setdefault((layer, group), set()).add(p.keep_k())
        unpacked = sum(len(config.spec.packed[g]) for (_, g), k in ks.items() if len(k) > 1)
        assert unpacked > 0
        assert len({n.name for n in found.values()}) == len(ks) - sum(len(k) > 1 for k in ks.values()) + unpacked
        assert not [n for n in graph.graph.node if n.op_type == "Slice" and "acttail" in n.name]
    else:
        assert len({n.name for n in found.values()}) < len(found)  # q/k/v and gate/up stay packed
    # the fused 4-bit down ops read the packed gate|up output and apply SwiGLU themselves (the mask kernel keeps the
    # builder's Sigmoid / Mul / Mul in front of MatMulNBits)
    downs = [n for name, n in found.items() if name.endswith("down_proj")]
    assert {activation_of(n) for n in downs} == ({"swiglu"} if sparse else {""})
    assert all(n.input[0] == found[name.replace("down_proj", "gate_proj")].output[0]
               for name, n in found.items() if name.endswith("down_proj")) == sparse
    assert ("Sigmoid" in {n.op_type for n in graph.graph.node}) != sparse
    # each fused node's decode-loop hint: its members' kept fractions by budget, weighted by their columns
    by_name, members = config.by_name(), {}
    for pname, node in found.items():
        members.setdefault(node.name, (node, []))[1].append(by_name[pname])
    for node, ps in members.values():
        if node.op_type != "SparseMatMulNBits":
            continue
        kept = [(1 - p.sparsity) * p.out_features for p in ps]
        density = next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "density")
        assert density == pytest.approx(sum(kept) / sum(p.out_features for p in ps), abs=1e-4), node.name
    tensors = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    # no float weight left (packed or a member's) but the tied embeddings (the float lm_head's weight, which the
    # embeddings read) and the rotary caches; the 4-bit ops' scales and offsets are float too
    floats = [n for n, a in tensors.items() if a.dtype == np.float32 and a.ndim == 2 and not n.startswith("/acttail_int")]
    assert sorted(floats) == ["cos_cache", "lm_head.MatMul.weight", "sin_cache"], floats
    # each member's columns of the node dequantize to the quantized original weight (same blocks along K; GPTQ:
    # with the Hessians of the same calibration windows)
    expected = _expected_weights(tiny_llama_dir, kw, wikitext_valid)
    columns = packed_columns(found, config)
    for pname, node in found.items():
        w = dequantize_node(node, tensors)
        if pname in columns:
            w = w[:, columns[pname][0]:columns[pname][1]]
        want = expected[pname]
        np.testing.assert_allclose(w, want, rtol=0, atol=1e-6 * float(np.abs(want).max()))


def test_int4_folder_is_smaller_than_the_float_export(exports, tiny_llama_dir, tmp_path, wikitext_valid):
    from transformers import AutoConfig

    from acttail_export.exporter import export

    float_folder = export(str(tiny_llama_dir), tmp_path / "fp32", calibration_data=str(wikitext_valid),
                          **{**FAST, **CASES["dense"], "block_size": None, "quantizer": None})
    config = ActTailConfig.load(float_folder)
    projection_bytes = sum(4 * p.in_features * p.out_features for p in config.projections)

    def size(folder):
        return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())

    # 4 bits + an fp32 scale and offset per 32 weights = 6 bits per weight: at least 3/4 of the fp32 bytes go; the
    # tiny model's lm_head is tied to its embeddings, so its float weight stays (the embeddings read it) and the 8-bit
    # head comes on top: 8 bits + an fp32 scale per 32 weights
    assert ActTailConfig.load(exports("dense")).lm_head == "int8"
    head = AutoConfig.from_pretrained(tiny_llama_dir)
    assert head.tie_word_embeddings
    head_bytes = head.vocab_size * head.hidden_size * (1 + 4 / 32)
    assert size(float_folder) - size(exports("dense")) >= 0.75 * projection_bytes * 0.99 - head_bytes


@pytest.mark.parametrize("name", ["fused-threshold", "mask-topk", "mask-acttail"])
def test_folder_runs_like_the_sparse_reference_of_the_dequantized_model(exports, name, tiny_llama_dir):
    """Prompt logits of a plain ONNX Runtime session within 1e-4 of PyTorch (dequantized weights, the exported
    masks, the 8-bit lm_head's arithmetic), and greedy tokens of ``og.Model(folder)`` equal to PyTorch's (tiny model: no boundary ties)."""
    from transformers import AutoModelForCausalLM

    from acttail_export.generation import OrtDecoder
    from acttail_export.int4_rewrite import quantize_model
    from acttail_export.lm_head import emulated_head, head_of_folder
    from acttail_export.sparsify import apply_sparsity

    folder, kw = exports(name), CASES[name]
    config = ActTailConfig.load(folder)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    quantize_model(model, *_int4(kw))
    prompt = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode(), apply_sparsity(model, config, kw["mode"]), emulated_head(model, head_of_folder(folder)):
        want = model(prompt).logits[0].numpy()
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                             pad_token_id=model.config.eos_token_id)[0, prompt.shape[1]:].tolist()
    got = OrtDecoder(folder).forward(prompt.numpy()[0])
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
    assert gbase.generate(folder, prompt.numpy(), 8) == ref


def test_default_quantizer_needs_the_calibration_windows(tiny_llama_dir, tmp_path):
    """The default quantizer's Hessians read the export's calibration windows (tokenized once, for the thresholds
    too): a text too short for them fails before the 4-bit stage with the calibration flags' one-line error, and
    nothing is left behind."""
    from acttail_export.errors import ActTailError
    from acttail_export.exporter import export

    short = tmp_path / "short.txt"
    short.write_text("A short calibration text of a few words.\n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ActTailError, match=r"^text has \d+ tokens, too short for 2 samples of 32 tokens: .*"
                                           r"--calibration-samples"):
        export(str(tiny_llama_dir), out, weights="int4", calibration_data=str(short),
               **{**FAST, **CASES["mask-default"]})
    assert not out.exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize(("name", "claim", "graph_head"), [("fused-threshold", "float", "MatMulNBits"),
                                                          ("fused-gptq", "int8", "MatMul")])
def test_lm_head_config_that_disagrees_with_the_graph(exports, name, claim, graph_head, tmp_path):
    """acttail_config.json's lm_head must be the graph's (the runtime's load check, one line)."""
    import json
    import shutil

    from acttail_export.errors import ActTailError
    from acttail_export.runtime import check_export_dir

    folder = tmp_path / "copy"
    shutil.copytree(exports(name), folder)
    check_export_dir(folder)
    raw = json.loads((folder / "acttail_config.json").read_text())
    (folder / "acttail_config.json").write_text(json.dumps({**raw, "lm_head": claim}))
    with pytest.raises(ActTailError, match=rf"^acttail_config.json says lm_head={claim} but the graph's lm_head is a "
                                           rf"{graph_head}: the files come from different exports, re-run the export$"):
        check_export_dir(folder)
