"""Stability study: top-1 agreement under a (1 + 1e-6) embedding perturbation, and perplexity, of the PyTorch
sparse reference of SmolLM2-135M with the hard mask and the continuous ramp mask (issue 17, items 3 and 4).

For each row (mode, level, ramp δ, scores) the same sparse model runs every window twice: as is, and with the
embedding output scaled by ``1 + eps``. Agreement is the fraction of positions whose top-1 token is the same in
both runs (per window; mean and min over windows). Perplexity comes from the unperturbed run. The default
ActTail allocation (``build_config``) is used; threshold mode is calibrated on the first
``--calibration-samples`` windows of 512 of ``--data`` and evaluated on the next ``--windows`` windows
(disjoint text). ``--scores wina`` keeps x_i by ``|x_i| * ||W[:, i]||`` (top-k only); ``--soft`` adds soft
thresholding (kept x shrunk to ``sign(x) (|x| - t)``, 1-Lipschitz, same zero set) in each mode. Rows are appended to
``--output`` as they finish (re-running skips finished rows)::

    nice -n 15 .venv/bin/python benchmarks/stability_study.py --data DATA/wiki.valid.raw \\
        --levels 0.5 --modes topk threshold --ramps 0 0.1 0.25 0.5 --dense \\
        --output docs/results/stability/study_valid.json
    .venv/bin/python benchmarks/stability_study.py --table docs/results/stability/study_valid.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acttail_export.allocation import build_config  # noqa: E402
from acttail_export.calibration import calibrate_many  # noqa: E402
from acttail_export.data import load_windows  # noqa: E402
from acttail_export.modeling import default_model_path, load_model  # noqa: E402
from acttail_export.sparsify import apply_sparsity  # noqa: E402
from acttail_export.spectral import analyze_model  # noqa: E402

logger = logging.getLogger("stability_study")
SEQUENCE_LENGTH = 512


def _run(model, windows: torch.Tensor, eps: float) -> tuple[list[torch.Tensor], list[torch.Tensor], float, int]:
    """(top-1 ids per window, final hidden states per window, summed NLL, count); embeddings scaled by ``1 + eps``."""
    handle = None
    if eps:
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out * (1.0 + eps))
    tops, hiddens, total, count = [], [], 0.0, 0
    try:
        with torch.inference_mode():
            for ids in windows:
                hidden = model.get_decoder()(input_ids=ids[None], use_cache=False).last_hidden_state[0]
                logits = model.get_output_embeddings()(hidden).float()
                tops.append(logits.argmax(-1))
                hiddens.append(hidden.float())
                total += float(F.cross_entropy(logits[:-1], ids[1:], reduction="sum").double())
                count += ids.numel() - 1
    finally:
        if handle is not None:
            handle.remove()
    return tops, hiddens, total, count


def evaluate(model, windows, config, mode: str, ramp: float, scores: str, eps: float, soft: bool = False) -> dict:
    """One row: agreement (mean, min, per window), final-hidden-state divergence, perplexity, effective sparsity."""
    hooks = None
    if config is not None:
        hooks = apply_sparsity(model, config, mode, ramp=ramp, soft=soft, scores=scores)
    try:
        base, h_base, total, count = _run(model, windows, 0.0)
        effective = hooks.weighted_effective_sparsity() if hooks is not None else None
        pert, h_pert, _, _ = _run(model, windows, eps)
    finally:
        if hooks is not None:
            hooks.remove()
    agree = [float((a == b).float().mean()) for a, b in zip(base, pert)]
    # per position ||h' - h|| / ||h|| of the last hidden state, median over the positions of all windows
    rel = torch.cat([(b - a).norm(dim=-1) / a.norm(dim=-1) for a, b in zip(h_base, h_pert)])
    return {"agreement_mean": sum(agree) / len(agree), "agreement_min": min(agree), "agreement": agree,
            "hidden_divergence_median": float(rel.median()), "hidden_divergence_max": float(rel.max()),
            "perplexity": float(torch.tensor(total / count).exp()), "effective_sparsity": effective,
            "tokens": int(windows.numel())}


def _rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["results"] if path.is_file() else []


def _key(r: dict) -> tuple:
    return (r["mode"], r["level"], r["ramp"], r["scores"], r.get("soft", False))


def _jobs(args) -> list[tuple]:
    jobs = [("dense", 0.0, 0.0, "abs", False)] if args.dense else []
    for level in args.levels:
        jobs += [(mode, level, ramp, "abs", False) for ramp in args.ramps for mode in args.modes]  # pairs of modes first
        if "wina" in args.scores:
            jobs += [("topk", level, ramp, "wina", False) for ramp in args.wina_ramps]
        if args.soft:
            jobs += [(mode, level, 0.0, "abs", True) for mode in args.modes]
    return jobs


def _configs(model, tokenizer, calib: torch.Tensor, levels, modes) -> dict:
    fits = analyze_model(model, progress=False)
    configs = {(m, s): build_config(model, s, "htsr", m, fits=fits) for s in levels for m in modes}
    threshold = [c for (m, _), c in configs.items() if m == "threshold"]
    if threshold:
        calibrate_many(model, tokenizer, threshold, windows=calib, sequence_length=SEQUENCE_LENGTH, progress=False)
    return configs


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(default_model_path())
    n_cal = args.calibration_samples
    all_windows = load_windows(tokenizer, args.data, SEQUENCE_LENGTH, max_tokens=(n_cal + args.windows) * SEQUENCE_LENGTH)
    calib, windows = all_windows[:n_cal], all_windows[n_cal:]
    rows = _rows(args.output)
    done = {_key(r) for r in rows}
    jobs = [j for j in _jobs(args) if j not in done]
    if not jobs:
        return
    start = time.perf_counter()
    modes = sorted({m for m, *_ in jobs if m != "dense"} | {"topk"})
    configs = _configs(model, tokenizer, calib, sorted({s for _, s, *_ in jobs if s > 0}), modes)
    meta = {"model": "SmolLM2-135M-Instruct (GGUF, fp32)", "split": "valid", "allocation": "acttail (default)",
            "sequence_length": SEQUENCE_LENGTH, "eval_windows": int(windows.shape[0]),
            "eval_first_token": n_cal * SEQUENCE_LENGTH, "calibration_windows": n_cal, "eps": args.eps,
            "threads": args.threads, "setup_seconds": time.perf_counter() - start}
    for mode, level, ramp, scores, soft in tqdm(jobs, desc="stability", unit="row"):
        start = time.perf_counter()
        config = None if mode == "dense" else configs[(mode, level)]
        row = {"mode": mode, "level": level, "ramp": ramp, "scores": scores, "soft": soft,
               **evaluate(model, windows, config, mode, ramp, scores, args.eps, soft), "seconds": time.perf_counter() - start}
        rows.append(row)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
        logger.info("%s %.2f ramp %g %s soft %s: agreement %.4f (min %.4f), perplexity %.3f (%.0f s)", mode, level, ramp,
                    scores, soft, row["agreement_mean"], row["agreement_min"], row["perplexity"], row["seconds"])


def table(paths: list[Path]) -> None:
    """Markdown table; Δppl is relative to the hard mask (ramp 0, |x| scores) of the same mode and level."""
    rows = [r for p in paths for r in _rows(p)]
    hard = {(r["mode"], r["level"]): r["perplexity"] for r in rows
            if r["ramp"] == 0 and r["scores"] == "abs" and not r.get("soft")}
    print("| mode | sparsity | scores | value rule | agreement mean | agreement min | hidden divergence (median) | perplexity | Δppl vs hard |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["mode"] != "dense", r["level"], r["mode"], r["scores"], r.get("soft", False), r["ramp"])):
        ref = hard.get((r["mode"], r["level"]))
        div = f"{r['hidden_divergence_median']:.1e}" if "hidden_divergence_median" in r else ""
        delta = "" if ref is None or r["mode"] == "dense" else f"{r['perplexity'] / ref - 1:+.2%}"
        rule = "soft threshold" if r.get("soft") else f"ramp δ {r['ramp']:g}" if r["ramp"] else "hard"
        print(f"| {r['mode']} | {r['level']:.0%} | {r['scores']} | {rule} | {r['agreement_mean']:.2%} | "
              f"{r['agreement_min']:.2%} | {div} | {r['perplexity']:.3f} | {delta} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="validation text (wiki.valid.raw)")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.5])
    parser.add_argument("--modes", nargs="+", choices=("topk", "threshold"), default=["topk", "threshold"])
    parser.add_argument("--ramps", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
    parser.add_argument("--scores", nargs="+", choices=("abs", "wina"), default=["abs"])
    parser.add_argument("--wina-ramps", type=float, nargs="+", default=[0.0])
    parser.add_argument("--soft", action="store_true", help="also soft thresholding (sign(x) (|x| - t)) in each mode")
    parser.add_argument("--dense", action="store_true", help="also measure the dense model")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens")
    parser.add_argument("--calibration-samples", type=int, default=64, help="threshold calibration windows of 512")
    parser.add_argument("--eps", type=float, default=1e-6, help="embedding perturbation: scale by 1 + eps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=Path("docs/results/stability/study_valid.json"))
    parser.add_argument("--table", type=Path, nargs="+", help="print the markdown table of these result files and exit")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.table:
        table(args.table)
        return
    if args.data is None or not args.data.is_file():
        print(f"stability_study: --data must name an existing text file (wiki.valid.raw), got {args.data}", file=sys.stderr)
        sys.exit(2)
    run(args)


if __name__ == "__main__":
    main()
