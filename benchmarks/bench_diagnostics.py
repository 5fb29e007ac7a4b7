"""What recording gradient variance costs a fit: wall time with and without ``GradientVariance()``.

Fits Bayesian logistic regression (breast cancer, mean-field Reparam, 16 particles) for
``--steps`` steps, alternating runs with the default ``GradientVariance()`` and without,
and writes the median wall-clock ratio to ``benchmarks/results/diagnostics.md``.

    python benchmarks/bench_diagnostics.py [--steps N] [--repeats R] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch

import vipkg
from vipkg._io import atomic_write_bytes
from vipkg.guides import MeanFieldNormal


def _run(model, diagnostics, steps) -> float:
    t0 = time.perf_counter()
    vipkg.fit(
        model, MeanFieldNormal(model), vipkg.Reparam(), steps=steps, progress=False, diagnostics=diagnostics
    )
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "diagnostics.md"))
    args = p.parse_args(argv)
    steps, repeats = (800, 1) if args.quick else (args.steps, args.repeats)
    torch.set_num_threads(2)
    model = vipkg.models.logistic_regression("breast_cancer")
    gv = vipkg.GradientVariance()
    _run(model, None, 200)  # warm-up
    plain, with_gv = [], []
    for _ in range(repeats):
        plain.append(_run(model, None, steps))
        with_gv.append(_run(model, gv, steps))
    ratio = statistics.median(w / p for w, p in zip(with_gv, plain))
    text = "\n".join(
        [
            "# Cost of recording gradient variance during a fit",
            "",
            f"- Date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
            f"- torch {torch.__version__}",
            f"- Breast-cancer logistic regression, MeanFieldNormal + Reparam, 16 particles, {steps} steps,",
            f"  GradientVariance(every={gv.every}, repeats={gv.repeats}), {repeats} alternating runs.",
            "",
            "| run | wall s (each repeat) |",
            "|---|---|",
            f"| no diagnostics | {', '.join(f'{t:.2f}' for t in plain)} |",
            f"| GradientVariance() | {', '.join(f'{t:.2f}' for t in with_gv)} |",
            "",
            f"Median slowdown: {100 * (ratio - 1):+.1f}% (target: at most about +10%).",
            "",
        ]
    )
    print(text)
    atomic_write_bytes(args.out, text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
