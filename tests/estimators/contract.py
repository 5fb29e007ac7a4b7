"""The estimator contract: one reusable test case that every estimator's test module parametrizes.

A module describes its estimator on small closed-form problems as :class:`Case` objects and
subclasses :class:`EstimatorContract`::

    class TestReparamContract(EstimatorContract):
        cases = [Case("reparam-fullrank", model=..., guide=..., estimator=Reparam, exact=...)]

and pytest runs, for every case:

``test_unbiased``
    The mean of ``repeats`` independent estimates (:func:`vipkg.diagnostics.gradient_samples`)
    equals the exact gradient (``Case.exact``) within ``n_se`` standard errors
    (:func:`tests.helpers.assert_unbiased`). Where no closed form exists, ``Case.reference``
    names an estimator known to be unbiased for the same objective; both run on the same seed
    (common random numbers) and their per-repeat differences must have mean zero. Where
    neither exists, ``Case.no_exact`` says why and what guarantees the estimator instead.
``test_check_has_power``
    The same check, with the same repeats, rejects a biased variant: the estimates of
    ``Case.biased`` (a known-biased sibling) and the exact gradient shifted by ``Case.shift``.
``test_same_seed_same_trajectory``
    A few :func:`vipkg.fit` steps give bitwise identical losses and parameters for the same
    seed, and different losses for another seed (``Case.stochastic``; a deterministic
    estimator must give the same ones).
``test_state_round_trip``
    After a few steps (control-variate baselines, annealing clocks have state), the state
    goes through ``state_dict`` -> ``torch.save`` / ``torch.load`` -> a fresh estimator's
    ``load_state_dict``; the next estimate (loss and every ``.grad``) is bitwise that of the
    original estimator. For ``Case.stateful`` estimators a fresh estimator without the state
    must give a different estimate (the round trip is not vacuous).
``test_no_host_reads_in_estimate``
    On CPU: Python-level reads of tensor values (``Tensor.item``, ``__bool__``, ``__float__``,
    ``tolist``, ``cpu``, ...) raise inside :meth:`Estimator.estimate`; a read made under the same
    guard after the estimate is caught (the guard has power).
``test_no_device_sync_in_estimate_on_cuda``
    With CUDA: ``torch.cuda.set_sync_debug_mode("error")`` around two estimates (after a
    warm-up); skipped on CPU, where the guard above stands in.

``tests/estimators/test_contract_coverage.py`` fails when an estimator exported by
:mod:`vipkg.estimators` has no case in any module.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import re
import traceback
from collections.abc import Callable

import pytest
import torch

import vipkg
from tests.helpers import assert_unbiased
from vipkg.diagnostics import gradient_samples

__all__ = ["Case", "EstimatorContract", "HostReadError", "no_host_reads"]

#: Python-level reads of a tensor's value: each makes a GPU loop wait for the device.
_OURS = re.compile(r"(vipkg|tests)/.*$")
READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__")


@dataclasses.dataclass(frozen=True)
class Case:
    """One estimator on one small problem, and what the contract may expect of it.

    Parameters
    ----------
    id : str
        Test id, unique over all modules.
    model : callable
        ``model() -> vipkg.Model``, a fresh one per call.
    guide : callable
        ``guide(model) -> Guide``, a fresh one per call (initialised away from the optimum).
    estimator : callable
        ``estimator() -> Estimator``, a fresh one per call.
    objective : callable
        ``objective() -> Objective``; default ELBO.
    num_particles : int
    exact : callable, optional
        ``exact(model, guide) -> {name: Tensor}``: the exact gradient of the loss that the
        estimates must average to.
    reference : callable, optional
        ``reference() -> Estimator`` known to be unbiased for the same objective, when there is
        no closed form: the check is on per-repeat differences (same seed, so common draws).
    no_exact : str, optional
        Why neither exists (the unbiasedness and power checks are skipped with this reason).
    biased : callable, optional
        ``biased() -> Estimator``, a known-biased variant the check must reject, run with
        ``biased_objective`` / ``biased_particles`` (default: the case's).
    shift : float, optional
        The check must also reject the exact gradient shifted by this much in every
        coordinate that varies: the repeats resolve a bias of that size.
    repeats, seed, n_se : int, int, float
        Of :func:`gradient_samples` and :func:`assert_unbiased`.
    stochastic : bool
        Different seeds give different trajectories (``False``: the seed cannot matter).
    stateful : bool
        The estimator keeps state that changes its estimate (the round trip must matter).
    lr : float
        Learning rate of the short fits.
    """

    id: str
    model: Callable
    guide: Callable
    estimator: Callable
    objective: Callable = vipkg.ELBO
    num_particles: int = 4
    exact: Callable | None = None
    reference: Callable | None = None
    no_exact: str | None = None
    biased: Callable | None = None
    biased_objective: Callable | None = None
    biased_particles: int | None = None
    shift: float | None = 0.1
    repeats: int = 300
    seed: int = 0
    n_se: float = 4.0
    stochastic: bool = True
    stateful: bool = False
    lr: float = 1e-2

    def __post_init__(self):
        given = [self.exact is not None, self.reference is not None, self.no_exact is not None]
        if sum(given) != 1:
            raise ValueError(f"case {self.id}: give exactly one of exact=, reference= or no_exact=.")
        if self.no_exact is None and self.biased is None and self.shift is None:
            raise ValueError(f"case {self.id}: the power check needs biased= or shift=.")

    def __str__(self):
        return self.id

    @property
    def estimator_class(self) -> type:
        return type(self.estimator())

    def setup(self):
        """A fresh ``(model, guide, estimator, objective)``, checked."""
        torch.manual_seed(0)  # guides that draw their initial weights (flows)
        model = self.model()
        guide = self.guide(model)
        est, objective = self.estimator(), self.objective()
        est.check(model, guide, objective)
        est.check_particles(self.num_particles)
        return model, guide, est, objective


# ------------------------------------------------------------------ samples, cached per case
_SAMPLES: dict[tuple, tuple] = {}


def _samples(case: Case, which: str = "estimator"):
    """``(samples, exact)``: the estimates (differences to the reference's, with zeros as the
    exact value, when the case has a reference) of the case's estimator or its biased variant."""
    key = (case.id, id(case), which)
    if key not in _SAMPLES:
        model, guide, _, objective = case.setup()
        if which == "biased":
            est = case.biased()
            objective = case.biased_objective() if case.biased_objective else objective
            n = case.biased_particles or case.num_particles
        else:
            est, n = case.estimator(), case.num_particles
        kw = dict(objective=objective, num_particles=n, repeats=case.repeats, seed=case.seed)
        samples = gradient_samples(model, guide, est, **kw)
        if case.reference is not None:
            ref = gradient_samples(model, guide, case.reference(), **{**kw, "objective": case.objective()})
            samples = {k: v - ref[k] for k, v in samples.items()}
            exact = {k: torch.zeros_like(v[0]) for k, v in samples.items()}
        else:
            exact = case.exact(model, guide)
        _SAMPLES[key] = (samples, exact, {k for k, _ in guide.named_parameters()})
    return _SAMPLES[key]


# ------------------------------------------------------------------ the host-read guard
class HostReadError(AssertionError):
    """A tensor's value was read on the host inside a guarded call."""


@contextlib.contextmanager
def no_host_reads(calls: list):
    """Inside the block, every Python-level read of a tensor value (:data:`READS`) is appended
    to ``calls`` (with the vipkg line it came from) and raises :class:`HostReadError`."""
    originals = {name: getattr(torch.Tensor, name) for name in READS if hasattr(torch.Tensor, name)}

    def guard(name):
        def method(t, *args, **kwargs):
            # the innermost frame in vipkg or in the tests (a test's own model may read, too)
            frames = [f for f in traceback.extract_stack()[:-1] if _OURS.search(f.filename)]
            where = f"{_OURS.search(frames[-1].filename).group(0)}:{frames[-1].lineno}" if frames else "?"
            calls.append(f"Tensor.{name} at {where}")
            raise HostReadError(f"host read of a tensor value: Tensor.{name} at {where}")

        return method

    for name in originals:
        setattr(torch.Tensor, name, guard(name))
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _grads(guide) -> dict:
    return {n: None if p.grad is None else p.grad.detach().clone() for n, p in guide.named_parameters()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
        for x, y in ((a[k], b[k]) for k in a)
    )


def _state_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b))
    return a == b


def _fit(case: Case, seed: int):
    torch.manual_seed(0)
    model = case.model()
    guide = case.guide(model)
    r = vipkg.fit(
        model,
        guide,
        case.estimator(),
        objective=case.objective(),
        steps=5,
        num_particles=case.num_particles,
        lr=case.lr,
        seed=seed,
        progress=False,
    )
    return r.losses, [p.detach().clone() for p in guide.parameters()]


# ------------------------------------------------------------------ the contract
class EstimatorContract:
    """Subclass as ``Test<Name>Contract`` with ``cases = [Case(...), ...]``; every test below runs
    once per case."""

    cases: list[Case] = []

    def pytest_generate_tests(self, metafunc):
        if "case" in metafunc.fixturenames:
            metafunc.parametrize("case", self.cases, ids=[c.id for c in self.cases])

    # 1. unbiased
    def test_unbiased(self, case: Case):
        if case.no_exact is not None:
            pytest.skip(case.no_exact)
        samples, exact, names = _samples(case)
        assert set(samples) == names == set(exact)
        assert all(torch.isfinite(v).all() for v in samples.values())
        assert_unbiased(samples, exact, n_se=case.n_se)
        varies = any(bool((v.std(0) > 1e-12).any()) for v in samples.values())
        assert not case.stochastic or varies, "a stochastic estimator gave identical estimates"

    # 2. the check has power
    def test_check_has_power(self, case: Case):
        if case.no_exact is not None:
            pytest.skip(case.no_exact)
        samples, exact, _ = _samples(case)
        if case.biased is not None:
            biased, _, _ = _samples(case, "biased")
            with pytest.raises(AssertionError, match="standard errors|constant coordinates differ"):
                assert_unbiased(biased, exact, n_se=case.n_se)
        if case.shift is not None:
            varying = {k: v.std(0) > 1e-12 for k, v in samples.items()}
            if not any(bool(m.any()) for m in varying.values()):  # deterministic: shift everything
                varying = {k: torch.ones_like(m) for k, m in varying.items()}
            shifted = {k: exact[k] + case.shift * varying[k].to(exact[k].dtype) for k in exact}
            with pytest.raises(AssertionError, match="standard errors|constant coordinates differ"):
                assert_unbiased(samples, shifted, n_se=case.n_se)

    # 3. determinism
    def test_same_seed_same_trajectory(self, case: Case):
        losses_a, params_a = _fit(case, seed=3)
        losses_b, params_b = _fit(case, seed=3)
        assert torch.isfinite(losses_a).all()
        assert torch.equal(losses_a, losses_b)
        assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))
        losses_c, params_c = _fit(case, seed=4)
        if case.stochastic:
            assert not torch.equal(losses_a, losses_c)
        else:  # nothing is drawn: the seed cannot matter
            assert torch.equal(losses_a, losses_c)
            assert all(torch.equal(a, c) for a, c in zip(params_a, params_c))

    # 4. state round trip
    def test_state_round_trip(self, case: Case):
        model, guide, est, objective = case.setup()
        opt = torch.optim.SGD(guide.parameters(), lr=case.lr)
        torch.manual_seed(case.seed)
        for _ in range(3):
            est.step(model, guide, objective, case.num_particles, opt)
        buffer = io.BytesIO()
        torch.save(est.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
        fresh = case.estimator()
        fresh.load_state_dict(copy.deepcopy(state))
        fresh.check(model, guide, objective)

        def next_estimate(e):
            torch.manual_seed(case.seed + 1)
            info = e.estimate(model, guide, objective, case.num_particles)
            return info.loss.clone(), _grads(guide)

        loss_a, grads_a = next_estimate(est)
        loss_b, grads_b = next_estimate(fresh)
        assert torch.equal(loss_a, loss_b)
        assert _same(grads_a, grads_b), "the restored estimator gives another estimate"
        assert _state_equal(est.state_dict(), fresh.state_dict())
        if case.stateful:
            assert not _state_equal(state, case.estimator().state_dict()), "the state never changed"
            unloaded = case.estimator()
            unloaded.check(model, guide, objective)
            _, grads_c = next_estimate(unloaded)
            assert not _same(grads_a, grads_c), "the state does not change the estimate"

    # 5. no host sync
    def test_no_host_reads_in_estimate(self, case: Case):
        model, guide, est, objective = case.setup()
        calls: list[str] = []
        with no_host_reads(calls):
            try:
                for _ in range(2):
                    info = est.estimate(model, guide, objective, case.num_particles)
            except HostReadError:
                pass
        assert not calls, f"{case.id}: estimate() reads tensor values on the host: {calls[:5]}"
        assert isinstance(info.loss, torch.Tensor) and info.loss.dim() == 0
        assert all(p.grad is not None for p in guide.parameters() if p.requires_grad)
        # power: the guard catches a read
        with no_host_reads(calls), pytest.raises(HostReadError, match="__bool__"):
            bool(info.loss.isfinite())
        assert calls and calls[0].startswith("Tensor.__bool__")

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sync debug mode sees C++ syncs")
    def test_no_device_sync_in_estimate_on_cuda(self, case: Case):  # pragma: no cover - GPU only
        model, guide, est, objective = case.setup()
        guide.to("cuda")
        model = model.to(device="cuda", dtype=guide.dtype)
        est.estimate(model, guide, objective, case.num_particles)  # warm-up: lazy CUDA initialisation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(2):
                est.estimate(model, guide, objective, case.num_particles)
        finally:
            torch.cuda.set_sync_debug_mode("default")
