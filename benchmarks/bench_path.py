"""Path-gradient estimators: step cost on RealNVP flows and gradient variance near the optimum.

Three parts, all in one process:

1. Milliseconds per optimisation step (``vipkg.fit``'s own timer, Adam, 64 particles)
   of ``Reparam``, ``STL`` (the slow path gradient: log q re-evaluated by the
   inverse pass at stopped parameters) and ``FastPath`` (Vaitl et al. 2024) for
   RealNVP flows (``Flow.real_nvp``) over dims and depths, on a Gaussian-mixture
   target, plus a hand-written PyTorch reverse-KL loop with the same flow as the
   floor. Target: FastPath <= 1.5x a Reparam step (the paper reports 1.4-2.3x).
2. Trace of the gradient covariance of STL vs Reparam for Gaussian guides on
   Bayesian logistic regression (synthetic and breast cancer) after a Reparam
   fit, i.e. near the optimum. Target: STL >= 30x lower.
3. A RealNVP fit of a multimodal mixture with each estimator (and FastPath's
   forward-KL, self-normalized maximum-likelihood variant): final KL(q || p)
   (the target is normalized) and importance ESS.

How to run::

    python benchmarks/bench_path.py            # full run (<= 4 min on 2 cores)
    python benchmarks/bench_path.py --quick    # smoke run, seconds

Writes ``benchmarks/results/path.md`` and PNGs next to it. Threads:
``VIPKG_BENCH_THREADS`` (default 1: these tensors are small, and a second OpenMP
thread that spin-waits on a shared core made steps ~4x slower in our runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
import warnings

THREADS_ENV = "VIPKG_BENCH_THREADS"
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402

from vipkg._io import atomic_save, atomic_write_bytes  # noqa: E402

PARTICLES = 64
LR = 1e-3
TARGET_FAST = 1.5
TARGET_VAR = 30.0
MIX_LR = 5e-3
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclasses.dataclass
class Settings:
    dims: tuple
    layers: tuple
    warmup: int
    steps: int
    reps: int
    fit_schedule: tuple
    var_repeats: int
    mix_steps: int


FULL = Settings(
    dims=(2, 8, 32, 64),
    layers=(4, 8, 16),
    warmup=10,
    steps=30,
    reps=3,
    fit_schedule=((2000, 1e-2), (1000, 1e-3), (1000, 1e-4)),
    var_repeats=64,
    mix_steps=1000,
)
QUICK = Settings(
    dims=(2, 8),
    layers=(4,),
    warmup=2,
    steps=5,
    reps=2,
    fit_schedule=((100, 1e-2),),
    var_repeats=8,
    mix_steps=30,
)


def _atomic_write(path: str, data: bytes) -> None:
    atomic_write_bytes(path, data)


# ------------------------------------------------------------------------- part 1: timing
def _flow_guide(model, layers, seed=0):
    from vipkg.guides.flow import Flow

    torch.manual_seed(seed)
    return Flow.real_nvp(model, layers=layers, hidden=64)


def _time_vipkg(model, layers, estimator, s: Settings) -> float:
    import vipkg

    guide = _flow_guide(model, layers)
    kw = dict(num_particles=PARTICLES, lr=LR, progress=False)
    vipkg.fit(model, guide, estimator, steps=s.warmup, seed=0, **kw)
    reps = []
    for k in range(s.reps):
        r = vipkg.fit(model, guide, estimator, steps=s.steps, seed=k + 1, **kw)
        if not torch.isfinite(r.losses).all():
            raise FloatingPointError("non-finite loss")
        reps.append(r.ms_per_step)
    return statistics.median(reps)


def _time_hand(model, layers, s: Settings) -> float:
    """Plain PyTorch reverse-KL loop over the same normflows model (no vipkg in the step)."""
    guide = _flow_guide(model, layers)
    flow = guide.flow
    opt = torch.optim.Adam(flow.parameters(), lr=LR)
    log_p = model.log_joint_unconstrained

    def step():
        opt.zero_grad(set_to_none=True)
        z, log_q = flow.q0(PARTICLES)
        for layer in flow.flows:
            z, ld = layer(z)
            log_q = log_q - ld
        loss = (log_q - log_p(z)).mean()
        loss.backward()
        opt.step()

    for _ in range(s.warmup):
        step()
    reps = []
    for _ in range(s.reps):
        t0 = time.perf_counter()
        for _ in range(s.steps):
            step()
        reps.append(1e3 * (time.perf_counter() - t0) / s.steps)
    return statistics.median(reps)


def part_timing(s: Settings) -> list[dict]:
    import vipkg
    from vipkg.estimators.path import STL, FastPath
    from vipkg.models.flow_targets import gaussian_mixture

    rows = []
    for d in s.dims:
        model = gaussian_mixture(d, num_modes=min(8, 2**d))
        for L in s.layers:
            row = {"dim": d, "layers": L}
            for name, fn in [
                ("hand", lambda m=model, n=L: _time_hand(m, n, s)),
                ("reparam", lambda m=model, n=L: _time_vipkg(m, n, vipkg.Reparam(), s)),
                ("stl", lambda m=model, n=L: _time_vipkg(m, n, STL(), s)),
                ("fast", lambda m=model, n=L: _time_vipkg(m, n, FastPath(), s)),
            ]:
                try:
                    row[name] = fn()
                except Exception as err:  # keep benchmarking the rest
                    row[name] = math.nan
                    row.setdefault("errors", []).append(f"{name}: {type(err).__name__}: {err}")
            rows.append(row)
            print(
                f"  dim {d:3d} layers {L:2d}: hand {row['hand']:.2f}  reparam {row['reparam']:.2f}  "
                f"stl {row['stl']:.2f}  fast {row['fast']:.2f} ms",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------- part 2: variance
def part_variance(s: Settings) -> list[dict]:
    import vipkg
    from vipkg.diagnostics import gradient_variance
    from vipkg.estimators.path import STL
    from vipkg.guides import FullRankNormal, MeanFieldNormal

    models = {
        "synthetic N=1000 D=10": vipkg.models.logistic_regression("synthetic", n=1000, d=10),
        "breast_cancer N=569 D=30": vipkg.models.logistic_regression("breast_cancer"),
    }
    rows = []
    for data, model in models.items():
        for name, make in [("MeanFieldNormal", MeanFieldNormal), ("FullRankNormal", FullRankNormal)]:
            torch.manual_seed(0)
            guide = make(model)
            # A decaying step size: the optimum, not the optimizer's noise floor, is what STL is about.
            for steps, lr in s.fit_schedule:
                r = vipkg.fit(
                    model, guide, vipkg.Reparam(), steps=steps, num_particles=16, lr=lr, progress=False
                )
            kw = dict(num_particles=16, repeats=s.var_repeats, seed=1)
            rep = gradient_variance(model, guide, vipkg.Reparam(), **kw).total_trace
            stl = gradient_variance(model, guide, STL(), **kw).total_trace
            rows.append(
                {
                    "data": data,
                    "guide": name,
                    "loss": float(r.losses[-100:].mean()),
                    "reparam": rep,
                    "stl": stl,
                    "ratio": rep / stl,
                }
            )
            print(
                f"  {data} {name}: trace var reparam {rep:.4g}  stl {stl:.4g}  ratio {rep / stl:.1f}x",
                flush=True,
            )
    return rows


# ---------------------------------------------------------------------- part 3: mixture fit
def part_mixture(s: Settings) -> list[dict]:
    import vipkg
    from vipkg._rng import seeded
    from vipkg.diagnostics import importance_ess
    from vipkg.estimators.path import STL, FastPath
    from vipkg.models.flow_targets import gaussian_mixture

    model = gaussian_mixture(4, scale=0.4)
    rows = []
    for name, est in [
        ("Reparam", vipkg.Reparam()),
        ("STL", STL()),
        ("FastPath", FastPath()),
        ("FastPath(kl='forward')", FastPath(kl="forward")),
    ]:
        guide = _flow_guide(model, 6)
        r = vipkg.fit(
            model, guide, est, steps=s.mix_steps, num_particles=PARTICLES, lr=MIX_LR, seed=0, progress=False
        )
        with torch.no_grad(), seeded(7):
            z, log_q = guide.rsample_and_log_prob((20000,))
            log_w = guide.log_joint(model, z) - log_q
        rows.append(
            {
                "estimator": name,
                "kl": float(-log_w.mean()),
                "ess": float(importance_ess(log_w, normalized=True)),
                "ms": r.ms_per_step,
            }
        )
        print(f"  {name}: KL {rows[-1]['kl']:.4f}  ESS {rows[-1]['ess']:.3f}", flush=True)
    return rows


# ----------------------------------------------------------------------------- report
def _plots(timing, variance) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    names = []
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"d{r['dim']}/L{r['layers']}" for r in timing]
    x = range(len(timing))
    for key, lab in [("fast", "FastPath"), ("stl", "STL (slow path)"), ("hand", "hand-written reparam")]:
        ax.plot(x, [r[key] / r["reparam"] for r in timing], marker="o", label=lab)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(TARGET_FAST, color="red", lw=0.8, ls="--", label=f"target {TARGET_FAST}x")
    ax.set_xticks(list(x), labels, rotation=45, ha="right")
    ax.set_ylabel("ms per step / Reparam's")
    ax.set_title("Step cost relative to Reparam, RealNVP")
    ax.legend()
    fig.tight_layout()
    names.append("path_step_ratio.png")
    buf = os.path.join(OUT_DIR, names[-1])
    os.makedirs(OUT_DIR, exist_ok=True)
    atomic_save(buf, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    xs = range(len(variance))
    ax.bar([i - 0.2 for i in xs], [r["reparam"] for r in variance], 0.4, label="Reparam")
    ax.bar([i + 0.2 for i in xs], [r["stl"] for r in variance], 0.4, label="STL")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"{r['data'].split()[0]}\n{r['guide']}" for r in variance], fontsize=7)
    ax.set_ylabel("trace of gradient covariance")
    ax.set_title("Near the optimum, logistic regression")
    ax.legend()
    fig.tight_layout()
    names.append("path_variance.png")
    buf = os.path.join(OUT_DIR, names[-1])
    atomic_save(buf, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return names


def _report(timing, variance, mixture, s: Settings, quick: bool, elapsed: float, pngs) -> str:
    lines = [
        "# Path-gradient estimators: STL, FastPath vs Reparam",
        "",
        f"Generated by `benchmarks/bench_path.py{' --quick' if quick else ''}` on "
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}; "
        f"{elapsed:.0f} s in all." + (" **Quick smoke run: numbers are not meaningful.**" if quick else ""),
        "",
        f"## Step cost (ms per step, Adam, {PARTICLES} particles, median of {s.reps} x {s.steps} steps)",
        "",
        "Target: Gaussian mixture (min(8, 2^dim) corner modes). `hand` is a plain PyTorch reverse-KL "
        "loop over the same normflows flow. `stl` re-evaluates log q by the inverse pass "
        "(the slow path gradient).",
        "",
        "| dim | layers | hand | Reparam | STL | FastPath | FastPath / Reparam | STL / Reparam | "
        "Reparam / hand |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in timing:
        lines.append(
            f"| {r['dim']} | {r['layers']} | {r['hand']:.2f} | {r['reparam']:.2f} | {r['stl']:.2f} | "
            f"{r['fast']:.2f} | {r['fast'] / r['reparam']:.2f} | {r['stl'] / r['reparam']:.2f} | "
            f"{r['reparam'] / r['hand']:.2f} |"
        )
    ratios = [r["fast"] / r["reparam"] for r in timing if math.isfinite(r["fast"] / r["reparam"])]
    if ratios:
        worst = max(ratios)
        lines += [
            "",
            f"FastPath / Reparam: median {statistics.median(ratios):.2f}x, worst {worst:.2f}x "
            f"(target <= {TARGET_FAST}x: {'met' if worst <= TARGET_FAST else 'NOT met'}).",
        ]
    errors = [e for r in timing for e in r.get("errors", [])]
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    lines += [
        "",
        "## Gradient variance near the optimum (Bayesian logistic regression, 16 particles)",
        "",
        "Each guide fitted with Reparam (Adam, (steps, lr) = "
        + ", ".join(f"({n}, {lr:g})" for n, lr in s.fit_schedule)
        + f"); then {s.var_repeats} independent gradient estimates per estimator. STL's variance "
        "vanishes only where the guide family contains the posterior: the more Gaussian the posterior "
        "(more data per parameter) and the richer the family, the larger the ratio.",
        "",
        "| data | guide | final loss | trace var Reparam | trace var STL | Reparam / STL |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in variance:
        lines.append(
            f"| {r['data']} | {r['guide']} | {r['loss']:.3f} | {r['reparam']:.4g} | {r['stl']:.4g} | "
            f"{r['ratio']:.1f}x |"
        )
    for data in dict.fromkeys(r["data"] for r in variance):
        worst = min(r["ratio"] for r in variance if r["data"] == data)
        lines += [
            "",
            f"{data}: target STL >= {TARGET_VAR:.0f}x lower: {'met' if worst >= TARGET_VAR else 'NOT met'} "
            f"(worst {worst:.1f}x).",
        ]
    lines += [
        "",
        f"## RealNVP (6 blocks) on a 4-d mixture with 16 modes, {s.mix_steps} steps, lr {MIX_LR:g}",
        "",
        "KL(q || p) and importance ESS ((sum w)^2 / (n sum w^2)) from 20000 fresh draws.",
        "",
        "| estimator | KL(q‖p) | ESS | ms/step |",
        "|---|---:|---:|---:|",
    ]
    for r in mixture:
        lines.append(f"| {r['estimator']} | {r['kl']:.4f} | {r['ess']:.3f} | {r['ms']:.2f} |")
    if pngs:
        lines += ["", *[f"![{p}]({p})" for p in pngs]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: few sizes and steps")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "path.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get(THREADS_ENV, "1")))
    warnings.filterwarnings("ignore")
    s = QUICK if args.quick else FULL
    t0 = time.perf_counter()
    print("step cost:", flush=True)
    timing = part_timing(s)
    print("gradient variance:", flush=True)
    variance = part_variance(s)
    print("mixture fit:", flush=True)
    mixture = part_mixture(s)
    pngs = _plots(timing, variance)
    text = _report(timing, variance, mixture, s, args.quick, time.perf_counter() - t0, pngs)
    _atomic_write(args.out, text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
