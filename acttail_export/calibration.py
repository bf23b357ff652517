"""Threshold calibration: ``t_i = quantile(|x|, s_i)`` over the inputs of projection ``i`` on calibration text.

The model runs on ``samples`` windows of calibration text. The input of each shared-input group
(q/k/v, o, gate/up, down; ``ArchSpec.shared_input_groups``) is captured once per layer by a forward
pre-hook and folded into a bounded-memory accumulator:

* **exact** when ``tokens * (sum of group input widths)`` fits ``exact_limit`` floats: every ``|x|`` is
  kept and the threshold is the linear-interpolation quantile (``torch.quantile``'s definition);
* **streamed** otherwise: one histogram per group keyed by the top bits of the float32 pattern of
  ``|x|`` (exponent + ``mantissa_bits`` mantissa bits), i.e. log-spaced bins of relative width
  ``2**-mantissa_bits``, interpolated linearly inside the bin holding the quantile. Error bound: the
  threshold is within one bin of the exact quantile (relative error <= ``2**-mantissa_bits``, 0.1 % at
  the default 10 bits), so the effective sparsity on the calibration data is within the mass of that one
  bin (logged as ``max bin mass``) of ``s_i``. Memory: ``96 * 2**mantissa_bits`` int64 counters per
  group (768 KiB at 10 bits), independent of the token count.

Activations are **dense** by default (as in TEAL): every projection's statistics come from the dense
model. ``sequential=True`` instead calibrates layer by layer, group by group, with the earlier groups
already thresholded, so each threshold sees the inputs it will get at inference.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import ActTailConfig, CalibrationInfo, ProjectionConfig, topk_keep
from .data import DEFAULT_CALIBRATION_DATA, load_windows
from .errors import ActTailError
from .offload import input_device
from .sparsify import projection_module

logger = logging.getLogger(__name__)

#: Float32 exponent range covered by the streamed histogram: |x| in [2**-64, 2**32); smaller values fall
#: in the first bin, larger ones (and inf) in the last.
_EXP_LO, _EXP_HI = 127 - 64, 127 + 32
#: Default number of |x| values kept for exact quantiles (float32: 128 MiB, about 4x that at the peak of
#: the sort that reads the quantiles off).
DEFAULT_EXACT_LIMIT = 2**25
DEFAULT_MANTISSA_BITS = 10


@dataclass
class QuantileEstimate:
    """A threshold and the calibration mass that may sit on the wrong side of it (0 when exact)."""

    threshold: float
    bin_mass: float = 0.0


# --- pure maths ----------------------------------------------------------------------------------
def linear_quantile(sorted_values: torch.Tensor, q: float) -> float:
    """Quantile of a sorted 1-D tensor with linear interpolation (same definition as ``torch.quantile``)."""
    n = sorted_values.numel()
    if n == 0:
        raise ActTailError("no calibration values were captured: check the calibration data")
    pos = q * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    a, b = float(sorted_values[lo]), float(sorted_values[hi])
    return a + (b - a) * frac


def histogram_edges(mantissa_bits: int) -> torch.Tensor:
    """Lower edges (float64) of the ``96 * 2**mantissa_bits`` histogram bins, plus the final upper edge."""
    shift = 23 - mantissa_bits
    base = _EXP_LO << mantissa_bits
    n = (_EXP_HI - _EXP_LO) << mantissa_bits
    bits = ((torch.arange(n + 1, dtype=torch.int64) + base) << shift).to(torch.int32)
    edges = bits.view(torch.float32).double()
    edges[0] = 0.0  # the first bin also holds everything below 2**-64 (zeros, denormals)
    return edges


def histogram_quantile(counts: torch.Tensor, edges: torch.Tensor, q: float) -> QuantileEstimate:
    """Quantile ``q`` of the values binned in ``counts`` (bin ``j`` = ``[edges[j], edges[j+1])``).

    The target rank ``q * (n - 1)`` (0-based) is located by the cumulative counts and interpolated
    linearly inside its bin; the result is within one bin width of the exact linear quantile.
    """
    n = int(counts.sum())
    if n == 0:
        raise ActTailError("no calibration values were captured: check the calibration data")
    rank = q * (n - 1)
    cum = torch.cumsum(counts, 0)
    j = int(torch.searchsorted(cum, torch.tensor(int(math.floor(rank)), dtype=cum.dtype), right=True))
    j = min(j, counts.numel() - 1)
    before = int(cum[j - 1]) if j > 0 else 0
    inside = int(counts[j])
    frac = min(1.0, max(0.0, (rank - before + 0.5) / inside)) if inside else 0.0
    lo, hi = float(edges[j]), float(edges[j + 1])
    return QuantileEstimate(lo + (hi - lo) * frac, inside / n)


# --- accumulators --------------------------------------------------------------------------------
class _Exact:
    """Keeps every |x| (float32) of one group."""

    exact = True

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        self.chunks.append(x.detach().abs().float().flatten().cpu())

    def quantiles(self, qs: list[float]) -> list[QuantileEstimate]:
        values = torch.sort(torch.cat(self.chunks)).values
        self.chunks = [values]
        return [QuantileEstimate(linear_quantile(values, q)) for q in qs]


class _Histogram:
    """Log-spaced histogram of |x| keyed by float32 bits (see module docstring)."""

    exact = False

    def __init__(self, mantissa_bits: int, edges: torch.Tensor) -> None:
        self.shift = 23 - mantissa_bits
        self.base = _EXP_LO << mantissa_bits
        self.nbins = (_EXP_HI - _EXP_LO) << mantissa_bits
        self.edges = edges
        self.counts: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        key = x.detach().float().abs().view(torch.int32)  # fresh tensor: the shifts below are in place
        key.bitwise_right_shift_(self.shift).sub_(self.base).clamp_(0, self.nbins - 1)
        if self.counts is None:
            self.counts = torch.zeros(self.nbins, dtype=torch.int64, device=key.device)
            self._one = torch.ones(1, dtype=torch.int64, device=key.device)
        key = key.flatten()
        self.counts.index_add_(0, key, self._one.expand(key.numel()))

    def quantiles(self, qs: list[float]) -> list[QuantileEstimate]:
        if self.counts is None:
            raise ActTailError("no calibration values were captured: check the calibration data")
        counts = self.counts.cpu()
        return [histogram_quantile(counts, self.edges, q) for q in qs]


def _groups(config: ActTailConfig) -> list[list[ProjectionConfig]]:
    """Config projections grouped by shared input (layer order, then ``config.spec.shared_input_groups`` order)."""
    group_of = config.spec.group_index()
    found: dict[tuple[int, int], list[ProjectionConfig]] = {}
    for p in config.projections:
        found.setdefault((p.layer, group_of[p.kind]), []).append(p)
    return [found[key] for key in sorted(found)]


def _fill_thresholds(group: list[ProjectionConfig], acc) -> float:
    """Set ``threshold`` (sparsity 0 -> 0.0: keep every nonzero) on each projection; returns max bin mass."""
    live = [p for p in group if p.sparsity > 0]
    for p in group:
        if p.sparsity == 0:
            p.threshold = 0.0
    if not live:
        return 0.0
    estimates = acc.quantiles([p.sparsity for p in live])
    for p, est in zip(live, estimates):
        if not math.isfinite(est.threshold):
            raise ActTailError(f"the calibrated threshold of {p.name} is {est.threshold}: its calibration statistics are not "
                               "finite; use --dtype fp32, or check the model's outputs in PyTorch")
        p.threshold = max(0.0, est.threshold)
    return max(est.bin_mass for est in estimates)


class _Stop(Exception):
    """Raised by a capture hook to end a forward pass early (sequential calibration)."""


def _capture_hook(acc, stop: bool = False, name: str = "a projection"):
    def hook(module, args):
        if not bool(torch.isfinite(args[0]).all()):  # finite weights can still overflow (fp16) on some text
            raise ActTailError(f"the input of {name} is not finite (NaN/Inf activations) on the calibration data: the model "
                               "overflows there; use --dtype fp32, or check the model's outputs in PyTorch")
        acc.add(args[0])
        if stop:
            raise _Stop
    return hook


def _make_accumulators(groups, tokens: int, exact_limit: int, mantissa_bits: int):
    total = tokens * sum(g[0].in_features for g in groups)
    exact = total <= exact_limit
    edges = None if exact else histogram_edges(mantissa_bits)
    logger.info(
        "calibration quantiles: %s (%d values%s)", "exact" if exact else f"streamed histogram, {mantissa_bits} mantissa bits",
        total, "" if exact else f" > exact limit {exact_limit}",
    )
    return [_Exact() if exact else _Histogram(mantissa_bits, edges) for _ in groups], exact


def _batches(windows: torch.Tensor, batch_size: int, device) -> list[torch.Tensor]:
    return [windows[i : i + batch_size].to(device) for i in range(0, windows.shape[0], batch_size)]


# --- calibration ---------------------------------------------------------------------------------
def calibrate(
    model: torch.nn.Module,
    tokenizer,
    config: ActTailConfig,
    data: str | Path | None = None,
    samples: int = 64,
    sequence_length: int = 512,
    progress: bool = True,
    **options,
) -> ActTailConfig:
    """Fill ``threshold`` and ``k`` of every projection of ``config`` and ``config.calibration``; returns ``config``.

    ``options`` are those of :func:`calibrate_many`.
    """
    return calibrate_many(model, tokenizer, [config], data, samples, sequence_length, progress, **options)[0]


def calibrate_many(
    model: torch.nn.Module,
    tokenizer,
    configs: list[ActTailConfig],
    data: str | Path | None = None,
    samples: int = 64,
    sequence_length: int = 512,
    progress: bool = True,
    *,
    batch_size: int = 4,
    sequential: bool = False,
    exact_limit: int = DEFAULT_EXACT_LIMIT,
    mantissa_bits: int = DEFAULT_MANTISSA_BITS,
    windows: torch.Tensor | None = None,
    source: str | None = None,
) -> list[ActTailConfig]:
    """Calibrate several configs of the same model (e.g. a sparsity sweep) from one dense pass.

    ``windows`` (``[n, L]`` token ids) replaces reading ``data`` when given; ``source`` then names where they came
    from in ``config.calibration.data`` (default ``<token windows>``), so that a caller that already read the file
    records it as if calibrate had. With ``sequential=True`` each config gets its own layer-wise pass (its thresholds
    change the later inputs).
    """
    if not configs:
        raise ActTailError("no configs to calibrate")
    names = [p.name for p in configs[0].projections]
    for config in configs:
        if not config.projections:
            raise ActTailError("the sparsity config has no projections: build it with allocation.build_config first")
        if [p.name for p in config.projections] != names:
            raise ActTailError("configs calibrated together must cover the same projections: calibrate them separately")
    if not 1 <= mantissa_bits <= 16:
        raise ActTailError(f"mantissa bits must be in [1, 16], got {mantissa_bits}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ActTailError(f"batch size must be a positive integer, got {batch_size!r}")
    path = Path(data) if data is not None else DEFAULT_CALIBRATION_DATA
    if windows is None:
        windows = load_windows(tokenizer, path, sequence_length, samples=samples)
        source = str(path)
    elif source is None:
        source = "<token windows>"
    n, length = windows.shape
    tokens = n * length
    groups_per_config = [_groups(config) for config in configs]
    for p in configs[0].projections:
        projection_module(model, p)
    for config in configs:
        for p in config.projections:
            p.k = topk_keep(p.sparsity, p.in_features)
    batches = _batches(windows, batch_size, input_device(model))
    max_mass, exact = 0.0, True
    if sequential:
        for config, groups in zip(configs, groups_per_config):
            accs, exact = _make_accumulators(groups, tokens, exact_limit, mantissa_bits)
            max_mass = max(max_mass, _calibrate_sequential(model, groups, accs, batches, progress))
    else:
        accs, exact = _make_accumulators(groups_per_config[0], tokens, exact_limit, mantissa_bits)
        max_mass = _calibrate_dense(model, groups_per_config, accs, batches, progress)
    for config in configs:
        config.calibration = CalibrationInfo(data=source, samples=n, sequence_length=length, tokens=tokens)
    if not exact:
        logger.info("streamed quantiles: max bin mass %.4f%% (bound on |effective - target| sparsity on calibration data)", 100 * max_mass)
    return configs


def _calibrate_dense(model, groups_per_config, accs, batches, progress: bool) -> float:
    groups = groups_per_config[0]
    handles = [model.get_submodule(g[0].name).register_forward_pre_hook(_capture_hook(acc, name=g[0].name))
               for g, acc in zip(groups, accs)]
    try:
        with torch.inference_mode():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    max_mass = 0.0
    for index, acc in enumerate(accs):
        for groups in groups_per_config:
            max_mass = max(max_mass, _fill_thresholds(groups[index], acc))
        if isinstance(acc, _Exact):
            acc.chunks = []
    return max_mass


def _calibrate_sequential(model, groups, accs, batches, progress: bool) -> float:
    """Layer-wise replay: the inputs of decoder layer 0 are captured once; then for each layer, each
    group's input is captured with the earlier groups already thresholded (the layer pass stops right
    after the capture), and the layer is re-run with all its thresholds to give the next layer's input.
    Cost: about 3 dense passes; memory: one hidden-state tensor per calibration token.
    """
    from .sparsify import _Rule

    layers = model.model.layers
    inputs: list[tuple[torch.Tensor, dict]] = []

    def grab(module, args, kwargs):
        inputs.append((args[0] if args else kwargs.pop("hidden_states"), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    installed = [layers[0].register_forward_pre_hook(grab, with_kwargs=True)]
    max_mass = 0.0
    by_layer: dict[int, list[tuple[list[ProjectionConfig], object]]] = {}
    for group, acc in zip(groups, accs):
        by_layer.setdefault(group[0].layer, []).append((group, acc))
    try:
        with torch.inference_mode():
            for batch in batches:
                try:
                    model(input_ids=batch, use_cache=False)
                except _Stop:
                    pass
            installed.pop().remove()
            hidden = [h for h, _ in inputs]
            for index in tqdm(range(len(layers)), desc="calibrating (sequential)", unit="layer", disable=not progress):
                layer = layers[index]
                for group, acc in by_layer.get(index, []):
                    handle = model.get_submodule(group[0].name).register_forward_pre_hook(_capture_hook(acc, stop=True, name=group[0].name))
                    try:
                        for h, (_, kwargs) in zip(hidden, inputs):
                            try:
                                layer(h, **kwargs)
                            except _Stop:
                                pass
                    finally:
                        handle.remove()
                    max_mass = max(max_mass, _fill_thresholds(group, acc))
                    if isinstance(acc, _Exact):
                        acc.chunks = []  # free the group's values before the next one
                    for p in group:
                        rule = _Rule(p, "threshold", p.in_features, p.threshold)
                        installed.append(model.get_submodule(p.name).register_forward_pre_hook(rule))
                hidden = [_layer_output(layer(h, **kwargs)) for h, (_, kwargs) in zip(hidden, inputs)]
    finally:
        for h in installed:
            h.remove()
    return max_mass


def _layer_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
