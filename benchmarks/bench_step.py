"""Milliseconds per optimisation step: vipkg vs a hand-written PyTorch loop vs Pyro SVI.

Every configuration fits a mean-field Gaussian to Bayesian logistic regression by
maximising the ELBO with Adam (lr 1e-2):

* vipkg ``fit(..., Reparam(), compile=False)`` and ``compile=True``;
* a hand-written plain-PyTorch loop computing the same ELBO, eager and with the
  whole step (zero_grad, loss, backward, Adam step) wrapped in ``torch.compile``;
* Pyro's ``SVI`` with ``Trace_ELBO(vectorize_particles=True)`` and ``AutoNormal``.

Each configuration is warmed up (compiled ones longer, so that compilation is not
timed), then a fixed number of steps is timed with ``time.perf_counter`` three
times; the table reports the median. Everything runs in one process.

How to run::

    python benchmarks/bench_step.py            # full run, writes benchmarks/RESULTS.md
    python benchmarks/bench_step.py --quick    # smoke run with few steps

Threads: ``VIPKG_BENCH_THREADS`` (default 2) is passed to ``torch.set_num_threads``
for every configuration. OpenMP threads are pinned (``OMP_PROC_BIND=close``,
``OMP_PLACES=cores``) unless those variables are already set: on small VMs an
unpinned OpenMP worker that spin-waits on the same core as the main thread makes
single runs 10-100x slower at random.
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
# libgomp reads these once, when torch loads it: they must be set before the import.
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vipkg._io import atomic_write_bytes  # noqa: E402

LR = 1e-2
INIT_SCALE = 0.1
CHECK_EVERY = 50  # vipkg.fit's host-read period; compiled vipkg windows are multiples of it
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
TARGET_EAGER = 1.15
TARGET_COMPILED = 1.10
PARTICLES = (1, 16)
MODELS = {
    "synthetic N=10000 D=50": dict(dataset="synthetic", n=10_000, d=50),
    "breast_cancer N=569 D=30": dict(dataset="breast_cancer"),
}


@dataclasses.dataclass
class Settings:
    warmup_eager: int
    warmup_compiled: int
    steps: int
    steps_pyro: int
    reps: int


FULL = Settings(warmup_eager=50, warmup_compiled=100, steps=1000, steps_pyro=300, reps=3)
QUICK = Settings(warmup_eager=20, warmup_compiled=50, steps=50, steps_pyro=20, reps=3)


@dataclasses.dataclass
class Result:
    """One configuration: per-repeat ms/step and a sanity check of the optimisation."""

    reps_ms: list[float] = dataclasses.field(default_factory=list)
    first_loss: float = math.nan
    last_loss: float = math.nan
    warmup_s: float = math.nan
    status: str = "ok"

    @property
    def ms(self) -> float:
        return statistics.median(self.reps_ms) if self.reps_ms else math.nan

    def check(self) -> None:
        if self.status != "ok":
            return
        if not math.isfinite(self.last_loss):
            self.status = f"non-finite final loss {self.last_loss}"
        elif math.isfinite(self.first_loss) and self.last_loss >= self.first_loss:
            self.status = f"loss did not decrease ({self.first_loss:.4g} -> {self.last_loss:.4g})"


def _guarded(fn, *args) -> Result:
    try:
        res = fn(*args)
    except Exception as err:  # record the failure, keep benchmarking the rest
        res = Result(status=f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    res.check()
    return res


# --------------------------------------------------------------------------- hand-written
def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def _hand_params(dim: int):
    loc = torch.zeros(dim, requires_grad=True)
    raw_scale = torch.full((dim,), _inverse_softplus(INIT_SCALE), requires_grad=True)
    return loc, raw_scale


def _hand_loss(loc, raw_scale, X, y, S: int) -> torch.Tensor:
    """Minus the ELBO of logistic regression with N(0, 1) priors, S reparameterized draws."""
    dim = loc.shape[0]
    scale = F.softplus(raw_scale)
    eps = torch.randn(S, dim, dtype=loc.dtype)
    z = loc + scale * eps  # [S, 1 + D]: alpha, beta
    alpha, beta = z[:, 0], z[:, 1:]
    logits = X @ beta.T + alpha  # [N, S]
    log_lik = y @ logits - F.softplus(logits).sum(0)  # Bernoulli(logits) summed over data
    log_prior = -0.5 * z.pow(2).sum(-1) - dim * HALF_LOG_2PI
    log_q = -0.5 * eps.pow(2).sum(-1) - dim * HALF_LOG_2PI - scale.log().sum()
    return -(log_prior + log_lik - log_q).mean()


def bench_hand(model, S: int, compiled: bool, s: Settings) -> Result:
    X, y = model.data["X"], model.data["y"]
    torch.manual_seed(0)
    loc, raw_scale = _hand_params(X.shape[1] + 1)
    opt = torch.optim.Adam([loc, raw_scale], lr=LR)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _hand_loss(loc, raw_scale, X, y, S)
        loss.backward()
        opt.step()
        return loss.detach()

    if compiled:
        torch._dynamo.reset()
        step = torch.compile(step)
    res = Result()
    t0 = time.perf_counter()
    for i in range(s.warmup_compiled if compiled else s.warmup_eager):
        loss = step()
        if i == 0:
            res.first_loss = float(loss)
    res.warmup_s = time.perf_counter() - t0
    for _ in range(s.reps):
        t0 = time.perf_counter()
        for _ in range(s.steps):
            loss = step()
        res.reps_ms.append(1e3 * (time.perf_counter() - t0) / s.steps)
        res.last_loss = float(loss)
    return res


# --------------------------------------------------------------------------- vipkg
def bench_vipkg_eager(model, S: int, s: Settings) -> Result:
    import vipkg

    torch.manual_seed(0)
    guide = vipkg.guides.MeanFieldNormal(model, init_scale=INIT_SCALE)
    est = vipkg.Reparam()
    kw = dict(num_particles=S, lr=LR, progress=False, compile=False)
    res = Result()
    r = vipkg.fit(model, guide, est, steps=s.warmup_eager, seed=0, **kw)
    res.first_loss, res.warmup_s = float(r.losses[0]), r.elapsed
    # Each repeat is its own fit() call (fresh Adam, guide trained on in place); the
    # time is FitResult.ms_per_step, i.e. fit's own timer around its loop.
    for k in range(s.reps):
        r = vipkg.fit(model, guide, est, steps=s.steps, seed=k + 1, **kw)
        res.reps_ms.append(r.ms_per_step)
        res.last_loss = float(r.losses[-1])
    return res


class _ChunkClock:
    """A stand-in for ``fit(diagnostics=...)`` that only reads the clock.

    ``fit`` calls ``measure`` before every ``every``-th step, outside its timed
    region, and once more after the last step; the stamps time windows of steps
    inside ONE compiled fit call, so that the compilation in its first steps can be
    left out (a second ``fit(compile=True)`` call would compile again).
    """

    def __init__(self, every: int):
        self.every = every

    def measure(self, *args, **kwargs) -> float:
        return time.perf_counter()


def bench_vipkg_compiled(model, S: int, s: Settings) -> Result:
    from torch._dynamo.utils import counters

    import vipkg

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    guide = vipkg.guides.MeanFieldNormal(model, init_scale=INIT_SCALE)
    warm, window = s.warmup_compiled, s.steps
    assert warm % CHECK_EVERY == 0 and window % CHECK_EVERY == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        r = vipkg.fit(
            model,
            guide,
            vipkg.Reparam(),
            steps=warm + s.reps * window,
            num_particles=S,
            lr=LR,
            progress=False,
            compile=True,
            seed=0,
            check_every=CHECK_EVERY,
            diagnostics=_ChunkClock(CHECK_EVERY),
        )
    stamps = dict(zip(r.diagnostics["steps"], r.diagnostics["gradient_variance"], strict=True))
    res = Result(first_loss=float(r.losses[0]), last_loss=float(r.losses[-1]))
    res.warmup_s = stamps[warm] - stamps[0]
    for k in range(s.reps):
        a, b = warm + k * window, warm + (k + 1) * window
        res.reps_ms.append(1e3 * (stamps[b] - stamps[a]) / window)
    fallback = [w for w in caught if "compile=True failed" in str(w.message)]
    if fallback:
        res.status = "fell back"
        FALLBACKS.append(str(fallback[0].message))
    elif not counters["stats"]["unique_graphs"]:
        res.status = "fell back (nothing compiled)"
    return res


FALLBACKS: list[str] = []


# --------------------------------------------------------------------------- Pyro
def bench_pyro(model, S: int, s: Settings) -> Result:
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    fn, args, kwargs = model.pyro_model
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoNormal(fn, init_scale=INIT_SCALE)
    elbo = Trace_ELBO(num_particles=S, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(fn, guide, pyro.optim.Adam({"lr": LR}), elbo)
    res = Result()
    t0 = time.perf_counter()
    for i in range(s.warmup_eager):
        loss = svi.step(*args, **kwargs)
        if i == 0:
            res.first_loss = loss
    res.warmup_s = time.perf_counter() - t0
    for _ in range(s.reps):
        t0 = time.perf_counter()
        for _ in range(s.steps_pyro):
            loss = svi.step(*args, **kwargs)  # returns a float: one host read per step
        res.reps_ms.append(1e3 * (time.perf_counter() - t0) / s.steps_pyro)
        res.last_loss = loss
    return res


# --------------------------------------------------------------------------- checks
def same_elbo_gap(model, S: int = 4) -> float:
    """Largest |vipkg loss - hand-written loss| over a few seeds at the initial guide."""
    import vipkg

    guide = vipkg.guides.MeanFieldNormal(model, init_scale=INIT_SCALE)
    loc, raw_scale = _hand_params(guide.dim)
    X, y = model.data["X"], model.data["y"]
    gap = 0.0
    for seed in range(3):
        torch.manual_seed(seed)
        ours = vipkg.Reparam().estimate(model, guide, vipkg.ELBO(), S).loss
        torch.manual_seed(seed)
        hand = float(_hand_loss(loc, raw_scale, X, y, S).detach())
        gap = max(gap, abs(float(ours) - hand) / max(1.0, abs(hand)))
    return gap


# --------------------------------------------------------------------------- report
CONFIGS = ("hand eager", "vipkg eager", "hand compiled", "vipkg compiled", "pyro SVI")


def _cpu_name() -> str:
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name or platform.machine()} ({os.cpu_count()} logical CPUs)"


def _short(status: str) -> str:
    if status.startswith("fell back"):
        return "fell back"
    return "error" if status.startswith("error") else "check failed"


def _fmt_ms(res: Result) -> str:
    if res.status.startswith("error"):
        return "error"
    return f"{res.ms:.3f}" + ("" if res.status == "ok" else f" ({_short(res.status)})")


def _ratio(num: Result, den: Result, target: float | None) -> str:
    for res, who in ((num, ""), (den, "baseline ")):
        if res.status != "ok":
            return f"n/a ({who}{_short(res.status)})"
    r = num.ms / den.ms
    if target is None:
        return f"{r:.2f}x"
    return f"{r:.2f}x {'ok' if r <= target else 'MISS'}"


def render(results, gaps, s: Settings, mode: str, threads: int) -> str:
    import pyro

    import vipkg

    lines = [
        "# vipkg step benchmark",
        "",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, pyro-ppl {pyro.__version__}, vipkg {vipkg.__version__}, "
        f"Python {platform.python_version()}",
        f"- CPU: {_cpu_name()}",
        f"- Threads: torch.set_num_threads({threads}) for every configuration "
        f"(env `{THREADS_ENV}`); OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND')}, "
        f"OMP_PLACES={os.environ.get('OMP_PLACES')}",
        f"- Mode: {mode}; warm-up {s.warmup_eager} steps (eager, Pyro) / {s.warmup_compiled} steps "
        f"(compiled), then {s.steps} timed steps ({s.steps_pyro} for Pyro) x {s.reps} repeats; "
        "the table shows the median.",
        "- Task: mean-field Gaussian guide (init scale 0.1), ELBO with S reparameterized draws "
        f"(num_particles), Adam lr {LR}, float32, full data.",
        "",
        f"Targets: vipkg eager <= {TARGET_EAGER}x hand-written eager; "
        f"vipkg compiled <= {TARGET_COMPILED}x hand-written compiled.",
        "",
        "## ms per step (median)",
        "",
        "| model | S | hand eager | vipkg eager | hand compiled | vipkg compiled | Pyro SVI "
        "| vipkg / hand eager | vipkg / hand compiled | Pyro / hand eager |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, S), row in results.items():
        cells = [_fmt_ms(row[c]) for c in CONFIGS]
        ratios = [
            _ratio(row["vipkg eager"], row["hand eager"], TARGET_EAGER),
            _ratio(row["vipkg compiled"], row["hand compiled"], TARGET_COMPILED),
            _ratio(row["pyro SVI"], row["hand eager"], None),
        ]
        lines.append(f"| {name} | {S} | " + " | ".join(cells + ratios) + " |")
    lines += [
        "",
        "## Every repeat, warm-up and losses",
        "",
        "Warm-up s includes compilation for the compiled configurations (short when TorchInductor's "
        "on-disk cache already holds the kernels from an earlier run). Losses are minus the "
        "ELBO estimate (nats) at the first warm-up step and the last timed step; each timed "
        "configuration must end finite and lower than it started.",
        "",
        "| model | S | configuration | ms/step per repeat | warm-up s | first loss | last loss | status |",
        "|---|---:|---|---|---:|---:|---:|---|",
    ]
    for (name, S), row in results.items():
        for c in CONFIGS:
            r = row[c]
            reps = ", ".join(f"{v:.3f}" for v in r.reps_ms) or "-"
            lines.append(
                f"| {name} | {S} | {c} | {reps} | {r.warmup_s:.2f} | {r.first_loss:.2f} "
                f"| {r.last_loss:.2f} | {r.status} |"
            )
    lines += [
        "",
        "## Notes",
        "",
        "- hand eager / compiled: plain PyTorch, parameters `loc` and `raw_scale` (softplus), "
        "`z = loc + scale * eps`, log joint = N(0, 1) priors on alpha and beta + Bernoulli-logit "
        "likelihood with `X @ beta.T + alpha`, log q from eps; `loss.backward(); adam.step()`. "
        "Compiled: the whole step function in `torch.compile` (default mode).",
        "- Same ELBO: at the initial guide and equal seeds the vipkg and hand-written losses agree "
        "to a relative " + ", ".join(f"{g:.1e} ({n})" for n, g in gaps.items()) + ".",
        "- vipkg eager: each repeat is one `vipkg.fit(..., steps=N, progress=False)` call and its "
        "time is `FitResult.ms_per_step` (fit's own timer; includes writing the loss of every step "
        f"and one host read per {CHECK_EVERY} steps).",
        "- vipkg compiled: one `vipkg.fit(..., compile=True)` call per configuration (another call "
        "would compile again); the windows are timed inside it with perf_counter stamps taken by a "
        "clock object passed as `diagnostics=` (called between fit's chunks, outside its steps).",
        "- Pyro: `SVI(model, AutoNormal(model, init_scale=0.1), pyro.optim.Adam, "
        "Trace_ELBO(num_particles=S, vectorize_particles=True, max_plate_nesting=1))` on the "
        "model's Pyro program (`model.pyro_model`); `svi.step` returns a float (one host read per "
        "step). AutoNormal starts from the prior median, so its losses start elsewhere.",
    ]
    lines.append(
        "- OpenMP threads are pinned (OMP_PROC_BIND/OMP_PLACES set before torch is imported, unless "
        "already set). On the 2-vCPU VM this script was written on, unpinned 2-thread runs of the "
        "same loops were 10-100x slower at random (e.g. ~46 ms/step instead of ~0.45 ms for the "
        "breast-cancer hand loop): a spin-waiting OpenMP worker sharing the main thread's core. "
        "With 1 thread they were stable."
    )
    if FALLBACKS:
        lines.append("- vipkg compile=True fell back to eager: " + "; ".join(sorted(set(FALLBACKS))))
    lines += [
        "",
        f"How to run: `python benchmarks/bench_step.py` (`--quick` for a smoke run, `--out PATH`; "
        f"threads via `{THREADS_ENV}`).",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run with few steps")
    p.add_argument("--out", default=os.path.join(here, "results", "step.md"), help="markdown report path")
    a = p.parse_args(argv)
    s = QUICK if a.quick else FULL
    threads = int(os.environ.get(THREADS_ENV, "2"))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*is deprecated")

    import vipkg

    t_start = time.perf_counter()
    results: dict = {}
    gaps: dict = {}
    for name, spec in MODELS.items():
        model = vipkg.models.logistic_regression(**spec)
        gaps[name.split()[0]] = same_elbo_gap(model)
        for S in PARTICLES:
            row = {}
            benches = {
                "hand eager": lambda m=model, S=S: bench_hand(m, S, False, s),
                "vipkg eager": lambda m=model, S=S: bench_vipkg_eager(m, S, s),
                "hand compiled": lambda m=model, S=S: bench_hand(m, S, True, s),
                "vipkg compiled": lambda m=model, S=S: bench_vipkg_compiled(m, S, s),
                "pyro SVI": lambda m=model, S=S: bench_pyro(m, S, s),
            }
            for c, fn in benches.items():
                t0 = time.perf_counter()
                row[c] = _guarded(fn)
                print(
                    f"{name:26s} S={S:<3d} {c:15s} {_fmt_ms(row[c]):>12s} ms/step  "
                    f"[{row[c].status}] ({time.perf_counter() - t0:.1f}s)",
                    flush=True,
                )
            results[(name, S)] = row
    text = render(results, gaps, s, "quick" if a.quick else "full", threads)
    write_atomic(a.out, text)
    print()
    print(text)
    print(f"wrote {a.out} in {time.perf_counter() - t_start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
