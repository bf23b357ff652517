"""TEAL's block-wise greedy allocation (arXiv 2408.14690, ``teal/greedyopt.py``), re-implemented.

Per decoder block, on dense calibration activations (the block's input from the dense model):
start with sparsity 0 for q, k, v, o, gate, up, down; at every step try raising each projection's
sparsity by ``step · P_block / P_i`` (so each candidate raises the block's parameter-weighted sparsity by
the same ``step``; budgets capped at ``s_max``) and keep the one whose block output is closest to the
dense block output (mean over tokens of the L2 distance over the hidden dimension). The search runs once
from 0 up to the highest level asked for; every level on the way is recorded, so the budgets for any
target in that range are read off one trajectory: the last recorded state below the target, with the
projection raised at the next step set so the block's weighted sparsity equals the target exactly.

Masks: ``topk`` keeps ``ceil((1 − s)·d)`` entries per token; ``threshold`` keeps ``|x| > t`` with ``t`` the
``s``-quantile of the projection's dense input in this block (as TEAL's histograms).

Only candidates downstream of the changed projection are recomputed (o, gate/up, down reuse the cached
attention output / MLP input). Memory: one block's activations at a time. Trajectories are cached on disk
(``modeling.cache_root()/greedy``, keyed by the model's weights and the search settings), written after
every block, so an interrupted search resumes at the first unfinished block and a higher level extends the
recorded trajectory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .calibration import linear_quantile
from .config import PROJECTION_KINDS, PROJECTION_PARENT, topk_keep
from .errors import ActTailError
from .sparsify import mask_topk

logger = logging.getLogger(__name__)

#: Block parameter-weighted sparsity added per greedy step (TEAL: 0.05 on q's share, ≈ 0.005 on a block).
DEFAULT_STEP = 0.01
DEFAULT_SAMPLES = 8
DEFAULT_SEQUENCE_LENGTH = 128
CACHE_VERSION = 1
#: ``acttail-greedy``: the HT-SR mapping that sets each block's target (block-level alpha means; docs/allocation.md).
COMBINED_MAPPING = "block-abs"


@dataclass(frozen=True)
class GreedySettings:
    """What a search's result depends on (besides the weights and the text): part of the cache key."""

    mode: str = "topk"
    step: float = DEFAULT_STEP
    s_max: float = 0.99
    samples: int = DEFAULT_SAMPLES
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH


def model_digest(model: torch.nn.Module) -> str:
    """blake2b of every parameter's name, shape and bytes (float32) — the model part of the cache key."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    from .modeling import cache_root

    return cache_root() / "greedy"


class _Rule:
    """Forward pre-hook with a mutable mask: ``k`` (top-k) or ``threshold``; None = identity."""

    def __init__(self) -> None:
        self.k: int | None = None
        self.threshold: float | None = None

    def __call__(self, module, args):
        x = args[0]
        if self.k is not None:
            x = mask_topk(x, self.k)
        elif self.threshold is not None:
            x = x * (x.abs() > self.threshold)
        return (x, *args[1:])


class BlockSearch:
    """Greedy state of one decoder block: current budgets, masking hooks and the caches of the current state."""

    def __init__(self, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, settings: GreedySettings):
        self.layer, self.hidden, self.kwargs, self.settings = layer, hidden, kwargs, settings
        self.modules = {kind: getattr(getattr(layer, PROJECTION_PARENT[kind]), kind) for kind in PROJECTION_KINDS}
        self.params = np.array([m.in_features * m.out_features for m in self.modules.values()], dtype=np.float64)
        self.rules = {kind: _Rule() for kind in PROJECTION_KINDS}
        self.sparsity = np.zeros(len(PROJECTION_KINDS))
        self._inputs: dict[str, torch.Tensor] = {}
        self._outputs: dict[str, torch.Tensor] = {}  # gate_proj / up_proj outputs of the current state
        self._sorted: dict[str, torch.Tensor] = {}
        self._capture = True
        self._handles = [m.register_forward_pre_hook(self._record(kind)) for kind, m in self.modules.items()]
        self._handles += [m.register_forward_pre_hook(self.rules[kind]) for kind, m in self.modules.items()]
        self._handles += [self.modules[kind].register_forward_hook(self._record_output(kind)) for kind in ("gate_proj", "up_proj")]
        self.target = self.forward()  # dense output (no rule set yet) and the dense inputs
        if settings.mode == "threshold":
            self._sorted = {k: torch.sort(self._inputs[k].abs().flatten()).values for k in ("q_proj", "o_proj", "gate_proj", "down_proj")}

    def _record(self, kind: str):
        """Keep the raw (pre-mask) inputs of one reader per shared input while capturing."""
        def hook(module, args):
            if self._capture and kind in ("q_proj", "o_proj", "gate_proj", "down_proj"):
                self._inputs[kind] = args[0]
        return hook

    def _record_output(self, kind: str):
        """Keep a gate / up projection's output while capturing (a candidate on the other one reuses it)."""
        def hook(module, args, output):
            if self._capture:
                self._outputs[kind] = output
        return hook

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    # --- block pieces ------------------------------------------------------------------------------
    def forward(self) -> torch.Tensor:
        """Full block output under the current rules (and refresh the caches of the current state)."""
        self._capture = True
        out = self.layer(self.hidden, **self.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        self._mid = self.hidden + self.modules["o_proj"](self._inputs["o_proj"])
        self._capture = False
        return out

    def _from_o(self) -> torch.Tensor:
        mid = self.hidden + self.modules["o_proj"](self._inputs["o_proj"])
        return mid + self.layer.mlp(self.layer.post_attention_layernorm(mid))

    def _gate_up(self, changed: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate, up) projection outputs with ``changed``'s rule as set, the other one from the current state (the
        MLP input is the same: only the rules of the MLP's projections differ)."""
        h = self._inputs["gate_proj"]
        gate = self.modules["gate_proj"](h) if changed == "gate_proj" else self._outputs["gate_proj"]
        up = self.modules["up_proj"](h) if changed == "up_proj" else self._outputs["up_proj"]
        return gate, up

    def _from_gate_up(self, changed: str) -> torch.Tensor:
        """Block output for a gate or up candidate: LlamaMLP's ``down(act(gate(h)) * up(h))`` with one of the two
        products recomputed."""
        gate, up = self._gate_up(changed)
        return self._mid + self.modules["down_proj"](self.layer.mlp.act_fn(gate) * up)

    def _from_down(self) -> torch.Tensor:
        return self._mid + self.modules["down_proj"](self._inputs["down_proj"])

    def output(self, changed: str) -> torch.Tensor:
        """Block output with the rules as set, recomputing only what ``changed`` affects."""
        if changed in ("q_proj", "k_proj", "v_proj"):
            out = self.layer(self.hidden, **self.kwargs)
            return out[0] if isinstance(out, tuple) else out
        if changed == "o_proj":
            return self._from_o()
        return self._from_down() if changed == "down_proj" else self._from_gate_up(changed)

    def commit(self, changed: str) -> None:
        """Refresh the caches of the current state after ``changed``'s rule was raised, recomputing only what it
        affects: the whole block (q/k/v), the MLP (o), one MLP product (gate/up) or nothing (down)."""
        if changed in ("q_proj", "k_proj", "v_proj"):
            self.forward()
        elif changed == "o_proj":  # the attention output is unchanged: the residual sum and the MLP again
            self._capture = True
            self._mid = self.hidden + self.modules["o_proj"](self._inputs["o_proj"])
            self.layer.mlp(self.layer.post_attention_layernorm(self._mid))
            self._capture = False
        elif changed in ("gate_proj", "up_proj"):
            gate, up = self._gate_up(changed)
            self._outputs.update(gate_proj=gate, up_proj=up)
            self._inputs["down_proj"] = self.layer.mlp.act_fn(gate) * up

    def error(self, out: torch.Tensor) -> float:
        """Mean over tokens of ||out − dense||₂ over the hidden dimension."""
        return float((out - self.target).double().norm(dim=-1).mean())

    # --- rules ---------------------------------------------------------------------------------------
    def set_sparsity(self, index: int, value: float) -> None:
        kind = PROJECTION_KINDS[index]
        rule, d = self.rules[kind], self.modules[kind].in_features
        if self.settings.mode == "topk":
            rule.k = None if value <= 0 else topk_keep(value, d)
        else:
            source = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(kind, kind)
            rule.threshold = None if value <= 0 else linear_quantile(self._sorted[source], value)

    def level(self, sparsity: np.ndarray | None = None) -> float:
        s = self.sparsity if sparsity is None else sparsity
        return float((self.params * s).sum() / self.params.sum())

    def candidates(self) -> list[tuple[int, float]]:
        """(projection index, raised sparsity) for every projection not at s_max."""
        steps = self.settings.step * self.params.sum() / self.params
        out = []
        for i, s in enumerate(self.sparsity):
            if s < self.settings.s_max - 1e-12:
                out.append((i, min(self.settings.s_max, s + steps[i])))
        return out

    def step(self) -> tuple[int, float, list[float]]:
        """One greedy step: (chosen index, its error, every candidate's error in PROJECTION_KINDS order, inf if skipped)."""
        errors = [float("inf")] * len(PROJECTION_KINDS)
        for i, value in self.candidates():
            old = self.sparsity[i]
            self.set_sparsity(i, value)
            errors[i] = self.error(self.output(PROJECTION_KINDS[i]))
            self.set_sparsity(i, old)
        best = int(np.argmin(errors))
        if not np.isfinite(errors[best]):
            raise ActTailError("greedy search: every projection is at s_max; lower the level")
        self.sparsity[best] = dict(self.candidates())[best]
        self.set_sparsity(best, self.sparsity[best])
        self.commit(PROJECTION_KINDS[best])
        return best, errors[best], errors

    def run(self, trajectory: list[list[float]], max_level: float) -> list[list[float]]:
        """Extend ``trajectory`` (rows of 7 budgets, starting at zeros) until its level reaches ``max_level``."""
        if not trajectory:
            trajectory = [[0.0] * len(PROJECTION_KINDS)]
        self.sparsity = np.array(trajectory[-1], dtype=np.float64)
        for i, value in enumerate(self.sparsity):
            self.set_sparsity(i, value)
        self.forward()
        with torch.inference_mode():
            while self.level() < max_level - 1e-12:
                self.step()
                trajectory.append(self.sparsity.tolist())
        return trajectory


def budgets_at(trajectory: list[list[float]], params: np.ndarray, target: float) -> np.ndarray:
    """Budgets of the trajectory at block level ``target`` exactly (the crossing step's projection interpolated)."""
    rows = np.asarray(trajectory, dtype=np.float64)
    levels = rows @ params / params.sum()
    if target > levels[-1] + 1e-9:
        raise ActTailError(f"greedy trajectory reaches {levels[-1]:.4f} < target {target:.4f}: search to a higher level")
    j = int(np.searchsorted(levels, target - 1e-12))  # first row at or above the target
    if j == 0 or abs(levels[j] - target) <= 1e-12:
        return rows[j].copy()
    out = rows[j - 1].copy()
    changed = int(np.argmax(np.abs(rows[j] - rows[j - 1])))
    out[changed] += (target - levels[j - 1]) * params.sum() / params[changed]
    return out


class _Stop(Exception):
    pass


def block_inputs(model: torch.nn.Module, windows: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Hidden states entering decoder layer 0 for ``windows`` and the layer's keyword arguments."""
    captured: list = []

    def grab(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        captured.append((hidden, {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            try:
                model(input_ids=windows, use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured[0]


def _cache_path(cache_dir: Path, key: dict) -> Path:
    text = json.dumps(key, sort_keys=True)
    return cache_dir / f"greedy-{hashlib.sha256(text.encode()).hexdigest()[:20]}.json"


def _write_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


def search(
    model: torch.nn.Module,
    windows: torch.Tensor,
    levels: list[float] | float,
    settings: GreedySettings = GreedySettings(),
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[int, list[list[float]]]:
    """Greedy trajectories (per layer: rows of 7 budgets in PROJECTION_KINDS order) reaching ``levels``.

    ``levels``: one level for every block, or one per block. ``windows`` ([n, L] token ids) is the
    calibration text. ``cache_dir=None`` uses :func:`default_cache_dir`; ``cache_dir=False`` disables the cache.
    """
    layers = model.model.layers
    wanted = [float(levels)] * len(layers) if np.isscalar(levels) else [float(v) for v in levels]
    if len(wanted) != len(layers):
        raise ActTailError(f"greedy search: {len(wanted)} levels for {len(layers)} blocks")
    if max(wanted) > settings.s_max:
        raise ActTailError(f"greedy search: level {max(wanted)} is above s_max {settings.s_max}")
    path = None
    key = {"version": CACHE_VERSION, "settings": asdict(settings), "model": model_digest(model),
           "windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()}
    if cache_dir is not False:
        path = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), key)
    cached = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    trajectories = {int(k): v for k, v in cached.get("trajectories", {}).items()}
    seconds = {int(k): v for k, v in cached.get("seconds", {}).items()}
    hidden, kwargs = block_inputs(model, windows)
    bar = tqdm(range(len(layers)), desc="greedy allocation", unit="block", disable=not progress)
    for index in bar:
        with torch.inference_mode():
            block = BlockSearch(layers[index], hidden, kwargs, settings)
            try:
                rows = trajectories.get(index, [])
                reached = block.level(np.asarray(rows[-1])) if rows else 0.0
                if reached < wanted[index] - 1e-12:
                    start = time.perf_counter()
                    trajectories[index] = block.run(rows, wanted[index])
                    seconds[index] = seconds.get(index, 0.0) + time.perf_counter() - start
                    if path is not None:
                        _write_atomic(path, {"key": key, "trajectories": trajectories, "seconds": seconds})
                hidden = block.target  # the next block reads the dense output
            finally:
                block.close()
    if path is not None:
        logger.info("greedy trajectories cached in %s", path)
    search.seconds = sum(seconds.values())  # search time of these trajectories, cached blocks included
    return trajectories


def greedy_budgets(model: torch.nn.Module, trajectories: dict[int, list[list[float]]], targets: list[float]) -> dict[str, float]:
    """Per-projection budget (by module name) with block ``l`` at level ``targets[l]``."""
    from .config import projection_name

    out = {}
    for index, layer in enumerate(model.model.layers):
        params = np.array([getattr(getattr(layer, PROJECTION_PARENT[k]), k).weight.numel() for k in PROJECTION_KINDS], dtype=np.float64)
        row = budgets_at(trajectories[index], params, targets[index])
        out.update({projection_name(index, kind): float(v) for kind, v in zip(PROJECTION_KINDS, row)})
    return out


def search_for(model, tokenizer, allocation: str, sparsities: list[float], mode: str, data: str | Path | None,
               fits: dict | None = None, epsilon: float | None = None, mapping: str | None = None,
               settings: GreedySettings | None = None, cache_dir: str | Path | None = None,
               progress: bool = True) -> dict[int, list[list[float]]]:
    """Run (or read from the cache) the greedy search that ``allocation`` needs at ``sparsities`` on ``data``."""
    from .allocation import greedy_levels
    from .data import DEFAULT_CALIBRATION_DATA, load_windows
    from .offload import input_device

    settings = settings or GreedySettings(mode=mode)
    windows = load_windows(tokenizer, Path(data) if data is not None else DEFAULT_CALIBRATION_DATA,
                           settings.sequence_length, samples=settings.samples)
    levels = greedy_levels(model, allocation, sparsities, epsilon=epsilon, mapping=mapping, s_max=settings.s_max, fits=fits)
    return search(model, windows.to(input_device(model)), levels, settings, cache_dir=cache_dir, progress=progress)
