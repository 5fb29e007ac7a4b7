"""The compiled step of ``fit(compile=True)``: one pure function of the parameters and optimizer state.

Compiling ``estimator.step`` as it is breaks the graph at ``Tensor.backward()`` (two half-steps
and the Python between them) and guards on the optimizer object, so every new ``fit`` compiles
again (``Cache line invalidated because L['opt'] got deallocated``). Here a step is instead:

- the estimator's surrogate (:meth:`vipkg.estimators.base.Estimator.surrogate`, whose gradient
  is the estimate) as a function of the guide's parameter tensors, through
  ``torch.func.functional_call``;
- its gradient and value, ``torch.func.grad_and_value``;
- the optimizer's update written as tensor math (Adam, AdamW, plain SGD, as torch's
  single-tensor kernels compute them), in place on the parameters and on the optimizer's own
  state tensors.

The torch optimizer object stays the source of truth: its ``state`` holds the moments (created
here as torch would, so ``state_dict``, checkpoints and resuming eagerly all work), its
``param_groups`` the hyper-parameters, and the learning rate enters as a tensor input, so
schedulers change it without a new graph. The estimator, model, objective and guide reach the
compiled function as one argument (a context), so a second ``fit`` of the same configuration and
shapes compiles nothing new.

On a small model the step is dominated by what surrounds the kernels, not by them. Measured on
breast-cancer logistic regression (2 CPU threads, S = 1): 107 us a call through ``torch.compile``
with its guards; 53 us with the guards skipped and inductor's C++ wrapper; 36 us for the
ahead-of-time compiled function called directly. So the step is compiled ahead of time
(``torch.compile(...).aot_compile``), its guards are checked once per run of steps between the
fit's stops (:meth:`FunctionalStep.segment`), and inductor's C++ wrapper launches the kernels on
the CPU. ``benchmarks/bench_step.py`` compares it with a hand-written functional step and NumPyro.

Estimators whose step is not a pure function of the parameters (update estimators, stateful
control variates, annealed temperatures: ``Estimator.functional`` is False) keep the older
path, ``torch.compile`` of the whole eager step.

References
----------
.. [1] Kingma, D. P., Ba, J. "Adam: A Method for Stochastic Optimization". ICLR (2015).
.. [2] Loshchilov, I., Hutter, F. "Decoupled Weight Decay Regularization". ICLR (2019).
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

__all__ = ["FunctionalStep", "functional_step", "why_not_functional"]


class _Surrogate(nn.Module):
    """The guide as the one submodule whose parameters ``functional_call`` swaps."""

    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def forward(self, estimator, model, objective, num_particles):
        _, surrogate, info = estimator.surrogate(model, self.guide, objective, num_particles)
        return surrogate, info.loss


# One wrapper per guide: the compiled function guards on it, so a new wrapper per fit would
# compile the same step again.
_WRAPPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def why_not_functional(estimator, model, optimizer, nan_policy: str) -> str | None:
    """None when the functional compiled step serves this fit, else the reason it does not."""
    if not estimator.functional:
        return f"{estimator!r} is not a pure function of the parameters (Estimator.functional is False)"
    if model.has_parameters:
        return f"model {model.name!r} has parameters of its own"
    if model.is_subsampled:
        return f"model {model.name!r} is fitted by minibatch (a new minibatch model every step)"
    if nan_policy != "raise":
        return 'nan_policy="skip" undoes steps eagerly'
    kind = _kind(optimizer)
    if kind is None:
        return f"{type(optimizer).__name__} has no functional form here (Adam, AdamW and SGD do)"
    return None


def _kind(opt) -> str | None:
    if type(opt) is torch.optim.Adam or type(opt) is torch.optim.AdamW:
        bad = any(g.get("amsgrad") or g.get("maximize") or g.get("differentiable") for g in opt.param_groups)
        return None if bad else ("adamw" if type(opt) is torch.optim.AdamW else "adam")
    if type(opt) is torch.optim.SGD:
        bad = any(g["momentum"] or g.get("maximize") or g.get("nesterov") for g in opt.param_groups)
        return None if bad else "sgd"
    return None


def _init_state(opt, kind: str) -> None:
    """The state torch's optimizer would create at its first step (so eager steps can follow)."""
    if kind == "sgd":
        return
    for g in opt.param_groups:
        for p in g["params"]:
            if not opt.state[p]:
                opt.state[p] = {
                    # On the parameter's device, as torch keeps it for fused and capturable Adam:
                    # the bias corrections stay device math, no host read.
                    "step": torch.zeros((), dtype=torch.float32, device=p.device),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
            elif opt.state[p]["step"].device != p.device:
                opt.state[p]["step"] = opt.state[p]["step"].to(p.device)


def _adam_state(state) -> tuple:
    return state["step"], state["exp_avg"], state["exp_avg_sq"]


def _adam(p, g, state, lr, beta1, beta2, eps, weight_decay, decoupled):
    step, m, v = state
    step.add_(1)
    if weight_decay:
        if decoupled:
            p.mul_(1 - lr * weight_decay)
        else:
            g = g.add(p, alpha=weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias1 = 1 - beta1 ** step.to(p.dtype)
    bias2 = 1 - beta2 ** step.to(p.dtype)
    denom = (v.sqrt() / bias2.sqrt()).add_(eps)
    p.sub_(lr / bias1 * m / denom)


class _Context:
    """What a step reads besides its tensors. It is an argument of the compiled function, not a
    closure, so that one compiled step serves every later fit whose context passes its guards."""

    def __init__(self, wrapper, names, estimator, model, objective, num_particles, groups, kind):
        self.wrapper, self.names, self.groups, self.kind = wrapper, names, groups, kind
        self.estimator, self.model, self.objective = estimator, model, objective
        self.num_particles = num_particles


def _step_impl(ctx, ps, states, lrs, hypers):
    """One step: the surrogate's gradient (torch.func) and the optimizer's update, in place.

    ``states`` holds (step, exp_avg, exp_avg_sq) of each parameter in turn, one flat tuple.
    """

    def loss_of(ps):
        args = (ctx.estimator, ctx.model, ctx.objective, ctx.num_particles)
        return torch.func.functional_call(ctx.wrapper, dict(zip(ctx.names, ps)), args, strict=True)

    grads, (_, loss) = torch.func.grad_and_value(loss_of, has_aux=True)(ps)
    with torch.no_grad():
        for members, lr, h in zip(ctx.groups, lrs, hypers):
            for i in members:
                if ctx.kind == "sgd":
                    g = grads[i] if not h[0] else grads[i].add(ps[i], alpha=h[0])
                    ps[i].sub_(lr * g)
                else:
                    adam_state = states[3 * i : 3 * i + 3]
                    _adam(ps[i], grads[i], adam_state, lr, *h, decoupled=ctx.kind == "adamw")
    return loss, grads


# Ahead-of-time compiled steps, most recently used first, by compiler and options. Each entry keeps the
# context it was compiled for: its guards compare objects by identity, so those objects must not
# be freed while the entry can match (a recycled id would pass). Bounded, least recently used out.
_COMPILED: dict[tuple, list] = {}
_KEEP = 16
# Graphs one fit may compile before it leaves the choice to dynamo (hyper-parameters that a
# scheduler moves every step would otherwise compile a graph a step).
_MAX_PER_FIT = 8


def _restarting(aot_compile, example):
    """``aot_compile(example)``, again when dynamo asks to restart its analysis.

    Inside ``torch.compile`` dynamo catches its own ``RestartAnalysis`` (raised, e.g., to trace a
    Python float as a constant after all) and traces again; ``aot_compile`` lets it escape.
    """
    from torch._dynamo.exc import RestartAnalysis

    # Tracing runs on fake tensors, but whatever runs for real while compiling (or fails half way)
    # must not move the fit's random stream: the compiled trajectory is the eager one.
    rng = torch.get_rng_state()
    try:
        for _ in range(3):
            try:
                return aot_compile(example)
            except RestartAnalysis:
                continue
        return aot_compile(example)
    finally:
        torch.set_rng_state(rng)


class FunctionalStep:
    """``step() -> loss``: one compiled, functional step of ``estimator`` on ``guide`` (see the module).

    The step is compiled ahead of time (``torch.compile(...).aot_compile``) and called without
    dynamo's frame machinery: its guards are checked at the first step of each :meth:`segment`
    (and when the optimizer's hyper-parameters move), not at every step. Where ahead-of-time
    compilation is not available it is a plain ``torch.compile`` call, guards every step
    (:attr:`aot_error` says why).

    Parameters' ``.grad`` hold the last step's estimate whenever control is back with the fit's
    hooks (after a :meth:`segment`, or after every step outside one), as an eager step leaves them.
    ``mode="reduce-overhead"`` asks inductor for CUDA graphs (through plain ``torch.compile``):
    every input keeps its storage across steps (the parameters' detached views, the optimizer's
    state tensors, the learning-rate tensors filled in place), which replaying a graph needs;
    :meth:`static_inputs` lists them.
    """

    def __init__(self, estimator, model, guide, objective, num_particles: int, optimizer, mode="default"):
        kind = self.kind = _kind(optimizer)
        _init_state(optimizer, kind)
        wrapper = _WRAPPERS.get(guide)
        if wrapper is None:
            wrapper = _WRAPPERS[guide] = _Surrogate(guide)
        names = tuple(f"guide.{k}" for k, _ in guide.named_parameters())
        self.params = tuple(p for _, p in guide.named_parameters())
        index = {id(p): i for i, p in enumerate(self.params)}
        groups = tuple(tuple(index[id(p)] for p in g["params"]) for g in optimizer.param_groups)
        self._ctx = _Context(wrapper, names, estimator, model, objective, num_particles, groups, kind)
        dtype, device = self.params[0].dtype, self.params[0].device
        # fallback_random: the same draws as eager steps with the same seed.
        options = {"fallback_random": True}
        if mode == "reduce-overhead":
            options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets; mode and options exclude
        if device.type == "cpu":
            # Inductor's C++ wrapper (instead of a Python function launching each kernel) took
            # 25-40 us off every step of a logistic regression (78 -> 53 us at N = 569, S = 1;
            # 251 -> 223 us at N = 10k), the same compile time and bit-identical results.
            options["cpp_wrapper"] = True
        self._options = options
        # Ahead of time unless CUDA graphs are asked for (their trees live in dynamo's runtime).
        self._aot = mode != "reduce-overhead"
        self._plain = None  # torch.compile(_step_impl), when ahead-of-time compilation is off
        self._compiles = 0
        self.estimator, self.optimizer = estimator, optimizer
        self._lrs = tuple(torch.zeros((), dtype=dtype, device=device) for _ in groups)
        self._lr_values = [None] * len(groups)
        self._run = None  # (callable, inputs) chosen for the running segment
        self._in_segment = False
        self._grads = None
        #: Why the C++ wrapper, or ahead-of-time compilation, was given up for this step.
        self.cpp_wrapper_error: str | None = None
        self.aot_error: str | None = None

    def _hypers(self) -> tuple:
        if self.kind == "sgd":
            return tuple((g["weight_decay"],) for g in self.optimizer.param_groups)
        return tuple((*g["betas"], g["eps"], g["weight_decay"]) for g in self.optimizer.param_groups)

    def _gather(self) -> tuple:
        """The compiled function's inputs, read afresh (loading a checkpoint replaces state tensors)."""
        opt, states = self.optimizer, ()
        if self.kind != "sgd":
            states = tuple(t for p in self.params for t in _adam_state(opt.state[p]))
        # Detached views share the parameters' storage: the in-place update moves the parameters,
        # and the compiled graph has no autograd history to keep (nothing needs a backward).
        return self._ctx, tuple(p.detach() for p in self.params), states, self._lrs, self._hypers()

    @contextlib.contextmanager
    def segment(self):
        """Steps between two stops of the fit, where nothing but these steps runs.

        Dynamo's guards (about 250 here: the estimator, model, guide, optimizer settings and every
        input) and its frame machinery cost 20-50 us a call on the CPU, 20-40% of a small step.
        Within a segment the guards are checked at the first step, which picks (or compiles) the
        graph of this configuration, and not after it. That is sound because what they protect
        cannot change between two steps of a segment: the objects are the fit's own, a functional
        estimator has no state (``Estimator.functional``), the inputs are the same tensors and the
        learning rates are tensor inputs. The optimizer's other hyper-parameters are compiled in
        as constants, so a step that finds them moved (a scheduler cycling Adam's betas) goes
        back through the guards.
        """
        self._in_segment, self._run = True, None
        try:
            yield
        finally:
            self._in_segment, self._run = False, None
            self._write_grads()

    def _write_grads(self) -> None:
        if self._grads is not None:
            for p, g in zip(self.params, self._grads):
                p.grad = g
            self._grads = None

    def _choose(self, inputs):
        """The compiled step whose guards ``inputs`` pass, compiled now if none does."""
        if self._aot:
            try:
                return self._ahead_of_time(inputs)
            except Exception as err:  # an API or backend without it: plain torch.compile
                self._aot, self.aot_error = False, f"{type(err).__name__}: {err}"
        if self._plain is None:
            self._plain = torch.compile(_step_impl, options=self._options)
        return self._plain

    def _ahead_of_time(self, inputs):
        # torch.compile itself is part of the key: a replaced one (a test's other backend) must not
        # be handed another's graphs.
        key = (torch.compile, *sorted(self._options.items()))
        entries = _COMPILED.setdefault(key, [])
        for i, (fn, _) in enumerate(entries):
            if fn.guard_check(*inputs):
                entries.insert(0, entries.pop(i))
                return fn.fn
        if self._compiles >= _MAX_PER_FIT:
            raise RuntimeError(f"{_MAX_PER_FIT} graphs compiled in one fit; guards each step from here on")
        aot_compile = torch.compile(_step_impl, fullgraph=True, options=self._options).aot_compile
        try:
            fn = _restarting(aot_compile, (inputs, {}))
        except Exception as err:
            # A graph break (a Pyro program's handlers, say) is no C++ wrapper's fault: it needs the
            # plain path, which compiles around breaks.
            if not self._options.get("cpp_wrapper") or isinstance(err, torch._dynamo.exc.Unsupported):
                raise
            # A graph the C++ wrapper cannot hold (a fallback kernel without a C shim) may still
            # compile with the Python one.
            self.cpp_wrapper_error = f"{type(err).__name__}: {err}"
            self._options = {k: v for k, v in self._options.items() if k != "cpp_wrapper"}
            return self._ahead_of_time(inputs)
        self._compiles += 1
        entries.insert(0, (fn, inputs[0]))
        del entries[_KEEP:]
        return fn.fn

    def __call__(self):
        for j, g in enumerate(self.optimizer.param_groups):
            if g["lr"] != self._lr_values[j]:  # a scheduler moved it: one scalar copy, no new graph
                self._lrs[j].fill_(g["lr"])
                self._lr_values[j] = g["lr"]
        run = self._run
        if run is None or run[1][4] != self._hypers():
            inputs = self._gather()
            run = (self._choose(inputs), inputs)
            # What torch's wrapped optimizer.step() records: lr schedulers check it to warn about a
            # scheduler stepped before its optimizer, which here never runs its own step().
            self.optimizer._opt_called = True
            self._run = run if self._in_segment and self._aot else None
        loss, self._grads = run[0](*run[1])
        if not self._in_segment:
            self._write_grads()
        self.estimator.after_step()
        return loss

    def static_inputs(self) -> tuple:
        _, _, states, lrs, _ = self._gather()
        return (*self.params, *states, *lrs)


def functional_step(estimator, model, guide, objective, num_particles: int, optimizer, mode="default"):
    """A :class:`FunctionalStep` (kept as the name the fit and tests call)."""
    return FunctionalStep(estimator, model, guide, objective, num_particles, optimizer, mode)
