"""Real Pyro programs through vipkg: does it run them, is their log joint right, how well and how fast
does it fit them compared with Pyro's own SVI?

Programs: every entry of ``tests/pyro_programs/programs.py`` (models from Pyro's test suite, examples
and tutorials; each names its source file and function). For each one:

* **status**: ``supported`` (the model builds, its log joint equals Pyro's at prior draws for 1, 3
  and 7 particles at once, to 1e-5 relative in float64, and a short fit has finite losses);
  ``vipkg error`` (vipkg raised one of its own errors: ``ModelError``, ``IncompatibleEstimatorError``,
  ``NonFiniteLossError``; the stage and message are listed); ``crash`` (any other exception);
  ``silently wrong`` (vipkg returns a log joint that differs from Pyro's; the largest relative error
  is listed). ``expected`` says whether that is what the registry expects (supported, or the refusal
  it documents for ``unsupported`` programs).
* **ELBO** (continuous programs): vipkg ``fit(MeanFieldNormal, Reparam())`` and Pyro
  ``SVI(AutoNormal, Adam(lr), Trace_ELBO())`` after the same number of steps at the same learning rate
  and one particle per step, both scored with the same draws of ``log p - log q`` on the (checked)
  log joint (an AutoNormal is the same diagonal Gaussian over the same unconstrained coordinates);
  the mean over two seeds (one with ``--quick``).
  Discrete programs and local latents: vipkg's ``per_site.auto`` fit only (AutoNormal cannot guide
  discrete sites; with local latents the ELBO is a minibatch estimate).
  Model-side ``pyro.param`` values are frozen on both sides.
* **ms per step** with 16 particles: vipkg ``fit(num_particles=16)`` against Pyro
  ``Trace_ELBO(vectorize_particles=True, num_particles=16, max_plate_nesting=...)`` with ``AutoNormal``,
  both after a warm-up, float32. ``ratio`` is vipkg / Pyro; the median is over programs that both
  evaluate vectorized (vipkg's particle plate, not its per-particle fallback; Pyro's vectorized ELBO ran).

How to run::

    python benchmarks/bench_pyro_programs.py            # all programs (~10 min on one core)
    python benchmarks/bench_pyro_programs.py --quick    # fewer steps, < 3 min
    python benchmarks/bench_pyro_programs.py --only coin,lda

Writes ``benchmarks/results/pyro_programs.md``. Threads: ``VIPKG_BENCH_THREADS`` (default 1).
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
import traceback
import warnings

THREADS_ENV = "VIPKG_BENCH_THREADS"
os.environ.setdefault("OMP_PROC_BIND", "close")
os.environ.setdefault("OMP_PLACES", "cores")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root: tests.pyro_programs

import pyro  # noqa: E402

import vipkg  # noqa: E402
from tests.pyro_programs import programs as P  # noqa: E402
from vipkg._io import atomic_write_bytes  # noqa: E402

OUT_DIR = os.path.join(HERE, "results")
RTOL, ATOL = 1e-5, 1e-8
LR = 0.05
TIMING_PARTICLES = 16
VIPKG_ERRORS = (vipkg.ModelError, vipkg.IncompatibleEstimatorError, vipkg.NonFiniteLossError)


@dataclasses.dataclass
class Settings:
    fit_steps: int
    n_eval: int
    warmup: int
    timed: int
    discrete_steps: int
    seeds: tuple


FULL = Settings(fit_steps=1000, n_eval=2000, warmup=20, timed=200, discrete_steps=200, seeds=(0, 1))
QUICK = Settings(fit_steps=200, n_eval=1000, warmup=5, timed=30, discrete_steps=30, seeds=(0,))


@dataclasses.dataclass
class Row:
    prog: P.Program
    status: str = "supported"
    stage: str = ""
    message: str = ""
    vectorization: str = ""
    warnings: list = dataclasses.field(default_factory=list)
    max_rel_err: float = math.nan
    elbo_vipkg: float = math.nan
    elbo_vipkg_se: float = math.nan
    elbo_pyro: float = math.nan
    elbo_pyro_se: float = math.nan
    pyro_note: str = ""
    ms_vipkg: float = math.nan
    ms_pyro: float = math.nan
    pyro_vectorized: bool = False

    @property
    def expected(self) -> bool:
        if self.prog.expects_error:
            return self.status == "vipkg error" and self.stage in ("build", "log joint", "fit")
        return self.status == "supported"

    @property
    def ratio(self) -> float:
        return self.ms_vipkg / self.ms_pyro if self.ms_pyro > 0 else math.nan


def _short(exc: BaseException, n: int = 300) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:n]}"


def _fail(row: Row, stage: str, exc: BaseException) -> Row:
    row.stage = stage
    row.status = "vipkg error" if isinstance(exc, VIPKG_ERRORS) else "crash"
    row.message = _short(exc)
    if row.status == "crash":
        tb = traceback.extract_tb(exc.__traceback__)
        where = next((f for f in reversed(tb) if "/vipkg/" in f.filename), None)
        if where is not None:
            row.message += f" (in {os.path.relpath(where.filename, os.path.dirname(HERE))}:{where.lineno})"
    return row


# ------------------------------------------------------------------------- one program
def check_program(prog: P.Program, s: Settings) -> Row:
    row = Row(prog)
    with P.default_dtype(torch.float64):
        fn, args, kwargs = P.build(prog)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = vipkg.Model.from_pyro(fn, *args, name=prog.name, **kwargs)
            row.warnings = sorted(
                {type(w.message).__name__ for w in caught if issubclass(w.category, UserWarning)}
            )
        except Exception as exc:  # noqa: BLE001 - every failure is a row of the table
            return _fail(row, "build", exc)
        row.vectorization = getattr(model, "vectorization", "plate")
        try:
            checks = P.compare_log_joint(model, fn, args, kwargs)
        except Exception as exc:  # noqa: BLE001
            return _fail(row, "log joint", exc)
        row.max_rel_err = max(c.max_rel_err for c in checks)
        if any(bool(c.bad(RTOL, ATOL).any()) for c in checks):
            row.status = "silently wrong"
            row.stage = "log joint"
            worst = max(checks, key=lambda c: c.max_rel_err)
            row.message = (
                f"{worst.S} particles: vipkg {[round(v, 3) for v in worst.got.tolist()]} vs Pyro "
                f"{[round(v, 3) for v in worst.expected.tolist()]}"
            )
        try:
            _fit(row, model, fn, args, kwargs, s)
        except Exception as exc:  # noqa: BLE001
            if row.status == "supported":
                _fail(row, "fit", exc)
            else:
                row.message += f"; fit: {_short(exc, 80)}"
    pyro.clear_param_store()
    return row


def _fit(row: Row, model, fn, args, kwargs, s: Settings) -> None:
    prog = row.prog
    n_eval = 400 if row.vectorization == "loop" else s.n_eval
    if prog.is_continuous and "local_subsample" not in prog.tags:
        if not prog.proper:
            row.pyro_note = "improper posterior: no fit"
            return
        cmp = P.compare_fit(
            prog, model, fn, args, kwargs, steps=s.fit_steps, lr=LR, seeds=s.seeds, n_eval=n_eval
        )
        row.elbo_vipkg, row.elbo_vipkg_se = P.mean_elbo(cmp.vipkg)
        if cmp.pyro_error is not None:
            row.pyro_note = _short(cmp.pyro_error, 100)
        else:
            row.elbo_pyro, row.elbo_pyro_se = P.mean_elbo(cmp.pyro)
        return
    from vipkg.estimators import per_site

    guide, est = per_site.auto(model)
    frozen = {"model_lr": 0.0} if getattr(model, "has_parameters", False) else {}
    res = vipkg.fit(
        model, guide, est, steps=s.discrete_steps, num_particles=4, lr=LR, seed=0, progress=False, **frozen
    )
    if not bool(torch.isfinite(res.losses).all()):
        raise vipkg.NonFiniteLossError("non-finite losses in the discrete fit")
    if getattr(model, "local_sites", None):
        # The log joint of a model with local latents is evaluated on minibatches: the ELBO shown is
        # minus the mean of the last tenth of the fit's losses (unbiased minibatch estimates).
        tail = res.losses[-max(10, s.discrete_steps // 10) :].double()
        row.elbo_vipkg, row.elbo_vipkg_se = -float(tail.mean()), float(tail.std() / math.sqrt(len(tail)))
        row.pyro_note = "local latents: ELBO from the last steps' minibatch losses; no AutoNormal comparison"
        return
    e = P.vipkg_elbo(res.model, res.guide, n_eval, seed=P.EVAL_SEED)
    row.elbo_vipkg, row.elbo_vipkg_se = e.mean, e.se
    row.pyro_note = "AutoNormal cannot guide discrete sites"


# ------------------------------------------------------------------------- timing
def time_program(row: Row, s: Settings) -> None:
    """ms per step with 16 particles, float32: vipkg's fit loop and Pyro's vectorized Trace_ELBO."""
    prog = row.prog
    if row.status in ("vipkg error", "crash") and row.stage == "build":
        return
    with P.default_dtype(torch.float32), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn, args, kwargs = P.build(prog)
        try:
            model = vipkg.Model.from_pyro(fn, *args, name=prog.name, **kwargs)
            if model.is_continuous and not getattr(model, "local_sites", None):
                from vipkg.guides import MeanFieldNormal

                make = lambda: (MeanFieldNormal(model), vipkg.Reparam())  # noqa: E731
            else:
                from vipkg.estimators import per_site

                make = lambda: per_site.auto(model)  # noqa: E731
            kw = dict(num_particles=TIMING_PARTICLES, lr=LR, seed=0, progress=False, nan_policy="skip")
            vipkg.fit(model, *make(), steps=s.warmup, **kw)
            res = vipkg.fit(model, *make(), steps=s.timed, **kw)
            row.ms_vipkg = res.ms_per_step
        except Exception as exc:  # noqa: BLE001
            row.pyro_note = (
                row.pyro_note + "; " if row.pyro_note else ""
            ) + f"vipkg timing: {_short(exc, 60)}"
        if not prog.is_continuous or "local_subsample" in prog.tags:
            return
        from pyro.infer import SVI, Trace_ELBO
        from pyro.infer.autoguide import AutoNormal
        from pyro.optim import Adam

        try:
            nesting = prog.max_plate_nesting
            if nesting is None:
                nesting = P.max_plate_nesting(fn, args, kwargs)
            model_fn = pyro.poutine.block(fn, hide_types=["param"]) if "params" in prog.tags else fn
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            elbo = Trace_ELBO(
                vectorize_particles=True, num_particles=TIMING_PARTICLES, max_plate_nesting=nesting
            )
            svi = SVI(model_fn, AutoNormal(model_fn), Adam({"lr": LR}), elbo)
            for _ in range(s.warmup):
                svi.step(*args, **kwargs)
            t0 = time.perf_counter()
            for _ in range(s.timed):
                svi.step(*args, **kwargs)
            row.ms_pyro = 1e3 * (time.perf_counter() - t0) / s.timed
            row.pyro_vectorized = True
        except Exception as exc:  # noqa: BLE001
            row.pyro_note = (
                row.pyro_note + "; " if row.pyro_note else ""
            ) + f"Pyro vectorized: {_short(exc, 60)}"
        finally:
            pyro.clear_param_store()


# ------------------------------------------------------------------------- report
def _revision() -> str:
    """The git commit of the vipkg that was imported, with ``+changes`` for a modified working tree."""
    import subprocess

    where = os.path.dirname(os.path.dirname(os.path.abspath(vipkg.__file__)))
    try:
        sha = subprocess.run(
            ["git", "-C", where, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--", "vipkg"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "revision unknown"
    return f"git {sha}" + (" + uncommitted changes" if dirty else "")


def _fmt(x: float, se: float = math.nan, digits: int = 2) -> str:
    if not math.isfinite(x):
        return "" if math.isnan(x) else f"{x}"
    out = f"{x:.{digits}f}"
    if math.isfinite(se):
        out += f" ± {se:.{digits}f}"
    return out


def report(rows: list[Row], s: Settings, mode: str, threads: int, seconds: float) -> str:
    counts = {
        k: sum(r.status == k for r in rows) for k in ("supported", "vipkg error", "crash", "silently wrong")
    }
    ratios = [
        r.ratio for r in rows if r.pyro_vectorized and r.vectorization == "plate" and math.isfinite(r.ratio)
    ]
    median = statistics.median(ratios) if ratios else math.nan
    unexpected = [r for r in rows if not r.expected]
    lines = [
        "# vipkg on real Pyro programs",
        "",
        f"- Date: {datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, pyro-ppl {pyro.__version__}, vipkg {vipkg.__version__} "
        f"({_revision()}), Python {platform.python_version()}",
        f"- CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs); "
        f"torch.set_num_threads({threads}) (env `{THREADS_ENV}`)",
        f"- Mode: {mode}; {len(rows)} programs from `tests/pyro_programs/programs.py`, Pyro sources at "
        f"commit {P.PYRO_COMMIT[:8]}; {seconds:.0f} s in all.",
        f"- Checks in float64: log joint at prior draws for {', '.join(map(str, P.PARTICLE_COUNTS))} "
        f"particles at once vs Pyro's `log_prob_sum` per draw (rtol {RTOL:g}); ELBO after {s.fit_steps} "
        f"steps, Adam lr {LR}, one particle per step, mean over seeds {', '.join(map(str, s.seeds))}, "
        f"scored from {s.n_eval} draws each (400 for per-particle evaluation), ± its Monte Carlo standard "
        "error (the last iterate of a one-particle trajectory also moves by up to a few nats between seeds "
        "on the hierarchical programs, for both libraries alike); discrete programs: "
        f"{s.discrete_steps} steps of `per_site.auto`, 4 particles, seed 0.",
        f"- Timing in float32, {TIMING_PARTICLES} particles: {s.warmup} warm-up then {s.timed} timed steps; "
        "vipkg "
        f"`fit(num_particles={TIMING_PARTICLES})` vs Pyro `Trace_ELBO(vectorize_particles=True, "
        f"num_particles={TIMING_PARTICLES}, max_plate_nesting=...)` with `AutoNormal`; ratio = vipkg / Pyro.",
        "",
        f"**Status**: {counts['supported']} supported, {counts['vipkg error']} vipkg error, "
        f"{counts['crash']} crash, "
        f"{counts['silently wrong']} silently wrong; {len(rows) - len(unexpected)} of {len(rows)} as the "
        "registry expects.",
        f"**Median ms/step ratio (vipkg / Pyro)** over the {len(ratios)} programs both evaluate vectorized: "
        f"{median:.2f}x.",
        "",
        "| program | source | kind | status | expected | vectorization | ELBO vipkg | ELBO Pyro "
        "| ms/step vipkg | ms/step Pyro | ratio |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        source = r.prog.source.removeprefix("pyro ")
        status = r.status + (f" ({r.stage})" if r.stage else "")
        lines.append(
            f"| {r.prog.name} | `{source}` | {r.prog.kind} | {status} | {'yes' if r.expected else '**no**'} "
            f"| {r.vectorization} | {_fmt(r.elbo_vipkg, r.elbo_vipkg_se)} "
            f"| {_fmt(r.elbo_pyro, r.elbo_pyro_se)} "
            f"| {_fmt(r.ms_vipkg)} | {_fmt(r.ms_pyro)} | {_fmt(r.ratio)} |"
        )
    lines += ["", "## Messages", ""]
    lines += [
        "Errors, mismatches and notes per program (vipkg warnings by class; Pyro: why its column is empty).",
        "",
    ]
    for r in rows:
        notes = []
        if r.message:
            notes.append(r.message.replace("|", "\\|"))
        if math.isfinite(r.max_rel_err) and r.max_rel_err > 0:
            notes.append(f"max relative log-joint error {r.max_rel_err:.2g}")
        if r.warnings:
            notes.append("warnings: " + ", ".join(r.warnings))
        if r.pyro_note:
            notes.append("Pyro: " + r.pyro_note.replace("|", "\\|"))
        if r.prog.notes:
            notes.append("program: " + r.prog.notes)
        if notes:
            lines.append(f"- **{r.prog.name}**: " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    parser.add_argument("--only", default="", help="comma-separated program names")
    parser.add_argument("--no-timing", action="store_true", help="skip the ms/step measurements")
    parser.add_argument("--out", default=os.path.join(OUT_DIR, "pyro_programs.md"))
    args = parser.parse_args(argv)
    threads = int(os.environ.get(THREADS_ENV, "1"))
    torch.set_num_threads(threads)
    s = QUICK if args.quick else FULL
    progs = P.PROGRAMS
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - set(P.BY_NAME)
        if unknown:
            parser.error(f"unknown program(s) {sorted(unknown)}")
        progs = [p for p in progs if p.name in wanted]
    t0 = time.perf_counter()
    rows = []
    for prog in progs:
        t = time.perf_counter()
        row = check_program(prog, s)
        if not args.no_timing:
            time_program(row, s)
        rows.append(row)
        print(
            f"{prog.name:40s} {row.status:15s} {row.stage:10s} ELBO {_fmt(row.elbo_vipkg):>10s} / "
            f"{_fmt(row.elbo_pyro):>10s}  ratio {_fmt(row.ratio):>6s}  {time.perf_counter() - t:5.1f}s "
            f"{row.message[:70]}",
            flush=True,
        )
    text = report(rows, s, "quick" if args.quick else "full", threads, time.perf_counter() - t0)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    atomic_write_bytes(args.out, text.encode())
    ratios = [
        r.ratio for r in rows if r.pyro_vectorized and r.vectorization == "plate" and math.isfinite(r.ratio)
    ]
    counts = {
        k: sum(r.status == k for r in rows) for k in ("supported", "vipkg error", "crash", "silently wrong")
    }
    print(f"\nwrote {args.out}")
    print(", ".join(f"{v} {k}" for k, v in counts.items()) + f" of {len(rows)} programs")
    med = statistics.median(ratios) if ratios else math.nan
    print(f"median ms/step ratio vipkg/Pyro over {len(ratios)} vectorized programs: {med:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
