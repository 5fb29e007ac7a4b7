"""Soak: a long small fit with diagnostics and checkpoints on must not grow in memory.

Runs ``steps`` (default 100,000) Reparam steps on a 5-d Gaussian target with
``GradientVariance(every=1000)`` and a checkpoint every 10,000 steps, reads the
process's resident set size at every host read, and writes
``benchmarks/results/soak.md``. Growth is measured from 20% of the run (after
allocator warm-up) to the end.

    python benchmarks/bench_soak.py [--steps N] [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

import vipkg
from vipkg._io import atomic_write_bytes
from vipkg.guides import MeanFieldNormal


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--quick", action="store_true", help="10,000 steps")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.md"))
    args = p.parse_args(argv)
    steps = 10_000 if args.quick else args.steps
    torch.set_num_threads(1)
    model = vipkg.models.gaussian(torch.linspace(-1, 1, 5))
    guide = MeanFieldNormal(model)
    trace: list[tuple[int, float]] = []

    def callback(step, loss):
        trace.append((step, rss_mib()))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = vipkg.fit(
            model,
            guide,
            vipkg.Reparam(),
            steps=steps,
            num_particles=8,
            lr=1e-3,
            progress=False,
            check_every=500,
            diagnostics=vipkg.GradientVariance(every=1000, repeats=8),
            checkpoint=Path(tmp) / "soak.ckpt",
            checkpoint_every=10_000,
            callback=callback,
        )
        wall = time.perf_counter() - t0
    warm = next(r for s, r in trace if s >= steps // 5)
    final = trace[-1][1]
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    growth = final - warm
    ok = growth < 20.0
    lines = [
        "# Soak: memory over a long fit",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, Python {platform.python_version()}, {platform.machine()}",
        f"- {steps} Reparam steps, MeanFieldNormal on a 5-d Gaussian, 8 particles, "
        "GradientVariance(every=1000, repeats=8), checkpoint every 10,000 steps, 1 thread.",
        "",
        "| what | value |",
        "|---|---:|",
        f"| wall time (s) | {wall:.1f} |",
        f"| ms per step (fit's own clock, diagnostics excluded) | {result.ms_per_step:.3f} |",
        f"| RSS at 20% of the run (MiB) | {warm:.1f} |",
        f"| RSS at the end (MiB) | {final:.1f} |",
        f"| growth from 20% to the end (MiB) | {growth:+.2f} |",
        f"| peak RSS (MiB) | {peak_kib / 1024:.1f} |",
        f"| gradient-variance records | {len(result.diagnostics['steps'])} |",
        f"| final loss | {float(result.losses[-1]):.4f} |",
        "",
        f"Verdict: {'no memory growth (< 20 MiB)' if ok else 'MEMORY GROWS'}.",
        "",
        "RSS every 10% of the run (MiB): "
        + ", ".join(f"{r:.1f}" for s, r in trace if s % max(steps // 10, 1) == 0),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    atomic_write_bytes(args.out, text.encode())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
