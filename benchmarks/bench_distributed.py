"""Steps per second of data-parallel fitting: 1 process against 2 gloo processes.

Model: the zoo's logistic regression on synthetic data (N = 200,000 rows, D = 50,
float32), mean-field Gaussian guide, ``Reparam``, 16 particles, Adam. Configurations:

- ``vipkg.fit``, one process, 1 and 2 threads (the baseline);
- ``vipkg.distributed.fit`` on 1 gloo process (the all-reduce wrapper's overhead);
- ``vipkg.distributed.fit`` on 2 gloo processes of 1 thread each, data split in two.

Each configuration runs a short warm-up fit, then the timed fit (``FitResult.elapsed``:
the optimisation loop only, not process start-up or data generation). With
``particles="shared"`` the 2-process fit follows the 1-process trajectory, so the
final losses must agree (checked and reported).

How to run::

    python benchmarks/bench_distributed.py            # full run (about a minute on 2 cores)
    python benchmarks/bench_distributed.py --quick    # smoke run (seconds)

Writes ``benchmarks/results/distributed.md`` and ``distributed.png``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time

os.environ.setdefault("OMP_PROC_BIND", "close")

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import vipkg  # noqa: E402
from vipkg._io import atomic_save, atomic_write_bytes  # noqa: E402
from vipkg.distributed import launch  # noqa: E402
from vipkg.guides import MeanFieldNormal  # noqa: E402
from vipkg.models import logistic_regression  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PARTICLES = 16


def _run(fit_fn, n, d, steps, warmup, threads):
    torch.set_num_threads(threads)
    model = logistic_regression("synthetic", n=n, d=d, seed=0)
    settings = dict(num_particles=PARTICLES, lr=0.01, seed=0, progress=False, check_every=50)
    fit_fn(model, MeanFieldNormal(model), vipkg.Reparam(), steps=warmup, **settings)
    r = fit_fn(model, MeanFieldNormal(model), vipkg.Reparam(), steps=steps, **settings)
    return {"elapsed": r.elapsed, "steps": steps, "final_loss": float(r.losses[-1])}


def _worker(rank, world, n, d, steps, warmup):
    from vipkg.distributed import fit

    return _run(fit, n, d, steps, warmup, threads=1 if world > 1 else 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small data, few steps: a smoke check")
    args = parser.parse_args(argv)
    n, d, steps, warmup = (20_000, 20, 20, 3) if args.quick else (200_000, 50, 300, 20)

    rows = {}
    t0 = time.perf_counter()
    for threads in (1, 2):
        rows[f"vipkg.fit, 1 process x {threads} thread(s)"] = _run(vipkg.fit, n, d, steps, warmup, threads)
    rows["distributed.fit, 1 gloo process x 2 threads"] = launch(_worker, 1, n, d, steps, warmup, threads=2)[
        0
    ]
    two = launch(_worker, 2, n, d, steps, warmup, threads=1)
    rows["distributed.fit, 2 gloo processes x 1 thread"] = max(two, key=lambda r: r["elapsed"])
    total = time.perf_counter() - t0

    base = rows["vipkg.fit, 1 process x 2 thread(s)"]
    base_rate = base["steps"] / base["elapsed"]
    lines = [
        "# Data-parallel fitting: 1 process against 2 gloo processes",
        "",
        f"Logistic regression, synthetic N = {n:,}, D = {d}, float32; MeanFieldNormal, Reparam, "
        f"{PARTICLES} particles, Adam; {steps} timed steps after {warmup} warm-up steps. Steps/s from "
        "`FitResult.elapsed` (the optimisation loop only; the slower rank for 2 processes).",
        "",
        "| configuration | steps/s | ms/step | vs vipkg.fit x 2 threads | final loss |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows.items():
        rate = r["steps"] / r["elapsed"]
        lines.append(
            f"| {label} | {rate:.1f} | {1e3 / rate:.2f} | {rate / base_rate:.2f}x | {r['final_loss']:.3f} |"
        )
    diff = abs(two[0]["final_loss"] - base["final_loss"])
    agree = abs(two[0]["final_loss"] - two[1]["final_loss"])
    lines += [
        "",
        f"Final loss of 2 processes against 1 process: |difference| = {diff:.2e} (float32 rounding of the "
        f"all-reduce; the ranks agree to {agree:.1e}).",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}; {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; "
        f"whole benchmark {total:.0f} s{' (--quick)' if args.quick else ''}.",
        "",
        "On 2 cores the 2-process run can at best match 1 process x 2 threads: both use the same two "
        "cores, and the matrix products of one process already run on both. What the split buys here is "
        "the check that it costs little (one all-reduce of the gradient per step); the gain needs more "
        "cores or GPUs than one process can use.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(RESULTS, exist_ok=True)
    atomic_write_bytes(os.path.join(RESULTS, "distributed.md"), text.encode())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    labels = list(rows)
    ax.barh(labels, [r["steps"] / r["elapsed"] for r in rows.values()], color="tab:blue")
    ax.set_xlabel("steps / s")
    ax.set_title(f"logistic regression N={n:,}, D={d}: steps per second")
    fig.tight_layout()
    atomic_save(os.path.join(RESULTS, "distributed.png"), lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
