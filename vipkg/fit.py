"""The fitting loop: estimator steps on device, host reads only every few steps.

:func:`fit` builds a :class:`FitState` and a list of :class:`Hook` objects (the
finiteness and divergence check, gradient-variance recording, checkpoints, the
progress bar, the callback). Each hook names the next step at which it wants
control; the loop runs the steps up to the nearest one on the device without a
host read, then gives every hook its turn, in that order.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from vipkg._adam import lean_step
from vipkg._rng import seeded
from vipkg.estimators.base import Estimator, check_minibatch_support, check_trains_model
from vipkg.model import ModelError
from vipkg.objectives import ELBO, Objective

__all__ = ["fit", "FitResult", "Bound", "NonFiniteLossError", "progress_label"]

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
}


class NonFiniteLossError(FloatingPointError):
    """The fit left finite arithmetic: a loss, gradient or parameter became NaN or infinite,
    the model refused the guide's draws after the parameters ran away, or the bound jumped
    by an impossible amount in one step (divergence)."""


#: A loss this many robust spreads below the recent median (and at least this many nats) in one
#: step is not optimisation progress: the bound has become numerically meaningless.
DIVERGENCE_SPREADS = 1e3


class Bound(NamedTuple):
    """:meth:`FitResult.bound`: the bound's estimate and its Monte Carlo standard error (nats)."""

    estimate: float
    se: float


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes
    ----------
    model, guide, estimator, objective
        The fitted guide is trained in place; ``model`` is on the fit's device.
    losses : Tensor
        ``[steps]`` loss per step, on the CPU.
    elapsed : float
        Wall-clock seconds of the optimisation loop (diagnostics excluded).
    diagnostics : dict
        ``{"steps": [...], "gradient_variance": [GradientVarianceResult, ...]}`` when
        ``fit(diagnostics=GradientVariance(...))`` was given.
    num_particles : int
    skipped_steps : int
        Steps whose loss, gradient or updated parameters were not finite and that
        ``nan_policy="skip"`` undid; their entries in ``losses`` are NaN, so they are
        visible (a step undone for its update alone is marked NaN too).
    compile_note : str
        With ``compile=True``: ``"functional"`` when the step was compiled as one function of the
        parameters and optimizer state (:mod:`vipkg._compiled`), else why it was compiled as the eager
        step instead.
    """

    model: Any
    guide: Any
    estimator: Any
    objective: Objective
    losses: torch.Tensor
    elapsed: float
    diagnostics: dict
    num_particles: int
    skipped_steps: int = 0
    compile_note: str = ""

    @property
    def steps(self) -> int:
        return int(self.losses.shape[0])

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.elapsed / max(self.steps, 1)

    @torch.no_grad()
    def sample(self, n: int = 1000, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``n`` draws from the fitted guide as named constrained sites ``{site: Tensor[n, *shape]}``,
        with the model's deterministic quantities (``pyro.deterministic`` sites) at those draws."""
        with seeded(seed, self.guide.device):
            z = self.guide().sample((n,))
        latents = {k: v.detach() for k, v in self.guide.constrain(self.model, z).items()}
        if self.model.is_subsampled:
            return latents
        return {**latents, **{k: v.detach() for k, v in self.model.deterministic(latents).items()}}

    @torch.no_grad()
    def bound(self, n: int = 1000, seed: int | None = 0, objective: Objective | None = None) -> Bound:
        """The fitted guide's bound on ``n`` fresh draws, with its Monte Carlo standard error.

        ``elbo, se = result.bound()`` is the ELBO ``E_q[log p(x, z) - log q(z)]`` estimated from
        ``n`` new guide draws (not the training losses, whose draws the parameters were fitted to).
        Pass ``objective=result.objective`` (or any :class:`~vipkg.objectives.Objective`) for its
        bound instead, estimated from ``n`` groups of ``objective.k`` draws. ``seed`` seeds a forked
        RNG: the caller's stream is left as it was.

        Raises ``ValueError`` for a guide without a density (particles: SVGD) and for a model with
        local latents in a subsampled plate, whose full-data log joint is never evaluated at once:
        use the model's held-out bound there (:func:`vipkg.models.heldout_elbo` for the zoo's VAEs)
        or an average of minibatch bounds.
        """
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"bound: n must be an int >= 2 (draws for a mean and its error), got {n!r}.")
        if getattr(self.guide, "is_empirical", False):
            raise ValueError(
                f"bound: the guide {type(self.guide).__name__} is a set of particles without a density, "
                "so it has no bound; compare particle fits by a held-out predictive or a Stein discrepancy."
            )
        if self.model.is_subsampled:
            raise ValueError(
                f"bound: model {self.model.name!r} has local latents {sorted(self.model.local_sites)} in "
                f"subsampled plate(s) {sorted(self.model.plates)}; its full-data bound is never evaluated "
                "at once. Use its held-out bound (vipkg.models.heldout_elbo(result.model, result.guide) "
                "for the zoo's VAEs) or average minibatch bounds (what vipkg compare reports)."
            )
        objective = objective or ELBO()
        S, K = objective.sample_shape(n)
        with seeded(seed, self.guide.device):
            z, log_q = self.guide.sample_and_log_prob((S, K))  # discrete guides too
        per = objective.per_group(self.guide.log_joint(self.model, z) - log_q).double()
        return Bound(float(per.mean()), float(per.std() / math.sqrt(per.numel())))

    def to_arviz(self, n: int = 1000, seed: int | None = 0):
        """The fit as ArviZ ``InferenceData`` (see :func:`vipkg.diagnostics.to_arviz`)."""
        from vipkg.diagnostics.arviz_adapter import to_arviz

        return to_arviz(self, n, seed=seed)


def _fusable(params) -> bool:
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    return bool(tensors) and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in tensors
    )


def _make_optimizer(optimizer, params, lr):
    if isinstance(optimizer, str):
        try:
            cls = OPTIMIZERS[optimizer.lower()]
        except KeyError:
            raise ValueError(
                f"unknown optimizer {optimizer!r}; use one of {sorted(OPTIMIZERS)} or a torch.optim class."
            ) from None
        params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
        if cls in (torch.optim.Adam, torch.optim.AdamW) and _fusable(params):
            # One fused kernel for every parameter: measured 0.12 ms against 0.41 ms per step
            # (single-tensor) for a VAE's eight tensors on one CPU thread.
            return cls(params, lr=lr, fused=True)
        return cls(params, lr=lr)
    if isinstance(optimizer, type) and issubclass(optimizer, torch.optim.Optimizer):
        return optimizer(params, lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):
        return optimizer(params)
    raise TypeError(f"optimizer must be a name, a torch.optim class or a factory, got {optimizer!r}.")


def _progress_enabled(progress) -> bool:
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI"):
        return False
    try:  # a notebook kernel has no tty but wants a bar
        shell = get_ipython().__class__.__name__  # type: ignore[name-defined]  # noqa: F821
        if shell == "ZMQInteractiveShell":
            return True
    except NameError:
        pass
    return sys.stderr.isatty()


def _compiled(step_fn, device=None, compiled=None):
    """``compiled`` (default: ``torch.compile`` of ``step_fn``), falling back to ``step_fn`` with a
    warning when its first call fails."""
    # fallback_random keeps the draws identical to eager steps with the same seed,
    # so compile=True changes speed, not the trajectory.
    if compiled is None:
        compiled = torch.compile(step_fn, options={"fallback_random": True})
    state = {"fn": compiled, "first": True}

    def run():
        if state["fn"] is step_fn:
            return step_fn()
        # A failing first call can run part of the step for real (the graph before a
        # break draws particles), so the fallback restarts from the RNG state before it.
        saved = _rng_state(device) if state["first"] and device is not None else None
        try:
            out = state["fn"]()
        except Exception as err:  # compile failures surface on first call
            warnings.warn(
                f"compile=True failed ({type(err).__name__}: {err}); falling back to eager steps.",
                RuntimeWarning,
                stacklevel=3,
            )
            if saved is not None:
                _set_rng_state(saved, device)
            state["fn"] = step_fn
            return step_fn()
        state["first"] = False
        return out

    return run


def fit(
    model,
    guide,
    estimator,
    *,
    objective: Objective | None = None,
    steps: int = 2000,
    num_particles: int = 16,
    optimizer="adam",
    lr: float = 1e-2,
    model_lr: float | None = None,
    scheduler=None,
    seed: int = 0,
    device=None,
    compile: bool | str = False,
    diagnostics=None,
    checkpoint=None,
    checkpoint_every: int = 500,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    check_every: int = 50,
    callback=None,
    nan_policy: str = "raise",
) -> FitResult:
    """Fit ``guide`` to ``model`` with gradient ``estimator``.

    Parameters
    ----------
    model : vipkg.Model
        Its own parameters, if it has any (``pyro.param`` / ``PyroModule`` parameters,
        ``Model.from_log_density(..., params=module)``), are trained in place with the
        guide: variational EM, maximizing the bound over both.
    guide : vipkg.guides.Guide
        Trained in place (and moved to ``device``).
    estimator : vipkg.estimators.Estimator
    objective : Objective, optional
        Default :class:`~vipkg.objectives.ELBO`.
    steps : int
    num_particles : int
        Groups of draws per step (each of ``objective.k`` draws).
    optimizer : str, torch.optim.Optimizer class or factory
        ``"adam"``, ``"adamw"``, ``"sgd"``, ``"adagrad"``, ``"rmsprop"``, a class
        (called with ``lr``) or ``params -> Optimizer``.
    lr : float
    model_lr : float, optional
        Learning rate of the model's own parameters (default ``lr``).
    scheduler : callable, optional
        ``optimizer -> torch.optim.lr_scheduler.LRScheduler``, stepped once per step
        (e.g. ``lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.999)``).
    seed : int
        Seeds a forked torch RNG; the caller's RNG is left as it was.
    device : str or torch.device, optional
        Where to run; default the guide's device.
    compile : bool or {"default", "reduce-overhead"}
        Compile the step with ``torch.compile`` (falls back to eager, with a warning, when
        compilation fails). Surrogate-style estimators (``Estimator.functional``) compile as one
        pure function of the parameters and the optimizer state (:mod:`vipkg._compiled`),
        compiled once per configuration; the others compile their eager step.
        ``FitResult.compile_note`` says which. ``"reduce-overhead"`` also captures the functional
        step as a CUDA graph on a GPU (its inputs keep their storage from step to step).
    diagnostics : GradientVariance, optional
        Record gradient variance during the fit.
    checkpoint : str or path, optional
        File to checkpoint to every ``checkpoint_every`` steps and at the end:
        guide, optimizer, scheduler and estimator state, RNG state, step counter,
        losses and diagnostics, written atomically (see :mod:`vipkg.checkpoint`).
    checkpoint_every : int
    resume : bool
        Continue from ``checkpoint`` when that file exists (start afresh when it
        does not, so the same call can be repeated after a crash). A resumed run
        follows the same trajectory as an uninterrupted one with the same seed.
        The guide must be built as for the original run; the checkpoint must come
        from a fit with the same seed, estimator, objective and particle count.
        Without ``resume`` (and without ``overwrite``) an existing ``checkpoint`` is
        refused with :class:`~vipkg.checkpoint.CheckpointError`: a fresh fit never
        replaces a saved one by accident.
    overwrite : bool
        Start afresh even though ``checkpoint`` exists; the old file (and the previous
        checkpoint kept beside it) is replaced at the first write, not before.
    progress : bool, optional
        tqdm bar; default on for a terminal or notebook, off under CI.
    check_every : int
        Steps between host reads of the losses (NaN checks, progress updates).
    callback : callable, optional
        ``callback(step, loss)`` after every host read: ``step`` steps are done and
        ``loss`` (a float) is the last one. Runs outside the timed loop.
    nan_policy : {"raise", "skip"}
        ``"raise"`` stops with :class:`NonFiniteLossError` naming the step.
        ``"skip"`` undoes a step whose loss or new parameters are not finite
        (parameters and optimizer state restored on the device, no host read) and
        counts it in ``FitResult.skipped_steps``; the fit still stops when more than
        half of the steps so far were skipped.

    Returns
    -------
    FitResult

    Raises
    ------
    NonFiniteLossError
        When a loss is NaN or infinite, naming the step and the estimator.
    TypeError
        When ``guide``, ``estimator`` or ``objective`` is a class, not an instance.
    CheckpointError
        When ``checkpoint`` exists and neither ``resume`` nor ``overwrite`` is given, or
        when the checkpoint to resume from is damaged or belongs to another fit.

    References
    ----------
    .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational Inference".
       AISTATS (2014).
    """
    _check_instances(guide, estimator, objective)
    if compile not in (True, False, "default", "reduce-overhead"):
        raise ValueError(
            f"compile must be True, False, 'default' or 'reduce-overhead' (CUDA graphs), got {compile!r}."
        )
    objective = objective or ELBO()
    _check_arguments(steps, num_particles, objective, lr, check_every, checkpoint_every, resume, checkpoint)
    if checkpoint is not None:
        from vipkg.checkpoint import check_target

        check_target(checkpoint, resume, overwrite)
    elif overwrite:
        raise ValueError("overwrite=True needs checkpoint=<path> to overwrite.")
    if nan_policy not in ("raise", "skip"):
        raise ValueError(f"nan_policy must be 'raise' or 'skip', got {nan_policy!r}.")
    if device is not None:
        guide.to(device)
    device = guide.device
    model = model.to(device=device, dtype=guide.dtype)
    if model.is_subsampled:
        check_minibatch_support(estimator, model, objective)
        from vipkg.guides.minibatch import draw_minibatch

        # Check against a minibatch (the only thing the estimator will see), off the fit's RNG stream.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            estimator.check(*draw_minibatch(model, guide), objective)
    else:
        estimator.check(model, guide, objective)
    estimator.check_particles(num_particles)
    params = list(guide.parameters())
    if model.has_parameters:
        check_trains_model(estimator, model)
        # Variational EM: the model's parameters take the same gradient step as the guide's,
        # in a parameter group of their own so that their learning rate can differ.
        params = [
            {"params": params},
            {"params": model.parameters(), "lr": lr if model_lr is None else model_lr},
        ]
    elif model_lr is not None:
        raise ValueError(
            f"fit: model_lr={model_lr!r} is given, but model {model.name!r} has no parameters of its own "
            "(pyro.param / PyroModule parameters, or Model.from_log_density(..., params=module))."
        )
    opt = _make_optimizer(optimizer, params, lr)
    state = FitState(
        model=model,
        guide=guide,
        estimator=estimator,
        objective=objective,
        optimizer=opt,
        scheduler=scheduler(opt) if scheduler is not None else None,
        num_particles=num_particles,
        seed=seed,
        steps=steps,
        losses=torch.empty(steps, device=device, dtype=guide.dtype),
    )
    # The order matters at a shared stop: the finiteness check runs first, so that no
    # measurement, checkpoint or callback ever sees a step that is about to be refused.
    hooks: list[Hook] = [FiniteCheck(check_every, nan_policy), GradientCheck()]
    if diagnostics is not None:
        hooks.append(RecordGradientVariance(diagnostics))
    saver = None if checkpoint is None else Checkpoint(checkpoint, checkpoint_every)
    if saver is not None:
        hooks.append(saver)
    if _progress_enabled(progress):
        hooks.append(ProgressBar(check_every))
    if callback is not None:
        hooks.append(Callback(callback, check_every))
    step = _make_step(state, nan_policy, compile)
    try:
        with seeded(seed, device):
            if saver is not None and resume:
                saver.restore(state)
            for h in hooks:
                h.start(state)
            while state.step < steps:
                stop = min([steps] + [h.next_stop(state) for h in hooks])
                _run(state, step, stop, nan_policy)
                for h in hooks:
                    h.at_stop(state)
    finally:
        for h in hooks:
            h.close(state)
    return FitResult(
        model=model,
        guide=guide,
        estimator=estimator,
        objective=objective,
        losses=state.losses.detach().cpu(),
        elapsed=state.elapsed,
        diagnostics=state.diagnostics,
        num_particles=num_particles,
        skipped_steps=state.skipped,
        compile_note=state.compile_note,
    )


def _check_instances(guide, estimator, objective) -> None:
    """A class where an instance belongs (``vipkg.Reparam`` for ``vipkg.Reparam()``) fails late, with
    a message about a missing ``self`` argument; say what to pass instead."""
    for what, value, call in (
        ("guide", guide, "(model)"),
        ("estimator", estimator, "()"),
        ("objective", objective, "()"),
    ):
        if isinstance(value, type):
            raise TypeError(
                f"fit: {what} is the class {value.__name__}, not an instance of it; pass an instance: "
                f"{value.__name__}{call}."
            )


def _check_arguments(steps, num_particles, objective, lr, check_every, checkpoint_every, resume, checkpoint):
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    objective.sample_shape(num_particles)  # validates num_particles
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}.")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be a positive int, got {check_every!r}.")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}.")
    if resume and checkpoint is None:
        raise ValueError("resume=True needs checkpoint=<path> to resume from.")


# --------------------------------------------------------------------------- the loop


@dataclasses.dataclass
class FitState:
    """Everything a fit carries from step to step; hooks read and extend it between stops.

    ``losses`` lives on the fit's device; ``step`` is the number of steps done.
    """

    model: Any
    guide: Any
    estimator: Any
    objective: Objective
    optimizer: Any
    scheduler: Any
    num_particles: int
    seed: int
    steps: int
    losses: torch.Tensor
    step: int = 0
    first_step: int = 0
    elapsed: float = 0.0
    skipped: int = 0
    diagnostics: dict = dataclasses.field(default_factory=dict)
    names: tuple = ()
    params: tuple = ()
    #: How ``compile=True`` compiled the step: ``"functional"`` (:mod:`vipkg._compiled`), or why not.
    compile_note: str = ""
    #: Context of one run of steps between stops (the functional compiled step checks its guards
    #: once per run, :meth:`vipkg._compiled.FunctionalStep.segment`).
    segment: Callable = contextlib.nullcontext

    def __post_init__(self):
        named = list(self.guide.named_parameters())
        named += [(f"model.{k}", p) for k, p in self.model.named_parameters()]
        self.names, self.params = zip(*named)

    @property
    def device(self) -> torch.device:
        return self.losses.device

    @property
    def where(self) -> str:
        return (
            f"estimator {self.estimator!r}, guide {type(self.guide).__name__}, objective "
            f"{self.objective!r}, model {self.model.name!r}"
        )


class Hook:
    """Something done between runs of steps: each hook names the next step at which it wants
    control, and the loop runs on the device, without host reads, until the nearest one."""

    def start(self, state: FitState) -> None:
        """Before the first step (after a resume, at the resumed step)."""

    def next_stop(self, state: FitState) -> int:
        """The step count (> ``state.step``) at which this hook next wants control."""
        return state.steps

    def at_stop(self, state: FitState) -> None:
        """At every stop (``state.step`` steps done); act when it is this hook's own."""

    def close(self, state: FitState) -> None:
        """When the fit ends, normally or not."""


def _every(n: int, state: FitState) -> int:
    return (state.step // n + 1) * n


class FiniteCheck(Hook):
    """Reads the losses once per ``every`` steps: non-finite losses and parameters, divergence.

    Nothing is checked per step in the default ``nan_policy="raise"``: a non-finite
    gradient or update makes the parameters non-finite, NaN stays, and the next loss
    is NaN, so one read of the losses and one of the parameters per run of steps finds
    every case (a flag per step cost 6-12% of a small step on the CPU). Under ``"skip"``
    every undone step's loss is NaN (see :func:`_undo_if_not_finite`).
    """

    def __init__(self, every: int, nan_policy: str):
        self.every, self.nan_policy = every, nan_policy
        self.last = 0
        self.history = torch.empty(0)

    def start(self, state):
        self.last = state.step
        self.history = self.history.to(state.losses.dtype)

    def next_stop(self, state):
        return self.last + self.every

    def at_stop(self, state):
        start, stop = self.last, state.step
        if stop == start:
            return
        # The one host read per run of steps: the losses, and whether the parameters are finite.
        with torch.no_grad():
            params_bad = ~torch.isfinite(torch.cat([p.detach().reshape(-1) for p in state.params])).all()
            read = torch.cat([state.losses[start:stop], params_bad.to(state.losses.dtype).reshape(1)]).cpu()
        chunk, params_bad = read[:-1], bool(read[-1])
        failed = ~torch.isfinite(chunk)
        if self.nan_policy == "skip" and bool(failed.any()):
            state.skipped += int(failed.sum())
            if state.skipped <= stop // 2:
                failed = torch.zeros_like(failed)
        if bool(failed.any()) or (params_bad and self.nan_policy == "raise"):
            j = int(failed.nonzero()[0, 0]) if bool(failed.any()) else stop - start - 1
            prefix = "" if self.nan_policy == "raise" else f"{state.skipped} of {stop} steps were skipped; "
            raise NonFiniteLossError(
                prefix
                + _what_went_wrong(float(chunk[j]), start + j, state)
                + ". Check the log density for NaN/inf over "
                "the guide's support, lower lr, or use more particles."
            )
        self.history = _check_divergence(self.history, chunk, start, state.where)
        self.last = stop


class GradientCheck(Hook):
    """Once per fit, at the first stop after at least two steps: parameters that got no gradient
    (``.grad is None``) or an all-zero one, and have not moved since the fit started, are named in
    a ``UserWarning`` (a log density that leaves autograd, a site the log joint never reads).

    It asks for no stop of its own and reads the host once (a few numbers per parameter), so
    the steps stay free of host reads. Two steps, not one, so that a network whose last layer
    starts at zero (a flow's coupling nets) has passed gradient to its earlier layers. Only
    the whole tensor counts: a minibatch step leaves the rows of local parameters outside
    the minibatch at zero. A parameter that moved before is not reported for a zero gradient at
    the check (a score-function estimate is exactly zero when every particle drew the same
    value); a guide parameter whose gradient is exactly zero is reported only when the log joint
    carries no gradient to the draws (else it may sit at its optimum: STL at the exact
    posterior, a score-function part that already is its site's posterior). Update estimators
    that move the guide without ``.grad`` (SVGD, FB-GVI, BW-SGD) are not checked.
    """

    MIN_STEPS = 2

    def __init__(self):
        self.done = False
        self.start_values = None

    @staticmethod
    def _fingerprint(params) -> list[torch.Tensor]:
        # Each parameter's sum and sum of squares, on the device in its dtype (no host read).
        with torch.no_grad():
            return [torch.stack([p.detach().sum(), p.detach().square().sum()]) for p in params]

    def _checked(self, state) -> bool:
        est = state.estimator
        return bool(est.trains_model_params)

    def start(self, state):
        if self._checked(state) and state.params:
            self.start_values = self._fingerprint(state.params)

    def at_stop(self, state):
        if self.done or state.step - state.first_step < self.MIN_STEPS:
            return
        self.done = True
        if self.start_values is None:
            return
        with torch.no_grad():
            nonzero = [
                torch.ones((), dtype=torch.bool, device=p.device) if p.grad is None else (p.grad != 0).any()
                for p in state.params
            ]
            now = self._fingerprint(state.params)
            unchanged = torch.stack([(a == b).all() for a, b in zip(now, self.start_values)])
            read = (
                torch.cat([torch.stack(nonzero).reshape(-1, 1), unchanged.reshape(-1, 1)], 1).cpu().tolist()
            )
        own = {id(p) for p in state.model.parameters()}
        named = [
            (n, p, bool(nz), bool(same))
            for (n, p), (nz, same) in zip(zip(state.names, state.params), read)
            if p.requires_grad and p.numel()
        ]
        missing = [n for n, p, _, same in named if p.grad is None and same]
        zero = [(n, id(p) in own) for n, p, nz, same in named if p.grad is not None and not nz and same]
        # A guide part whose estimate is exactly zero at every draw may just sit at its optimum (a
        # score-function part whose site's posterior it already is, STL at the exact posterior):
        # reported only when the log joint itself carries no gradient. A model parameter (a dead
        # layer, an unread one) has no such excuse.
        leaves = _log_joint_leaves_autograd(state) if (missing or zero) else False
        zero = [n for n, of_model in zero if of_model or leaves]
        if not (missing or zero):
            return
        what = []
        if missing:
            what.append(f"no gradient for {', '.join(missing)}")
        if zero:
            what.append(f"an all-zero gradient for {', '.join(zero)}")
        if leaves:
            cause = (
                "The cause: the model's log joint at the guide's draws carries no gradient (it leaves "
                "autograd: a NumPy round trip, .detach(), .item(), float() or torch.tensor() of a value); "
                "write the log density in torch operations on its argument."
            )
        else:
            cause = (
                "Likely cause: the log density leaves autograd for some sites (a NumPy round trip, "
                ".detach(), .item(), float() or torch.tensor() of a value), the log joint never reads "
                "the site(s) or parameter(s) they belong to, or reads them through something flat there "
                "(a clamp at a boundary, a dead ReLU)."
            )
        warnings.warn(
            f"fit: at step {state.step} with {state.where}, the estimate gave {' and '.join(what)}, "
            f"and they have not moved since step {state.first_step}. {cause}",
            UserWarning,
            stacklevel=3,
        )


def _log_joint_leaves_autograd(state: FitState) -> bool:
    """Whether the model's log joint at a few reparameterized guide draws has no gradient with
    respect to them (best effort, off the fit's RNG stream; False when it cannot tell)."""
    model, guide = state.model, state.guide
    try:
        with torch.random.fork_rng(devices=[state.device] if state.device.type == "cuda" else []):
            if model.is_subsampled:
                from vipkg.guides.minibatch import draw_minibatch

                model, guide = draw_minibatch(model, guide)
            with torch.enable_grad():
                z = guide().rsample((2,))
                if not z.requires_grad:
                    return False
                return not model.log_joint(guide.constrain(model, z)).requires_grad
    except Exception:  # no reparameterized draws (discrete guides), a guide without one flat draw
        return False


class RecordGradientVariance(Hook):
    """``fit(diagnostics=GradientVariance(every=...))``: measurements at multiples of ``every``
    and at the last step, each seeing the parameters of the step it is labelled with."""

    def __init__(self, diagnostics):
        self.diagnostics = diagnostics

    def _record(self, state):
        d = state.diagnostics
        if state.step in d["steps"]:
            return
        d["steps"].append(state.step)
        d["gradient_variance"].append(
            self.diagnostics.measure(
                state.model,
                state.guide,
                state.estimator,
                state.objective,
                state.num_particles,
                seed=state.seed * 1_000_003 + state.step,
            )
        )

    def start(self, state):
        if not state.diagnostics:
            state.diagnostics = {"steps": [], "gradient_variance": []}
        if state.step % self.diagnostics.every == 0:
            self._record(state)

    def next_stop(self, state):
        return _every(self.diagnostics.every, state)

    def at_stop(self, state):
        if state.step % self.diagnostics.every == 0 or state.step == state.steps:
            self._record(state)


class Checkpoint(Hook):
    """Atomic, checksummed checkpoints every ``every`` steps and at the end; :meth:`restore` resumes
    from one. Each write keeps the checkpoint it replaces as ``<path>.prev``, except the first write
    of a fresh fit, which replaces another fit's files (``fit(overwrite=True)``)."""

    def __init__(self, path, every: int):
        self.path, self.every = path, every
        # Whether the file at path is this fit's own (restored from, or written by it).
        self.owns_file = False

    def identity(self, state) -> dict:
        return {
            "seed": state.seed,
            "estimator": repr(state.estimator),
            "objective": repr(state.objective),
            "guide_type": type(state.guide).__name__,
            "num_particles": state.num_particles,
        }

    def start(self, state):
        from vipkg import checkpoint as ckpt

        ckpt.remove_stale_temporaries(self.path)

    def restore(self, state):
        """Continue from the checkpoint when it exists (a fresh start when it does not)."""
        from vipkg import checkpoint as ckpt

        if not os.path.exists(self.path):
            return
        saved = ckpt.load_checkpoint(self.path, map_location=state.device)
        ckpt.check_matches(self.path, saved, self.identity(state))
        step = int(saved["step"])
        if step > state.steps:
            raise ckpt.CheckpointError(
                f"checkpoint {str(self.path)!r} is at step {step}, past steps={state.steps}; "
                f"pass steps >= {step} to continue it."
            )
        try:
            state.guide.load_state_dict(saved["guide"])
        except RuntimeError as err:
            raise ckpt.CheckpointError(
                f"checkpoint {str(self.path)!r}: its guide state does not fit this guide ({err}); build the "
                "guide as for the fit that wrote it, or start afresh with overwrite=True."
            ) from err
        _load_model_params(state.model, saved.get("model_params", {}), self.path)
        try:
            state.optimizer.load_state_dict(saved["optimizer"])
        except ValueError as err:
            raise ckpt.CheckpointError(
                f"checkpoint {str(self.path)!r}: its optimizer state does not fit this guide's parameters "
                f"({err}); it was written for another parameterization (an earlier vipkg?). Its guide "
                "still loads with guide.load_state_dict(state['guide']); start a new fit from there."
            ) from err
        if state.scheduler is not None and saved.get("scheduler") is not None:
            state.scheduler.load_state_dict(saved["scheduler"])
        state.estimator.load_state_dict(saved["estimator_state"])
        state.losses[:step] = saved["losses"].to(state.losses)
        state.elapsed = float(saved["elapsed"])
        state.skipped = int(saved.get("skipped_steps", 0))
        state.step = state.first_step = step
        _set_rng_state(saved["rng"], state.device)
        if saved.get("diagnostics"):
            state.diagnostics = ckpt.diagnostics_from_state(saved["diagnostics"])
        self.owns_file = True

    def next_stop(self, state):
        return _every(self.every, state)

    def at_stop(self, state):
        if state.step % self.every == 0 or state.step == state.steps:
            self.save(state)

    def save(self, state):
        from vipkg import checkpoint as ckpt

        ckpt.save_checkpoint(
            self.path,
            {
                **self.identity(state),
                "step": state.step,
                "guide": state.guide.state_dict(),
                "model_params": {k: p.detach().clone() for k, p in state.model.named_parameters()},
                "optimizer": state.optimizer.state_dict(),
                "scheduler": None if state.scheduler is None else state.scheduler.state_dict(),
                "estimator_state": state.estimator.state_dict(),
                "rng": _rng_state(state.device),
                "losses": state.losses[: state.step].detach().cpu(),
                "elapsed": state.elapsed,
                "skipped_steps": state.skipped,
                "diagnostics": ckpt.diagnostics_to_state(state.diagnostics),
            },
            keep_previous=self.owns_file,
        )
        self.owns_file = True


def _load_model_params(model, saved: dict, path) -> None:
    from vipkg import checkpoint as ckpt

    own = dict(model.named_parameters())
    if set(saved) != set(own):
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} holds model parameters {sorted(saved)}, this model has "
            f"{sorted(own)}; it was written for another model."
        )
    with torch.no_grad():
        for k, p in own.items():
            if saved[k].shape != p.shape:
                raise ckpt.CheckpointError(
                    f"checkpoint {str(path)!r}: model parameter {k!r} has shape {tuple(saved[k].shape)}, "
                    f"this model's has {tuple(p.shape)}."
                )
            p.copy_(saved[k])


#: The label of the progress bars of the fits inside :func:`progress_label` (default: the estimator's name).
_PROGRESS_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "vipkg_progress_label", default=None
)


@contextlib.contextmanager
def progress_label(label: str):
    """Label the progress bar of every :func:`fit` inside the block with ``label`` (``vipkg compare``
    names each configuration this way) instead of the estimator's class name."""
    token = _PROGRESS_LABEL.set(str(label))
    try:
        yield
    finally:
        _PROGRESS_LABEL.reset(token)


def _tqdm():
    """tqdm's notebook bar when ipywidgets is there, its text bar otherwise: ``tqdm.auto`` in a
    notebook without ipywidgets prints ``TqdmWarning: IProgress not found`` and falls back anyway."""
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm
    else:
        from tqdm.auto import tqdm
    return tqdm


class ProgressBar(Hook):
    """A tqdm bar, updated every ``every`` steps with the last loss; labelled with the estimator's
    name, or the label of the enclosing :func:`progress_label`."""

    def __init__(self, every: int):
        self.every, self.bar, self.shown = every, None, 0
        self.label = _PROGRESS_LABEL.get()

    def start(self, state):
        self.shown = state.step
        desc = self.label or state.estimator.name
        self.bar = _tqdm()(total=state.steps, initial=state.step, desc=desc, leave=False)

    def next_stop(self, state):
        return self.shown + self.every

    def at_stop(self, state):
        if state.step >= self.shown + self.every or state.step == state.steps:
            self.bar.update(state.step - self.shown)
            self.bar.set_postfix(loss=f"{float(state.losses[state.step - 1]):.4g}")
            self.shown = state.step

    def close(self, state):
        if self.bar is not None:
            self.bar.close()


class Callback(Hook):
    """``callback(step, loss)`` every ``every`` steps and at the end (outside the timed loop)."""

    def __init__(self, fn, every: int):
        self.fn, self.every, self.called = fn, every, 0

    def start(self, state):
        self.called = state.step

    def next_stop(self, state):
        return self.called + self.every

    def at_stop(self, state):
        if state.step >= self.called + self.every or state.step == state.steps:
            self.fn(state.step, float(state.losses[state.step - 1]))
            self.called = state.step


def _make_step(state: FitState, nan_policy: str, compile: bool):
    est, model, guide, obj, S, opt = (
        state.estimator,
        state.model,
        state.guide,
        state.objective,
        state.num_particles,
        state.optimizer,
    )

    if type(est).step is Estimator.step and not compile:
        # Not under torch.compile, which traces opt.step() itself (its own functional form).
        update = lean_step(opt)

        def advance(m, g):
            # Estimator.step with the optimizer's update in its lean form (vipkg._adam).
            loss = est.estimate(m, g, obj, S).loss
            update()
            return loss

    else:

        def advance(m, g):
            return est.step(m, g, obj, S, opt).loss

    def step_fn():
        return advance(model, guide)

    if model.is_subsampled:
        from vipkg.guides.minibatch import draw_minibatch

        def step_fn():
            # A fresh minibatch from the fit's (seeded, checkpointed) RNG stream every step.
            return advance(*draw_minibatch(model, guide))

    if compile:
        from vipkg._compiled import functional_step, why_not_functional

        reason = why_not_functional(est, model, opt, nan_policy)
        if reason is None:
            state.compile_note = "functional"
            mode = compile if isinstance(compile, str) else "default"
            functional = functional_step(est, model, guide, obj, S, opt, mode)
            state.segment = functional.segment
            return _compiled(step_fn, state.device, functional)
        state.compile_note = f"compiled as the whole eager step: {reason}"
    if nan_policy == "skip":
        step_fn = _undo_if_not_finite(step_fn, state.params, opt)
    own = model.parameters()
    if compile and own:
        # Measured: under torch.compile the optimizer step leaves a model parameter's value
        # unchanged although its .grad is set (torch 2.13), so the fit would silently not learn
        # the model. Until the compiled step is a pure function of all parameters, run eagerly.
        warnings.warn(
            f"compile=True does not cover model {model.name!r}'s own parameters yet; its steps run "
            "eagerly (same results, eager speed).",
            RuntimeWarning,
            stacklevel=3,
        )
        compile = False
    step = _compiled(step_fn, state.device) if compile else step_fn
    if not own:
        return step

    def with_fresh_model_grads():
        for p in own:
            # An estimate replaces the guide's .grad; the model's would accumulate.
            p.grad = None
        return step()

    return with_fresh_model_grads


def _run(state: FitState, step, stop: int, nan_policy: str) -> None:
    """Steps ``state.step .. stop - 1`` on the device, timed, with no host read."""
    losses, sched, start = state.losses, state.scheduler, state.step
    # Losses are gathered in a list and written once per run: one indexed write a step cost
    # 2 us, 4% of a small compiled step (47 us on breast-cancer logistic regression).
    done: list = []
    written = 0

    def flush():
        nonlocal written
        if done:
            losses[start + written : start + written + len(done)] = torch.stack(done).detach()
            written += len(done)
            done.clear()

    _sync(state.device)
    t0 = time.perf_counter()
    with state.segment():
        for i in range(start, stop):
            try:
                done.append(step())
            except (ValueError, RuntimeError) as err:
                flush()
                # Skipped steps were undone, so only under "raise" can they explain the error.
                past = losses[state.first_step : i] if nan_policy == "raise" else losses[:0]
                exc = _step_error(err, i, past.cpu(), state)
                if exc is None:
                    raise
                if nan_policy == "skip" and getattr(exc, "skippable", False):
                    # The model refused this step's draws before any update: nothing to undo,
                    # so the step counts as skipped and the fit goes on.
                    done.append(losses.new_full((), float("nan")))
                    continue
                raise exc from err
            if len(done) == _FLUSH_EVERY:
                flush()
            if sched is not None:
                sched.step()
    flush()
    _sync(state.device)
    state.elapsed += time.perf_counter() - t0
    state.step = stop


# Losses held before a write into FitState.losses (bounds the list on long runs between stops).
_FLUSH_EVERY = 1024


def _not_finite(loss, params) -> torch.Tensor:
    """One flag on device: the loss, a gradient or a parameter is not finite (for ``"skip"``).

    One concatenation and one reduction: a handful of kernels whatever the number of
    parameters (a flag per tensor cost 12% of a small logistic-regression step on the CPU).
    """
    grads = [p.grad for p in params if p.grad is not None]
    flat = [loss.detach().reshape(1)] + [t.detach().reshape(-1) for t in (*grads, *params)]
    return ~torch.isfinite(torch.cat(flat)).all()


def _undo_if_not_finite(step_fn, params, opt):
    """Wrap a step so that a non-finite loss, gradient or update leaves parameters and optimizer
    state as they were, and the step's loss is NaN (so every undone step is counted and visible).

    The decision stays on the device (``torch.where``), so the loop keeps its one
    host read per chunk. Optimizer state created by a skipped first step is reset
    to zeros, which is the fresh state of Adam-type optimizers.
    """

    def state_tensors():
        return [(st, k) for st in opt.state.values() for k, v in st.items() if isinstance(v, torch.Tensor)]

    def run():
        saved_params = [p.detach().clone() for p in params]
        saved_state = {(id(st), k): st[k].clone() for st, k in state_tensors()}
        loss = step_fn()
        with torch.no_grad():
            ok = ~_not_finite(loss, params)
            for p, old in zip(params, saved_params):
                p.copy_(torch.where(ok, p, old))
            for st, k in state_tensors():
                new = st[k]
                old = saved_state.get((id(st), k))
                old = torch.zeros_like(new) if old is None else old
                st[k] = torch.where(ok.to(new.device), new, old)
            return torch.where(ok, loss.detach(), torch.full_like(loss.detach(), float("nan")))

    return run


def _what_went_wrong(loss: float, j: int, state: FitState) -> str:
    """``"<what> at step j with <estimator, guide, ...>; <which parameters>"`` for flagged step
    ``j``, from its loss and the parameters now (NaN stays)."""
    with torch.no_grad():
        bad = [n for n, p in zip(state.names, state.params) if not bool(torch.isfinite(p).all())]
    if math.isfinite(loss):
        what = f"the loss was finite ({loss:.6g}) but its gradient or update was not at step {j}"
    else:
        what = f"the loss became {loss} at step {j}"
    what += f" with {state.where}"
    if bad:
        what += f"; parameter(s) {', '.join(bad)} are no longer finite"
        if not math.isfinite(loss) and j > state.first_step:
            what += f" (the gradient or update of step {j - 1} or {j} was not)"
    return what


def _step_error(err, i, past_losses, state: FitState) -> NonFiniteLossError | None:
    """The :class:`NonFiniteLossError` that explains an error raised inside step ``i``, or None
    when it is the model's own error (which the caller re-raises as it is)."""
    where, names, params = state.where, state.names, state.params
    if isinstance(err, torch.linalg.LinAlgError):
        # A factorisation failed (non-finite or singular input): on the CPU this surfaces at once.
        return NonFiniteLossError(
            f"linear algebra failed at step {i} with {where}: {err} The parameters or the "
            "Hessian estimate were no longer finite; lower lr / step_size or use more particles."
        )
    done = ~torch.isfinite(past_losses)
    if bool(done.any()):
        # An earlier step left NaN behind and a distribution's argument check caught it later.
        j = state.first_step + int(done.nonzero()[0, 0])
        return NonFiniteLossError(
            f"{_what_went_wrong(float(state.losses[j]), j, state)}; at step {i} "
            f"the model then failed with {type(err).__name__}: {err}"
        )
    with torch.no_grad():
        bad = [n for n, p in zip(names, params) if not bool(torch.isfinite(p).all())]
        largest = max(float(p.detach().abs().max()) for p in params)
    if bad:
        return NonFiniteLossError(
            f"parameter(s) {', '.join(bad)} became non-finite before step {i} with {where}; the model "
            f"then failed with {type(err).__name__}: {err}"
        )
    if i > state.first_step and isinstance(err, ValueError) and not isinstance(err, ModelError):
        # The same model accepted the draws of the steps before: the guide ran away (e.g. a
        # draw so large that a positive site overflowed) rather than the model being wrong.
        exc = NonFiniteLossError(
            f"at step {i} with {where}, the model refused the guide's draws after the parameters "
            f"grew to |{largest:.3g}|: {type(err).__name__}: {err} Lower lr or start nearer the posterior."
        )
        exc.skippable = True
        return exc
    return None


def _check_divergence(history: torch.Tensor, chunk: torch.Tensor, start: int, where: str) -> torch.Tensor:
    """Raise when the losses of ``chunk`` (steps ``start..``) leave the range the recent ones make
    possible; return the updated history of finite losses.

    A loss is minus a lower bound on the log evidence, so it cannot fall without
    limit: a single step that lands ``DIVERGENCE_SPREADS`` robust spreads (and at
    least as many nats) below the median of the last few hundred steps means the
    bound has stopped meaning anything (an ill-conditioned factor in float32, say).
    Upwards one noisy step may spike (a draw in a far tail), so only a whole run of
    steps whose median rises that far counts: the guide has run away.
    """
    finite = torch.isfinite(chunk)
    window = torch.cat([history, chunk[finite]])[-500:]
    if window.numel() < 5:
        return window

    def scale(x):
        med = x.median()
        spread = 1.4826 * (x - med).abs().median()
        return med, spread, DIVERGENCE_SPREADS * max(float(spread), 0.01 * abs(float(med)), 1.0)

    med, spread, margin = scale(window)
    low = (finite & (chunk < med - margin)).nonzero()
    if low.numel():
        j = int(low[0, 0])
        raise NonFiniteLossError(
            f"the fit diverged at step {start + j} with {where}: the loss jumped to "
            f"{float(chunk[j]):.4g}, far below the recent median {float(med):.4g} "
            f"(spread {float(spread):.3g}): an impossible bound. Lower lr, use float64, or a "
            "better conditioned parameterization."
        )
    if history.numel() >= 5 and int(finite.sum()) >= 5:
        past_med, past_spread, past_margin = scale(history[-500:])
        now = chunk[finite].median()
        if now > past_med + past_margin:
            raise NonFiniteLossError(
                f"the fit diverged in steps {start}-{start + chunk.numel() - 1} with {where}: the loss "
                f"rose to a median of {float(now):.4g} from {float(past_med):.4g} (spread "
                f"{float(past_spread):.3g}) before: the guide ran away. Lower lr or use float64."
            )
    return window


def _rng_state(device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).cpu()
    return state


def _set_rng_state(state: dict, device) -> None:
    torch.set_rng_state(state["cpu"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
