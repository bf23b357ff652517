"""The tree is ruff-clean under pyproject.toml's ``[tool.ruff]`` (rules E, F, W, I; lines up to 150 characters)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("acttail_export", "tests", "benchmarks", "scripts", "examples", "optimum")


def test_ruff_clean():
    ruff = Path(sys.executable).parent / "ruff"
    if not ruff.exists():
        found = shutil.which("ruff")
        if found is None:
            pytest.skip("ruff is not installed (it is in the test extra: pip install -e '.[test]')")
        ruff = Path(found)
    out = subprocess.run([str(ruff), "check", "--output-format", "concise", *FOLDERS], cwd=REPO, capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-1000:]
