"""Checkpoints of a fit: everything needed to continue it bit for bit.

A checkpoint holds the guide's and optimizer's state, the scheduler's and the
estimator's state (control-variate averages, step sizes), the RNG state of the
fit's forked generator, the step counter, the losses so far, the recorded
diagnostics and the identity of the fit's configuration (seed, estimator,
objective, guide type, particle count), which a resume must match.

File format (version 2)::

    vipkg-checkpoint\n
    version=2 size=<payload bytes> sha256=<hex digest of the payload>\n
    <payload: torch.save of the state>

Every byte is checked on reading: the header must match exactly, the payload must
have exactly ``size`` bytes and its SHA-256 must match, so a flipped, inserted or
missing byte anywhere (a disk error, an outside write, truncation) is a
:class:`CheckpointError` naming the file, never a silently different resume. The
payload is read with ``torch.load(weights_only=True)``: loading a checkpoint can
never run code.

Writes are atomic (temporary file in the same directory, fsync, rename, fsync of
the directory), so a process killed at any moment leaves either the previous
checkpoint or the new one, never a torn file. The checkpoint being replaced is
kept as ``<path>.prev`` (:func:`previous_path`) until the next write: when the
main file is later found damaged, the error says whether that one is intact and
how to resume from it. Nothing falls back to it on its own, because resuming from
an older step is the user's decision (it repeats up to ``checkpoint_every`` steps).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
from pathlib import Path

import torch

from vipkg._io import atomic_write_bytes, stale_temporaries, writable_dir

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "previous_path"]

FORMAT = "vipkg-checkpoint"
VERSION = 2
MAGIC = FORMAT.encode() + b"\n"
_HEADER = re.compile(rb"version=(\d{1,9}) size=(\d{1,19}) sha256=([0-9a-f]{64})\n")
_HEADER_MAX = 128  # longer than any valid header line


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not belong to the fit that tries to resume from it."""


def previous_path(path: str | os.PathLike) -> Path:
    """Where the checkpoint before the one at ``path`` is kept (``<path>.prev``)."""
    path = Path(path)
    return path.with_name(path.name + ".prev")


def encode(state: dict) -> bytes:
    """The file content of a checkpoint of ``state``: header and checksummed payload."""
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, **state}, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest()
    return MAGIC + f"version={VERSION} size={len(payload)} sha256={digest}\n".encode() + payload


def save_checkpoint(path: str | os.PathLike, state: dict, keep_previous: bool = True) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically to ``path``.

    Parameters
    ----------
    path : str or path
    state : dict
    keep_previous : bool
        Keep the checkpoint that ``path`` held as :func:`previous_path` (linked there only
        once the new one is durable). ``False`` (a fresh fit replacing another fit's file)
        writes the new one and then removes any previous checkpoint, which belongs to the
        other fit.
    """
    prev = previous_path(path)
    atomic_write_bytes(path, encode(state), previous=prev if keep_previous else None)
    if not keep_previous:
        try:
            prev.unlink()
        except FileNotFoundError:
            pass


def _verified_payload(path: Path, data: bytes) -> bytes:
    """The payload of checkpoint file content ``data``, or :class:`CheckpointError` when any byte is off."""
    if not data.startswith(MAGIC):
        hint = ""
        if data.startswith(b"PK\x03\x04"):
            hint = (
                " It is a torch zip file: either not written by vipkg.fit, or written by a vipkg older "
                "than checkpoint format 2, which carried no checksum and cannot be verified."
            )
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it is not a vipkg checkpoint (its first bytes are "
            f"not the {FORMAT!r} header, so it was damaged or written by something else).{hint}"
        )
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _HEADER_MAX)
    header = data[len(MAGIC) : end + 1] if end >= 0 else b""
    match = _HEADER.fullmatch(header)
    if match is None:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its header line is damaged.")
    version, size, digest = int(match[1]), int(match[2]), match[3].decode()
    if version != VERSION:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: it has format version {version}; "
            f"this vipkg reads version {VERSION}."
        )
    payload = data[len(MAGIC) + len(header) :]
    if len(payload) != size:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: its payload has {len(payload)} bytes, its header says "
            f"{size} (the file was truncated or appended to)."
        )
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: its SHA-256 checksum does not match its content "
            "(the file was damaged after it was written)."
        )
    return payload


def _read(path: Path, map_location) -> dict:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {type(err).__name__}: {err}") from err
    payload = _verified_payload(path, data)
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:
        # The checksum matched, so the file is as written: it was built by hand, not by vipkg.fit.
        reason = " ".join(str(err).split())  # torch's messages span lines
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {reason}); its checksum matches, "
            "so it was written this way, not by vipkg.fit."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("version") != VERSION:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: its payload is not a vipkg checkpoint.")
    return state


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint`, after verifying every byte of it.

    The payload is unpickled with ``weights_only=True``: no code runs.

    Raises
    ------
    CheckpointError
        When the file is damaged (any byte changed, truncated, appended to), is not a vipkg
        checkpoint, or cannot be unpickled safely. The message names the file and, when the
        previous checkpoint (:func:`previous_path`) is intact, its step and how to resume from it.
    """
    path = Path(path)
    try:
        return _read(path, map_location)
    except CheckpointError as err:
        hint = _previous_hint(path) if path.exists() else ""
        raise CheckpointError(f"{err}{hint}") from err.__cause__


def _previous_hint(path: Path) -> str:
    prev = previous_path(path)
    if not prev.exists():
        return " There is no previous checkpoint beside it; fit(..., overwrite=True) starts afresh."
    try:
        step = int(_read(prev, "cpu")["step"])
    except (CheckpointError, KeyError, TypeError, ValueError):
        return (
            f" The previous checkpoint {str(prev)!r} is damaged too; fit(..., overwrite=True) starts afresh."
        )
    return (
        f" The previous checkpoint {str(prev)!r} (step {step}) is intact: to resume from it, move it over "
        f"the damaged file (mv {str(prev)!r} {str(path)!r}) and run again with resume=True."
    )


def check_target(path: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Before a fit with ``checkpoint=path`` starts: refuse to let a fresh fit replace a checkpoint,
    and make sure the checkpoint's directory exists and is writable (so that the first write, many
    steps later, cannot be the first to fail).

    Raises
    ------
    CheckpointError
        When ``path`` (or its previous checkpoint) exists, ``resume`` is False and ``overwrite``
        is False; or when ``resume`` finds only the previous checkpoint.
    ValueError
        When both ``resume`` and ``overwrite`` are given.
    OSError
        When the directory cannot be created or written.
    """
    if resume and overwrite:
        raise ValueError("resume=True continues the checkpoint and overwrite=True replaces it; pass one.")
    path = Path(path)
    prev = previous_path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is a directory; pass a file path.")
    if not overwrite and not path.exists() and prev.exists():
        # A write never leaves the previous checkpoint without the main one, so someone removed it;
        # starting afresh would delete the previous one too at the first write.
        raise CheckpointError(
            f"checkpoint {str(path)!r} is missing but its previous checkpoint {str(prev)!r} exists. To "
            f"resume from that one, move it to {str(path)!r} and pass resume=True; to start afresh and "
            "replace it, pass overwrite=True."
        )
    if path.exists() and not resume and not overwrite:
        raise CheckpointError(
            f"checkpoint {str(path)!r} already exists, and a fresh fit would overwrite it. Pass "
            "resume=True (vipkg fit --resume) to continue it, or overwrite=True (--overwrite) to start "
            "afresh and replace it, or choose another path."
        )
    writable_dir(path.parent, "the checkpoint's directory")


def remove_stale_temporaries(path: str | os.PathLike) -> None:
    """Delete temporary files that a killed writer left beside ``path``."""
    for tmp in stale_temporaries(path):
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def diagnostics_to_state(diag: dict) -> dict:
    """Recorded diagnostics as plain containers (``weights_only`` can load them)."""
    if not diag:
        return {}
    return {
        "steps": list(diag["steps"]),
        "gradient_variance": [dataclasses.asdict(g) for g in diag["gradient_variance"]],
    }


def diagnostics_from_state(state: dict) -> dict:
    from vipkg.diagnostics.variance import GradientVarianceResult

    if not state:
        return {}
    return {
        "steps": list(state["steps"]),
        "gradient_variance": [GradientVarianceResult(**g) for g in state["gradient_variance"]],
    }


def check_matches(path, state: dict, expected: dict) -> None:
    """Raise :class:`CheckpointError` when the checkpoint was written by a different fit."""
    for key, want in expected.items():
        got = state.get(key)
        if got != want:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written with {key}={got!r}, but this fit has {key}={want!r}; "
                "resuming would not reproduce the run. Pass the same arguments, or a new checkpoint path."
            )
