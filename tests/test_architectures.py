"""ArchSpec: each spec's tables are consistent, and its node patterns match the names of real exported graphs."""

from __future__ import annotations

import onnx
import pytest
import torch

from acttail_export.architectures import (
    LLAMA,
    MISTRAL,
    SPECS,
    SUPPORTED_ARCHITECTURES,
    spec_for,
    spec_of_model,
    spec_or_default,
)
from acttail_export.errors import ActTailError


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_groups_partition_the_kinds(spec):
    flat = [kind for group in spec.shared_input_groups for kind in group]
    assert sorted(flat) == sorted(spec.kinds) and len(flat) == len(set(flat))  # every kind in exactly one group
    assert set(spec.parent) == set(spec.kinds)
    for group in spec.shared_input_groups:  # one input tensor: one sub-module
        assert len({spec.parent[kind] for kind in group}) == 1


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_packed_members_are_kinds_of_their_parent(spec):
    assert set(spec.packed) == set(spec.packed_parent) and not set(spec.packed) & set(spec.kinds)
    for packed, members in spec.packed.items():
        assert members and set(members) <= set(spec.kinds)
        assert {spec.parent[m] for m in members} == {spec.packed_parent[packed]}
        # members of one packed MatMul read one input: they lie in one shared-input group
        assert any(set(members) <= set(group) for group in spec.shared_input_groups)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("base", ["optimum", "genai"])
def test_node_names_round_trip(spec, base):
    for layer in (0, 7, 31):
        for kind in (*spec.kinds, *spec.packed):
            match = spec.match_node(spec.onnx_node_name(layer, kind, base))
            assert (match.layer, match.kind) == (layer, kind)
            assert match.members == spec.packed.get(kind, (kind,))


def _graph_names(model_dir, tmp_path):
    from acttail_export.modeling import load_model
    from acttail_export.onnx_export import export_base_onnx

    model, _ = load_model(str(model_dir))
    path = export_base_onnx(model, tmp_path / "base")
    return model, [n.name for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.optimum  # optimum-onnx's graph
@pytest.mark.parametrize("fixture, spec", [("tiny_llama_dir", LLAMA), ("tiny_mistral_dir", MISTRAL)])
def test_patterns_match_a_real_optimum_graph(fixture, spec, request, tmp_path):
    """The nodes the spec matches in optimum-onnx's graph are exactly the model's projection Linears."""
    from acttail_export.graph_rewrite import find_projections

    model, names = _graph_names(request.getfixturevalue(fixture), tmp_path)
    assert spec_of_model(model) is spec
    linears = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name.startswith("model.layers.")}
    matched = {n: spec.match_node(n) for n in names}
    found = {spec.projection_name(m.layer, m.kind) for m in matched.values() if m is not None}
    assert found == linears and len(found) == model.config.num_hidden_layers * len(spec.kinds)
    assert {n for n, m in matched.items() if m is not None} == {
        spec.onnx_node_name(i, k) for i in range(model.config.num_hidden_layers) for k in spec.kinds}
    # other MatMuls (attention scores, lm_head) and every other node are rejected
    others = [n for n, m in matched.items() if m is None]
    assert any("MatMul" in n for n in others) and all(spec.match_node(n) is None for n in others)
    graph = onnx.load(str(tmp_path / "base" / "model.onnx"), load_external_data=False)
    assert set(find_projections(graph, spec)) == linears
    layers = {spec.layer_of(n) for n in names} - {None}
    assert layers == set(range(model.config.num_hidden_layers))


# names as onnxruntime-genai's model builder writes them (fuse_qkv / fuse_mlp_gate_up on and off)
GENAI_NAMES = {
    "/model/layers.0/attn/q_proj/MatMul": (0, "q_proj"),
    "/model/layers.3/attn/o_proj/MatMul": (3, "o_proj"),
    "/model/layers.1/mlp/down_proj/MatMul": (1, "down_proj"),
    "/model/layers.2/attn/qkv_proj/MatMul": (2, "qkv_proj"),
    "/model/layers.2/mlp/gate_up_proj/MatMul": (2, "gate_up_proj"),
}
NOT_PROJECTIONS = [
    "/model/layers.0/attn/GroupQueryAttention", "/model/layers.0/attn/q_proj/Add", "/model/layers.0/self_attn/MatMul",
    "/model/layers.0/mlp/q_proj/MatMul",  # a kind under the wrong parent
    "/model/layers.0/attn/gate_up_proj/MatMul", "/model/layers.0/self_attn/rotary_proj/MatMul", "/lm_head/MatMul",
    "/model/layers.x/mlp/up_proj/MatMul", "model/layers.0/mlp/up_proj/MatMul", "/model/layers.0/mlp/up_proj/MatMul/x",
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_genai_names_and_rejections(spec):
    for name, (layer, kind) in GENAI_NAMES.items():
        match = spec.match_node(name)
        assert (match.layer, match.kind, match.packed) == (layer, kind, kind in spec.packed)
        assert spec.onnx_node_name(layer, kind, "genai") == name
    for name in NOT_PROJECTIONS:
        assert spec.match_node(name) is None, name
    # the builder puts the final norm under /model/layers.{num_layers}/: not a decoder layer
    assert spec.layer_of("/model/layers.2/final_norm_layernorm/SkipLayerNorm") is None
    assert spec.layer_of("/model/layers.1/attn/GroupQueryAttention") == 1


def test_spec_for():
    assert spec_for("LlamaForCausalLM") is LLAMA and spec_for("llama") is LLAMA
    assert spec_for("MistralForCausalLM") is MISTRAL and spec_for("mistral") is MISTRAL
    assert spec_or_default(None) is LLAMA
    for bad in ("GPT2LMHeadModel", "", "Llama"):
        with pytest.raises(ActTailError) as err:
            spec_for(bad)
        message = str(err.value)
        assert "\n" not in message and repr(bad) in message and all(a in message for a in SUPPORTED_ARCHITECTURES)


def test_config_spec_follows_architecture():
    from acttail_export.config import ActTailConfig

    assert ActTailConfig(target_sparsity=0.5, architecture="MistralForCausalLM").spec is MISTRAL
    assert ActTailConfig(target_sparsity=0.5).spec is LLAMA
    with pytest.raises(ActTailError, match="unsupported architecture 'Foo'"):
        _ = ActTailConfig(target_sparsity=0.5, architecture="Foo").spec
