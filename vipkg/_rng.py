"""Seeded randomness that leaves the caller's torch RNG stream as it was."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device | None = None):
    """Fork the torch RNG (CPU, and ``device`` when it is CUDA) and seed it; no-op for ``None``."""
    if seed is None:
        yield
        return
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
