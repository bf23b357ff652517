"""The atomic output folder of an export: checks, temporary sibling, rename into place, signals, umask.

Everything is written into a temporary sibling of OUTPUT_DIR (``.NAME.acttail-tmp-PID-XXXX``, same
filesystem) and renamed into place at the very end, so a failure, Ctrl-C, SIGTERM, SIGHUP or SIGQUIT
leaves OUTPUT_DIR as it was. Temporary folders of killed runs (their PID is gone) are removed at the
next run. A symlinked OUTPUT_DIR is followed: the export lands in the folder the link points to and
the link stays.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path

from .errors import ActTailError

logger = logging.getLogger(__name__)

TMP_MARK = ".acttail-tmp-"
OLD_MARK = ".acttail-old-"
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.acttail-(?:tmp|old)-(?P<pid>\d+)-\w+$")
#: Signals handled like Ctrl-C during an export (temporary folder removed, exit 130).
INTERRUPT_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGQUIT") if hasattr(signal, name))
#: Longest OUTPUT_DIR name kept whole in temporary folder names: ``.NAME`` + mark + PID + 8 random
#: characters must fit NAME_MAX (255 bytes on Linux file systems); longer names are shortened + hashed.
_TAG_BYTES = 200


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def temp_tag(output_dir: Path) -> str:
    """The OUTPUT_DIR name as it appears in its temporary folders (shortened with a hash when long)."""
    name = output_dir.name
    if len(name.encode()) <= _TAG_BYTES:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return name.encode()[:100].decode(errors="ignore") + "~" + digest


def _follow_symlink(output_dir: Path) -> Path:
    """OUTPUT_DIR itself when it is no symlink, else the folder it points to (refusing dangling or file targets)."""
    if not output_dir.is_symlink():
        return output_dir
    try:
        target = output_dir.resolve(strict=False)
    except (RuntimeError, OSError):  # a symlink loop
        raise ActTailError(f"OUTPUT_DIR {output_dir} is a symlink loop: remove the link and pass a real folder") from None
    if target.is_symlink():  # Python < 3.13 leaves a loop unresolved instead of raising
        raise ActTailError(f"OUTPUT_DIR {output_dir} is a symlink loop: remove the link and pass a real folder")
    if not target.exists():
        if target.parent.is_dir():
            return target  # a dangling link to a new folder in an existing one: the export creates it
        raise ActTailError(f"OUTPUT_DIR {output_dir} is a symlink to {target}, whose parent folder does not exist: "
                           "create it, or remove the link and pass a real folder")
    if not target.is_dir():
        raise ActTailError(f"OUTPUT_DIR {output_dir} is a symlink to the file {target}: choose a folder path")
    return target


def _check_part_lengths(output_dir: Path) -> None:
    """Refuse names longer than the file system allows before any work (one line instead of an OSError later)."""
    anchor = output_dir
    while True:
        try:
            if anchor.exists() or anchor == anchor.parent:
                break
        except OSError:
            pass
        anchor = anchor.parent
    limit = _name_max(anchor)
    for part in output_dir.parts:
        if len(part.encode()) > limit:
            raise ActTailError(f"output folder name {part[:40]}... is {len(part.encode())} bytes, above the file system's "
                               f"limit of {limit}: choose a shorter OUTPUT_DIR")


def _check_path_length(output_dir: Path, probe: Path) -> None:
    """The whole path must leave room under PATH_MAX for the files inside it."""
    try:
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        path_max = 4096
    if len(str(output_dir).encode()) + _TAG_BYTES // 4 > path_max:  # room for the files inside it
        raise ActTailError(f"output path {str(output_dir)[:40]}... is too long for the file system: choose a shorter OUTPUT_DIR")


def check_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """OUTPUT_DIR must be new, empty, or ``overwrite``; its parent must be writable; returns the folder to write.

    A symlinked OUTPUT_DIR is followed (the export lands where it points, the link stays); a link to a
    file, or into a missing folder, is refused.
    """
    output_dir = Path(output_dir).expanduser().absolute()
    _check_part_lengths(output_dir)  # before any stat: a name above NAME_MAX makes it raise ENAMETOOLONG
    output_dir = _follow_symlink(output_dir)
    if output_dir.exists():
        if not output_dir.is_dir():
            raise ActTailError(f"output {output_dir} exists and is a file: choose a folder path")
        if any(output_dir.iterdir()) and not overwrite:
            raise ActTailError(f"output folder {output_dir} exists and is not empty: pass --overwrite or choose another folder")
    probe = output_dir.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ActTailError(f"{probe} is a file, so {output_dir} cannot be created: choose another OUTPUT_DIR")
    _check_path_length(output_dir, probe)
    try:  # a real write probe: root ignores permission bits, read-only mounts do not show in os.access
        Path(tempfile.mkdtemp(prefix=".acttail-write-probe-", dir=probe)).rmdir()
    except OSError as exc:
        raise ActTailError(f"cannot write to {probe} ({exc.strerror}): choose a writable OUTPUT_DIR") from None
    return output_dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temp(output_dir: Path) -> list[Path]:
    """Remove temp folders of ``output_dir`` left by killed runs (PID no longer alive).

    A run killed inside :func:`_move_into_place` with ``--overwrite``, after it moved the previous export
    aside (``.NAME.acttail-old-PID-*/previous``) and before the new one took its place, leaves no
    OUTPUT_DIR: the previous export is moved back then, not deleted.
    """
    removed = []
    parent = output_dir.parent
    if not parent.is_dir():
        return removed
    for entry in sorted(parent.iterdir()):
        m = _TMP_RE.match(entry.name)
        if m and m.group("name") == temp_tag(output_dir) and entry.is_dir() and not _pid_alive(int(m.group("pid"))):
            previous = entry / "previous"
            if OLD_MARK in entry.name and previous.is_dir() and not output_dir.exists():
                os.replace(previous, output_dir)
                logger.warning("restored %s: the export that was replacing it had been killed", output_dir)
            shutil.rmtree(entry)
            removed.append(entry)
            logger.info("removed stale temporary folder %s", entry)
    return removed


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_as_interrupt() -> dict | None:
    """Treat SIGTERM, SIGHUP (a dropped ssh session) and SIGQUIT like Ctrl-C during the export, so the temp folder
    is removed; returns the previous handlers for :func:`restore_signals` (None outside the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return {signum: signal.signal(signum, _raise_interrupt) for signum in INTERRUPT_SIGNALS}


def restore_signals(previous: dict | None) -> None:
    """Put back the handlers :func:`_sigterm_as_interrupt` replaced."""
    for signum, handler in (previous or {}).items():
        signal.signal(signum, handler)


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; returns the folders this call created, deepest first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:  # made by a concurrent run meanwhile: not ours to remove
            continue
        created.append(path)
    return created[::-1]


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) as long as they are empty; a folder something else wrote into stays."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _make_temp(output_dir: Path, mark: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f".{temp_tag(output_dir)}{mark}{os.getpid()}-", dir=output_dir.parent))


def remove_own_temp(output_dir: Path, mark: str) -> None:
    """Remove this process's temporary folders for ``output_dir``: a signal can land between ``mkdtemp`` creating
    the folder and the caller holding its name."""
    for path in output_dir.parent.glob(f".{glob.escape(temp_tag(output_dir))}{mark}{os.getpid()}-*"):
        shutil.rmtree(path, ignore_errors=True)


def _umask() -> int:
    """The process umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, output_dir: Path, overwrite: bool = False) -> None:
    """Rename ``tmp`` to ``output_dir``.

    Without ``overwrite`` the rename itself is the check that ``output_dir`` is still new or empty: a
    concurrent run may have written it since the input checks, and ``rename`` onto a non-empty folder
    (or a file) fails, so that output is never replaced. With ``overwrite`` an existing folder is moved
    aside, then deleted. ``tmp`` (``mkdtemp``: mode 0700) first gets the mode of a folder made with
    ``mkdir``: 0777 less the umask.
    """
    os.chmod(tmp, 0o777 & ~_umask())
    if not overwrite:
        try:
            os.rename(tmp, output_dir)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
                raise ActTailError(f"{output_dir} was created by another process during the export and was left as it is: "
                                   f"choose another OUTPUT_DIR, or pass --overwrite to replace it") from None
            raise
        return
    old = None
    if output_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{temp_tag(output_dir)}{OLD_MARK}{os.getpid()}-", dir=output_dir.parent))
        os.replace(output_dir, old / "previous")
    try:
        os.replace(tmp, output_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "previous", output_dir)
        raise
    if old is not None:
        try:
            shutil.rmtree(old)
        except KeyboardInterrupt:  # the new export is in place; the next export to OUTPUT_DIR removes the rest
            logger.warning("interrupted while deleting the replaced export %s; the new export is in place", old)


