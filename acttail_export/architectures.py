"""Per-architecture specs: what the pipeline needs to know about a decoder family, in one object.

An :class:`ArchSpec` holds the Hugging Face class names, the projection kinds in layer order, the sub-module
that holds each (``self_attn`` / ``mlp``), the groups of projections that read one input tensor, the packed
projections some bases write (``qkv_proj`` -> q, k, v), and how each export base names the projection MatMuls
in its ONNX graph (:class:`NodeNaming`). ``LLAMA`` and ``MISTRAL`` are the two instances; :func:`spec_for`
looks one up by class name (``LlamaForCausalLM``) or spec name (``llama``). Adding an architecture is one
new instance in :data:`SPECS` (CONTRIBUTING.md, "Add an architecture").
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .errors import ActTailError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeNaming:
    """How one export base names a projection MatMul: ``template`` with ``{layer}``, ``{parent}``, ``{kind}``.

    ``parents`` renames a module parent in the graph (the genai builder writes ``attn`` for ``self_attn``);
    ``not_layers`` are sub-folders under ``/model/layers.N/`` that do not belong to decoder layer N.
    """

    template: str = "/model/layers.{layer}/{parent}/{kind}/MatMul"
    parents: Mapping[str, str] = field(default_factory=dict)
    not_layers: tuple[str, ...] = ()

    def name(self, layer: int, parent: str, kind: str) -> str:
        """The node name of projection ``kind`` (under module ``parent``) of ``layer``."""
        return self.template.format(layer=layer, parent=self.parents.get(parent, parent), kind=kind)

    def pattern(self, parents: tuple[str, ...]) -> re.Pattern:
        """Regex with groups ``layer``, ``parent`` (the graph's name) and ``kind`` for names of this base."""
        names = sorted({self.parents.get(p, p) for p in parents})
        text = re.escape(self.template)
        for key, group in (("layer", r"(?P<layer>\d+)"), ("parent", f"(?P<parent>{'|'.join(map(re.escape, names))})"),
                           ("kind", r"(?P<kind>\w+)")):
            text = text.replace(re.escape("{" + key + "}"), group)
        return re.compile(f"^{text}$")


@dataclass(frozen=True)
class ProjectionNode:
    """A projection MatMul matched by :meth:`ArchSpec.match_node`: its layer and kind, and the members it packs."""

    layer: int
    kind: str
    members: tuple[str, ...]

    @property
    def packed(self) -> bool:
        return self.members != (self.kind,)


@dataclass(frozen=True, eq=False)
class ArchSpec:
    """Everything architecture-specific the export needs (see the module docstring)."""

    name: str
    hf_classes: tuple[str, ...]
    model_types: tuple[str, ...]
    kinds: tuple[str, ...]
    parent: Mapping[str, str]
    shared_input_groups: tuple[tuple[str, ...], ...]
    #: packed projection -> its members, in the column order of the packed weight
    packed: Mapping[str, tuple[str, ...]]
    packed_parent: Mapping[str, str]
    #: export base name -> how that base names the projection MatMuls
    node_naming: Mapping[str, NodeNaming]
    _patterns: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for attr in ("parent", "packed", "packed_parent", "node_naming"):
            object.__setattr__(self, attr, MappingProxyType(dict(getattr(self, attr))))
        parents = tuple(dict.fromkeys([*self.parent.values(), *self.packed_parent.values()]))
        self._patterns.update({base: naming.pattern(parents) for base, naming in self.node_naming.items()})

    def projection_name(self, layer: int, kind: str) -> str:
        """Module path of a projection, e.g. ``model.layers.3.mlp.down_proj``."""
        return f"model.layers.{layer}.{self.parent[kind]}.{kind}"

    def onnx_node_name(self, layer: int, kind: str, base: str = "optimum") -> str:
        """ONNX node name of a projection (or packed projection) MatMul as ``base`` writes it."""
        parent = self.parent[kind] if kind in self.parent else self.packed_parent[kind]
        return self.node_naming[base].name(layer, parent, kind)

    def match_node(self, node_name: str) -> ProjectionNode | None:
        """The projection (or packed projection) a node name of any base stands for; None for other nodes."""
        for base, pattern in self._patterns.items():
            m = pattern.match(node_name)
            if m is None:
                continue
            graph_parent, kind = m.group("parent"), m.group("kind")
            renamed = {v: k for k, v in self.node_naming[base].parents.items()}
            parent = renamed.get(graph_parent, graph_parent)
            if self.parent.get(kind) == parent:
                return ProjectionNode(int(m.group("layer")), kind, (kind,))
            if self.packed_parent.get(kind) == parent:
                return ProjectionNode(int(m.group("layer")), kind, self.packed[kind])
        return None

    def layer_of(self, node_name: str) -> int | None:
        """Decoder layer a node belongs to (``/model/layers.N/...``), None for nodes outside the layers."""
        m = re.match(r"^/model/layers\.(\d+)/(.*)$", node_name)
        if m is None or any(m.group(2).startswith(f"{folder}/") for naming in self.node_naming.values()
                            for folder in naming.not_layers):
            return None
        return int(m.group(1))

    def group_index(self) -> dict[str, int]:
        """Projection kind -> index of its shared-input group."""
        return {kind: g for g, kinds in enumerate(self.shared_input_groups) for kind in kinds}


_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
_PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_PACKED_PARENT = {"qkv_proj": "self_attn", "gate_up_proj": "mlp"}
#: optimum-onnx traces module paths (``/model/layers.0/self_attn/q_proj/MatMul``); onnxruntime-genai's model
#: builder writes ``attn`` for the attention block and puts the final norm under ``/model/layers.{num_layers}/``.
_NAMING = {"optimum": NodeNaming(),
           "genai": NodeNaming(parents={"self_attn": "attn"}, not_layers=("final_norm_layernorm",))}

LLAMA = ArchSpec("llama", ("LlamaForCausalLM",), ("llama",), _KINDS, _PARENT, _GROUPS, _PACKED, _PACKED_PARENT, _NAMING)
MISTRAL = ArchSpec("mistral", ("MistralForCausalLM",), ("mistral",), _KINDS, _PARENT, _GROUPS, _PACKED, _PACKED_PARENT,
                   _NAMING)
SPECS: tuple[ArchSpec, ...] = (LLAMA, MISTRAL)
#: the spec of configs written before ``architecture`` was recorded (every supported spec names nodes alike)
DEFAULT_SPEC = LLAMA
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(c for s in SPECS for c in s.hf_classes)
#: HF ``model_type`` / GGUF ``general.architecture`` -> transformers class name
MODEL_TYPE_TO_ARCHITECTURE: dict[str, str] = {t: s.hf_classes[0] for s in SPECS for t in s.model_types}
#: every projection kind of any spec (what a config's ``kind`` may be)
ALL_KINDS: tuple[str, ...] = tuple(dict.fromkeys(k for s in SPECS for k in s.kinds))


def spec_for(architecture: str) -> ArchSpec:
    """The spec of a transformers class name (``LlamaForCausalLM``) or spec name (``llama``).

    Raises a one-line :class:`ActTailError` naming the supported architectures for anything else.
    """
    for spec in SPECS:
        if architecture in spec.hf_classes or architecture == spec.name:
            return spec
    raise ActTailError(f"unsupported architecture {architecture!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def check_architecture(architectures: list[str] | None, model_type: str | None, where: str) -> str:
    """The first supported class name of a checkpoint's ``architectures`` (or of its ``model_type`` when that list
    is empty); a one-line ActTailError naming ``where`` and the supported ones otherwise."""
    names = list(architectures or [])
    if not names and isinstance(model_type, str) and model_type in MODEL_TYPE_TO_ARCHITECTURE:
        names = [MODEL_TYPE_TO_ARCHITECTURE[model_type]]
    for name in names:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = ", ".join(names) or f"model_type={model_type!r}"
    raise ActTailError(f"{where}: unsupported architecture {found}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")


def spec_or_default(architecture: str | None) -> ArchSpec:
    """:func:`spec_for`, or :data:`DEFAULT_SPEC` when ``architecture`` is None (configs that do not record it)."""
    return DEFAULT_SPEC if architecture is None else spec_for(architecture)


def spec_of_model(model) -> ArchSpec:
    """The spec of a loaded transformers model (by its class name)."""
    return spec_for(type(model).__name__)
