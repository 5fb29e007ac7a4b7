"""Reference posterior moments shipped with the package (``vipkg/models/references/*.json``).

The files are written by ``benchmarks/make_references.py`` from long NUTS runs on each
model's own unconstrained log joint. A file describes the model built with the keyword
arguments it records; any other arguments give another posterior, so its moments are
attached only when the arguments match.
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

import torch

__all__ = ["load_reference", "reference_path", "data_checksum"]


def reference_path(name: str):
    """The packaged JSON file of hard posterior ``name`` (it may not exist)."""
    return resources.files("vipkg.models").joinpath("references", f"{name}.json")


def data_checksum(data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Sum of every data entry in float64: cheap evidence that a file still fits its data."""
    return {k: float(v.double().sum()) for k, v in sorted(data.items())}


@functools.cache
def _record(name: str) -> dict | None:
    path = reference_path(name)
    return json.loads(path.read_text()) if path.is_file() else None


def load_reference(name: str, kwargs: dict[str, Any], dtype) -> dict[str, Any]:
    """Moments of ``name`` as tensors of ``dtype``, or ``{}`` when the arguments differ or no file exists.

    Returns
    -------
    dict
        ``unconstrained_mean``, ``unconstrained_sd`` (Tensor [dim]), ``site_mean`` and
        ``site_sd`` ({site: Tensor}), ``source`` (str) and ``nuts`` (the raw record:
        settings, diagnostics, versions, date).
    """
    record = _record(name)
    if record is None or record["model_kwargs"] != kwargs:
        return {}

    def tensor(x):
        return torch.tensor(x, dtype=dtype)

    return {
        "unconstrained_mean": tensor(record["unconstrained_mean"]),
        "unconstrained_sd": tensor(record["unconstrained_sd"]),
        "site_mean": {k: tensor(v) for k, v in record["site_mean"].items()},
        "site_sd": {k: tensor(v) for k, v in record["site_sd"].items()},
        "source": record["source"],
        "nuts": {
            k: record[k] for k in ("settings", "diagnostics", "versions", "date", "dim", "data_checksum")
        },
    }
