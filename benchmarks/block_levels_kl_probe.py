"""Probe (docs/allocation.md section 6j): block levels chosen on the model's own output, the greedy budgets inside.

Starts from every block at the target (TEAL-greedy), moves ``--delta`` of level from one random block to another (no
block above target + ``--headroom``), and keeps a move when the mean KL(dense || sparse) of the next-token
distributions on ``--samples`` windows of ``--length`` calibration tokens drops (a hill climb, ``--evals`` moves; the
hidden states entering every block are kept, so a move reruns the model from its first changed block). Then both level
vectors are evaluated on validation tokens 4096 .. 4096 + ``--heldout`` (text the climb did not read)::

    nice -n 5 .venv/bin/python benchmarks/block_levels_kl_probe.py --data DATA/wiki.valid.raw --level 0.4 \
        --evals 80 --samples 4 --output docs/results/allocation/block_levels_kl_probe_valid_40.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocation_study import config_at_block_levels  # noqa: E402  (benchmarks/, the script's folder)

from acttail_export import greedy  # noqa: E402
from acttail_export.data import load_windows  # noqa: E402
from acttail_export.evaluation import perplexity_windows  # noqa: E402
from acttail_export.modeling import default_model_path, load_model  # noqa: E402
from acttail_export.sparsify import apply_sparsity  # noqa: E402


class Objective:
    """KL(dense || sparse) of the next-token distributions, recomputed from the first block a move changes (the hidden
    states entering every block under the accepted levels are kept)."""

    def __init__(self, model, ids):
        self.model = model
        hidden, self.kwargs = greedy.block_inputs(model, ids)
        self.layers = model.model.layers
        with torch.inference_mode():
            self.dense_lp = self._logprobs(self._run(hidden, 0)[-1])
        self.p = self.dense_lp.exp()
        self.states = [hidden]  # entering each block under the accepted levels (the first is rule-free)

    def _run(self, hidden, start):
        out = [hidden]
        for layer in self.layers[start:]:
            res = layer(out[-1], **self.kwargs)
            out.append(res[0] if isinstance(res, tuple) else res)
        return out

    def _logprobs(self, hidden):
        with torch.inference_mode():
            logits = self.model.lm_head(self.model.model.norm(hidden)).float()
            return F.log_softmax(logits, dim=-1)

    def __call__(self, config, start=0):
        """(KL under ``config``, the trial's states from block ``start`` on: for :meth:`accept`)."""
        hooks = apply_sparsity(self.model, config, "topk")
        try:
            with torch.inference_mode():
                tail = self._run(self.states[start], start)
        finally:
            hooks.remove()
        lp = self._logprobs(tail[-1])
        return float((self.p * (self.dense_lp - lp)).sum(-1).mean()), (start, tail)

    def accept(self, trial):
        start, tail = trial
        self.states = self.states[:start] + tail


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--level", type=float, default=0.4)
    p.add_argument("--headroom", type=float, default=0.1)
    p.add_argument("--delta", type=float, default=0.05)
    p.add_argument("--evals", type=int, default=100)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=8192)
    p.add_argument("--output", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    model, tok = load_model(default_model_path())
    calib = load_windows(tok, args.data, args.length, samples=args.samples)
    settings = greedy.GreedySettings(mode="topk", step=0.01, samples=8, sequence_length=128)
    search_calib = load_windows(tok, args.data, 128, samples=8)
    n = len(model.model.layers)
    traj = greedy.search(model, search_calib, [args.level + args.headroom] * n, settings)
    objective = Objective(model, calib)
    levels = np.full(n, args.level)
    cap = args.level + args.headroom
    t0 = time.perf_counter()
    best, state = objective(config_at_block_levels(model, args.level, levels.tolist(), traj))
    objective.accept(state)
    print(f"start kl {best:.5f} ({time.perf_counter() - t0:.1f} s per eval)", flush=True)
    rng = np.random.default_rng(args.seed)
    history = [best]
    for e in range(args.evals):
        i, j = rng.choice(n, 2, replace=False)
        d = min(args.delta, cap - levels[i], levels[j])
        if d <= 1e-9:
            continue
        trial = levels.copy()
        trial[i] += d
        trial[j] -= d
        value, state = objective(config_at_block_levels(model, args.level, trial.tolist(), traj), start=int(min(i, j)))
        if value < best:
            best, levels = value, trial
            objective.accept(state)
        history.append(best)
        if e % 10 == 0:
            print(f"eval {e}: kl {best:.5f} levels {np.round(levels, 2).tolist()}", flush=True)
    seconds = time.perf_counter() - t0
    windows = load_windows(tok, args.data, 1024, max_tokens=args.heldout + 4096)[4:]
    ppl, base = (perplexity_windows(model, windows, config_at_block_levels(model, args.level, v, traj), "topk",
                                    progress=False) for v in (levels.tolist(), [args.level] * n))
    out = {"args": vars(args) | {"output": str(args.output)}, "levels": levels.tolist(), "kl": history,
           "search_seconds": seconds, "heldout_ppl": ppl["perplexity"], "teal_heldout_ppl": base["perplexity"]}
    print(json.dumps({k: out[k] for k in ("heldout_ppl", "teal_heldout_ppl", "search_seconds")}))
    if args.output:
        args.output.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
