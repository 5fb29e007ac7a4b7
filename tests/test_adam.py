"""The eager fit loop's lean Adam update (vipkg._adam.lean_step) is ``optimizer.step()`` exactly."""

import copy

import pytest
import torch

import vipkg
from vipkg._adam import lean_step


def _params(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, generator=g, dtype=dtype, requires_grad=True) for _ in range(3)]


def _run(make_opt, step_of, steps=25, sched=None, dtype=torch.float64):
    params = _params(dtype=dtype)
    opt = make_opt(params)
    scheduler = sched(opt) if sched else None
    step = step_of(opt)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            # A fresh .grad tensor each step, as the estimators leave it.
            p.grad = torch.randn(p.shape, generator=g, dtype=dtype) + p.detach()
        step()
        if scheduler is not None:
            scheduler.step()
    return params, opt


OPTIMIZERS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True),
    "adam-wd": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.1, fused=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1, betas=(0.8, 0.99), fused=True),
    "adam-maximize": lambda ps: torch.optim.Adam(ps, lr=0.05, maximize=True, eps=1e-6, fused=True),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lean_step_is_optimizer_step_bit_for_bit(name, dtype):
    make = OPTIMIZERS[name]
    ref, ref_opt = _run(make, lambda o: o.step, dtype=dtype)
    got, opt = _run(make, lean_step, dtype=dtype)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    for p, q in zip(ref, got):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt.state[p][k], opt.state[q][k]), k


def test_lean_step_follows_a_scheduler_and_warns_nothing():
    sched = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=30)  # noqa: E731
    ref, _ = _run(OPTIMIZERS["adam"], lambda o: o.step, sched=sched)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, _ = _run(OPTIMIZERS["adam"], lean_step, sched=sched)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_lean_step_after_load_state_dict_uses_the_loaded_state():
    ref, ref_opt = _run(OPTIMIZERS["adamw"], lambda o: o.step, steps=10)
    params = [p.detach().clone().requires_grad_(True) for p in ref]
    opt = OPTIMIZERS["adamw"](params)
    # A copy: state_dict() hands out the live moment tensors.
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    step, ref_step = lean_step(opt), ref_opt.step
    for _ in range(5):
        for p, q in zip(params, ref):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        step()
        ref_step()
    for a, b in zip(ref, params):
        assert torch.equal(a, b)


def test_lean_step_falls_back_where_it_does_not_apply():
    params = _params()
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append(1))
    step = lean_step(opt)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        step()
    assert len(calls) == 3  # hooks run: every step went through opt.step()
    # A parameter without a gradient is skipped by Adam; the lean form must not touch it either.
    params = _params()
    opt = torch.optim.Adam(params, lr=0.1, fused=True)
    step = lean_step(opt)
    before = params[2].detach().clone()
    for _ in range(3):
        params[0].grad, params[1].grad, params[2].grad = (
            torch.ones(5, dtype=torch.float64),
            torch.ones(5, dtype=torch.float64),
            None,
        )
        step()
    assert torch.equal(params[2], before)
    assert not torch.equal(params[0], _params()[0])
    # Not a fused Adam: opt.step itself.
    sgd = torch.optim.SGD(params, lr=0.1)
    assert lean_step(sgd) == sgd.step
    params, ref = _params(), _params()
    amsgrad = torch.optim.Adam(params, lr=0.1, amsgrad=True, fused=True)
    ref_opt = torch.optim.Adam(ref, lr=0.1, amsgrad=True, fused=True)
    step = lean_step(amsgrad)
    for _ in range(3):
        for p, q in zip(params, ref):
            p.grad, q.grad = torch.ones_like(p), torch.ones_like(q)
        step()
        ref_opt.step()
    for a, b in zip(params, ref):
        assert torch.equal(a, b)


def test_fit_with_the_lean_update_matches_a_fit_through_optimizer_step():
    """fit(optimizer="adam") takes the lean update; a factory with a step hook forces opt.step()."""
    model = vipkg.models.logistic_regression(dataset="breast_cancer", dtype=torch.float64)

    def hooked(params):
        opt = torch.optim.Adam(params, lr=1e-2, fused=True)
        opt.register_step_pre_hook(lambda *a: None)
        return opt

    out = []
    for optimizer in ("adam", hooked):
        guide = vipkg.guides.MeanFieldNormal(model, init_scale=0.1, dtype=torch.float64)
        r = vipkg.fit(
            model,
            guide,
            vipkg.Reparam(),
            steps=40,
            seed=3,
            lr=1e-2,
            optimizer=optimizer,
            num_particles=4,
            progress=False,
        )
        out.append((r.losses, guide.loc.detach().clone()))
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])
