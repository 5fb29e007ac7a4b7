"""Reference posterior moments of the hard posteriors by long NUTS runs.

For each model in ``vipkg.models.HARD_POSTERIORS`` without a closed form, Pyro's NUTS
runs on the model's own unconstrained log joint (``potential_fn = -log_joint_unconstrained``
in float64), so the reference is for exactly the density vipkg's estimators see. Chains
start from Uniform(-2, 2) in the unconstrained space (as Stan's default) and run in worker
processes, two at a time. The script checks R-hat (rank-normalized split R-hat, ArviZ)
and bulk/tail ESS over every unconstrained coordinate and every constrained site, refuses
to write anything when max R-hat > 1.01, and writes one small JSON file per model:

    vipkg/models/references/<name>.json

with the unconstrained and per-site posterior mean and sd, the NUTS settings, the
diagnostics, the package versions and the date. The model constructors read these files.

Eight schools is drawn once, in the non-centred parameterization (on which NUTS does not
diverge), and the draws are mapped to both parameterizations: ``theta = mu + tau *
theta_tilde`` is the same posterior, so the centred model's file describes its exact
target without the bias that divergences in its funnel would bring.

Pyro's own ``jit_compile`` applies only to a Pyro model, not to a ``potential_fn``; here the
potential is traced with ``torch.jit.trace`` instead (about 20 % faster per gradient), after
checking the traced function against the eager one at random points.

How to run::

    python benchmarks/make_references.py              # all references (15-20 min on 2 cores)
    python benchmarks/make_references.py --only ar_series
    python benchmarks/make_references.py --quick --out /tmp/refs   # smoke run

Threads: one per worker (every potential here is small).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import inspect
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vipkg._io import atomic_write_bytes  # noqa: E402
from vipkg.models import hard  # noqa: E402
from vipkg.models._reference import data_checksum  # noqa: E402
from vipkg.models.eight_schools import eight_schools  # noqa: E402

F64 = torch.float64
MAX_RHAT = 1.01
OUT = REPO / "vipkg" / "models" / "references"

#: run name -> how to draw: the model NUTS runs on, its settings, and the files it feeds
#: (file name -> (target model, map from the sampled model's constrained draws to its sites))
RUNS = {
    "stochastic_volatility": dict(
        sampler=lambda: hard.stochastic_volatility(dtype=F64),
        constructor=hard.stochastic_volatility,
        settings=dict(chains=4, warmup=1000, draws=1500, target_accept_prob=0.95, full_mass=False),
        outputs={"stochastic_volatility": (lambda: hard.stochastic_volatility(dtype=F64), None)},
    ),
    "ar_series": dict(
        sampler=lambda: hard.ar_series(dtype=F64),
        constructor=hard.ar_series,
        # alpha trades against sum(beta): a dense mass matrix turns that ridge into a
        # round target (trees ~4x shorter than with a diagonal one).
        settings=dict(chains=4, warmup=1000, draws=3000, target_accept_prob=0.9, full_mass=True),
        outputs={"ar_series": (lambda: hard.ar_series(dtype=F64), None)},
    ),
    "random_walk": dict(
        sampler=lambda: hard.random_walk(dtype=F64),
        constructor=hard.random_walk,
        # sigma_x and the walk form a funnel: ESS per draw is ~0.07, hence the long chains.
        settings=dict(chains=4, warmup=1000, draws=6000, target_accept_prob=0.9, full_mass=False),
        outputs={"random_walk": (lambda: hard.random_walk(dtype=F64), None)},
    ),
    "eight_schools": dict(
        sampler=lambda: eight_schools(centered=False, dtype=F64),
        constructor=None,
        settings=dict(chains=4, warmup=1000, draws=5000, target_accept_prob=0.9, full_mass=False),
        outputs={
            "eight_schools": (lambda: eight_schools(centered=False, dtype=F64), None),
            "eight_schools_centered": (
                lambda: eight_schools(centered=True, dtype=F64),
                lambda z: {
                    "mu": z["mu"],
                    "tau": z["tau"],
                    "theta": z["mu"][:, None] + z["tau"][:, None] * z["theta_tilde"],
                },
            ),
        },
    ),
}


def _potential(model, jit: bool):
    def eager(u):
        return -model.log_joint_unconstrained(u[None])[0]

    if not jit:
        return eager
    g = torch.Generator().manual_seed(123)
    example = torch.randn(model.dim, generator=g, dtype=F64)
    traced = torch.jit.trace(eager, (example,), check_trace=False)
    for _ in range(5):
        u = (2 * torch.randn(model.dim, generator=g, dtype=F64)).requires_grad_()
        a, b = eager(u), traced(u)
        (ga,) = torch.autograd.grad(a, u)
        (gb,) = torch.autograd.grad(b, u)
        if not (torch.allclose(a, b, rtol=1e-12) and torch.allclose(ga, gb, rtol=1e-10, atol=1e-12)):
            # A trace can bake in a branch taken at the example point; fall back rather than
            # sample the wrong density.
            return eager
    return traced


def run_chain(run: str, chain: int, settings: dict, jit: bool) -> dict:
    """One NUTS chain of ``run`` (in a worker process): draws of the flat unconstrained vector."""
    import warnings

    import pyro
    from pyro.infer.mcmc import MCMC, NUTS

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    model = RUNS[run]["sampler"]()
    potential = _potential(model, jit)
    seed = 1000 * sorted(RUNS).index(run) + chain
    pyro.set_rng_seed(seed)
    g = torch.Generator().manual_seed(seed)
    init = 4 * torch.rand(model.dim, generator=g, dtype=F64) - 2
    kernel = NUTS(
        potential_fn=lambda p: potential(p["u"]),
        target_accept_prob=settings["target_accept_prob"],
        full_mass=settings["full_mass"],
        max_tree_depth=settings.get("max_tree_depth", 10),
    )
    mcmc = MCMC(
        kernel,
        num_samples=settings["draws"],
        warmup_steps=settings["warmup"],
        initial_params={"u": init},
        disable_progbar=True,
    )
    start = time.perf_counter()
    mcmc.run()
    seconds = time.perf_counter() - start
    diag = mcmc.diagnostics()
    divergences = len(diag["divergences"]["chain 0"])
    return {
        "run": run,
        "chain": chain,
        "seed": seed,
        "draws": mcmc.get_samples()["u"].numpy(),
        "divergences": divergences,
        "step_size": float(kernel.step_size),
        "seconds": seconds,
    }


def _summary(draws: np.ndarray) -> dict:
    """Max R-hat, min bulk / tail ESS and max MCSE(mean) / sd over the columns of ``[chains, n, k]``."""
    import arviz as az

    ds = az.convert_to_dataset({"x": draws})
    rhat = az.rhat(ds)["x"].values
    bulk = az.ess(ds, method="bulk")["x"].values
    tail = az.ess(ds, method="tail")["x"].values
    mcse = az.mcse(ds, method="mean")["x"].values
    sd = draws.reshape(-1, draws.shape[-1]).std(0, ddof=1)
    return {
        "max_rhat": float(rhat.max()),
        "min_ess_bulk": float(bulk.min()),
        "min_ess_tail": float(tail.min()),
        "max_mcse_mean_over_sd": float((mcse / sd).max()),
    }


def _model_kwargs(constructor) -> dict:
    if constructor is None:
        return {}
    sig = inspect.signature(constructor)
    return {k: p.default for k, p in sig.parameters.items() if k not in ("form", "dtype")}


def _versions() -> dict:
    import arviz
    import pyro

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "arviz": arviz.__version__,
        "numpy": np.__version__,
    }


def _records(run: str, chains: list[dict], settings: dict, jit: bool) -> dict[str, dict]:
    spec = RUNS[run]
    sampler = spec["sampler"]()
    chains = sorted(chains, key=lambda c: c["chain"])
    u = torch.as_tensor(np.stack([c["draws"] for c in chains]), dtype=F64)  # [C, N, dim]
    C, N, _ = u.shape
    out = {}
    for name, (make_target, to_target) in spec["outputs"].items():
        target = make_target()
        latents = sampler.constrain(u.reshape(C * N, -1))
        if to_target is not None:
            latents = to_target(latents)
        ut = target.unconstrain(latents)
        flat_sites = torch.cat([latents[k].reshape(C * N, -1) for k in target.sites], -1)
        both = torch.cat([ut, flat_sites], -1).reshape(C, N, -1).numpy()
        diagnostics = _summary(both)
        diagnostics.update(
            divergences=[c["divergences"] for c in chains],
            step_size=[c["step_size"] for c in chains],
            seconds_per_chain=[round(c["seconds"], 1) for c in chains],
        )
        sampled_as = "" if to_target is None else f" (drawn as {sampler.name!r}, mapped)"
        source = (
            f"Pyro NUTS, {C} chains x {N} draws ({settings['warmup']} warm-up){sampled_as}, "
            f"max R-hat {diagnostics['max_rhat']:.4f}, min bulk ESS {diagnostics['min_ess_bulk']:.0f}, "
            f"{sum(diagnostics['divergences'])} divergences"
        )
        out[name] = {
            "name": name,
            "model": target.name,
            "model_kwargs": _model_kwargs(spec["constructor"]),
            "dim": target.dim,
            "sites": {k: list(s.shape) for k, s in target.sites.items()},
            "data_checksum": data_checksum(target.data),
            "unconstrained_mean": ut.mean(0).tolist(),
            "unconstrained_sd": ut.std(0).tolist(),
            "site_mean": {k: v.mean(0).tolist() for k, v in latents.items()},
            "site_sd": {k: v.std(0).tolist() for k, v in latents.items()},
            "source": source,
            "settings": {
                "sampler": "pyro.infer.mcmc.NUTS",
                "potential": f"-{sampler.name}.log_joint_unconstrained (float64)",
                "sampled_model": sampler.name,
                "init": "Uniform(-2, 2) per unconstrained coordinate",
                "jit": "torch.jit.trace of the potential" if jit else "none",
                "max_tree_depth": settings.get("max_tree_depth", 10),
                "seeds": [c["seed"] for c in chains],
                **settings,
            },
            "diagnostics": diagnostics,
            "versions": _versions(),
            "date": datetime.date.today().isoformat(),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated runs: " + ", ".join(RUNS))
    p.add_argument("--quick", action="store_true", help="smoke run: 2 chains x 100 draws, 100 warm-up")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-jit", action="store_true")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    runs = [r.strip() for r in args.only.split(",")] if args.only else list(RUNS)
    unknown = set(runs) - set(RUNS)
    if unknown:
        p.error(f"unknown run(s) {sorted(unknown)}; choose from {list(RUNS)}")
    settings = {}
    for r in runs:
        s = dict(RUNS[r]["settings"])
        if args.quick:
            s.update(chains=2, warmup=100, draws=100)
        settings[r] = s
    jobs = [(r, c) for r in runs for c in range(settings[r]["chains"])]
    results: dict[str, list] = {r: [] for r in runs}
    start = time.perf_counter()
    # Chains of the costliest models go first so the two workers finish together.
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=args.workers, mp_context=ctx) as pool:
        futures = {pool.submit(run_chain, r, c, settings[r], not args.no_jit): (r, c) for r, c in jobs}
        for f in cf.as_completed(futures):
            res = f.result()
            results[res["run"]].append(res)
            print(
                f"[{time.perf_counter() - start:7.1f}s] {res['run']} chain {res['chain']}: "
                f"{res['seconds']:.1f}s, step {res['step_size']:.3g}, {res['divergences']} divergences",
                flush=True,
            )
    records = {}
    for r in runs:
        records.update(_records(r, results[r], settings[r], not args.no_jit))
    failed = {n: rec["diagnostics"]["max_rhat"] for n, rec in records.items()}
    failed = {n: v for n, v in failed.items() if not v <= MAX_RHAT}
    for n, rec in records.items():
        print(f"{n}: {rec['source']}; total {sum(rec['diagnostics']['seconds_per_chain']):.0f}s of chains")
    if failed and not args.quick:
        raise SystemExit(
            f"max R-hat above {MAX_RHAT} for {failed}: the chains disagree, nothing written. "
            "Run longer chains (settings in RUNS) or look at the model."
        )
    out = Path(args.out)
    for n, rec in records.items():
        atomic_write_bytes(out / f"{n}.json", (json.dumps(rec, indent=1) + "\n").encode())
        print(f"wrote {out / f'{n}.json'}")
    print(f"total wall time {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
