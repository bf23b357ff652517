"""``acttail-export evaluate`` with a candidate's search settings in threshold mode (docs/allocation.md, sections 6m, 6n).

Section 6m's candidate gives the threshold default's two searches the top-k default's settings of their kind:
``teal-greedy`` updates products (``greedy.TEAL_SEARCH``), ``acttail-greedy`` runs the refreshed lazy search with
updated products (``greedy.FAST_SEARCH``). Section 6n's (``--section 6n``) gives ``acttail-greedy`` the updated products
only (``greedy.TEAL_SEARCH``: every candidate evaluated). Everything after ``--`` is passed to ``acttail-export evaluate``
as is, so the rows come from the same code path as the full search's rows (same calibration, same evaluation)::

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

#: Each section's candidate settings per method in threshold mode (docs/allocation.md, sections 6m and 6n).
CANDIDATES = {"6m": {"teal-greedy": greedy.TEAL_SEARCH, "acttail-greedy": greedy.FAST_SEARCH},
              "6n": {"teal-greedy": greedy.TEAL_SEARCH, "acttail-greedy": greedy.TEAL_SEARCH}}


#: The defaults the candidate replaces (kept before ``main`` patches the module).
_DEFAULT = greedy.default_settings


def candidate_settings(section: str):
    """The settings function of ``section``'s candidate: its settings in threshold mode, the current defaults elsewhere."""
    chosen = CANDIDATES[section]

    def settings(method: str, mode: str) -> greedy.GreedySettings:
        if mode == "threshold" and method in chosen:
            return greedy.GreedySettings(mode=mode, **chosen[method])
        return _DEFAULT(method, mode)

    return settings


def main() -> None:
    argv = sys.argv[1:]
    section = "6m"
    if argv[:1] == ["--section"]:
        if len(argv) < 2 or argv[1] not in CANDIDATES:
            print(f"threshold_search_candidate: --section takes one of {', '.join(CANDIDATES)}", file=sys.stderr)
            sys.exit(2)
        section, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    greedy.default_settings = candidate_settings(section)  # greedy.search_for looks it up at call time
    from acttail_export.cli import main as cli_main

    sys.exit(cli_main(["evaluate", *argv]))


if __name__ == "__main__":
    main()
