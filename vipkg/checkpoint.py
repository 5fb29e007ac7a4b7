"""Checkpoints of a fit: everything needed to continue it bit for bit.

A checkpoint holds the guide's and optimizer's state, the scheduler's and the
estimator's state (control-variate averages, step sizes), the RNG state of the
fit's forked generator, the step counter, the losses so far and the recorded
diagnostics. It is written atomically (temporary file in the same directory,
fsync, rename, fsync of the directory), so a process killed at any moment
leaves either the previous checkpoint or the new one, never a torn file. It is
read with ``torch.load(weights_only=True)``: loading a checkpoint can never run
code.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from vipkg._io import atomic_save, stale_temporaries

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint"]

FORMAT = "vipkg-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not belong to the fit that tries to resume from it."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (tensors, numbers, strings, lists and dicts of them) atomically to ``path``."""
    payload = {"format": FORMAT, "version": VERSION, **state}
    atomic_save(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike, map_location=None) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs).

    Raises
    ------
    CheckpointError
        When the file is not a vipkg checkpoint or cannot be unpickled safely.
    """
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r} ({type(err).__name__}: {err}). vipkg writes checkpoints "
            "atomically, so this file was not written by vipkg.fit or was changed afterwards; move it "
            "away to start the fit afresh."
        ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a vipkg checkpoint (no {FORMAT!r} header).")
    if state.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {str(path)!r} has format version {state.get('version')!r}; "
            f"this vipkg reads version {VERSION}."
        )
    return state


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
