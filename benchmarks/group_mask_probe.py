"""Probe (docs/allocation.md section 6o's kind): masks that keep whole groups of G consecutive channels, at fixed budgets.

The project's rule (``channel``) keeps, per token and projection input ``x`` (length K), the ``k = ceil((1 − s) K)``
entries of largest ``|x|``. ``group`` keeps whole groups of ``G`` consecutive channels instead (the last one shorter
when ``G`` does not divide K): per token the ``n_g = round((1 − s) K / G)`` groups (half up, at least 1) of largest
score, the score the group's ``Σ |x|`` (``--score l1``) or ``Σ x²`` (``l2``); ties go to the earlier group. A 4-bit
decode kernel could then read a kept group's 32 weight rows together with their quant-block scales and skip a dropped
group's scales (docs/benchmarks.md, #15's bound). The channel order the groups cut (``--orders``):

* ``identity``: the projection input as it is, groups ``[0, G), [G, 2G), …``;
* ``sorted``: per projection the channels by descending mean ``|x|`` (ties: the lower channel first) of the dense
  model on ``--calibration-windows`` windows of 512 validation tokens after the evaluation text, so that channels of
  similar typical magnitude share a group. Free at run time: the weight rows are stored permuted, the kernel gathers x.

Uniform top-k budgets on every projection, first ``--max-tokens`` validation tokens in windows of 1024. The effective
sparsity is the zeroed share of the inputs over the tokens, weighted by K·N as the project reports it: ``n_g G / K``
differs from ``1 − s`` when ``(1 − s) K / G`` is not an integer. Rows are appended to ``--output`` after each one
(rows already there are skipped)::

    nice -n 10 .venv/bin/python benchmarks/group_mask_probe.py --data DATA/wiki.valid.raw --levels 0.4 0.5 \
        --variants channel group --groups 8 32 --orders identity sorted --threads 1 \
        --output docs/results/allocation/group_mask_probe_valid.json
    .venv/bin/python benchmarks/group_mask_probe.py --table docs/results/allocation/group_mask_probe_valid.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from probe_common import load_probe, probe_parser, run_windows, write_output  # benchmarks/, the script's folder

from acttail_export.allocation import build_config
from acttail_export.evaluation import perplexity_windows
from acttail_export.sparsify import projection_module

SCORES = ("l1", "l2")
ORDERS = ("identity", "sorted")


def groups_kept(in_features: int, group: int, sparsity: float) -> int:
    """``n_g = round((1 − s) K / G)``, half up, at least 1, at most the number of groups ``ceil(K / G)``."""
    return min(-(-in_features // group), max(1, math.floor((1.0 - sparsity) * in_features / group + 0.5)))


def group_keep_mask(x: torch.Tensor, group: int, n_keep: int, score: str = "l1", order: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of ``x``'s shape keeping, per row (last dim), the ``n_keep`` groups of largest score.

    Groups are ``group`` consecutive channels of ``x[..., order]`` (``order`` None: of ``x``), the last one shorter when
    ``group`` does not divide the width; the score is ``Σ |x|`` (``l1``) or ``Σ x²`` (``l2``) over the group; of groups
    with equal scores the earlier one (in ``order``) is kept. The mask is returned in ``x``'s own channel order.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    width = x.shape[-1]
    n_groups = -(-width // group)
    if n_keep >= n_groups:
        return torch.ones_like(x, dtype=torch.bool)
    xo = x if order is None else x.index_select(-1, order)
    v = xo.abs() if score == "l1" else xo.square()
    pad = n_groups * group - width
    if pad:
        v = torch.nn.functional.pad(v, (0, pad))
    scores = v.reshape(*v.shape[:-1], n_groups, group).sum(-1)
    top = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_keep]
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    keep = keep.repeat_interleave(group, dim=-1)[..., :width]
    if order is not None:  # position j of the ordered channels is channel order[j]
        keep = keep.index_select(-1, torch.argsort(order))
    return keep


def sorted_order(mean_abs: torch.Tensor) -> torch.Tensor:
    """Channels by descending mean |x|; ties: the lower channel first."""
    return torch.sort(mean_abs, descending=True, stable=True).indices


def channel_means(model, config, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean |x| per input channel of every projection of ``config``, the dense model (no masks) on ``windows``."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for proj in config.projections:
        def hook(module, args, name=proj.name):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.abs().double().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        handles.append(projection_module(model, proj).register_forward_pre_hook(hook))
    run_windows(model, windows, handles)
    return {name: sums[name] / counts[name] for name in sums}


class GroupHooks:
    """Group-mask pre-hooks on every projection of ``config`` (its budgets ``proj.sparsity``); counts zeroed inputs."""

    def __init__(self, model, config, group: int, score: str, orders: dict[str, torch.Tensor] | None = None):
        self.config = config
        self.zeroed: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self._handles = []
        for proj in config.projections:
            module = projection_module(model, proj)
            n_keep = groups_kept(proj.in_features, group, proj.sparsity)
            order = None if orders is None else orders[proj.name]

            def hook(module, args, name=proj.name, n_keep=n_keep, order=order):
                x = args[0]
                keep = group_keep_mask(x, group, n_keep, score, order)
                self.zeroed[name] = self.zeroed.get(name, 0) + int(keep.numel() - torch.count_nonzero(keep))
                self.total[name] = self.total.get(name, 0) + keep.numel()
                return (x * keep, *args[1:])

            self._handles.append(module.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def weighted_effective_sparsity(self) -> float:
        params = {p.name: p.parameters for p in self.config.projections if self.total.get(p.name)}
        return sum(self.zeroed[n] / self.total[n] * w for n, w in params.items()) / sum(params.values())


def row_key(row: dict) -> tuple:
    return (row["tokens"], row["variant"], row["G"], row["order"], row["score"], row["level"])


def print_table(path: Path) -> None:
    """Markdown table: perplexity and effective sparsity per variant and level, each against ``channel`` at that level."""
    data = json.loads(path.read_text())
    for tokens in sorted({r["tokens"] for r in data["rows"]}):
        rows = [r for r in data["rows"] if r["tokens"] == tokens]
        base = {r["level"]: r["perplexity"] for r in rows if r["variant"] == "channel"}
        calib = f"; sorted orders from {data['calibration_tokens']} calibration tokens" if data.get("calibration_tokens") else ""
        print(f"\n{tokens} validation tokens, windows of 1024, uniform top-k budgets{calib}\n")
        print("| variant | G | order | score | level | perplexity | against `channel` | effective sparsity | seconds |")
        print("|---|---:|---|---|---:|---:|---:|---:|---:|")
        rows = sorted(rows, key=lambda r: (r["level"], r["variant"] != "channel", r["G"] or 0, r["order"] or "", r["score"] or ""))
        for r in rows:
            change = f"{r['perplexity'] / base[r['level']] - 1:+.1%}" if r["variant"] != "channel" and r["level"] in base else ""
            print(f"| {r['variant']} | {r['G'] or ''} | {r['order'] or ''} | {r['score'] or ''} | {r['level']:.0%} | "
                  f"{r['perplexity']:.3f} | {change} | {r['effective_sparsity']:.4f} | {r['seconds']:.0f} |")


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--table", type=Path)
    table = pre.parse_known_args()[0].table
    if table:  # the table of a saved file needs none of the probe's flags
        print_table(table)
        return
    ap = probe_parser(__doc__)
    ap.add_argument("--levels", type=float, nargs="+", default=[0.4, 0.5])
    ap.add_argument("--variants", nargs="+", choices=("channel", "group"), default=["channel", "group"])
    ap.add_argument("--groups", type=int, nargs="+", default=[8, 32], help="G, channels per group")
    ap.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS))
    ap.add_argument("--score", nargs="+", choices=SCORES, default=["l1"], help="group score: sum of |x| (l1) or of x² (l2)")
    ap.add_argument("--calibration-windows", type=int, default=8, help="sorted order: windows of 512 after the evaluation's")
    ap.add_argument("--table", type=Path, help="print the markdown table of this results file and exit")
    args = ap.parse_args()
    sorted_needed = "group" in args.variants and "sorted" in args.orders
    model, _, windows, calib = load_probe(args, args.calibration_windows if sorted_needed else 0)
    tokens = int(windows.numel())
    out = {"tokens": tokens, "rows": []}
    if args.output and args.output.exists():
        out = json.loads(args.output.read_text())
    done = {row_key(r) for r in out["rows"]}

    def run(variant, group, order, score, level, measure):
        row = {"variant": variant, "G": group, "order": order, "score": score, "level": level, "tokens": tokens}
        if row_key(row) in done:
            print(f"{variant} G={group} {order} {score} {level:.2f}: already in {args.output}", flush=True)
            return
        start = time.perf_counter()
        ppl, eff = measure()
        row |= {"perplexity": ppl, "effective_sparsity": eff, "seconds": time.perf_counter() - start}
        out["rows"].append(row)
        done.add(row_key(row))
        write_output(args, out)
        print(f"{variant:8s} G={group or '-'} {order or '-':8s} {score or '-':3s} {level:.2f}: perplexity {ppl:.3f}, "
              f"effective sparsity {eff:.4f}, {row['seconds']:.0f} s", flush=True)

    configs = {level: build_config(model, level, "uniform", "topk") for level in args.levels}
    if "channel" in args.variants:  # first: the project's rule, the baseline every group row is read against
        for level, config in configs.items():
            def channel(config=config):
                result = perplexity_windows(model, windows, config, "topk", progress=False)
                return result["perplexity"], result["effective_sparsity"]

            run("channel", None, None, None, level, channel)
    orders = {"identity": None}
    if sorted_needed:
        start = time.perf_counter()
        means = channel_means(model, configs[args.levels[0]], calib)
        orders["sorted"] = {name: sorted_order(m) for name, m in means.items()}
        out["calibration_tokens"] = int(calib.numel())
        out["calibration_seconds"] = time.perf_counter() - start
    for group in args.groups if "group" in args.variants else []:
        for order in args.orders:
            for score in args.score:
                for level, config in configs.items():
                    def grouped(config=config, group=group, order=order, score=score):
                        hooks = GroupHooks(model, config, group, score, orders[order])
                        try:
                            ppl = perplexity_windows(model, windows, None, progress=False)["perplexity"]
                        finally:
                            hooks.remove()
                        return ppl, hooks.weighted_effective_sparsity()

                    run("group", group, order, score, level, grouped)
    if args.output:
        print_table(args.output)


if __name__ == "__main__":
    main()
