"""``acttail-export evaluate`` with section 6m's candidate search settings in threshold mode (docs/allocation.md).

The candidate gives the threshold default's two searches the top-k default's settings of their kind:
``teal-greedy`` updates products (``greedy.TEAL_SEARCH``), ``acttail-greedy`` runs the refreshed lazy search with
updated products (``greedy.FAST_SEARCH``). Everything after ``--`` is passed to ``acttail-export evaluate`` as is, so
the rows come from the same code path as the full search's rows (same calibration, same evaluation)::

    python benchmarks/threshold_search_candidate.py -- --model smollm2 --data DATA/wiki.valid.raw --max-tokens 8192 \\
        --sequence-length 1024 --sparsity 0.5 0.6 0.7 0.8 0.9 --allocation acttail --mode threshold \\
        --calibration-data DATA/wiki.valid.raw --calibration-samples 16 --calibration-sequence-length 512 \\
        --json docs/results/allocation/threshold_valid_default_candidate.json

Each search is cached under its own settings' key, so the full search's cache is not touched.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acttail_export import greedy  # noqa: E402

#: The candidate's settings per method in threshold mode (docs/allocation.md, section 6m).
CANDIDATE = {"teal-greedy": greedy.TEAL_SEARCH, "acttail-greedy": greedy.FAST_SEARCH}


#: The defaults the candidate replaces (kept before ``main`` patches the module).
_DEFAULT = greedy.default_settings


def candidate_settings(method: str, mode: str) -> greedy.GreedySettings:
    """Section 6m's candidate in threshold mode; the current defaults elsewhere."""
    if mode == "threshold" and method in CANDIDATE:
        return greedy.GreedySettings(mode=mode, **CANDIDATE[method])
    return _DEFAULT(method, mode)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    greedy.default_settings = candidate_settings  # greedy.search_for looks it up at call time
    from acttail_export.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *argv]))


if __name__ == "__main__":
    main()
