"""PyTorch sparse reference: forward pre-hooks that zero small-magnitude projection inputs.

Two masking rules, per projection ``i`` with budget ``s_i`` and input width ``d``:

* ``topk`` (ActTail paper): per token keep the ``k_i = ceil((1 - s_i) d)`` entries of largest ``|x|``
  (ties: any ``k_i`` of them), zero the rest.
* ``threshold`` (TEAL): keep entries with ``|x| > t_i`` (``t_i`` from :mod:`acttail_export.calibration`),
  zero the rest.

Optional ``ramp`` (δ > 0): kept entries are scaled by ``min(1, (|x| - t) / (δ t))`` (``t`` the threshold, or
per token the largest dropped |x| in top-k mode), a mask continuous in ``x`` with the same zero set
(:func:`acttail_export.reference.torch_mask`). ``ramp=0`` (default) is the hard mask. ``soft=True`` applies soft
thresholding instead (kept ``x`` shrunk to ``sign(x) (|x| - t)``; measurement only, no kernel implements it).

``scores="wina"`` (top-k only) ranks entries by the weight-informed score ``|x_i| * ||W[:, i]||`` (the norm of the
weight column ``x_i`` multiplies) instead of ``|x_i|``.

Projections that read the same tensor (q/k/v, gate/up) are hooked separately, so each applies its own
budget. The hooks count the zeroed input entries over all tokens seen, which gives the achieved
(effective) sparsity per projection and its parameter-weighted mean.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .config import MODES, ActTailConfig, ProjectionConfig
from .errors import ActTailError
from .reference import torch_mask

logger = logging.getLogger(__name__)

#: ranking scores of the hooks: |x| (the project's rule) or weight-informed |x| * ||W[:, i]|| (top-k only)
SCORES = ("abs", "wina")


def mask_topk(x: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest-|x| entries along the last dim, zero the others (new tensor)."""
    d = x.shape[-1]
    if k >= d:
        return x
    if k <= 0:
        return torch.zeros_like(x)
    mag = x.abs()
    if k <= d - k:
        idx = mag.topk(k, dim=-1, largest=True, sorted=False).indices
        keep = torch.zeros_like(x, dtype=torch.bool).scatter_(-1, idx, True)
    else:  # cheaper to find the d - k smallest and drop them
        idx = mag.topk(d - k, dim=-1, largest=False, sorted=False).indices
        keep = torch.ones_like(x, dtype=torch.bool).scatter_(-1, idx, False)
    return x * keep


def mask_threshold(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Keep entries with ``|x| > threshold``, zero the others (new tensor)."""
    return x * (x.abs() > threshold)


def projection_module(model: torch.nn.Module, proj: ProjectionConfig) -> torch.nn.Linear:
    """The ``nn.Linear`` of ``proj`` in ``model``; ActTailError when the config does not match the model."""
    try:
        module = model.get_submodule(proj.name)
    except AttributeError:
        raise ActTailError(
            f"model has no projection {proj.name}: the config was built for another model; rebuild it for this one"
        ) from None
    if not isinstance(module, torch.nn.Linear) or module.in_features != proj.in_features:
        raise ActTailError(f"{proj.name} is not a Linear with {proj.in_features} inputs: the config does not match this model")
    return module


@dataclass
class _Rule:
    """Masking rule of one hooked projection and its running zero count."""

    proj: ProjectionConfig
    mode: str
    k: int
    threshold: float | None
    ramp: float = 0.0
    soft: bool = False
    scale: torch.Tensor | None = None
    zeroed: torch.Tensor | int = 0
    total: int = 0

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        x = args[0]
        d = x.shape[-1]
        rows = x.numel() // d
        self.total += x.numel()
        plain = self.ramp == 0 and not self.soft and self.scale is None
        if self.mode == "topk":
            self.zeroed = self.zeroed + rows * (d - self.k)
            if plain or self.k >= d:
                y = mask_topk(x, self.k)
            else:
                y = torch_mask(x, "topk", k=self.k, scale=self.scale, ramp=self.ramp, soft=self.soft)
        elif self.threshold is None:  # threshold mode, sparsity 0, not calibrated: identity
            y = x
        else:
            keep = x.abs() > self.threshold
            self.zeroed = self.zeroed + (keep.numel() - torch.count_nonzero(keep))
            y = x * keep if plain else torch_mask(x, "threshold", threshold=self.threshold, ramp=self.ramp, soft=self.soft)
        return (y, *args[1:])

    def effective(self) -> float | None:
        if self.total == 0:
            return None
        return float(self.zeroed) / self.total


class SparsityHooks:
    """Handles of the installed hooks; use as a context manager or call :meth:`remove`."""

    def __init__(self, model: torch.nn.Module, config: ActTailConfig, mode: str, ramp: float = 0.0, soft: bool = False,
                 scores: str = "abs"):
        if not ramp >= 0:
            raise ActTailError(f"ramp must be >= 0 (0: hard mask), got {ramp}")
        if soft and ramp:
            raise ActTailError("choose one value rule: a ramp or soft thresholding, not both")
        if scores not in SCORES:
            raise ActTailError(f"scores must be one of {', '.join(SCORES)}; got {scores!r}")
        if scores == "wina" and mode != "topk":
            raise ActTailError("weight-informed scores are measured in top-k mode only: the thresholds are calibrated on |x|")
        self.config = config
        self.mode = mode
        self.ramp = float(ramp)
        self._rules: dict[str, _Rule] = {}
        self._handles: list = []
        modules: list[tuple[torch.nn.Module, _Rule]] = []
        for proj in config.projections:
            module = projection_module(model, proj)
            if mode == "topk":
                # the norm of the weight column x_i multiplies, float32
                scale = module.weight.detach().float().norm(dim=0) if scores == "wina" else None
                rule = _Rule(proj, mode, proj.keep_k(), None, self.ramp, soft, scale)
            else:
                if proj.threshold is None and proj.sparsity > 0:
                    raise ActTailError(
                        f"{proj.name} has no threshold: run calibration (acttail_export.calibration.calibrate) "
                        "before threshold mode, or use --mode topk"
                    )
                rule = _Rule(proj, mode, proj.in_features, proj.threshold, self.ramp, soft)
            self._rules[proj.name] = rule
            modules.append((module, rule))
        # register only once every projection is validated, so a bad config leaves the model untouched
        self._handles = [module.register_forward_pre_hook(rule) for module, rule in modules]
        logger.debug("installed %d %s sparsity hooks", len(self._handles), mode)

    # --- lifecycle -------------------------------------------------------------------------------
    def remove(self) -> None:
        """Remove all hooks (idempotent); the counts stay readable."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "SparsityHooks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def reset(self) -> None:
        """Forget the counted tokens."""
        for rule in self._rules.values():
            rule.zeroed, rule.total = 0, 0

    # --- measurements ----------------------------------------------------------------------------
    def effective_sparsity(self) -> dict[str, float]:
        """Fraction of zeroed input entries per projection, over the tokens seen (projections that saw none are left out)."""
        out = {}
        for name, rule in self._rules.items():
            value = rule.effective()
            if value is not None:
                out[name] = value
        return out

    def weighted_effective_sparsity(self) -> float:
        """Parameter-weighted mean of :meth:`effective_sparsity` (0.0 before any token)."""
        eff = self.effective_sparsity()
        total = sum(self._rules[n].proj.parameters for n in eff)
        if total == 0:
            return 0.0
        return sum(v * self._rules[n].proj.parameters for n, v in eff.items()) / total

    def record(self, config: ActTailConfig | None = None) -> ActTailConfig:
        """Write the measured sparsities into ``config`` (default: the hooked one) and return it."""
        config = config or self.config
        eff = self.effective_sparsity()
        for proj in config.projections:
            if proj.name in eff:
                proj.effective_sparsity = eff[proj.name]
        config.effective_sparsity = self.weighted_effective_sparsity()
        return config


def apply_sparsity(model: torch.nn.Module, config: ActTailConfig, mode: str | None = None, ramp: float = 0.0,
                   soft: bool = False, scores: str = "abs") -> SparsityHooks:
    """Install one forward pre-hook per projection of ``config`` on ``model``; ``mode`` defaults to ``config.mode``.

    ``ramp`` > 0 applies the continuous ramp mask (same zero set); 0 is the hard mask; ``soft`` soft thresholding;
    ``scores`` "wina" the weight-informed ranking (top-k).
    """
    mode = mode or config.mode
    if mode not in MODES:
        raise ActTailError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if not config.projections:
        raise ActTailError("the sparsity config has no projections: build it with allocation.build_config first")
    return SparsityHooks(model, config, mode, ramp, soft, scores)
