"""Typed ActTail configuration, serialized as ``acttail_config.json`` next to an export.

The config is the single contract between the pipeline steps: spectral analysis fills ``alpha``,
allocation fills ``sparsity``, calibration fills ``threshold`` / ``k``, the graph rewrite reads them.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any

from .architectures import (  # noqa: F401
    ALL_KINDS,
    DEFAULT_SPEC,
    SUPPORTED_ARCHITECTURES,
    ArchSpec,
    spec_or_default,
)
from .errors import ActTailError

CONFIG_NAME = "acttail_config.json"
CONFIG_VERSION = 1

#: Compatibility aliases of the default architecture's tables (:mod:`acttail_export.architectures` holds them;
#: code that knows its model or config asks :func:`~acttail_export.architectures.spec_for` instead).
PROJECTION_KINDS: tuple[str, ...] = DEFAULT_SPEC.kinds
PROJECTION_PARENT = DEFAULT_SPEC.parent
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = DEFAULT_SPEC.shared_input_groups

#: ``--allocation`` values: ``acttail`` is the project's default, a method chosen per target level
#: (:data:`DEFAULT_POLICY`); each of the others is one method: ``htsr`` (budgets from the HT-SR alphas of the
#: weights, the ActTail paper's allocation), ``uniform``, ``teal-greedy`` (TEAL's block-wise greedy search) and
#: ``acttail-greedy`` (HT-SR block targets, the greedy search inside each block), ``waterfill-greedy`` (block levels
#: water-filled on the search's own block-error curves, the search's budgets inside each block).
ALLOCATIONS = ("acttail", "htsr", "uniform", "teal-greedy", "acttail-greedy", "waterfill-greedy")
#: The methods ``acttail`` resolves to (every allocation but ``acttail`` is its own method).
ALLOCATION_METHODS = ("htsr", "uniform", "teal-greedy", "acttail-greedy", "waterfill-greedy")
#: Allocations that run the block-wise greedy search of :mod:`acttail_export.greedy` (they need calibration text).
GREEDY_ALLOCATIONS = ("teal-greedy", "acttail-greedy", "waterfill-greedy")
#: Methods whose budgets start from the HT-SR alphas of the weights (:mod:`acttail_export.spectral`).
ALPHA_ALLOCATIONS = ("htsr", "acttail-greedy")
MODES = ("topk", "threshold")
#: ``--allocation acttail``, per ``--mode``: (highest target, method) in increasing order — the method with the lowest
#: perplexity at each level on WikiText-2 validation (SmolLM2-135M; docs/allocation.md section 6c). Top-k (40-90 %,
#: ``study_valid_*_defaults.json``): TEAL's greedy search up to 65 %, HT-SR above 85 %; from 65 to 85 % the
#: water-filled block levels (section 6d, ``study_valid_waterfill*.json``: 147.4 vs 167.4 for the combination at 70 %,
#: 695.3 vs 1200.4 at 80 %).
#: Threshold (40-90 %, ``threshold_valid.json``, ``threshold_valid_40_60.json``): HT-SR up to 45 % (at 40 % 21.22 vs
#: 21.55 for the greedy search, at a higher effective sparsity), TEAL's greedy search up to 65 %, the combination above
#: (at 90 % it beats HT-SR, 13645 vs 239024). A dense target (0) needs no allocation.
DEFAULT_POLICY: dict[str, tuple[tuple[float, str], ...]] = {
    "topk": ((0.65, "teal-greedy"), (0.85, "waterfill-greedy"), (1.0, "htsr")),
    "threshold": ((0.45, "htsr"), (0.65, "teal-greedy"), (1.0, "acttail-greedy")),
}
#: ``--mode`` when not given, by target sparsity: (highest target, mode) in increasing order — the mode whose default
#: allocation has the lower perplexity at the level on WikiText-2 validation (SmolLM2-135M, first 8192 tokens, windows of
#: 1024; docs/allocation.md section 6q): threshold 21.22 / 26.50 / 45.74 against top-k 22.15 / 27.71 / 48.14 at
#: 40 / 50 / 60 % (at an effective sparsity of 0.405 / 0.499 / 0.615), top-k 147.9 / 642.6 / 8856 against threshold
#: 218.2 / 2159 / 13645 at 70 / 80 / 90 %; the bound halfway between 60 and 70 %. A dense target keeps top-k (k = d: no
#: thresholds to calibrate).
DEFAULT_MODE_POLICY: tuple[tuple[float, str], ...] = ((0.0, "topk"), (0.65, "threshold"), (1.0, "topk"))
KERNELS = ("mask", "fused")
#: projection weights of the graph: the float dtype of the export, or 4-bit blocks (:mod:`acttail_export.quantize`)
WEIGHTS = ("fp32", "fp16", "int4")
#: The highest per-projection budget the acttail allocation gives (a target above it cannot be met).
DEFAULT_S_MAX = 0.99


def default_mode(target: float) -> str:
    """``--mode`` when not given: :data:`DEFAULT_MODE_POLICY` at ``target`` sparsity."""
    for bound, mode in DEFAULT_MODE_POLICY:
        if target <= bound:
            return mode
    return DEFAULT_MODE_POLICY[-1][1]


def mode_policy_text() -> str:
    """:data:`DEFAULT_MODE_POLICY` in words, e.g. ``topk at 0, threshold up to 0.65, topk above``."""
    parts = []
    for i, (bound, mode) in enumerate(DEFAULT_MODE_POLICY):
        parts.append(f"{mode} above" if i == len(DEFAULT_MODE_POLICY) - 1 else f"{mode} at 0" if bound == 0 else f"{mode} up to {bound:g}")
    return ", ".join(parts)


def resolve_allocation(allocation: str, target: float, mode: str) -> str:
    """The method ``allocation`` uses at ``target`` sparsity in ``mode`` (``acttail``: ``DEFAULT_POLICY[mode]``; a dense
    target: ``uniform``). ``mode`` is required: the default's method depends on it."""
    if allocation != "acttail":
        return allocation
    if mode not in DEFAULT_POLICY:
        raise ActTailError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if target <= 0:
        return "uniform"  # every budget is 0 whatever the method: no alphas, no search
    return next(method for bound, method in DEFAULT_POLICY[mode] if target <= bound)


def projection_name(layer: int, kind: str) -> str:
    """Module path of a projection of the default architecture, e.g. ``model.layers.3.mlp.down_proj``
    (:meth:`ArchSpec.projection_name <acttail_export.architectures.ArchSpec.projection_name>`)."""
    return DEFAULT_SPEC.projection_name(layer, kind)


def _check_unit_interval(value: float, what: str) -> float:
    """Validate a number in [0, 1) and return it as float."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ActTailError(f"{what} must be a number in [0, 1), got {value!r}") from None
    if not math.isfinite(value) or not 0.0 <= value < 1.0:
        raise ActTailError(f"{what} must be in [0, 1), got {value}")
    return value


def check_sparsity(value: float, what: str = "sparsity") -> float:
    """Validate a sparsity in [0, 1) and return it as float."""
    return _check_unit_interval(value, what)


def check_epsilon(value: float, what: str = "epsilon") -> float:
    """Validate the allocation spread epsilon in [0, 1) (``what``: its name in the error, e.g. the flag)."""
    return _check_unit_interval(value, what)


def _check_type(value, types: tuple[type, ...], what: str, optional: bool = False, minimum: int | None = None) -> None:
    """One-line ActTailError unless ``value`` is one of ``types`` (never a bool), finite, and >= ``minimum``
    (a hand-edited ``acttail_config.json`` with a string where a number belongs, say)."""
    if value is None and optional:
        return
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and isinstance(value, float):
        ok = math.isfinite(value)
    if ok and minimum is not None:
        ok = value >= minimum
    if not ok:
        shown = [t for t in types if not (t is int and float in types)]  # (int, float): "number"
        names = " or ".join("integer" if t is int else "number" if t is float else "string" if t is str else "object" if t is dict
                            else t.__name__ for t in shown)
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ActTailError(f"{what} must be a finite {names}{bound}{' or null' if optional else ''}, got {value!r}: "
                           f"{CONFIG_NAME} was edited or is damaged; re-run the export")


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise ActTailError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


@dataclass
class ProjectionConfig:
    """Budget and calibration result of one projection."""

    name: str
    layer: int
    kind: str
    in_features: int
    out_features: int
    sparsity: float
    alpha: float | None = None
    threshold: float | None = None
    k: int | None = None
    effective_sparsity: float | None = None
    #: set when the weight spectrum was degenerate: why, and where ``alpha`` came from instead
    alpha_fallback: str | None = None

    def __post_init__(self) -> None:
        _check_type(self.name, (str,), "projection name")
        for what in ("layer", "in_features", "out_features"):
            _check_type(getattr(self, what), (int,), f"{what} of {self.name}", minimum=0 if what == "layer" else 1)
        for what in ("alpha", "threshold", "effective_sparsity"):
            _check_type(getattr(self, what), (int, float), f"{what} of {self.name}", optional=True)
        _check_type(self.k, (int,), f"k of {self.name}", optional=True)
        _check_type(self.alpha_fallback, (str,), f"alpha_fallback of {self.name}", optional=True)
        _check_choice(self.kind, ALL_KINDS, "projection kind")
        self.sparsity = check_sparsity(self.sparsity, f"sparsity of {self.name}")
        if self.k is not None and not 0 <= self.k <= self.in_features:
            raise ActTailError(f"k of {self.name} must be in [0, {self.in_features}], got {self.k}")
        if self.threshold is not None and not self.threshold >= 0:
            raise ActTailError(f"threshold of {self.name} must be >= 0, got {self.threshold}")

    @property
    def parameters(self) -> int:
        return self.in_features * self.out_features

    def keep_k(self) -> int:
        """Channels kept per token in top-k mode: ceil((1 - s) * d)."""
        return self.k if self.k is not None else topk_keep(self.sparsity, self.in_features)


def topk_keep(sparsity: float, in_features: int) -> int:
    """Number of channels kept per token in top-k mode, ``ceil((1 - s) * d)``."""
    return min(in_features, max(0, math.ceil((1.0 - sparsity) * in_features - 1e-9)))


@dataclass
class CalibrationInfo:
    data: str | None = None
    samples: int = 0
    sequence_length: int = 0
    tokens: int = 0


@dataclass
class ActTailConfig:
    """Method configuration; validated on construction and round-trips through JSON."""

    target_sparsity: float
    allocation: str = "acttail"
    mode: str = "topk"
    kernel: str = "mask"
    #: ActTail spread and alpha-to-budget mapping; None for ``allocation="uniform"`` (neither applies).
    epsilon: float | None = 0.0
    mapping: str | None = "default"
    s_max: float = DEFAULT_S_MAX
    projections: list[ProjectionConfig] = field(default_factory=list)
    calibration: CalibrationInfo = field(default_factory=CalibrationInfo)
    effective_sparsity: float | None = None
    model: str | None = None
    architecture: str | None = None
    perplexity: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)
    method: str = "acttail"
    config_version: int = CONFIG_VERSION
    #: None in configs written before 4-bit weights existed (float weights); int4 also sets block_size, quantizer
    weights: str | None = None
    block_size: int | None = None
    quantizer: str | None = None
    #: the lm_head's weights: "int8" (an 8-bit MatMulNBits, :mod:`acttail_export.lm_head`; int4 exports only) or "float"
    #: (None in configs written before ``--lm-head`` existed: float)
    lm_head: str | None = None
    #: the method behind ``allocation`` at this target and mode (:func:`resolve_allocation`); None in configs written before ``acttail``
    #: became a per-level choice, where ``acttail`` meant ``htsr``
    allocation_method: str | None = None

    def __post_init__(self) -> None:
        self.target_sparsity = check_sparsity(self.target_sparsity, "target sparsity")
        for what in ("model", "architecture"):
            _check_type(getattr(self, what), (str,), what, optional=True)
        _check_type(self.effective_sparsity, (int, float), "effective_sparsity", optional=True)
        _check_type(self.s_max, (int, float), "s_max")
        _check_type(self.config_version, (int,), "config_version")
        _check_type(self.perplexity, (dict,), "perplexity")
        _check_type(self.versions, (dict,), "versions")
        if not isinstance(self.projections, list):
            raise ActTailError(f"projections must be a list, got {type(self.projections).__name__}: {CONFIG_NAME} was edited "
                               "or is damaged; re-run the export")
        _check_choice(self.allocation, ALLOCATIONS, "allocation")
        if self.allocation_method is not None:
            _check_choice(self.allocation_method, ALLOCATION_METHODS, "allocation_method")
        _check_choice(self.mode, MODES, "mode")
        _check_choice(self.kernel, KERNELS, "kernel")
        if self.epsilon is not None:
            check_epsilon(self.epsilon)
        if self.mapping is not None and not isinstance(self.mapping, str):
            raise ActTailError(f"mapping must be a string or null, got {self.mapping!r}")
        self._check_weights()
        if not 0.0 < self.s_max < 1.0:
            raise ActTailError(f"s_max must be in (0, 1), got {self.s_max}")
        self.projections = [p if isinstance(p, ProjectionConfig) else ProjectionConfig(**p) for p in self.projections]
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationInfo(**self.calibration)
        _check_type(self.calibration.data, (str,), "calibration.data", optional=True)
        for what in ("samples", "sequence_length", "tokens"):
            _check_type(getattr(self.calibration, what), (int,), f"calibration.{what}", minimum=0)

    def _check_weights(self) -> None:
        if self.weights is not None:
            _check_choice(self.weights, WEIGHTS, "weights")
        if self.lm_head is not None:
            from .lm_head import LM_HEADS

            _check_choice(self.lm_head, LM_HEADS, "lm_head")
            if self.lm_head == "int8" and self.weights != "int4":
                raise ActTailError(f"lm_head=int8 only applies to weights=int4, got weights={self.weights!r}")
        if self.weights != "int4":
            if self.block_size is not None or self.quantizer is not None:
                raise ActTailError(f"block_size / quantizer only apply to weights=int4, got weights={self.weights!r}")
            return
        from .quantize import BLOCK_SIZES, WEIGHT_QUANTIZERS

        if self.block_size not in BLOCK_SIZES or isinstance(self.block_size, bool):
            raise ActTailError(f"block_size must be one of {', '.join(map(str, BLOCK_SIZES))} for int4 weights; got {self.block_size!r}")
        _check_choice(self.quantizer, WEIGHT_QUANTIZERS, "quantizer")

    # --- queries -----------------------------------------------------------------------------
    @property
    def spec(self) -> ArchSpec:
        """The :class:`~acttail_export.architectures.ArchSpec` of ``architecture`` (the default one when unset)."""
        return spec_or_default(self.architecture)

    def by_name(self) -> dict[str, ProjectionConfig]:
        return {p.name: p for p in self.projections}

    def weighted_sparsity(self) -> float:
        """Parameter-weighted mean of the per-projection budgets."""
        total = sum(p.parameters for p in self.projections)
        return sum(p.sparsity * p.parameters for p in self.projections) / total if total else 0.0

    # --- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ActTailConfig":
        if not isinstance(data, dict):
            raise ActTailError(f"invalid {CONFIG_NAME}: expected a JSON object, got a JSON {type(data).__name__}; re-run the export")
        if data.get("method", "acttail") != "acttail":
            raise ActTailError(f"not an ActTail config (method={data.get('method')!r})")
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ActTailError(f"unknown keys in {CONFIG_NAME}: {', '.join(sorted(unknown))}")
        required = [name for name, f in cls.__dataclass_fields__.items()
                    if f.default is MISSING and f.default_factory is MISSING and name not in data]
        if required:
            raise ActTailError(f"invalid {CONFIG_NAME}: missing {', '.join(required)}; re-run the export")
        try:
            return cls(**data)
        except (TypeError, ValueError, AttributeError) as exc:  # wrong keys or shapes inside a hand-edited file
            raise ActTailError(f"invalid {CONFIG_NAME}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                               "re-run the export") from None

    def save(self, directory: str | Path) -> Path:
        """Write ``directory/acttail_config.json``.

        A relative local path in ``model`` or ``calibration.data`` is made absolute first (in ``self``
        too): the file is read from other working directories (``evaluate --model EXPORT``), where a
        relative path would name nothing, or a Hub repository.
        """
        self.model = _absolute_if_local(self.model)
        self.calibration.data = _absolute_if_local(self.calibration.data)
        path = Path(directory) / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory_or_file: str | Path) -> "ActTailConfig":
        path = Path(directory_or_file)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            raise ActTailError(f"{path} not found: is this an acttail-export output folder?")
        return cls.from_dict(read_json_object(path, "it is not a valid ActTail config, re-run the export"))


def read_json_object(path: Path, fix: str) -> dict:
    """``path`` parsed as a JSON object; a one-line ActTailError ending in ``fix`` when it is unreadable, not UTF-8,
    not valid JSON or not an object."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ActTailError(f"cannot read {path} ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ActTailError(f"{path} is not UTF-8 text (byte {exc.start}): {fix}") from None
    except json.JSONDecodeError as exc:
        raise ActTailError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ActTailError(f"{path} holds a JSON {type(data).__name__}, not an object: {fix}")
    return data


def _absolute_if_local(ref: str | None) -> str | None:
    """``ref`` as an absolute path when it is a relative path that exists here; otherwise unchanged (Hub ids, absolute paths)."""
    if not ref or not isinstance(ref, str):
        return ref
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path) if ref.startswith("~") else ref
    return os.path.abspath(path) if path.exists() else ref
