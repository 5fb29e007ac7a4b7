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
schedulers change it without a new graph. The compiled function closes over the estimator,
model, objective and guide only, so a second ``fit`` of the same objects and shapes compiles
nothing new.

Estimators whose step is not a pure function of the parameters (update estimators, stateful
control variates, annealed temperatures: ``Estimator.functional`` is False) keep the older
path, ``torch.compile`` of the whole eager step.

References
----------
.. [1] Kingma, D. P., Ba, J. "Adam: A Method for Stochastic Optimization". ICLR (2015).
.. [2] Loshchilov, I., Hutter, F. "Decoupled Weight Decay Regularization". ICLR (2019).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

__all__ = ["functional_step", "why_not_functional"]


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


def functional_step(estimator, model, guide, objective, num_particles: int, optimizer, mode="default"):
    """``step() -> loss``: one compiled, functional step of ``estimator`` on ``guide`` (see the module).

    Sets the parameters' ``.grad`` to the step's estimate (outside the compiled graph) so that hooks
    reading gradients see what an eager step leaves. ``mode="reduce-overhead"`` asks inductor for
    CUDA graphs: every input keeps its storage across steps (the parameters' detached views, the
    optimizer's state tensors, the learning-rate tensors filled in place), which replaying a graph
    needs; ``step.static_inputs()`` lists them.
    """
    kind = _kind(optimizer)
    _init_state(optimizer, kind)
    wrapper = _WRAPPERS.get(guide)
    if wrapper is None:
        wrapper = _WRAPPERS[guide] = _Surrogate(guide)
    names = tuple(f"guide.{k}" for k, _ in guide.named_parameters())
    params = tuple(p for _, p in guide.named_parameters())
    index = {id(p): i for i, p in enumerate(params)}
    groups = []
    for g in optimizer.param_groups:
        groups.append(tuple(index[id(p)] for p in g["params"]))

    def loss_of(ps):
        return torch.func.functional_call(
            wrapper, dict(zip(names, ps)), (estimator, model, objective, num_particles), strict=True
        )

    def step_impl(ps, states, lrs, hypers):
        # states: (step, exp_avg, exp_avg_sq) of each parameter in turn, one flat tuple.
        grads, (_, loss) = torch.func.grad_and_value(loss_of, has_aux=True)(ps)
        with torch.no_grad():
            for members, lr, h in zip(groups, lrs, hypers):
                for i in members:
                    if kind == "sgd":
                        g = grads[i] if not h[0] else grads[i].add(ps[i], alpha=h[0])
                        ps[i].sub_(lr * g)
                    else:
                        _adam(ps[i], grads[i], states[3 * i : 3 * i + 3], lr, *h, decoupled=kind == "adamw")
        return loss, grads

    # fallback_random: the same draws as eager steps with the same seed.
    options = {"fallback_random": True}
    if mode == "reduce-overhead":
        options["triton.cudagraphs"] = True  # what mode="reduce-overhead" sets; mode and options exclude
    compiled = torch.compile(step_impl, options=options)
    lr_tensors = [torch.zeros((), dtype=params[0].dtype, device=params[0].device) for _ in groups]
    lr_values = [None] * len(groups)

    def step():
        for j, g in enumerate(optimizer.param_groups):
            if g["lr"] != lr_values[j]:  # a scheduler moved it: one scalar copy, no new graph
                lr_tensors[j].fill_(g["lr"])
                lr_values[j] = g["lr"]
        if kind == "sgd":
            hypers = tuple((g["weight_decay"],) for g in optimizer.param_groups)
            states = ()
        else:
            hypers = tuple(
                (g["betas"][0], g["betas"][1], g["eps"], g["weight_decay"]) for g in optimizer.param_groups
            )
            # Read every step: loading a checkpoint replaces the optimizer's state tensors.
            states = tuple(t for p in params for t in _adam_state(optimizer.state[p]))
        # Detached views share the parameters' storage: the in-place update moves the parameters,
        # and the compiled graph has no autograd history to keep (nothing needs a backward).
        loss, grads = compiled(tuple(p.detach() for p in params), states, tuple(lr_tensors), hypers)
        for p, g in zip(params, grads):
            p.grad = g
        # What torch's wrapped optimizer.step() records: lr schedulers check it to warn about a
        # scheduler stepped before its optimizer, which here never runs its own step().
        optimizer._opt_called = True
        estimator.after_step()
        return loss

    def static_inputs():
        states = () if kind == "sgd" else tuple(t for p in params for t in _adam_state(optimizer.state[p]))
        return (*params, *states, *lr_tensors)

    step.static_inputs = static_inputs
    return step
