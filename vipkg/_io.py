"""Atomic file writes: a temporary file in the target directory, fsync, then rename.

A reader (or a crash) sees either the old file or the new one, never a torn one.
With ``previous=``, the file being replaced is kept under that name too, so that a
file found damaged later (a disk error, an outside write) still has a good
predecessor beside it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_save", "atomic_write_bytes", "stale_temporaries", "writable_dir"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_save(
    path: str | os.PathLike, save: Callable[[str], None], previous: str | os.PathLike | None = None
) -> None:
    """Let ``save(tmp_path)`` write a temporary file beside ``path``, then rename it into place.

    Parameters
    ----------
    path : str or path
    save : callable
        ``save(tmp_path)`` writes the new content.
    previous : str or path, optional
        Where the file that ``path`` held keeps living once the new one is in place (in
        the same directory). It is linked (or copied) there only after the new file is
        durable, and atomically, so at every moment ``path`` is complete (the old file
        or the new one) and ``previous`` is complete (the file before, or ``path``'s).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        save(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; match a plain open()
        if previous is not None and path.exists():
            _keep_as(path, Path(previous))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _keep_as(path: Path, previous: Path) -> None:
    """Make ``previous`` a second name of ``path``'s current content, atomically."""
    # Named like atomic_save's temporaries, so stale_temporaries(path) finds it after a kill.
    tmp = path.parent / f".{path.stem}.{secrets.token_hex(6)}{path.suffix}"
    try:
        try:
            os.link(path, tmp)  # no copy, and the content is already durable
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, previous)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk (POSIX); on
    # platforms without directory file descriptors this is a no-op.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Temporary files :func:`atomic_save` left beside ``path`` when a process died mid-write."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.stem}.*{path.suffix}"))


def atomic_write_bytes(
    path: str | os.PathLike, data: bytes, previous: str | os.PathLike | None = None
) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_save`)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_save(path, write, previous=previous)


def writable_dir(path: str | os.PathLike, what: str = "output directory") -> Path:
    """Create directory ``path`` (and its parents) and prove it writable by writing a file there.

    Called before any long work, so that an output path that cannot be written fails at
    once rather than after the work is done. ``os.access`` is not enough: it says yes to
    root on read-only mounts and to anyone under ``/proc``.

    Raises
    ------
    OSError
        (``PermissionError``, ``FileNotFoundError``, ...) with a message naming ``path``.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".vipkg-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        raise type(err)(
            f"cannot write to {what} {str(path)!r} ({reason}); choose a directory you can create files in"
        ) from err
    return path
