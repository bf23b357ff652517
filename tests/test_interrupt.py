"""Ctrl-C and kill -9 in the middle of an export leave OUTPUT_DIR as it was; stale temp folders go away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = ["--calibration-samples", "2", "--sequence-length", "32"]


def _temps(out: Path) -> list[Path]:
    return [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.acttail-")]


def _start(model_dir: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "acttail_export.cli", "export", "--model", str(model_dir), *FAST, *extra, str(out)]
    # a shell's background job (`cmd &`) starts with SIGINT ignored, and Python keeps an inherited
    # SIG_IGN: give the child the default disposition so that it gets its KeyboardInterrupt handler
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_mid_way(proc: subprocess.Popen, out: Path, timeout: float = 240) -> Path:
    """Wait until the export is writing its temp folder (the base ONNX export has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"export ended before it could be interrupted: {proc.stderr.read()}"
        for tmp in _temps(out):
            if (tmp / ".base").exists() or (tmp / "model.onnx").exists():
                return tmp
        time.sleep(0.02)
    proc.kill()
    pytest.fail("export never reached the ONNX step")


@pytest.mark.parametrize("existing, sig", [(False, signal.SIGINT), (True, signal.SIGINT), (False, signal.SIGTERM)],
                         ids=["ctrl-c-new-output", "ctrl-c-existing-output", "sigterm"])
def test_ctrl_c_leaves_nothing(tiny_llama_dir, tmp_path, existing, sig):
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "previous.txt").write_text("earlier export")
    proc = _start(tiny_llama_dir, out, "--overwrite")
    _wait_mid_way(proc, out)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "acttail-export: interrupted"
    if existing:
        assert [p.name for p in out.iterdir()] == ["previous.txt"]
    else:
        assert not out.exists()
    assert _temps(out) == []


def test_kill_9_then_next_run_cleans_up(tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    proc = _start(tiny_llama_dir, out)
    stale = _wait_mid_way(proc, out)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()
    assert stale.exists()  # a killed process cannot clean up; its PID is now gone
    # a temp folder of a *running* export (this test's PID) must survive the cleanup
    alive = out.parent / f".{out.name}.acttail-tmp-{os.getpid()}-keepme"
    alive.mkdir()
    rerun = subprocess.run([sys.executable, "-m", "acttail_export.cli", "export", "--model", str(tiny_llama_dir), *FAST,
                            "--no-validate", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert (out / "model.onnx").is_file()
    assert _temps(out) == [alive]


def test_killed_while_replacing_restores_the_previous_export(tmp_path):
    """kill -9 inside the --overwrite move, after the previous export went aside and before the new one took its
    place: no OUTPUT_DIR, the previous export only in .NAME.acttail-old-PID-*/previous. The next run's cleanup moves
    it back instead of deleting it; an old folder whose OUTPUT_DIR exists (the new export landed) is just removed."""
    from acttail_export.exporter import OLD_MARK, clean_stale_temp

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that is no longer alive
    out = tmp_path / "out"
    aside = tmp_path / f".{out.name}{OLD_MARK}{dead.pid}-x1"
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "model.onnx").write_bytes(b"previous export")
    assert clean_stale_temp(out) == [aside]
    assert (out / "model.onnx").read_bytes() == b"previous export" and not aside.exists()
    # the new export landed before the kill: the aside copy is stale, OUTPUT_DIR is kept as it is
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "model.onnx").write_bytes(b"older")
    assert clean_stale_temp(out) == [aside]
    assert (out / "model.onnx").read_bytes() == b"previous export" and not aside.exists()


def test_ctrl_c_while_deleting_the_replaced_export_keeps_the_new_one(tmp_path, monkeypatch):
    """Ctrl-C during the last step of an --overwrite move (deleting the replaced export) is not an interrupted
    export: the new one is in place, so the move returns normally and the leftover goes with the next run."""
    from acttail_export import exporter

    out, tmp = tmp_path / "out", tmp_path / ".out.acttail-tmp-1-x"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old")
    tmp.mkdir()
    (tmp / "model.onnx").write_bytes(b"new")

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(exporter.shutil, "rmtree", interrupted)
    exporter._move_into_place(tmp, out, overwrite=True)
    assert (out / "model.onnx").read_bytes() == b"new" and not tmp.exists()
    monkeypatch.undo()
    leftover = [p for p in tmp_path.iterdir() if exporter.OLD_MARK in p.name]
    assert len(leftover) == 1 and (leftover[0] / "previous" / "model.onnx").read_bytes() == b"old"
    assert exporter.clean_stale_temp(out) == []  # this process's own leftover is not touched while it runs


def test_interrupt_inside_a_string_eval_still_exits_130(tmp_path):
    """A signal that lands while an import builds a namedtuple (a string eval) must still give exit 130: CPython
    3.11 otherwise remembers that KeyboardInterrupt as unhandled and ends `python -m` with SIGINT (-2)."""
    (tmp_path / "interrupt_in_eval.py").write_text(
        "import sys\n"
        "import acttail_export.commands.analyze as analyze\n"
        "from acttail_export import cli\n"
        "def boom(args):\n"
        "    eval(\"(_ for _ in ()).throw(KeyboardInterrupt)\")\n"
        "analyze.run = boom\n"
        "sys.exit(cli.main(['analyze', '--model', 'unused']))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "interrupt_in_eval"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "acttail-export: interrupted"
