"""``ExportOptions``: every setting of :func:`acttail_export.exporter.export`, typed and validated once.

The CLI (``acttail-export export``, ``optimum-cli export acttail``) and the Python API build the same object, so a
bad value or combination fails with the same one-line :class:`ActTailError` naming the flag and the fix, before
any model is loaded. Checks that need the machine or the files (a CUDA GPU, the op library, the model, the output
folder, the Hub token, onnxruntime-genai's builder) stay in :func:`acttail_export.exporter.export`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .bases import get_base
from .config import ALLOCATIONS, ALPHA_ALLOCATIONS, DEFAULT_S_MAX, check_sparsity, default_mode, resolve_allocation
from .errors import ActTailError

logger = logging.getLogger(__name__)

Allocation = Literal["acttail", "htsr", "uniform", "teal-greedy", "acttail-greedy", "waterfill-greedy"]
Mode = Literal["topk", "threshold"]
Kernel = Literal["mask", "fused"]
DType = Literal["fp32", "fp16"]
Device = Literal["cpu", "cuda"]
#: a key of :data:`acttail_export.bases.BASES`: ``genai`` (the default), onnxruntime-genai's model builder graph
#: (:mod:`acttail_export.bases.genai`, the fast decode base); ``optimum``, optimum-onnx's trace (``ORTModelForCausalLM``,
#: the ``optimum`` extra)
Base = str
Weights = Literal["fp32", "fp16", "int4"]
LmHead = Literal["float", "int8"]
Quantizer = Literal["rtn", "mse", "gptq", "gptq-mse", "gptq-act", "gptq-mse-act"]

MODES, KERNELS, DTYPES, DEVICES = (get_args(t) for t in (Mode, Kernel, DType, Device))
#: export-time perplexity tokens when ``eval_tokens`` is not given (0 skips it)
EVAL_TOKENS = 2048


def _choice(value: Any, choices: tuple, flag: str) -> None:
    if value not in choices:
        raise ActTailError(f"{flag} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _integer(value: Any, flag: str, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ActTailError(f"{flag} must be {what}, got {value!r}")


def check_allocation_shape(allocation: str, sparsity: float, mode: str, epsilon: float | None, mapping: str | None,
                           alternatives: str = "htsr or acttail-greedy") -> None:
    """--epsilon / --mapping shape HT-SR budgets: an ActTailError when ``allocation`` reads no alphas at ``sparsity`` in
    ``mode`` (``alternatives``: the allocations the command takes that read them, named in the fix)."""
    if epsilon is None and mapping is None:
        return
    method = resolve_allocation(allocation, sparsity, mode)
    if method in ALPHA_ALLOCATIONS or (allocation == "acttail" and sparsity == 0):
        return
    if allocation == "acttail":
        raise ActTailError(f"--epsilon/--mapping shape HT-SR budgets; --allocation acttail at {sparsity:g} in {mode} mode is {method} "
                           f"(docs/allocation.md), which reads no alphas: drop them, or use --allocation {alternatives}")
    raise ActTailError("--epsilon/--mapping only apply to the allocations from HT-SR alphas: drop them or use "
                       f"--allocation {alternatives}")


def default_kernel(weights: str | None) -> str:
    """``--kernel`` when not given: ``fused`` for ``--weights int4``, whose ``--kernel mask`` graph multiplies by ONNX
    Runtime's ``MatMulNBits`` with float zero points, which its CPU kernel dequantizes on every call (SmolLM2 at 50 %,
    2 threads: 91 ms per decode step against 10.6 ms fused, docs/quantization.md); ``mask`` (standard ONNX ops)
    otherwise."""
    return "fused" if weights == "int4" else "mask"


@dataclass(frozen=True)
class ExportOptions:
    """What to export and how; ``ExportOptions(**kwargs)`` raises a one-line ActTailError on a bad value.

    Field names are :func:`~acttail_export.exporter.export`'s keyword arguments (the CLI flag is the name with
    dashes, e.g. ``calibration_samples`` is ``--calibration-samples``; ``validate=False`` is ``--no-validate``).
    """

    sparsity: float = 0.5
    allocation: Allocation = "acttail"
    mode: Mode | None = None  # None: by the target (threshold up to 65 %, topk above; see config.default_mode)
    kernel: Kernel | None = None  # None: fused for --weights int4, else mask (see :func:`default_kernel`)
    epsilon: float | None = None
    mapping: str | None = None
    calibration_data: Path | None = None
    calibration_samples: int = 64
    sequence_length: int | None = None
    dtype: DType = "fp32"
    device: Device = "cpu"
    overwrite: bool = False
    push_to_hub: str | None = None
    private: bool = False
    token: str | None = field(default=None, repr=False)  # never printed
    validate: bool = True
    progress: bool = True
    eval_tokens: int = EVAL_TOKENS
    base: Base = "genai"
    weights: Weights | None = None  # None: the --dtype
    block_size: int | None = None  # int4 only (default 32)
    quantizer: Quantizer | None = None  # int4 only (default gptq-mse-act)
    lm_head: LmHead | None = None  # None: int8 for --weights int4 on the CPU, else float (see :attr:`head`)
    # the mode was filled in from the target (none given): a new target in :meth:`validated` moves it too
    _mode_defaulted: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # frozen: the numbers, the path and the kernel's and mode's defaults are normalized here, once
        if self.kernel is None:
            object.__setattr__(self, "kernel", default_kernel(self.weights))
        object.__setattr__(self, "sparsity", check_sparsity(self.sparsity, "--sparsity"))
        if self.mode is None:
            object.__setattr__(self, "mode", default_mode(self.sparsity))
            object.__setattr__(self, "_mode_defaulted", True)
        if self.epsilon is not None:
            object.__setattr__(self, "epsilon", check_sparsity(self.epsilon, "--epsilon"))
        if self.calibration_data is not None:
            object.__setattr__(self, "calibration_data", Path(self.calibration_data))
        for value, choices, flag in ((self.allocation, ALLOCATIONS, "--allocation"), (self.mode, MODES, "--mode"),
                                     (self.kernel, KERNELS, "--kernel"), (self.dtype, DTYPES, "--dtype"),
                                     (self.device, DEVICES, "--device")):
            _choice(value, choices, flag)
        base = get_base(self.base)
        _integer(self.calibration_samples, "--calibration-samples", 1, "a positive integer")
        if self.sequence_length is not None:
            _integer(self.sequence_length, "--sequence-length", 2, "an integer >= 2")
        _integer(self.eval_tokens, "eval_tokens", 0, "0 (no export-time perplexity) or an integer >= 2")
        if self.eval_tokens == 1:  # a window of one token predicts nothing
            raise ActTailError("eval_tokens must be 0 (no export-time perplexity) or an integer >= 2, got 1")
        self._check_allocation()
        if (self.private or self.token) and not self.push_to_hub:
            raise ActTailError("--private/--token only apply with --push-to-hub REPO_ID: add it or drop them")
        base.check_options(self)  # e.g. --base genai --dtype fp16 needs --device cuda
        self._check_weights()

    def _check_allocation(self) -> None:
        """A known mapping, epsilon/mapping only with acttail, and a target the acttail allocation can meet."""
        if self.mapping is not None:
            from .allocation import MAPPINGS

            _choice(self.mapping, MAPPINGS, "--mapping")
        check_allocation_shape(self.allocation, self.sparsity, self.mode, self.epsilon, self.mapping)
        if self.allocation != "uniform" and self.sparsity > DEFAULT_S_MAX:
            raise ActTailError(f"sparsity {self.sparsity} is above {DEFAULT_S_MAX}, the highest per-projection budget "
                               f"of the {self.allocation} allocation: use --sparsity {DEFAULT_S_MAX} or lower, or "
                               "--allocation uniform")

    def _check_weights(self) -> None:
        """--weights/--block-size/--quantizer against --dtype and --base (see :attr:`int4`)."""
        from .quantize import BLOCK_SIZES, WEIGHT_QUANTIZERS

        weights = self.dtype if self.weights is None else self.weights
        _choice(weights, get_args(Weights), "--weights")
        if self.lm_head is not None:
            _choice(self.lm_head, get_args(LmHead), "--lm-head")
        if weights != "int4":
            if weights != self.dtype:
                raise ActTailError(f"--weights {weights} needs --dtype {weights} (float weights have the graph's "
                                   f"dtype): pass --dtype {weights}, or --weights int4")
            if self.block_size is not None or self.quantizer is not None:
                raise ActTailError("--block-size/--quantizer only apply to --weights int4: add --weights int4 or "
                                   "drop them")
            if self.lm_head == "int8":
                raise ActTailError("--lm-head int8 only applies to --weights int4 (float exports keep a float lm_head): "
                                   "add --weights int4 or drop --lm-head")
            return
        if not get_base(self.base).supports_int4:
            from .bases import BASES

            able = " or ".join(f"--base {name}" for name, base in BASES.items() if base.supports_int4)
            raise ActTailError(f"--weights int4 needs {able} (the {self.base} base cannot carry the 4-bit ops): "
                               "pass one of them or drop --weights int4")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES):
            choices = ", ".join(map(str, BLOCK_SIZES))
            raise ActTailError(f"--block-size must be one of {choices}; got {self.block_size!r}")
        if self.quantizer is not None:
            _choice(self.quantizer, WEIGHT_QUANTIZERS, "--quantizer")

    @property
    def head(self) -> str:
        """The lm_head's weights: ``--lm-head``, else ``int8`` for ``--weights int4`` on the CPU (where it is a quarter of
        a decode step, docs/quantization.md) and ``float`` otherwise (the 8-bit node is not measured on a GPU)."""
        if self.lm_head is not None:
            return self.lm_head
        return "int8" if self.weights == "int4" and self.device == "cpu" else "float"

    @property
    def int4(self) -> tuple[int, str] | None:
        """(block size, quantizer) of the 4-bit projections, defaults filled in; None for float weights."""
        if self.weights != "int4":
            return None
        from .int4_rewrite import DEFAULT_BLOCK_SIZE, DEFAULT_QUANTIZER

        return (int(DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size),
                DEFAULT_QUANTIZER if self.quantizer is None else self.quantizer)

    @property
    def mode_from_target(self) -> bool:
        """True when no mode was given and the target chose it (:func:`~acttail_export.config.default_mode`)."""
        return self._mode_defaulted

    def to_kwargs(self) -> dict[str, Any]:
        """:func:`~acttail_export.exporter.export`'s keyword arguments (``ExportOptions(**o.to_kwargs()) == o``; a mode the
        target chose is None, so that it stays the target's)."""
        kwargs = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        if self.mode_from_target:
            kwargs["mode"] = None
        return kwargs

    @classmethod
    def validated(cls, options: ExportOptions | None = None, **kwargs: Any) -> ExportOptions:
        """``options`` with ``kwargs`` replacing its fields (the defaults when None), validated."""
        if options is None:
            return cls(**kwargs)
        if not isinstance(options, cls):
            raise TypeError(f"options must be an ExportOptions, got {type(options).__name__}: pass the settings as "
                            "keyword arguments (sparsity=..., mode=...)")
        if "weights" in kwargs and "kernel" not in kwargs and options.kernel == default_kernel(options.weights):
            kwargs = {**kwargs, "kernel": None}  # a kernel that was the weights' default follows the new weights
        if kwargs and "mode" not in kwargs and options.mode_from_target:
            kwargs = {**kwargs, "mode": None}  # a mode filled in from the target stays so (and follows a new target)
        return dataclasses.replace(options, **kwargs) if kwargs else options
