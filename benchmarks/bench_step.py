"""Milliseconds per optimisation step: vipkg vs hand-written PyTorch vs NumPyro vs Pyro SVI.

Every configuration fits a mean-field Gaussian to Bayesian logistic regression by
maximising the ELBO with Adam (lr 1e-2), on four settings (synthetic N=10000 D=50 and
sklearn's breast_cancer, S = 1 and 16 draws per step):

* vipkg ``fit(..., Reparam(), compile=False)`` and ``compile=True``;
* a hand-written plain-PyTorch loop computing the same ELBO, eager and with the
  whole step (zero_grad, loss, backward, Adam step) wrapped in ``torch.compile``;
* a hand-written functional step: draws, ELBO, ``torch.func.grad_and_value`` and Adam
  written as pure tensor math on (params, moments, step count), the whole of it one
  ``torch.compile(fullgraph=True)`` graph; its loss trajectory is checked against the
  eager hand loop's (same seed, same draws) before it is reported;
* NumPyro ``jax.jit(svi.update)`` with ``Trace_ELBO(num_particles=S,
  vectorize_particles=True)`` when numpyro is installed (``pip install -e '.[bench]'``);
* Pyro's ``SVI`` with ``Trace_ELBO(vectorize_particles=True)`` and ``AutoNormal``.

Each configuration is warmed up (compiled / jitted ones longer, so that compilation is
not timed); then every configuration of a setting runs one window of a fixed number of
steps, timed with ``time.perf_counter``, in turn, for seven rounds
(:func:`run_interleaved`): the machine's slow spells hit rounds, not configurations.
The tables report the median ms per step and, for ratios, the median over rounds of
the ratio within a round. Everything runs in one process.

How to run::

    python benchmarks/bench_step.py            # full run (~10 min on 2 cores), writes results/step.md
    python benchmarks/bench_step.py --quick    # smoke run with few steps, writes nothing
    python benchmarks/bench_step.py --quick --out /tmp/step.md
    python benchmarks/bench_step.py --device cuda   # on a GPU machine, writes results/step_cuda.md

With ``--device cuda`` every PyTorch configuration runs on the GPU, windows are timed between
``torch.cuda.synchronize()`` calls, and the compiled configurations (the hand-written
functional step and vipkg's) use ``mode="reduce-overhead"`` (CUDA graphs); NumPyro runs on
JAX's default backend.

``benchmarks/collect_results.py`` then folds results/step.md into benchmarks/RESULTS.md.

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
TARGET_EAGER = 1.10
TARGET_COMPILED = 1.10
PARTICLES = (1, 16)
DEVICE = torch.device("cpu")  # set by main (--device)
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


FULL = Settings(warmup_eager=50, warmup_compiled=100, steps=1000, steps_pyro=300, reps=7)
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
    def ok(self) -> bool:
        return self.status == "ok" or self.status.startswith("ok ")

    @property
    def ms(self) -> float:
        return statistics.median(self.reps_ms) if self.reps_ms else math.nan

    def check(self) -> None:
        if not self.ok:
            return
        if not math.isfinite(self.last_loss):
            self.status = f"non-finite final loss {self.last_loss}"
        elif math.isfinite(self.first_loss) and self.last_loss >= self.first_loss:
            self.status = f"loss did not decrease ({self.first_loss:.4g} -> {self.last_loss:.4g})"


def _prepared(fn, *args):
    """``fn(*args) -> (Result, window)``; a failure is recorded as the Result's status (window None)."""
    try:
        return fn(*args)
    except Exception as err:  # record the failure, keep benchmarking the rest
        return Result(status=_error(err)), None


def _error(err: Exception) -> str:
    return f"error: {type(err).__name__}: {str(err).splitlines()[0][:200]}"


def run_interleaved(benches: dict, s: Settings, label: str = "") -> dict:
    """Prepare (warm up) every configuration of ``benches``, then time ``s.reps`` rounds in which
    each configuration runs one window, in turn: repeat ``k`` of every configuration runs back to
    back with the others', so that a slow spell of the machine hits a round, not a configuration,
    and the paired ratios of one round compare like with like."""
    prepared = {}
    for c, fn in benches.items():
        t0 = time.perf_counter()
        prepared[c] = _prepared(fn)
        status = prepared[c][0].status
        print(f"{label} {c:24s} prepared [{status}] ({time.perf_counter() - t0:.1f}s)", flush=True)
    for _ in range(s.reps):
        for res, window in prepared.values():
            if window is None or not res.ok:
                continue
            try:
                window()
            except Exception as err:
                res.status = _error(err)
    out = {}
    for c, (res, _) in prepared.items():
        res.check()
        out[c] = res
    return out


# --------------------------------------------------------------------------- hand-written
def _sync() -> None:
    # CUDA kernels run asynchronously: a window's clock stops once its last step has run.
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _compile_mode() -> str | None:
    return "reduce-overhead" if DEVICE.type == "cuda" else None


def _step_begin() -> None:
    # Under CUDA graphs a replay reuses its outputs' memory: each call of the functional step
    # is marked as a new iteration, so that the previous state (this call's inputs) is copied
    # in rather than overwritten.
    if DEVICE.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()


def _inverse_softplus(x: float) -> float:
    return x + math.log(-math.expm1(-x))


def _hand_params(dim: int):
    loc = torch.zeros(dim, device=DEVICE, requires_grad=True)
    raw_scale = torch.full((dim,), _inverse_softplus(INIT_SCALE), device=DEVICE, requires_grad=True)
    return loc, raw_scale


def _hand_loss(loc, raw_scale, X, y, S: int) -> torch.Tensor:
    """Minus the ELBO of logistic regression with N(0, 1) priors, S reparameterized draws."""
    return _neg_elbo(loc, raw_scale, torch.randn(S, loc.shape[0], dtype=loc.dtype, device=loc.device), X, y)


def _neg_elbo(loc, raw_scale, eps, X, y) -> torch.Tensor:
    """Minus the ELBO estimate from standard-normal draws ``eps`` [S, 1 + D]."""
    dim = loc.shape[0]
    scale = F.softplus(raw_scale)
    z = loc + scale * eps  # [S, 1 + D]: alpha, beta
    alpha, beta = z[:, 0], z[:, 1:]
    # The Bernoulli-logit likelihood written as vipkg's zoo model writes it (same kernels).
    logits = torch.addmm(alpha.unsqueeze(0), X, beta.T)  # [N, S]
    log_lik = (y.unsqueeze(-1) * logits - F.softplus(logits)).sum(0)  # summed over data
    log_prior = -0.5 * z.pow(2).sum(-1) - dim * HALF_LOG_2PI
    log_q = -0.5 * eps.pow(2).sum(-1) - dim * HALF_LOG_2PI - scale.log().sum()
    return -(log_prior + log_lik - log_q).mean()


def bench_hand(model, S: int, compiled: bool, s: Settings, fused: bool = False):
    X, y = model.data["X"], model.data["y"]
    torch.manual_seed(0)
    loc, raw_scale = _hand_params(X.shape[1] + 1)
    # torch.optim.Adam's default (foreach) unless fused: vipkg.fit's Adam is fused.
    opt = torch.optim.Adam([loc, raw_scale], lr=LR, fused=fused or None)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = _hand_loss(loc, raw_scale, X, y, S)
        loss.backward()
        opt.step()
        return loss.detach()

    if compiled:
        step = torch.compile(step)
    return _windows(step, s.warmup_compiled if compiled else s.warmup_eager, s, time.perf_counter())


def _windows(step, warmup: int, s: Settings, t0: float, res: Result | None = None):
    """``warmup`` calls of ``step() -> loss`` (timed from ``t0``, which may include compiling);
    returns ``(res, window)``: each ``window()`` times ``s.steps`` calls into ``res.reps_ms``.
    The first loss is recorded at warm-up, the last one by every window."""
    res = Result() if res is None else res
    for i in range(warmup):
        loss = step()
        if i == 0:
            res.first_loss = float(loss)
    res.warmup_s = time.perf_counter() - t0

    def window():
        _sync()
        t0 = time.perf_counter()
        for _ in range(s.steps):
            loss = step()
        _sync()
        res.reps_ms.append(1e3 * (time.perf_counter() - t0) / s.steps)
        res.last_loss = float(loss)

    return res, window


# --------------------------------------------------------------------------- hand-written functional
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults, as are eps and no weight decay
ADAM_EPS = 1e-8
VERIFY_STEPS = 200  # length of the loss trajectories compared in check_functional
VERIFY_TAIL = 50  # "same level": mean loss over the last VERIFY_TAIL of them
# How the functional step was compiled, per (model, S): "fullgraph=True", or the fallback and why.
FUNCTIONAL_COMPILE: dict = {}
FUNCTIONAL_CHECKS: dict = {}


def _functional_init(dim: int):
    """(params, exp_avg, exp_avg_sq, step) for the functional step; same init as _hand_params."""
    params = (
        torch.zeros(dim, device=DEVICE),
        torch.full((dim,), _inverse_softplus(INIT_SCALE), device=DEVICE),
    )
    exp_avg = tuple(torch.zeros_like(p) for p in params)
    exp_avg_sq = tuple(torch.zeros_like(p) for p in params)  # not aliased: dynamo guards on aliasing
    # float64 step count: the bias corrections are computed in double, as torch.optim.Adam
    # does with Python floats; a 0-d float64 tensor does not promote the float32 parameters.
    return params, exp_avg, exp_avg_sq, torch.zeros((), dtype=torch.float64, device=DEVICE)


def _make_functional_step(S: int):
    """One whole step as a pure function: draws, ELBO, gradient, Adam update.

    ``step(params, exp_avg, exp_avg_sq, t, X, y) -> (params, exp_avg, exp_avg_sq, t, loss)``
    with the arithmetic of torch.optim.Adam's single-tensor path (lerp for the first
    moment, bias-corrected ``addcdiv``), but out of place, so that the whole step is
    one graph for ``torch.compile``. The draws use the same ``torch.randn(S, 1 + D)``
    call as the eager hand loop.
    """
    b1, b2 = ADAM_BETAS
    grad_and_loss = torch.func.grad_and_value(lambda params, eps, X, y: _neg_elbo(*params, eps, X, y))

    def step(params, exp_avg, exp_avg_sq, t, X, y):
        eps = torch.randn(S, params[0].shape[0], dtype=params[0].dtype, device=params[0].device)
        grads, loss = grad_and_loss(params, eps, X, y)
        t = t + 1
        step_size = LR / (1 - b1**t)
        bc2_sqrt = (1 - b2**t).sqrt()
        new_p, new_m, new_v = [], [], []
        for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq, strict=True):
            m = torch.lerp(m, g, 1 - b1)
            v = b2 * v + (1 - b2) * g * g
            new_p.append(p - step_size * m / (v.sqrt() / bc2_sqrt + ADAM_EPS))
            new_m.append(m)
            new_v.append(v)
        return tuple(new_p), tuple(new_m), tuple(new_v), t, loss.detach()

    return step


def _compile_functional(step, X, y, dim: int):
    """torch.compile(step, fullgraph=True), or without fullgraph if that fails; says which."""
    # No torch._dynamo.reset() here: it would drop the compiled configurations prepared
    # before this one (main resets once per setting).
    try:
        compiled = torch.compile(step, fullgraph=True, mode=_compile_mode())
        compiled(*_functional_init(dim), X, y)  # compiles here; a graph break raises
        return compiled, "fullgraph=True"
    except Exception as err:
        why = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        how = f"fullgraph=True failed ({why}); compiled with graph breaks"
        return torch.compile(step, mode=_compile_mode()), how


def _trajectory(step, X, y, dim: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    state = _functional_init(dim)
    losses = []
    for _ in range(steps):
        _step_begin()
        *state, loss = step(*state, X, y)
        losses.append(loss.clone())  # a CUDA graph's next replay would overwrite it
    return [float(v) for v in losses]


def _hand_trajectory(X, y, S: int, steps: int) -> list[float]:
    torch.manual_seed(0)
    loc, raw_scale = _hand_params(X.shape[1] + 1)
    opt = torch.optim.Adam([loc, raw_scale], lr=LR)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = _hand_loss(loc, raw_scale, X, y, S)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return [float(v) for v in losses]


def _max_rel_gap(a: list[float], b: list[float]) -> float:
    return max(abs(u - v) / max(1.0, abs(v)) for u, v in zip(a, b, strict=True))


def check_functional(model, S: int, key) -> None:
    """Loss trajectories of the functional step vs the eager hand loop, same seed, into
    ``FUNCTIONAL_CHECKS[key]`` (and how it compiled into ``FUNCTIONAL_COMPILE[key]``).

    * ``eager``: the uncompiled functional step: same draws, so the losses must agree
      to float32 rounding;
    * ``compiled, fallback_random``: the step compiled with Inductor's ``fallback_random``
      (eager RNG inside the graph): the same draws again;
    * ``compiled level``: the step compiled as it is timed (Inductor's own RNG, other draws):
      mean loss over the last VERIFY_TAIL steps vs the hand loop's.

    Runs before a setting's configurations are prepared: it resets Dynamo (so that the
    ``fallback_random`` compilation is not served from the cache of the other one).
    """
    X, y = model.data["X"], model.data["y"]
    dim, n = X.shape[1] + 1, VERIFY_STEPS
    step = _make_functional_step(S)
    hand = _hand_trajectory(X, y, S, n)
    out = {"eager": _max_rel_gap(_trajectory(step, X, y, dim, n), hand)}
    compiled, how = _compile_functional(step, X, y, dim)
    timed = _trajectory(compiled, X, y, dim, n)
    tail_hand = statistics.fmean(hand[-VERIFY_TAIL:])
    out["level"] = (statistics.fmean(timed[-VERIFY_TAIL:]) - tail_hand) / abs(tail_hand)
    out["start"], out["hand_tail"] = hand[0], tail_hand
    torch._dynamo.reset()
    with torch._inductor.config.patch(fallback_random=True):
        again = torch.compile(step, fullgraph=how == "fullgraph=True")
        out["fallback_random"] = _max_rel_gap(_trajectory(again, X, y, dim, n), hand)
    torch._dynamo.reset()
    FUNCTIONAL_CHECKS[key] = out
    FUNCTIONAL_COMPILE[key] = how


# Tolerances of check_functional (relative): float32 rounding that grows a little over
# VERIFY_STEPS Adam steps for the same draws; noise of a VERIFY_TAIL-step mean for other ones.
TOL_SAME_DRAWS = 1e-4
TOL_LEVEL = 0.05


def bench_functional(model, S: int, s: Settings, key):
    from torch._dynamo.utils import counters

    X, y = model.data["X"], model.data["y"]
    dim = X.shape[1] + 1
    step = _make_functional_step(S)
    res = Result()
    t0 = time.perf_counter()
    counters.clear()
    compiled, how = _compile_functional(step, X, y, dim)
    torch.manual_seed(0)
    state = list(_functional_init(dim))

    def one_step():
        _step_begin()
        *new, loss = compiled(*state, X, y)
        state[:] = new
        return loss

    res, window = _windows(one_step, s.warmup_compiled, s, t0, res)
    graphs = counters["stats"]["unique_graphs"]  # 1: compiled once, no recompiles while warmed up
    FUNCTIONAL_COMPILE[key] = f"{how}, {graphs} graph{'s' * (graphs != 1)}"
    chk = FUNCTIONAL_CHECKS.get(key)
    bad = [] if chk is not None else ["no trajectory check"]
    bad += [
        f"{k} {chk[k]:.1e} > {tol:g}"
        for k, tol in (("eager", TOL_SAME_DRAWS), ("fallback_random", TOL_SAME_DRAWS), ("level", TOL_LEVEL))
        if chk is not None and not abs(chk[k]) <= tol
    ]
    if bad:
        res.status = "loss mismatch vs hand eager: " + ", ".join(bad)
    elif how != "fullgraph=True":
        res.status = "ok (graph breaks)"
    return res, window


# --------------------------------------------------------------------------- vipkg
def bench_vipkg_eager(model, S: int, s: Settings):
    import vipkg

    torch.manual_seed(0)
    guide = vipkg.guides.MeanFieldNormal(model, init_scale=INIT_SCALE)
    est = vipkg.Reparam()
    kw = dict(num_particles=S, lr=LR, progress=False, compile=False, device=DEVICE)
    res = Result()
    r = vipkg.fit(model, guide, est, steps=s.warmup_eager, seed=0, **kw)
    res.first_loss, res.warmup_s = float(r.losses[0]), r.elapsed

    def window():
        # Each window is its own fit() call (fresh Adam, guide trained on in place); the
        # time is FitResult.ms_per_step, i.e. fit's own timer around its loop.
        r = vipkg.fit(model, guide, est, steps=s.steps, seed=len(res.reps_ms) + 1, **kw)
        res.reps_ms.append(r.ms_per_step)
        res.last_loss = float(r.losses[-1])

    return res, window


def bench_vipkg_compiled(model, S: int, s: Settings):
    """``fit(compile=True)``: one warm-up fit (it compiles), then each window is a fit call of its
    own with the same shapes, which compiles nothing new (tests/test_compiled.py counts)."""
    from torch._dynamo.utils import counters

    import vipkg

    counters.clear()
    torch.manual_seed(0)
    guide = vipkg.guides.MeanFieldNormal(model, init_scale=INIT_SCALE)
    kw = dict(num_particles=S, lr=LR, progress=False, compile=_compile_mode() or True, device=DEVICE)
    res = Result()

    def fit(steps, seed):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RuntimeWarning)
            r = vipkg.fit(model, guide, vipkg.Reparam(), steps=steps, seed=seed, **kw)
        fallback = [w for w in caught if "compile=True failed" in str(w.message)]
        if fallback:
            res.status = "fell back"
            FALLBACKS.append(str(fallback[0].message))
        return r

    t0 = time.perf_counter()
    r = fit(s.warmup_compiled, 0)
    res.warmup_s, res.first_loss = time.perf_counter() - t0, float(r.losses[0])
    if res.ok and not counters["stats"]["unique_graphs"]:
        res.status = "fell back (nothing compiled)"
    graphs = counters["stats"]["unique_graphs"]

    def window():
        r = fit(s.steps, len(res.reps_ms) + 1)
        res.reps_ms.append(r.ms_per_step)
        res.last_loss = float(r.losses[-1])
        if counters["stats"]["unique_graphs"] != graphs and res.ok:
            res.status = "recompiled in a timed fit"

    return res, window


FALLBACKS: list[str] = []


# --------------------------------------------------------------------------- Pyro
def bench_pyro(model, S: int, s: Settings):
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoNormal

    fn, args, kwargs = model.pyro_model
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args)
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

    def window():
        _sync()
        t0 = time.perf_counter()
        for _ in range(s.steps_pyro):
            loss = svi.step(*args, **kwargs)  # returns a float: one host read per step
        res.reps_ms.append(1e3 * (time.perf_counter() - t0) / s.steps_pyro)
        res.last_loss = loss

    return res, window


# --------------------------------------------------------------------------- NumPyro
def _numpyro_versions() -> str | None:
    try:
        import jax
        import numpyro
    except ImportError:
        return None
    return f"numpyro {numpyro.__version__}, jax {jax.__version__} ({jax.default_backend()})"


def bench_numpyro(model, S: int, s: Settings):
    """NumPyro ``jit(svi.update)`` with a hand-written guide of the hand loop's parameterization."""
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as dist
        from numpyro.infer import SVI, Trace_ELBO
    except ImportError:
        return Result(status="not installed"), None

    # JAX's CPU backend unless the PyTorch configurations run on a GPU: then its default one.
    jdev = jax.devices()[0] if DEVICE.type == "cuda" else jax.devices("cpu")[0]
    X = jax.device_put(jnp.asarray(model.data["X"].cpu().numpy(), dtype=jnp.float32), jdev)
    y = jax.device_put(jnp.asarray(model.data["y"].cpu().numpy(), dtype=jnp.float32), jdev)
    dim = X.shape[1] + 1

    def np_model(X, y):
        alpha = numpyro.sample("alpha", dist.Normal(0.0, 1.0))
        beta = numpyro.sample("beta", dist.Normal(jnp.zeros(X.shape[1]), 1.0).to_event(1))
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", dist.Bernoulli(logits=X @ beta + alpha), obs=y)

    def np_guide(X, y):
        loc = numpyro.param("loc", jnp.zeros(dim, dtype=jnp.float32))
        raw_scale = numpyro.param("raw_scale", jnp.full(dim, _inverse_softplus(INIT_SCALE), jnp.float32))
        scale = jax.nn.softplus(raw_scale)
        numpyro.sample("alpha", dist.Normal(loc[0], scale[0]))
        numpyro.sample("beta", dist.Normal(loc[1:], scale[1:]).to_event(1))

    elbo = Trace_ELBO(num_particles=S, vectorize_particles=True)
    svi = SVI(np_model, np_guide, numpyro.optim.Adam(LR), elbo)
    update = jax.jit(svi.update)
    res = Result()
    t0 = time.perf_counter()
    state = svi.init(jax.random.PRNGKey(0), X, y)
    for i in range(s.warmup_compiled):
        state, loss = update(state, X, y)
        loss.block_until_ready()
        if i == 0:
            res.first_loss = float(loss)
            if loss.dtype != jnp.float32:
                return Result(status=f"error: loss dtype {loss.dtype}, expected float32"), None
    res.warmup_s = time.perf_counter() - t0
    carry = [state]

    def window():
        state = carry[0]
        t0 = time.perf_counter()
        for _ in range(s.steps):
            state, loss = update(state, X, y)
            # Wait for every step: the loss comes out of the same XLA executable as the new
            # state, so async dispatch cannot run ahead of the timer.
            loss.block_until_ready()
        jax.block_until_ready(state)
        res.reps_ms.append(1e3 * (time.perf_counter() - t0) / s.steps)
        res.last_loss = float(loss)
        carry[0] = state

    return res, window


# --------------------------------------------------------------------------- checks
def same_elbo_gap(model, S: int = 4) -> float:
    """Largest |vipkg loss - hand-written loss| over a few seeds at the initial guide."""
    import vipkg

    guide = vipkg.guides.MeanFieldNormal(model, init_scale=INIT_SCALE).to(DEVICE)
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
CONFIGS = (
    "hand eager",
    "hand eager, fused Adam",
    "vipkg eager",
    "hand compiled",
    "hand functional compiled",
    "vipkg compiled",
    "numpyro jit",
    "pyro SVI",
)


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


def _device_name() -> str:
    if DEVICE.type == "cuda":
        name = f"{torch.cuda.get_device_name(DEVICE)} (CUDA {torch.version.cuda})"
        return f"{name}; compiled configurations with mode='reduce-overhead'"
    return "cpu"


def _short(status: str) -> str:
    if status.startswith("fell back"):
        return "fell back"
    if status == "not installed":
        return status
    return "error" if status.startswith("error") else "check failed"


def _fmt_ms(res: Result) -> str:
    if res.status.startswith("error") or res.status == "not installed":
        return _short(res.status)
    return f"{res.ms:.3f}" + ("" if res.ok else f" ({_short(res.status)})")


def paired_ratio(num: Result, den: Result) -> float:
    """The median over rounds of ``num``'s ms / ``den``'s ms in the same round (run_interleaved)."""
    if len(num.reps_ms) != len(den.reps_ms) or not num.reps_ms:
        return num.ms / den.ms
    return statistics.median(a / b for a, b in zip(num.reps_ms, den.reps_ms, strict=True))


def _ratio(num: Result, den: Result, target: float | None = None, strict: bool = False) -> str:
    """``num.ms / den.ms``, with ok/MISS against ``target`` (``<=``, or ``<`` when strict)."""
    for res, who in ((num, ""), (den, "baseline ")):
        if not res.ok:
            return f"n/a ({who}{_short(res.status)})"
    r = paired_ratio(num, den)
    if target is None:
        return f"{r:.2f}x"
    met = r < target if strict else r <= target
    return f"{r:.2f}x {'ok' if met else 'MISS'}"


# (numerator, denominator, target, strict, column title) of the targets table
TARGETS = (
    ("vipkg eager", "hand eager", TARGET_EAGER, False, f"vipkg eager / hand eager (<= {TARGET_EAGER})"),
    (
        "vipkg compiled",
        "hand functional compiled",
        TARGET_COMPILED,
        False,
        f"vipkg compiled / hand functional compiled (<= {TARGET_COMPILED})",
    ),
    ("vipkg compiled", "numpyro jit", 1.0, True, "vipkg compiled / NumPyro jit (< 1)"),
    ("vipkg compiled", "hand compiled", None, False, "vipkg compiled / hand compiled (no target)"),
    (
        "vipkg eager",
        "hand eager, fused Adam",
        None,
        False,
        "vipkg eager / hand eager with fused Adam (no target)",
    ),
)


def render(results, gaps, s: Settings, mode: str, threads: int) -> str:
    import pyro

    import vipkg

    settings = list(results)
    np_versions = _numpyro_versions()
    lines = [
        "# vipkg step benchmark",
        "",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- torch {torch.__version__}, pyro-ppl {pyro.__version__}, vipkg {vipkg.__version__}, "
        f"Python {platform.python_version()}; "
        + (np_versions or "NumPyro not installed (`pip install -e '.[bench]'`)"),
        f"- CPU: {_cpu_name()}",
        f"- Device: {_device_name()}",
        f"- Threads: torch.set_num_threads({threads}) for every PyTorch configuration "
        f"(env `{THREADS_ENV}`); OMP_PROC_BIND={os.environ.get('OMP_PROC_BIND')}, "
        f"OMP_PLACES={os.environ.get('OMP_PLACES')}; XLA (NumPyro) uses its own CPU thread pool.",
        f"- Mode: {mode}; warm-up {s.warmup_eager} steps (eager, Pyro) / {s.warmup_compiled} steps "
        f"(compiled, NumPyro jit), then {s.reps} rounds of {s.steps} timed steps ({s.steps_pyro} "
        "for Pyro) per configuration, interleaved: each round runs every configuration once, in "
        "turn, so a slow spell of the machine hits a round rather than a configuration. ms per "
        "step: median over rounds; ratios: median over rounds of the ratio within a round.",
        "- Task: mean-field Gaussian guide (init scale 0.1), ELBO with S reparameterized draws "
        f"(num_particles), Adam lr {LR}, float32, full data.",
        "",
        f"Targets (issue 21): vipkg eager <= {TARGET_EAGER}x hand-written eager; vipkg compiled "
        f"<= {TARGET_COMPILED}x the hand-written functional compiled step and below NumPyro's "
        "`jit(svi.update)`, on all four settings.",
        "",
        "## ms per step (median)",
        "",
        "| model | S | " + " | ".join(CONFIGS) + " |",
        "|---|---:|" + "---:|" * len(CONFIGS),
    ]
    for (name, S), row in results.items():
        lines.append(f"| {name} | {S} | " + " | ".join(_fmt_ms(row[c]) for c in CONFIGS) + " |")
    lines += [
        "",
        "## Ratio to the hand-written eager loop",
        "",
        "ms per step of each configuration / ms per step of `hand eager` on the same setting "
        "(median over rounds of the ratio within a round).",
        "",
        "| configuration | " + " | ".join(f"{name}, S={S}" for name, S in settings) + " |",
        "|---|" + "---:|" * len(settings),
    ]
    for c in CONFIGS[1:]:
        cells = [_ratio(results[k][c], results[k]["hand eager"]) for k in settings]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Targets",
        "",
        "| model | S | " + " | ".join(t[-1] for t in TARGETS) + " |",
        "|---|---:|" + "---:|" * len(TARGETS),
    ]
    verdicts = []
    for (name, S), row in results.items():
        cells = [_ratio(row[a], row[b], tgt, strict) for a, b, tgt, strict, _ in TARGETS]
        verdicts += [c for c, t in zip(cells, TARGETS, strict=True) if t[2] is not None]
        lines.append(f"| {name} | {S} | " + " | ".join(cells) + " |")
    met = sum(v.endswith(" ok") for v in verdicts)
    lines += ["", f"Targets met: {met} of {len(verdicts)}."]
    lines += [
        "",
        "## Hand-written functional step vs the eager hand loop",
        "",
        f"Loss trajectories of {VERIFY_STEPS} steps from the same initial guide and seed 0. "
        "Same draws: largest relative loss gap to the eager hand loop (`torch.optim.Adam`) at any "
        "step, for the functional step run uncompiled and compiled with Inductor's "
        "`fallback_random` (eager RNG inside the graph); tolerance "
        f"{TOL_SAME_DRAWS:g}. Other draws: the timed compiled step (Inductor's RNG) — relative "
        f"difference of the mean loss over the last {VERIFY_TAIL} steps; tolerance {TOL_LEVEL:g}.",
        "",
        "| model | S | torch.compile | uncompiled, same draws | compiled + fallback_random, same draws "
        f"| compiled (timed), last-{VERIFY_TAIL} mean vs hand |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for key in settings:
        chk = FUNCTIONAL_CHECKS.get(key)
        how = FUNCTIONAL_COMPILE.get(key, "-")
        if chk is None:
            lines.append(f"| {key[0]} | {key[1]} | {how} | - | - | - |")
            continue
        lines.append(
            f"| {key[0]} | {key[1]} | {how} | {chk['eager']:.1e} | {chk['fallback_random']:.1e} "
            f"| {100 * chk['level']:+.2f}% ({chk['hand_tail']:.2f} nats) |"
        )
    lines += [
        "",
        "## Every repeat, warm-up and losses",
        "",
        "Warm-up s includes compilation for the compiled configurations and NumPyro's jit (short "
        "when TorchInductor's on-disk cache already holds the kernels from an earlier run). Losses "
        "are minus the ELBO estimate (nats) at the first warm-up step and the last timed step; each "
        "timed configuration must end finite and lower than it started.",
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
        "likelihood with `addmm(alpha, X, beta.T)` and `(y * logits - softplus(logits)).sum(0)` "
        "(as the zoo model writes it), log q from eps; `loss.backward(); adam.step()`. "
        "Compiled: the whole step function in `torch.compile` (default mode). `torch.optim.Adam` "
        "with its defaults (the foreach path), except `hand eager, fused Adam` (`fused=True`, "
        "the kernel vipkg.fit's Adam uses): the last target column separates what vipkg's "
        "update gains from the rest of its step.",
        "- hand functional compiled: the same ELBO and draws (`torch.randn(S, 1 + D)`), its gradient "
        "by `torch.func.grad_and_value`, and Adam (betas 0.9/0.999, eps 1e-8, as torch.optim.Adam's "
        "single-tensor path: lerp, bias-corrected addcdiv) written out of place, as one pure "
        "function `(params, exp_avg, exp_avg_sq, step, X, y) -> (..., loss)` compiled once per "
        "setting with `torch.compile(fullgraph=True)` (default mode); its state is passed in and "
        "out each step, nothing is mutated. The torch.compile column above says whether "
        "fullgraph=True held and how many graphs Dynamo built over compilation and the timed "
        "steps (1: no recompilation).",
        "- Same ELBO: at the initial guide and equal seeds the vipkg and hand-written losses agree "
        "to a relative " + ", ".join(f"{g:.1e} ({n})" for n, g in gaps.items()) + ".",
        "- vipkg eager: each repeat is one `vipkg.fit(..., steps=N, progress=False)` call and its "
        "time is `FitResult.ms_per_step` (fit's own timer; includes writing the loss of every step "
        f"and one host read per {CHECK_EVERY} steps).",
        "- vipkg compiled: a warm-up `vipkg.fit(..., compile=True)` call compiles; every round is "
        "then a `fit(..., compile=True)` call of its own with the same shapes, which compiles "
        "nothing new (its status would say `recompiled in a timed fit`), timed like vipkg eager.",
        "- NumPyro: `jax.jit(SVI(model, guide, numpyro.optim.Adam(0.01), Trace_ELBO(num_particles=S, "
        "vectorize_particles=True)).update)`, float32 on the CPU backend; the model has sites alpha, "
        "beta (N(0, 1)) and a Bernoulli-logit `plate` over the data with `X @ beta + alpha`; the guide "
        "is hand-written with the hand loop's parameterization (one `loc` and one `raw_scale` vector "
        "of size 1 + D, softplus, same init). Every timed step calls `loss.block_until_ready()` (the "
        "loss and the new state come out of one XLA executable), and the state is blocked on at "
        "the end of each repeat, so async dispatch does not hide work. Its draws come from JAX's "
        "PRNG, so its losses follow other draws.",
        "- Pyro: `SVI(model, AutoNormal(model, init_scale=0.1), pyro.optim.Adam, "
        "Trace_ELBO(num_particles=S, vectorize_particles=True, max_plate_nesting=1))` on the "
        "model's Pyro program (`model.pyro_model`); `svi.step` returns a float (one host read per "
        "step). AutoNormal starts from the prior median, so its losses start elsewhere.",
        "- OpenMP threads are pinned (OMP_PROC_BIND/OMP_PLACES set before torch is imported, unless "
        "already set). On the 2-vCPU VM this script was written on, unpinned 2-thread runs of the "
        "same loops were 10-100x slower at random (e.g. ~46 ms/step instead of ~0.45 ms for the "
        "breast-cancer hand loop): a spin-waiting OpenMP worker sharing the main thread's core. "
        "With 1 thread they were stable.",
    ]
    if FALLBACKS:
        lines.append("- vipkg compile=True fell back to eager: " + "; ".join(sorted(set(FALLBACKS))))
    lines += [
        "",
        f"How to run: `python benchmarks/bench_step.py` (writes benchmarks/results/step.md; "
        f"`--quick` for a smoke run that writes nothing unless `--out PATH` is given; threads via "
        f"`{THREADS_ENV}`; NumPyro via `pip install -e '.[bench]'`).",
        "",
    ]
    return "\n".join(lines)


def write_atomic(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def main(argv=None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run with few steps; writes no file by default")
    p.add_argument(
        "--out",
        default=None,
        help="markdown report path (default: benchmarks/results/step.md for a full run, none for --quick)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where the PyTorch configurations run (cuda: report results/step_cuda.md)",
    )
    a = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch.cuda.is_available() is False on this machine")
    s = QUICK if a.quick else FULL
    report = "step.md" if DEVICE.type == "cpu" else "step_cuda.md"
    out = a.out if a.out is not None or a.quick else os.path.join(here, "results", report)
    threads = int(os.environ.get(THREADS_ENV, "2"))
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*is deprecated")

    import vipkg

    t_start = time.perf_counter()
    results: dict = {}
    gaps: dict = {}
    for name, spec in MODELS.items():
        model = vipkg.models.logistic_regression(**spec).to(device=DEVICE)
        gaps[name.split()[0]] = same_elbo_gap(model)
        for S in PARTICLES:
            key = (name, S)
            torch._dynamo.reset()
            check_functional(model, S, key)
            benches = {
                "hand eager": lambda m=model, S=S: bench_hand(m, S, False, s),
                "hand eager, fused Adam": lambda m=model, S=S: bench_hand(m, S, False, s, fused=True),
                "vipkg eager": lambda m=model, S=S: bench_vipkg_eager(m, S, s),
                "hand compiled": lambda m=model, S=S: bench_hand(m, S, True, s),
                "hand functional compiled": lambda m=model, S=S, k=key: bench_functional(m, S, s, k),
                "vipkg compiled": lambda m=model, S=S: bench_vipkg_compiled(m, S, s),
                "numpyro jit": lambda m=model, S=S: bench_numpyro(m, S, s),
                "pyro SVI": lambda m=model, S=S: bench_pyro(m, S, s),
            }
            t0 = time.perf_counter()
            row = results[key] = run_interleaved(benches, s, f"{name:26s} S={S:<3d}")
            for c, res in row.items():
                print(f"{name:26s} S={S:<3d} {c:24s} {_fmt_ms(res):>14s} ms/step  [{res.status}]", flush=True)
            print(f"  ({time.perf_counter() - t0:.1f}s)", flush=True)
    text = render(results, gaps, s, "quick" if a.quick else "full", threads)
    print()
    print(text)
    if out is None:
        print(f"quick run: no report written (pass --out PATH) in {time.perf_counter() - t_start:.0f}s")
    else:
        write_atomic(out, text)
        print(f"wrote {out} in {time.perf_counter() - t_start:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
