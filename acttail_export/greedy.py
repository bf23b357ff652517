"""TEAL's block-wise greedy allocation (arXiv 2408.14690, ``teal/greedyopt.py``), re-implemented.

Per decoder block, on dense calibration activations (the block's input from the dense model):
start with sparsity 0 for q, k, v, o, gate, up, down; at every step try raising each projection's
sparsity by ``step · P_block / P_i`` (so each candidate raises the block's parameter-weighted sparsity by
the same ``step``; budgets capped at ``s_max``; with ``GreedySettings.max_increment`` set, no projection rises by more
than that in one step, so a capped candidate raises the block by less) and keep the one whose block output is closest to the
dense block output (mean over tokens of the L2 distance over the hidden dimension). The search runs once
from 0 up to the highest level asked for; every level on the way is recorded, so the budgets for any
target in that range are read off one trajectory: the last recorded state below the target, with the
projection raised at the next step set so the block's weighted sparsity equals the target exactly.

Masks: ``topk`` keeps ``ceil((1 − s)·d)`` entries per token; ``threshold`` keeps ``|x| > t`` with ``t`` the
``s``-quantile of the projection's dense input in this block (as TEAL's histograms).

Every tensor of a block is memoized under the rules of the projections upstream of it, so a candidate computes
only what no candidate of this step or the step before has computed (after a down step, for instance, every
candidate reruns down_proj alone); top-k masks compare with the k-th largest |x| of each token, read off |x|
sorted once per tensor (ties at the k-th entry take ``mask_topk``'s own choice), and on CPU the sequences are
split into one shard per torch thread, each evaluated in a thread of its own. With every product in full
(``delta_limit`` 0) every candidate's error is that of a full-block forward with the ``sparsify`` masks under the
same rules (bit for bit with MKL on x86: the ops are the same and act on each token, attention on each sequence, on
its own; tests/test_greedy.py).
``GreedySettings.delta_limit`` updates a product whose rule rises on an unchanged input from the entries the rule drops
instead, and ``GreedySettings.lazy`` evaluates candidates lazily (Minoux), with every ``refresh``-th step in full: in
top-k mode the default's searches update products, and the one it runs at 65-85 % is lazy too; in threshold mode both of
its searches update products (:func:`default_settings`, docs/allocation.md sections 6k, 6m, 6n).
Memory: one block's activations (a few per candidate) at a time. Trajectories are cached on disk
(``modeling.cache_root()/greedy``, keyed by the model's weights and the search settings), written after
every block, so an interrupted search resumes at the first unfinished block and a higher level extends the
recorded trajectory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
RANKS = ("error", "error_per_rise")
#: ``waterfill-greedy``: every block is searched to ``target + WATERFILL_HEADROOM`` and no block goes above it
#: (docs/allocation.md section 6d: chosen on validation at 70 %).
WATERFILL_HEADROOM = 0.1


@dataclass(frozen=True)
class GreedySettings:
    """What a search's result depends on (besides the weights and the text): part of the cache key."""

    mode: str = "topk"
    step: float = DEFAULT_STEP
    s_max: float = 0.99
    samples: int = DEFAULT_SAMPLES
    sequence_length: int = DEFAULT_SEQUENCE_LENGTH
    #: Opt-in cap on one step's sparsity increase of a projection (None, the default: no cap, ``step · P_block / P_i``
    #: for every projection). With a cap, projection i's candidate is ``min(s_i + min(step · P_block / P_i,
    #: max_increment), s_max)``: a coarse ``step`` for the large projections with the small ones (SmolLM2's k / v, 1/32
    #: of a block each) kept at a finer increment (docs/allocation.md section 6c). In the cache key only when set.
    max_increment: float | None = None
    #: How a step ranks its candidates: ``"error"`` (TEAL's rule, the default: the smallest block error) or
    #: ``"error_per_rise"`` (the smallest rise of the block error per unit of the block level the candidate adds; the
    #: same choice where every candidate adds the same level, i.e. without a cap binding). In the cache key only when
    #: not the default.
    rank: str = "error"
    #: Lazy evaluation (Minoux's lazy greedy; opt-in, False by default): a step re-evaluates candidates in the order of
    #: the error rise each had when last evaluated, and takes the first whose fresh rise is still the smallest, fresh or
    #: last known, of all; the others keep their old rises. The same choice as evaluating every candidate wherever a
    #: projection's rise never falls while the others rise (the block error supermodular in the budgets), otherwise
    #: possibly another; fewer products per step (docs/allocation.md section 6i). Only with ``rank="error"``. In the
    #: cache key only when set.
    lazy: bool = False
    #: With ``lazy``: every ``refresh``-th step of a block (counted from the dense row) evaluates every candidate, which
    #: renews every last known rise; 0 (the default): only the first. In the cache key only with ``lazy``.
    refresh: int = 0
    #: 0 (the default): every product in full, so that every candidate's error is that of a full-block forward bit for
    #: bit. Above 0, on CPU (float32), a projection whose rule rises on an input it already ran on is updated from the
    #: entries the rule drops (:meth:`_Input.delta`) instead of recomputed, for the projections whose step drops at most
    #: this fraction of their input's entries (``step · P_block / P_i``: on SmolLM2 4 % for gate / up / down, 11 % for
    #: q / o, 32 % for k / v). The errors then differ from the full products' in float rounding, which can flip a
    #: near-tie between two candidates (docs/allocation.md section 6c). In the cache key only when above 0.
    delta_limit: float = 0.0

    def __post_init__(self) -> None:
        if self.rank not in RANKS:
            raise ActTailError(f"greedy search: rank must be one of {', '.join(RANKS)}, not {self.rank!r}")
        if self.lazy and self.rank != "error":
            raise ActTailError("greedy search: lazy evaluation ranks by the error only (rank=\"error\")")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 0:
            raise ActTailError(f"greedy search: refresh must be an integer >= 0 (0: never), not {self.refresh!r}")
        value = self.delta_limit
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ActTailError(f"greedy search: delta_limit must be a number in [0, 1] (0: every product in full), not {value!r}")
        if self.max_increment is not None:
            value = self.max_increment
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ActTailError(f"greedy search: max_increment must be a number in (0, 1] or None, not {value!r}")

    def increments(self, params: np.ndarray) -> np.ndarray:
        """One step's sparsity increase per projection (``params``: parameter counts of the block's projections)."""
        steps = self.step * params.sum() / params
        if self.max_increment is not None:
            steps = np.minimum(steps, self.max_increment)
        return steps

    def key(self) -> dict:
        """The settings as a cache key: ``max_increment`` only when set, so that uncapped searches keep the key (and
        the cached trajectories) they had before the cap existed."""
        out = asdict(self)
        if out["max_increment"] is None:
            del out["max_increment"]
        if out["rank"] == "error":
            del out["rank"]
        if not out["lazy"]:
            del out["lazy"], out["refresh"]
        if not out["delta_limit"]:
            del out["delta_limit"]
        return out


#: The search behind ``waterfill-greedy`` in top-k mode (the default's 65-85 %, ``config.DEFAULT_POLICY``): lazy with
#: every third step in full, the products of the projections whose step drops at most 20 % of their input updated
#: (docs/allocation.md section 6k: within 0.3 % / 7.6 % below the full search at 70 / 80 % on validation, 241.6 s
#: against 464.6 s at 80 % on the 2-core CPU).
FAST_SEARCH = {"lazy": True, "refresh": 3, "delta_limit": 0.2}
#: TEAL's search (``teal-greedy``, the default's 40-65 % in top-k mode, 50-65 % in threshold mode) in both modes, and the
#: combination's (``acttail-greedy``, the threshold default's 70-90 %) in threshold mode: every candidate of every step
#: evaluated (TEAL's rule), the same products updated (errors that differ from the full products' in float rounding
#: only; section 6k: the default's top-k validation rows at 40-60 % unchanged, 257.0 s to 60 %; section 6m: its threshold
#: rows at 50 / 60 % unchanged, 187.4 s to 60 %; section 6n: the combination's threshold rows at 70-90 % unchanged, 244.0 s
#: at 80 % against 399.5 s in full). The combination's lazy search failed in threshold mode (section 6m).
TEAL_SEARCH = {"delta_limit": 0.2}
#: Per mode, the search settings of the methods that do not search in full by default (measured where they were adopted).
_DEFAULT_SEARCH = {"topk": {"teal-greedy": TEAL_SEARCH, "waterfill-greedy": FAST_SEARCH},
                   "threshold": {"teal-greedy": TEAL_SEARCH, "acttail-greedy": TEAL_SEARCH}}


def default_settings(method: str, mode: str) -> GreedySettings:
    """The search settings an allocation ``method`` (``config.ALLOCATION_METHODS``) runs with in ``mode`` when none are
    given."""
    return GreedySettings(mode=mode, **_DEFAULT_SEARCH.get(mode, {}).get(method, {}))


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
    """Masking rule of one projection: ``k`` (top-k) or ``threshold``; None = identity."""

    def __init__(self) -> None:
        self.k: int | None = None
        self.threshold: float | None = None

    def __call__(self, module, args):  # forward pre-hook of the full-block forward
        x = args[0]
        if self.k is not None:
            x = mask_topk(x, self.k)
        elif self.threshold is not None:
            x = x * (x.abs() > self.threshold)
        return (x, *args[1:])


#: per thread: the q / k / v outputs the attention module reads instead of running its projections (None: run them)
_LOCAL = threading.local()
_POOL: ThreadPoolExecutor | None = None
_POOL_WORKERS = 0  # the size _POOL was created with


def _pool(workers: int) -> ThreadPoolExecutor:
    """The module's thread pool, grown (replaced) when a search needs more workers than it has."""
    global _POOL, _POOL_WORKERS
    if _POOL is None or _POOL_WORKERS < workers:
        _POOL = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="acttail-greedy")
        _POOL_WORKERS = workers
    return _POOL


class _Input:
    """A projection input of one state of the block, with what its masks need: |x| and, for top-k, |x| sorted per
    token (once, on the first top-k mask; rules only rise, so later masks of this input reuse it), and per projection
    the last product computed on it (``outputs``: kind -> (rule, output)), from which a sparser rule's product is
    updated (:meth:`delta`)."""

    __slots__ = ("x", "abs", "sorted", "outputs")

    def __init__(self, x: torch.Tensor):
        self.x = x
        self.abs: torch.Tensor | None = None
        self.sorted: torch.Tensor | None = None
        self.outputs: dict[str, tuple] = {}

    def _sort(self) -> torch.Tensor:
        """|x| sorted per token (ascending), computed once."""
        if self.sorted is None:
            d = self.x.shape[-1]
            if self.abs is None:
                self.abs = self.x.abs()
            flat = self.abs.reshape(-1, d)
            if flat.device.type == "cpu" and flat.dtype == torch.float32:
                # numpy's vectorized sort is several times faster than torch.sort; |x| >= 0, so its float32 bits sort
                # as int32 in the same order (a little faster still)
                self.sorted = flat.clone()
                self.sorted.numpy().view(np.int32).sort(axis=-1)
            else:
                self.sorted = torch.sort(flat, dim=-1).values
        return self.sorted

    def _tied(self, k: int) -> torch.Tensor | None:
        """Per token, whether its k-th and (k+1)-th largest |x| tie (None for k outside (0, d): no tie to break)."""
        d = self.x.shape[-1]
        if k <= 0 or k >= d:
            return None
        sorted_ = self._sort()
        return sorted_[:, d - k - 1] == sorted_[:, d - k]

    def mask(self, rule, mode: str, out: torch.Tensor) -> torch.Tensor:
        """The input under ``rule`` (top-k ``k`` or threshold; None = unmasked), bit for bit what the ``sparsify``
        masks give (``mask_topk``; ``x * (|x| > t)``), written into ``out`` where it is masked."""
        x = self.x
        if rule is None:
            return x
        if mode == "topk" and (rule >= x.shape[-1] or rule <= 0):
            return mask_topk(x, rule)
        if self.abs is None:
            self.abs = x.abs()
        if mode != "topk":
            return torch.gt(self.abs, rule, out=out).mul_(x)
        # the k largest |x| of a token are those at or above its k-th largest whenever the k-th and (k+1)-th largest
        # differ (the top-k set is then unique); a token where they tie takes mask_topk's own choice
        d, k = x.shape[-1], rule
        kth = self._sort()[:, d - k]
        out = torch.ge(self.abs, kth.view(*x.shape[:-1], 1), out=out).mul_(x)
        tied = self._tied(k)
        if bool(tied.any()):
            rows = tied.nonzero().flatten()
            out.view(-1, d)[rows] = mask_topk(x.reshape(-1, d)[rows], k)
        return out

    def _rows_masked(self, rows: torch.Tensor, rule, mode: str) -> torch.Tensor:
        """The tokens ``rows`` (flat indices) under ``rule``, as :meth:`mask` gives them."""
        x = self.x.reshape(-1, self.x.shape[-1])[rows]
        return _Input(x).mask(rule, mode, torch.empty_like(x))

    def delta(self, old, rule, mode: str, weight_t: torch.Tensor) -> torch.Tensor | None:
        """``linear(x under rule) − linear(x under old)`` (no bias) for a ``rule`` at least as sparse as ``old``: the
        product of ``weight_t`` (``weight.T``) with the entries the two masks differ in, a few per token (an
        EmbeddingBag sum per token, each token on its own). None when ``rule`` is less sparse than ``old``. CPU float32
        only (the masks' bits are compared as int32, as in :meth:`_sort`)."""
        x, d = self.x, self.x.shape[-1]
        if self.abs is None:
            self.abs = x.abs()
        magnitude = self.abs.reshape(-1, d).numpy().view(np.int32)  # |x| >= 0: its bits order as int32 like the floats
        tied = None
        if mode == "topk":
            k_old = d if old is None else min(max(old, 0), d)
            k_new = d if rule is None else min(max(rule, 0), d)
            if k_new > k_old:
                return None
            if k_new == k_old:
                return x.new_zeros(*x.shape[:-1], weight_t.shape[1])
            # dropped: among the k_old largest |x| of a token but not the k_new largest, i.e. kth(k_old) <= |x| <
            # kth(k_new), where neither rank ties (those tokens take mask_topk's choice: below)
            sorted_ = None if k_old == d and k_new == 0 else self._sort().numpy().view(np.int32)
            if k_old == d:
                band = magnitude < sorted_[:, d - k_new : d - k_new + 1] if k_new > 0 else np.ones_like(magnitude, dtype=bool)
            elif k_new == 0:
                band = magnitude >= sorted_[:, d - k_old : d - k_old + 1]
            else:  # lo <= m < hi as one unsigned comparison (0 <= lo <= hi)
                lo, hi = sorted_[:, d - k_old : d - k_old + 1], sorted_[:, d - k_new : d - k_new + 1]
                band = (magnitude - lo).view(np.uint32) < (hi - lo).view(np.uint32)
            for k in (k_old, k_new):
                t = self._tied(k)
                if t is not None:
                    tied = t if tied is None else tied | t
            if tied is not None and bool(tied.any()):
                tied = tied.nonzero().flatten()
                band[tied.numpy()] = False
            else:
                tied = None
        else:
            if rule is None or (old is not None and rule < old):
                return None
            # dropped: old < |x| <= rule, compared as mask() does (float32 against the scalar)
            flat_abs = self.abs.reshape(-1, d)
            band = torch.le(flat_abs, rule)
            if old is not None:
                band &= torch.gt(flat_abs, old)
            band = band.numpy()
        flat = np.flatnonzero(band)
        values = np.negative(x.reshape(-1).numpy()[flat])
        if tied is not None:  # tokens with a tie at either rank: the difference of their two masks as mask() gives them
            diff = self._rows_masked(tied, rule, mode) - self._rows_masked(tied, old, mode)
            r, c = diff.nonzero(as_tuple=True)
            flat = np.concatenate([flat, (tied[r] * d + c).numpy()])
            values = np.concatenate([values, diff[r, c].numpy()])
            order = np.argsort(flat, kind="stable")
            flat, values = flat[order], values[order]
        tokens = band.shape[0]
        offsets = np.searchsorted(flat, np.arange(tokens, dtype=np.int64) * d)
        out = torch.nn.functional.embedding_bag(torch.from_numpy(flat % d), weight_t, torch.from_numpy(offsets), mode="sum",
                                                per_sample_weights=torch.from_numpy(values))
        return out.view(*x.shape[:-1], weight_t.shape[1])


def _batch_rows(value, rows: slice, batch: int):
    """``value`` (a layer keyword argument) restricted to the sequences ``rows``: tensors (or tuples of them) with at
    least two dimensions whose first one is the batch are sliced, anything else is kept."""
    if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value[rows]
    if isinstance(value, tuple):
        return tuple(_batch_rows(v, rows, batch) for v in value)
    return value


class _Shard:
    """The search's block on some of the calibration sequences: its memo of intermediate tensors, keyed by rules.

    Every tensor of the block is a function of the rules of the projections upstream of it (``_DEPENDS``): the q /
    k / v outputs of their own rule (their input, the normed block input, is fixed), the attention output of
    (q, k, v), the residual sum and the MLP input of (q, k, v, o), the gate / up outputs of those and their own
    rule, the down input of (q, k, v, o, gate, up), the block output of all seven. A candidate computes only the
    tensors whose key no candidate has computed yet: after a down step, for instance, every candidate's down input
    is the one of the step before and only down_proj runs again. Every op acts on each token (attention: on each
    sequence) on its own, so the shards' rows equal those of the whole batch, bit for bit.
    """

    _DEPENDS = {"q": (0,), "k": (1,), "v": (2,), "attn": (0, 1, 2), "mid": (0, 1, 2, 3), "gate": (0, 1, 2, 3, 4),
                "up": (0, 1, 2, 3, 5), "act": (0, 1, 2, 3, 4, 5), "out": (0, 1, 2, 3, 4, 5, 6)}

    def __init__(self, search: "BlockSearch", rows: slice, attn_kwargs: dict):
        batch = search.hidden.shape[0]
        self.search, self.mode = search, search.settings.mode
        self.hidden, self.target = search.hidden[rows], search.target[rows]
        self.normed = _Input(search._inputs["q_proj"][rows])  # input of q / k / v: the same in every state
        self.attn_kwargs = {k: _batch_rows(v, rows, batch) for k, v in attn_kwargs.items()}
        self.memo: dict[tuple, object] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        # the dense forward's tensors (its rules: none) start the memo: the first step's candidates read them
        view, keys = search._view, search._view["keys"]

        def put(name, value):
            self.memo[(name, *(keys[i] for i in self._DEPENDS[name]))] = value

        def seed(data: _Input, kind: str, output: torch.Tensor) -> None:  # a dense product, the base of its updates
            if search.weight_t(kind) is not None:
                data.outputs[kind] = (None, output)

        for kind in ("q_proj", "k_proj", "v_proj"):
            put(kind[0], view["outputs"][kind][rows])
            seed(self.normed, kind, view["outputs"][kind][rows])
        attn = _Input(view["inputs"]["o_proj"][rows])
        put("attn", attn)
        normed_mid = _Input(view["inputs"]["gate_proj"][rows])
        put("mid", (view["mid"][rows], normed_mid, attn))
        gate, up = view["outputs"]["gate_proj"][rows], view["outputs"]["up_proj"][rows]
        seed(normed_mid, "gate_proj", gate)
        seed(normed_mid, "up_proj", up)
        put("gate", gate)
        put("up", up)
        put("act", (_Input(view["inputs"]["down_proj"][rows]), gate, up))

    def _memoized(self, name: str, keys: tuple, compute):
        key = (name, *(keys[i] for i in self._DEPENDS[name]))
        value = self.memo.get(key)
        if value is None:
            value = self.memo[key] = compute()
        return value

    def evict(self, live: set) -> None:
        self.memo = {key: value for key, value in self.memo.items() if key in live}

    def _linear(self, kind: str, data: _Input, keys: tuple) -> torch.Tensor:
        """The projection ``kind`` of ``data`` under its rule in ``keys``: updated from the product of a less sparse rule
        on the same input when one was computed (the few entries the rule drops, :meth:`_Input.delta`), else in full."""
        rule = keys[PROJECTION_KINDS.index(kind)]
        weight_t = self.search.weight_t(kind)
        base = data.outputs.get(kind) if weight_t is not None else None
        delta = None if base is None else data.delta(base[0], rule, self.mode, weight_t)
        if delta is not None:
            out = base[1] + delta
        else:
            x = data.x
            buffer = self._buffers.get(x.shape[-1])  # the masked input lives only until its projection has run
            if buffer is None or buffer.shape != x.shape:
                buffer = self._buffers[x.shape[-1]] = torch.empty_like(x)
            out = self.search.modules[kind](data.mask(rule, self.mode, buffer))
        if weight_t is not None:
            data.outputs[kind] = (rule, out)
        return out

    def _attention(self, keys: tuple) -> _Input:
        """o_proj's input: the attention module's own forward, its q / k / v projections replaced by the memoized
        outputs of ``keys`` and o_proj by the identity (``BlockSearch._route``)."""
        _LOCAL.projections = {kind: self._memoized(kind[0], keys, lambda kind=kind: self._linear(kind, self.normed, keys))
                              for kind in ("q_proj", "k_proj", "v_proj")}
        try:
            result = self.search.layer.self_attn(**{**self.attn_kwargs, "hidden_states": self.normed.x})
        finally:
            _LOCAL.projections = None
        return _Input(result[0] if isinstance(result, tuple) else result)

    def mid(self, keys: tuple) -> tuple[torch.Tensor, _Input, _Input]:
        """(residual sum after attention, MLP input, o_proj's input)."""
        def compute():
            attn = self._memoized("attn", keys, lambda: self._attention(keys))
            mid = self.hidden + self._linear("o_proj", attn, keys)
            return mid, _Input(self.search.layer.post_attention_layernorm(mid)), attn
        return self._memoized("mid", keys, compute)

    def act(self, keys: tuple) -> tuple[_Input, torch.Tensor, torch.Tensor]:
        """(down_proj's input, LlamaMLP's ``act(gate(h)) * up(h)``; the gate output; the up output)."""
        def compute():
            h = self.mid(keys)[1]
            gate = self._memoized("gate", keys, lambda: self._linear("gate_proj", h, keys))
            up = self._memoized("up", keys, lambda: self._linear("up_proj", h, keys))
            act = self.search.layer.mlp.act_fn(gate)
            return _Input(act * up if act is gate else act.mul_(up)), gate, up  # (in place: one allocation less)
        return self._memoized("act", keys, compute)

    def output(self, keys: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """(block output, per token the L2 distance to the dense output in float64) under the rules ``keys``."""
        def compute():
            out = self.mid(keys)[0] + self._linear("down_proj", self.act(keys)[0], keys)
            return out, (out - self.target).double().norm(dim=-1)
        return self._memoized("out", keys, compute)

    def distances(self, candidates: list[tuple], threads: int | None = None) -> list[torch.Tensor]:
        """Per candidate (a tuple of rules), the per-token distances. ``threads``: torch threads of this (pool)
        thread; inference mode is per thread, so it is entered here."""
        if threads is not None:
            torch.set_num_threads(threads)
        with torch.inference_mode():
            return [self.output(keys)[1] for keys in candidates]


class BlockSearch:
    """Greedy state of one decoder block: current budgets and rules, and the memo of the block's tensors.

    On CPU the block's calibration sequences are split into shards, as many as torch threads (at most one per
    sequence), each evaluated in a thread of its own with its share of the threads (one, at the default two threads
    and eight sequences) and its own memo (:class:`_Shard`). The masks' sorts run in numpy, in the calling thread:
    one shard per core gives them every core (next to one multi-threaded torch run they would get one, torch's idle
    workers spinning on the other), and the shards need no synchronization inside a step. A candidate's error is
    the mean over all tokens of the shards' per-token distances, the same float64 reduction as over the whole batch.
    """

    def __init__(self, layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, settings: GreedySettings):
        self.layer, self.hidden, self.kwargs, self.settings = layer, hidden, kwargs, settings
        self.modules = {kind: getattr(getattr(layer, PROJECTION_PARENT[kind]), kind) for kind in PROJECTION_KINDS}
        self.params = np.array([m.in_features * m.out_features for m in self.modules.values()], dtype=np.float64)
        self.rules = {kind: _Rule() for kind in PROJECTION_KINDS}
        self.sparsity = np.zeros(len(PROJECTION_KINDS))
        self._error: float | None = 0.0  # block error of the current rules (None: not known yet)
        self._rises: dict[int, float] = {}  # lazy evaluation: each projection's error rise when last evaluated
        self._steps = 0  # steps from the dense row to the current state
        self._sorted: dict[str, torch.Tensor] = {}
        self._view: dict | None = None
        self._shards: list[_Shard] = []
        self.target = self.forward(capture=True)  # dense output (no rule set yet) and the dense inputs
        if settings.mode == "threshold":
            self._sorted = {k: torch.sort(self._inputs[k].abs().flatten()).values for k in ("q_proj", "o_proj", "gate_proj", "down_proj")}
        batch, threads = hidden.shape[0], torch.get_num_threads()
        shards = max(1, min(threads, batch)) if hidden.device.type == "cpu" else 1
        self._shard_threads = max(1, threads // shards)
        fractions = settings.increments(self.params)  # of a projection's input a step drops
        self._weights_t = {kind: self._weight_t(module) if fraction <= settings.delta_limit else None
                           for (kind, module), fraction in zip(self.modules.items(), fractions)}
        bounds = np.linspace(0, batch, shards + 1).astype(int)
        self._shards = [_Shard(self, slice(int(a), int(b)), self._attn_kwargs) for a, b in zip(bounds[:-1], bounds[1:])]
        self._routed: dict[str, object] = {}
        self._route()

    def _weight_t(self, module: torch.nn.Module) -> torch.Tensor | None:
        """``weight.T`` of a projection (contiguous) for :meth:`_Input.delta`, or None where its products are always
        computed in full: off the CPU, not float32, updates turned off (``delta_limit`` 0), or a weight that is not a
        plain parameter here (e.g. offloaded by accelerate's hooks)."""
        weight = getattr(module, "weight", None)
        usable = (self.settings.delta_limit > 0 and type(module) is torch.nn.Linear and isinstance(weight, torch.Tensor)
                  and weight.device.type == "cpu" and weight.dtype == torch.float32 and self.hidden.device.type == "cpu"
                  and self.hidden.dtype == torch.float32 and getattr(module, "_hf_hook", None) is None)
        return weight.detach().t().contiguous() if usable else None

    def weight_t(self, kind: str) -> torch.Tensor | None:
        return self._weights_t[kind]

    def _route(self) -> None:
        """Let the attention module read the q / k / v outputs a shard sets in ``_LOCAL`` (and skip o_proj) while it
        does; otherwise the projections run as before (an instance ``forward`` set by others, e.g. accelerate's
        offload hooks, is kept and restored)."""
        for kind in ("q_proj", "k_proj", "v_proj", "o_proj"):
            module = self.modules[kind]
            self._routed[kind] = module.__dict__.get("forward")
            original = module.forward

            def forward(x, kind=kind, original=original):
                given = getattr(_LOCAL, "projections", None)
                if given is None:
                    return original(x)
                return x if kind == "o_proj" else given[kind]

            module.forward = forward

    def close(self) -> None:
        for kind, previous in self._routed.items():
            if previous is None:
                del self.modules[kind].forward
            else:
                self.modules[kind].forward = previous
        self._routed = {}
        for shard in self._shards:
            shard.memo.clear()

    # --- full-block forward (hooks) -------------------------------------------------------------------
    def forward(self, capture: bool = False) -> torch.Tensor:
        """Full block output under the current rules, by the layer's own forward with masking hooks; the state
        tensors (``_inputs``, ``_outputs``, ``_mid``) are then this forward's."""
        inputs, outputs = {}, {}

        def record(kind):
            def hook(module, args):
                inputs[kind] = args[0]
            return hook

        def record_output(kind):
            def hook(module, args, output):
                outputs[kind] = output
            return hook

        def record_attn(module, args, kwargs):
            self._attn_kwargs = dict(kwargs)

        handles = [self.layer.self_attn.register_forward_pre_hook(record_attn, with_kwargs=True)] if capture else []
        handles += [self.modules[k].register_forward_pre_hook(record(k)) for k in ("q_proj", "o_proj", "gate_proj", "down_proj")]
        handles += [m.register_forward_pre_hook(self.rules[kind]) for kind, m in self.modules.items()]
        handles += [self.modules[k].register_forward_hook(record_output(k)) for k in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")]
        try:
            out = self.layer(self.hidden, **self.kwargs)
            out = out[0] if isinstance(out, tuple) else out
            mid = self.hidden + self.modules["o_proj"](inputs["o_proj"])
        finally:
            for handle in handles:
                handle.remove()
        self._view = {"mid": mid, "inputs": inputs, "outputs": outputs, "keys": self._keys()}
        return out

    # --- state tensors ------------------------------------------------------------------------------------
    def _state(self) -> dict:
        if self._view is None:
            keys = self._keys()
            parts = [(shard.mid(keys), shard.act(keys), shard.normed.x) for shard in self._shards]
            cat = (lambda ts: ts[0]) if len(parts) == 1 else (lambda ts: torch.cat(ts))
            self._view = {
                "mid": cat([m[0] for m, _, _ in parts]),
                "inputs": {"q_proj": cat([n for _, _, n in parts]), "o_proj": cat([m[2].x for m, _, _ in parts]),
                           "gate_proj": cat([m[1].x for m, _, _ in parts]), "down_proj": cat([a[0].x for _, a, _ in parts])},
                "outputs": {"gate_proj": cat([a[1] for _, a, _ in parts]), "up_proj": cat([a[2] for _, a, _ in parts])},
            }
        return self._view

    @property
    def _mid(self) -> torch.Tensor:
        return self._state()["mid"]

    @property
    def _inputs(self) -> dict[str, torch.Tensor]:
        """Raw (pre-mask) inputs of q_proj (= k, v), o_proj, gate_proj (= up) and down_proj in the current state."""
        return self._state()["inputs"]

    @property
    def _outputs(self) -> dict[str, torch.Tensor]:
        """gate_proj / up_proj outputs in the current state."""
        return self._state()["outputs"]

    def _keys(self) -> tuple:
        """The current rules, one hashable key per projection (PROJECTION_KINDS order)."""
        return tuple(rule.k if self.settings.mode == "topk" else rule.threshold for rule in self.rules.values())

    def _distances(self, candidates: list[tuple]) -> list[torch.Tensor]:
        """Per candidate (a tuple of rules), the per-token distances to the dense output over all shards."""
        if len(self._shards) == 1:
            return self._shards[0].distances(candidates)
        threads = torch.get_num_threads()
        torch.set_num_threads(self._shard_threads)  # what a pool thread starting now inherits
        try:
            parts = list(_pool(len(self._shards)).map(lambda shard: shard.distances(candidates, self._shard_threads),
                                                      self._shards))
        finally:
            torch.set_num_threads(threads)
        return [torch.cat([part[j] for part in parts]) for j in range(len(candidates))]

    def commit(self) -> None:
        """Make the state tensors (``_inputs``, ``_outputs``, ``_mid``) those of the rules as set (memoized: computed
        only where no candidate computed them)."""
        self._view = None
        self._state()

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
        steps = self.settings.increments(self.params)
        out = []
        for i, s in enumerate(self.sparsity):
            if s < self.settings.s_max - 1e-12:
                out.append((i, min(self.settings.s_max, s + steps[i])))
        return out

    def _candidate_keys(self) -> list[tuple[int, tuple]]:
        """(projection index, the rules with that projection raised) for every candidate of the current state."""
        out = []
        for i, value in self.candidates():
            old = self.sparsity[i]
            self.set_sparsity(i, value)
            out.append((i, self._keys()))
            self.set_sparsity(i, old)
        return out

    def current_error(self) -> float:
        """The block error of the rules as set (0 while every projection is dense)."""
        if not np.any(self.sparsity > 0):
            return 0.0
        return float(self._distances([self._keys()])[0].mean())

    def _lazy_errors(self, candidates: list[tuple[int, tuple]]) -> list[float]:
        """:attr:`GreedySettings.lazy`: the errors of the candidates a lazy step evaluates (inf for the others, whose
        last known rise is not below the chosen one's fresh rise); the chosen candidate has the smallest error of
        the returned list, ties to the lowest index as in a full step."""
        keys = dict(candidates)
        missing = [i for i in keys if i not in self._rises]
        refresh = self.settings.refresh
        if self._error is None:
            self._error = self.current_error()
        if missing or (refresh and self._steps % refresh == 0):
            # the first step, a projection not evaluated yet, or a refresh: every candidate, as a full step
            errors = self._full_errors(candidates)
            self._rises.update({i: errors[i] - self._error for i in keys})
            return errors
        errors = [float("inf")] * len(PROJECTION_KINDS)
        fresh: set[int] = set()
        while True:
            i = min(keys, key=lambda j: (self._rises[j], j))
            if i in fresh:
                break
            errors[i] = float(self._distances([keys[i]])[0].mean())
            self._rises[i] = errors[i] - self._error
            fresh.add(i)
        # every other fresh candidate has a larger error, or the same error and a higher index: np.argmin picks i
        return errors

    def _full_errors(self, candidates: list[tuple[int, tuple]]) -> list[float]:
        """Every candidate's error (PROJECTION_KINDS order; inf for a projection at s_max)."""
        errors = [float("inf")] * len(PROJECTION_KINDS)
        for (i, _), distances in zip(candidates, self._distances([keys for _, keys in candidates])):
            errors[i] = float(distances.mean())
        return errors

    def step(self) -> tuple[int, float, list[float]]:
        """One greedy step: (chosen index, its error, every candidate's error in PROJECTION_KINDS order, inf if skipped
        or, with lazy evaluation, not evaluated)."""
        candidates = self._candidate_keys()
        errors = self._lazy_errors(candidates) if self.settings.lazy else self._full_errors(candidates)
        scores, raised = errors, dict(self.candidates())
        if self.settings.rank == "error_per_rise":
            if self._error is None:
                self._error = self.current_error()
            total = self.params.sum()
            scores = [e if not np.isfinite(e) else (e - self._error) / ((raised[i] - self.sparsity[i]) * self.params[i] / total)
                      for i, e in enumerate(errors)]
        best = int(np.argmin(scores))
        if not np.isfinite(errors[best]):
            raise ActTailError("greedy search: every projection is at s_max; lower the level")
        self._error = errors[best]
        self._steps += 1
        self.sparsity[best] = raised[best]
        self.set_sparsity(best, self.sparsity[best])
        self._view = None
        # drop the memo entries that neither the new state nor its candidates read (rules only rise: they do not
        # come back)
        live = set()
        for keys in [self._keys()] + [keys for _, keys in self._candidate_keys()]:
            live.update((name, *(keys[i] for i in depends)) for name, depends in _Shard._DEPENDS.items())
        for shard in self._shards:
            shard.evict(live)
        return best, errors[best], errors

    def run(self, trajectory: list[list[float]], max_level: float, errors: list[float] | None = None,
            rises: dict[int, float] | None = None) -> list[list[float]]:
        """Extend ``trajectory`` (rows of 7 budgets, starting at zeros) until its level reaches ``max_level``;
        ``errors`` (one per row, the block error of that state: 0 for the dense first row) is extended alongside.
        ``rises`` (lazy evaluation): the projections' last known error rises at the trajectory's end, read and updated
        in place, so that extending a trajectory makes the choices of one search run to the higher level."""
        if not trajectory:
            trajectory = [[0.0] * len(PROJECTION_KINDS)]
        if errors is not None and not errors:
            errors.append(0.0)
        self.sparsity = np.array(trajectory[-1], dtype=np.float64)
        self._steps = len(trajectory) - 1
        for i, value in enumerate(self.sparsity):
            self.set_sparsity(i, value)
        self._view = None
        self._error = errors[-1] if errors else None
        if rises is not None:
            self._rises = rises
        with torch.inference_mode():
            while self.level() < max_level - 1e-12:
                _, error, _ = self.step()
                trajectory.append(self.sparsity.tolist())
                if errors is not None:
                    errors.append(error)
        return trajectory


def budgets_at(trajectory: list[list[float]], params: np.ndarray, target: float) -> np.ndarray:
    """Budgets of the trajectory at block level ``target`` exactly (the crossing step's projection interpolated).

    A step raises one projection only, by however much (a full ``step · P_block / P_i``, one capped at
    ``max_increment`` or at ``s_max``): the crossing step's projection is set so that the block's weighted sparsity is
    the target, which lies between its budgets of the two rows."""
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


def waterfill_targets(levels: list[np.ndarray], errors: list[np.ndarray], weights: np.ndarray, target: float,
                      max_level: float | None = None) -> np.ndarray:
    """Block levels whose weighted mean is ``target``, spent where the recorded block errors rise least.

    The cross-block analogue of the in-block search, on its recorded curves: ``levels[b]`` / ``errors[b]`` are block
    b's trajectory (its level and block error at every row, from the dense row on), ``weights`` the blocks' parameter
    counts. All blocks start dense; each move advances the block whose next recorded row costs the least error per unit
    of the weighted mean level, until that mean reaches ``target`` (the last move is cut at the target, as
    :func:`budgets_at` cuts a step): on convex curves the smallest total error at the target. ``max_level``: no block
    goes above it. Pure maths: numbers in, per-block levels out."""
    import heapq

    weights = np.asarray(weights, dtype=np.float64)
    share = weights / weights.sum()
    curves = [(np.asarray(lv, dtype=np.float64), np.asarray(er, dtype=np.float64)) for lv, er in zip(levels, errors)]
    if len(curves) != len(share):
        raise ActTailError(f"waterfill: {len(curves)} curves for {len(share)} blocks")
    cap = np.inf if max_level is None else max_level + 1e-12
    pos = [0] * len(curves)
    heap: list[tuple[float, int]] = []

    def push(b: int) -> None:
        lv, er = curves[b]
        j = pos[b] + 1
        if j < len(lv) and lv[j] <= cap:
            heapq.heappush(heap, ((er[j] - er[j - 1]) / max((lv[j] - lv[j - 1]) * share[b], 1e-12), b))

    for b in range(len(curves)):
        push(b)
    mean = 0.0
    out = np.zeros(len(curves))
    while mean < target - 1e-12:
        if not heap:
            raise ActTailError(f"waterfill: the recorded trajectories reach a mean level of {mean:.4f} < target "
                               f"{target:.4f}: search to a higher level")
        _, b = heapq.heappop(heap)
        lv = curves[b][0]
        rise = (lv[pos[b] + 1] - lv[pos[b]]) * share[b]
        if mean + rise >= target - 1e-12:
            out[b] = lv[pos[b]] + (target - mean) / share[b]
            mean = target
            break
        pos[b] += 1
        out[b] = lv[pos[b]]
        mean += rise
        push(b)
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
    path = key = None
    if cache_dir is not False:  # the key hashes every weight (a second on a 135M model): only for the cache
        key = {"version": CACHE_VERSION, "settings": settings.key(), "model": model_digest(model),
               "windows": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()}
        path = _cache_path(Path(cache_dir) if cache_dir else default_cache_dir(), key)
    cached = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    trajectories = {int(k): v for k, v in cached.get("trajectories", {}).items()}
    seconds = {int(k): v for k, v in cached.get("seconds", {}).items()}
    # per block, the error of every trajectory row and the mean norm of the dense output (a block cached before they
    # were recorded is searched again)
    errors = {int(k): v for k, v in cached.get("errors", {}).items()}
    scales = {int(k): v for k, v in cached.get("scales", {}).items()}
    # lazy evaluation: per block, the projections' last known error rises at the trajectory's end
    rises = {int(k): {int(i): r for i, r in v.items()} for k, v in cached.get("rises", {}).items()}
    hidden, kwargs = block_inputs(model, windows)
    bar = tqdm(range(len(layers)), desc="greedy allocation", unit="block", disable=not progress)
    for index in bar:
        with torch.inference_mode():
            block = BlockSearch(layers[index], hidden, kwargs, settings)
            try:
                rows = trajectories.get(index, [])
                errs = errors.get(index, []) if rows else []
                if len(errs) != len(rows) or (settings.lazy and rows and index not in rises):
                    # a block cached before its errors were recorded (the same rows, with errors), or a lazy search's
                    # block without its last known rises: searched again
                    rows, errs = [], []
                    seconds.pop(index, None)
                    rises.pop(index, None)
                reached = block.level(np.asarray(rows[-1])) if rows else 0.0
                scales[index] = float(block.target.double().norm(dim=-1).mean())
                if reached < wanted[index] - 1e-12:
                    start = time.perf_counter()
                    trajectories[index] = block.run(rows, wanted[index], errs,
                                                    rises.setdefault(index, {}) if settings.lazy else None)
                    errors[index] = errs
                    seconds[index] = seconds.get(index, 0.0) + time.perf_counter() - start
                    if path is not None:
                        payload = {"key": key, "trajectories": trajectories, "seconds": seconds, "errors": errors,
                                   "scales": scales}
                        _write_atomic(path, payload | ({"rises": rises} if settings.lazy else {}))
                hidden = block.target  # the next block reads the dense output
            finally:
                block.close()
    if path is not None:
        logger.info("greedy trajectories cached in %s", path)
    search.seconds = sum(seconds.values())  # search time of these trajectories, cached blocks included
    return Trajectories(trajectories, errors=errors, scales=scales)


def _block_params(layer: torch.nn.Module) -> np.ndarray:
    """Parameter counts of a block's projections, in PROJECTION_KINDS order."""
    return np.array([getattr(getattr(layer, PROJECTION_PARENT[k]), k).weight.numel() for k in PROJECTION_KINDS],
                    dtype=np.float64)


class Trajectories(dict):
    """The search's result: block index -> rows of 7 budgets, plus per block ``errors`` (the block error of every row)
    and ``scales`` (the dense block output's mean token norm), which :func:`waterfill_levels` reads."""

    def __init__(self, rows: dict, errors: dict | None = None, scales: dict | None = None):
        super().__init__(rows)
        self.errors, self.scales = dict(errors or {}), dict(scales or {})
        #: allocation method -> the trajectories of the search it runs, where :func:`search_for` ran several
        self.methods: dict[str, Trajectories] = {}

    def for_method(self, method: str) -> "Trajectories":
        """The trajectories of the search ``method`` runs (these, unless :func:`search_for` ran another one for it)."""
        return self.methods.get(method, self)


def waterfill_levels(model: torch.nn.Module, trajectories: dict, target: float,
                     headroom: float = WATERFILL_HEADROOM, weighting: str = "rel") -> list[float]:
    """Block levels of ``waterfill-greedy`` at ``target``: :func:`waterfill_targets` on each block's recorded errors
    relative to its dense output's mean norm (``rel``, docs/allocation.md section 6d; ``abs``: the errors as recorded,
    measured only), no block above ``target + headroom``."""
    errors, scales = getattr(trajectories, "errors", {}), getattr(trajectories, "scales", {})
    levels, curves, weights = [], [], []
    for index, layer in enumerate(model.model.layers):
        params = _block_params(layer)
        rows = trajectories[index]
        if len(errors.get(index, [])) != len(rows) or index not in scales:
            raise ActTailError(f"waterfill-greedy: block {index} of the trajectories has no recorded block errors: pass "
                               "the result of greedy.search / greedy.search_for")
        levels.append(np.asarray(rows, dtype=np.float64) @ params / params.sum())
        curves.append(np.asarray(errors[index], dtype=np.float64) / (scales[index] if weighting == "rel" else 1.0))
        weights.append(params.sum())
    return [float(v) for v in waterfill_targets(levels, curves, np.array(weights), target, max_level=target + headroom)]


def greedy_budgets(model: torch.nn.Module, trajectories: dict[int, list[list[float]]], targets: list[float]) -> dict[str, float]:
    """Per-projection budget (by module name) with block ``l`` at level ``targets[l]``."""
    from .config import projection_name

    out = {}
    for index, layer in enumerate(model.model.layers):
        params = _block_params(layer)
        row = budgets_at(trajectories[index], params, targets[index])
        out.update({projection_name(index, kind): float(v) for kind, v in zip(PROJECTION_KINDS, row)})
    return out


def search_windows(tokenizer, allocation: str, sparsities: list[float], mode: str, data: str | Path | None,
                   settings: GreedySettings | None = None) -> list[tuple[GreedySettings, list[float], set[str], torch.Tensor]]:
    """The searches that ``allocation`` needs at ``sparsities`` (one per distinct setting, see :func:`search_for`), each
    with its token windows of ``data``: [(settings, targets, methods, windows)]. A text too short for one of them
    raises the one-line ActTailError that names the search's needs (the exporter calls this before its long stages)."""
    from .allocation import resolve_allocation
    from .config import GREEDY_ALLOCATIONS
    from .data import DEFAULT_CALIBRATION_DATA, EXPORT_CALIBRATION_FLAGS, read_text, token_windows

    groups: dict[GreedySettings, tuple[list[float], set[str]]] = {}
    for target in sparsities:
        method = resolve_allocation(allocation, target, mode)
        if method in GREEDY_ALLOCATIONS:
            targets, methods = groups.setdefault(settings or default_settings(method, mode), ([], set()))
            targets.append(target)
            methods.add(method)
    if not groups:  # no target reads the search: one search to level 0, as the levels say
        groups[settings or GreedySettings(mode=mode)] = (list(sparsities), set())
    path = Path(data) if data is not None else DEFAULT_CALIBRATION_DATA
    text = read_text(path, EXPORT_CALIBRATION_FLAGS)
    out = []
    for chosen, (targets, methods) in groups.items():
        length, samples = chosen.sequence_length, chosen.samples
        try:  # as many windows as the text holds, then one message that names the search's needs
            windows = token_windows(tokenizer, text, length, max_tokens=samples * length)
        except ActTailError:
            windows = None
        if windows is None or len(windows) < samples:
            raise ActTailError(f"the greedy allocation search of --allocation {allocation} reads {samples} windows of "
                               f"{length} tokens of the calibration text, and {path.name} holds "
                               f"{0 if windows is None else len(windows)}: pass a longer --calibration-data, or an "
                               "allocation without the search (htsr, uniform)")
        out.append((chosen, targets, methods, windows))
    return out


def search_for(model, tokenizer, allocation: str, sparsities: list[float], mode: str, data: str | Path | None,
               fits: dict | None = None, epsilon: float | None = None, mapping: str | None = None,
               settings: GreedySettings | None = None, cache_dir: str | Path | None = None,
               progress: bool = True) -> Trajectories:
    """Run (or read from the cache) the greedy search that ``allocation`` needs at ``sparsities`` on ``data``.

    With ``settings`` one search serves every target; without, each target's method runs its own
    :func:`default_settings`, one search per distinct setting (e.g. ``acttail`` at 50 % and 80 % in top-k mode: TEAL's
    search and the lazy one), and the result answers for every method (:meth:`Trajectories.for_method`)."""
    from .allocation import greedy_levels
    from .offload import input_device

    results = []
    for chosen, targets, methods, windows in search_windows(tokenizer, allocation, sparsities, mode, data, settings):
        levels = greedy_levels(model, allocation, targets, mode, epsilon=epsilon, mapping=mapping, s_max=chosen.s_max,
                               fits=fits)
        results.append((search(model, windows.to(input_device(model)), levels, chosen, cache_dir=cache_dir,
                               progress=progress), methods))
    out = results[-1][0]
    if len(results) > 1:
        out.methods = {method: trajectories for trajectories, methods in results for method in methods}
    return out
