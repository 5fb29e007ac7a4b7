"""The step as a device program: no host syncs inside a step, and ``compile=True`` keeps the trajectory.

Host-sync guard: Python-level reads of a tensor's value (``.item()``, ``bool()``,
``float()``, ``int()``, ``.tolist()``, ``.numpy()``, ``.cpu()``) are what make a GPU loop
wait for the device. On CPU nothing waits, so the guard replaces those methods with
ones that record the call (and where it came from) while ``estimator.step`` runs, for
every estimator of the catalogue (:mod:`vipkg.estimators.catalog`). It does not see reads
done inside C++ kernels; ``torch.cuda.set_sync_debug_mode("error")`` does, and runs when
CUDA is there.
The optimizer's own bookkeeping (Adam reads its CPU step counter) is outside the guard:
it is not a device sync.
"""

from __future__ import annotations

import contextlib
import inspect
import traceback
import warnings

import pytest
import torch

import vipkg
import vipkg.estimators as estimators
from vipkg.estimators import IncompatibleEstimatorError, catalog
from vipkg.fit import fit
from vipkg.model import Model
from vipkg.models import ZOO

READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__array__")


class HostReads:
    """Record Python-level host reads of tensor values while :attr:`active`."""

    def __init__(self):
        self.calls: list[str] = []
        self.active = False

    @contextlib.contextmanager
    def patched(self):
        originals = {name: getattr(torch.Tensor, name) for name in READS if hasattr(torch.Tensor, name)}

        def spy(name, original):
            def method(t, *args, **kwargs):
                if self.active:
                    frames = [f for f in traceback.extract_stack()[:-1] if "/vipkg/" in f.filename]
                    where = (
                        f"{frames[-1].filename.split('/vipkg/')[-1]}:{frames[-1].lineno}" if frames else "?"
                    )
                    self.calls.append(f"Tensor.{name} at {where}")
                return original(t, *args, **kwargs)

            return method

        for name, original in originals.items():
            setattr(torch.Tensor, name, spy(name, original))
        try:
            yield self
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    @contextlib.contextmanager
    def watching(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


class _Unwatched:
    """An optimizer whose ``step`` runs outside the guard."""

    def __init__(self, opt, reads):
        self.opt, self.reads = opt, reads

    def step(self):
        active, self.reads.active = self.reads.active, False
        try:
            self.opt.step()
        finally:
            self.reads.active = active


def _discrete_model(support, shape=(2,)):
    """A one-site model over integer (one-hot accepted, for relaxations) or boolean entries."""
    from vipkg.model import Site

    weights = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)

    def log_joint(latents, data):
        c = latents["c"]
        if c.is_floating_point() and c.dim() == len(shape) + 2:  # relaxed one-hot [S, *shape, K]
            return (c * data["w"]).flatten(1).sum(-1)
        return data["w"][c.long()].flatten(1).sum(-1)

    return Model({"c": Site(torch.Size(shape), support)}, log_joint, data={"w": weights}, name="discrete")


def _one_hot_model():
    """A one-site model over two one-hot entries with four categories (OneHotCategorical guides)."""
    from torch.distributions import constraints

    from vipkg.model import Site

    weights = torch.linspace(-1.0, 1.0, 4, dtype=torch.float64)
    return Model(
        {"c": Site(torch.Size([2, 4]), constraints.one_hot)},
        lambda latents, data: (latents["c"] * data["w"]).flatten(1).sum(-1),
        data={"w": weights},
        name="one_hot",
    )


def _candidates():
    """(model, guide factory) pairs, tried in order until an estimator's check accepts one.

    A guide family or estimator that fits none of them fails the tests below with a
    request to add one here, so that new ones are covered from the day they are exported.
    """
    from torch.distributions import constraints

    import vipkg.guides as guides

    f64 = {"dtype": torch.float64}
    gaussian = ZOO["gaussian"](dim=3, **f64)
    simplex = ZOO["dirichlet_multinomial"](**f64)
    unit = Model.from_log_density(
        lambda x: (2 * x.log() + (1 - x).log()).sum(-1), 3, constraints.unit_interval
    )
    out = [
        (gaussian, lambda m: guides.MeanFieldNormal(m, **f64)),
        (gaussian, lambda m: guides.FullRankNormal(m, **f64)),
        (gaussian, lambda m: guides.LowRankNormal(m, rank=1, **f64)),
        (ZOO["gamma_poisson"](**f64), lambda m: guides.Gamma(m, **f64)),
        (simplex, lambda m: guides.Dirichlet(m, **f64)),
        (unit, lambda m: guides.Beta(m, **f64)),
        (_discrete_model(constraints.integer_interval(0, 3)), lambda m: guides.Categorical(m, **f64)),
        (_discrete_model(constraints.boolean), lambda m: guides.Bernoulli(m, **f64)),
    ]
    if hasattr(guides, "Particles"):
        out.append((gaussian, lambda m: guides.Particles(m, n=8, **f64)))
        out.append((simplex, lambda m: guides.Particles(m, n=8, mirror="entropic", **f64)))
    if hasattr(guides, "Flow"):
        out.append((gaussian, lambda m: guides.Flow.real_nvp(m, layers=2).to(torch.float64)))
    if hasattr(guides, "Composite"):
        parts = {"mu": guides.MeanFieldNormal, "c": guides.Categorical}
        mixture = ZOO["discrete_mixture"](n=6, **f64)
        out.append((mixture, lambda m: guides.Composite(m, parts, **f64)))
    out.append((_one_hot_model(), lambda m: guides.OneHotCategorical(m, **f64)))
    if hasattr(guides, "AmortizedNormal"):
        # Amortized families on models without subsampling: each site's first dimension is the datum,
        # the encoder reads one row of a data tensor per datum.
        def rows(n):
            return torch.linspace(-1.0, 1.0, 2 * n, dtype=torch.float64).reshape(n, 2)

        def enc(k):
            return torch.nn.Linear(2, k, dtype=torch.float64)

        out += [
            (gaussian, lambda m: guides.AmortizedNormal(m, enc(2), data=rows(3))),
            (
                _discrete_model(constraints.integer_interval(0, 3)),
                lambda m: guides.AmortizedCategorical(m, enc(4), data=rows(2)),
            ),
            (
                _discrete_model(constraints.boolean),
                lambda m: guides.AmortizedBernoulli(m, enc(1), data=rows(2)),
            ),
            (_one_hot_model(), lambda m: guides.AmortizedOneHotCategorical(m, enc(4), data=rows(2))),
        ]
    return out


def _estimator_classes():
    """Every estimator class of the catalogue: every class ``vipkg.estimators`` exports,
    PerSite included (tests/estimators/test_catalog.py checks that)."""
    return catalog.estimator_classes()


def _setup(cls):
    """A (model, guide, estimator, objective) that ``cls`` accepts, or fail saying what to add."""
    reasons = []
    for objective in (vipkg.ELBO(), vipkg.IWAE(4)):
        for model, make_guide in _candidates():
            try:
                guide = make_guide(model)
                est = catalog.for_estimator(cls).make_estimator(model)  # the catalogue's settings
                est.check(model, guide, objective)
            except (IncompatibleEstimatorError, ValueError, TypeError) as err:
                reasons.append(f"{model.name}, {objective!r}: {err}")
                continue
            return model, guide, est, objective
    pytest.fail(f"no candidate model/guide fits {cls.__name__}; add one to _candidates(): {reasons}")


#: Estimators that read on the host today, with why; strict, so a fix shows up as XPASS.
# Estimators known to read tensor values on the host inside a step (each an xfail with the reason);
# empty now: Gaussian guides build their distributions without argument validation and
# GumbelSoftmax draws its Concrete variables directly.
KNOWN_READS: dict[str, str] = {}


def _known(classes, known):
    return [
        pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=known[c.__name__]))
        if c.__name__ in known
        else c
        for c in classes
    ]


@pytest.mark.parametrize("cls", _known(_estimator_classes(), KNOWN_READS), ids=lambda c: c.__name__)
def test_no_host_reads_inside_a_step(cls):
    model, guide, est, objective = _setup(cls)
    opt = torch.optim.Adam(guide.parameters(), lr=1e-2)
    reads = HostReads()
    with reads.patched():
        with reads.watching():
            for _ in range(3):
                info = est.step(model, guide, objective, 4, _Unwatched(opt, reads))
        assert not reads.calls, f"{cls.__name__} reads tensor values on the host in a step: {reads.calls[:5]}"
        assert isinstance(info.loss, torch.Tensor) and info.loss.dim() == 0
        # The guard sees reads (power check): fit's once-per-chunk read happens outside steps.
        with reads.watching():
            bool(info.loss.isfinite())
        assert reads.calls and reads.calls[0].startswith("Tensor.__bool__")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: sync debug mode sees C++-level syncs")
@pytest.mark.parametrize("cls", _known(_estimator_classes(), KNOWN_READS), ids=lambda c: c.__name__)
def test_no_device_sync_inside_a_step_on_cuda(cls):  # pragma: no cover - GPU only
    model, guide, est, objective = _setup(cls)
    guide.to("cuda")
    model = model.to(device="cuda", dtype=guide.dtype)
    opt = torch.optim.Adam(guide.parameters(), lr=1e-2, capturable=True)
    est.step(model, guide, objective, 4, opt)  # warm-up: lazy CUDA initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            est.step(model, guide, objective, 4, opt)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _guide_classes():
    import vipkg.guides as guides
    from vipkg.guides.base import Guide

    return [
        obj
        for name in guides.__all__
        if inspect.isclass(obj := getattr(guides, name)) and issubclass(obj, Guide) and obj is not Guide
    ]


KNOWN_GUIDE_READS: dict[str, str] = {}


@pytest.mark.parametrize("cls", _known(_guide_classes(), KNOWN_GUIDE_READS), ids=lambda c: c.__name__)
def test_guide_draws_and_densities_do_not_read_on_the_host(cls):
    """The root cause of most syncs: what every estimator calls on a guide."""
    for model, make_guide in _candidates():
        try:
            guide = make_guide(model)
        except (ValueError, TypeError):
            continue
        if type(guide) is cls:
            break
    else:
        pytest.fail(f"no candidate builds a {cls.__name__} guide; add one to _candidates()")
    reads = HostReads()
    with reads.patched(), reads.watching():
        q = guide()
        q.sample((4,))
        if not getattr(guide, "is_empirical", False):  # point masses have no density
            guide.sample_and_log_prob((4,))
            if q.has_rsample:
                guide.rsample_and_log_prob((4,))
    assert not reads.calls, f"{cls.__name__} reads tensor values on the host: {reads.calls[:5]}"


def test_the_guard_catches_a_read_in_a_step():
    class Reads(vipkg.Reparam):
        def estimate(self, model, guide, objective, num_particles):
            info = super().estimate(model, guide, objective, num_particles)
            if info.loss > 0:  # a host read: Python branching on a tensor value
                pass
            return info

    model, guide, est, objective = _setup(vipkg.Reparam)
    reads = HostReads()
    opt = torch.optim.SGD(guide.parameters(), lr=1e-3)
    with reads.patched(), reads.watching():
        Reads().step(model, guide, objective, 4, _Unwatched(opt, reads))
    assert any(c.startswith("Tensor.__bool__ at") for c in reads.calls), reads.calls


# ---------------------------------------------------------------------- compile
#: Estimators whose step torch.compile cannot capture today; fit falls back to eager steps.
COMPILE_FALLBACK = {
    name: "the step calls torch.autograd.grad (scores / Hessians), which dynamo does not trace"
    for name in ("FastPath", "FBGVI", "BWSGD")
}


def _losses(cls, compile, optimizer="sgd", steps=6):
    model, guide, est, objective = _setup(cls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        result = fit(
            model,
            guide,
            est,
            objective=objective,
            steps=steps,
            num_particles=4,
            optimizer=optimizer,
            lr=1e-3,
            seed=3,
            compile=compile,
            progress=False,
        )
    fell_back = any("compile=True failed" in str(w.message) for w in caught)
    return result.losses, fell_back


def _check_compiled(cls):
    eager, _ = _losses(cls, False)
    compiled, fell_back = _losses(cls, True)
    # Also after a fallback: the failed first call must not have moved the RNG stream.
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    assert fell_back == (cls.__name__ in COMPILE_FALLBACK), f"{cls.__name__}: fell back = {fell_back}"


@pytest.fixture
def aot_eager(monkeypatch):
    """Compile with dynamo + AOT autograd but no C++ code generation: the graph capture is
    what can change a trajectory, and inductor's C++ build takes ~30 s per graph on CPU."""
    real = torch.compile

    def compile_aot(fn, **kwargs):
        kwargs.pop("options", None)  # inductor options; aot_eager takes none
        return real(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [vipkg.Reparam, estimators.ScoreFunction, estimators.RSVI, estimators.FBGVI])
def test_compiled_steps_give_the_eager_losses(cls, aot_eager):
    _check_compiled(cls)


@pytest.mark.slow
@pytest.mark.parametrize("cls", _estimator_classes(), ids=lambda c: c.__name__)
def test_every_estimator_compiles_or_falls_back_on_the_eager_path(cls, aot_eager):
    _check_compiled(cls)


def test_compiled_adam_steps_agree_to_float32_rounding(aot_eager):
    # torch's Adam keeps its step counter as a float32 tensor; compiled code uses it in
    # the bias correction while eager code reads it as a Python float, so the two
    # differ by float32 rounding (~1e-7 relative), whatever the parameters' dtype.
    eager, _ = _losses(vipkg.Reparam, False, "adam")
    compiled, fell_back = _losses(vipkg.Reparam, True, "adam")
    assert not fell_back
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("cls", [vipkg.Reparam, estimators.ScoreFunction, estimators.RSVI])
def test_inductor_compiled_steps_give_the_eager_losses(cls):
    torch._dynamo.reset()
    _check_compiled(cls)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken_compile(fn, **kwargs):
        def run(*args, **kwargs):  # the eager step takes none, the functional one its state
            raise RuntimeError("no backend here")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    model, guide, est, _ = _setup(vipkg.Reparam)
    with pytest.warns(RuntimeWarning, match="compile=True failed .*no backend here.*falling back to eager"):
        fallback = fit(
            model, guide, est, steps=6, num_particles=4, lr=1e-3, seed=3, compile=True, progress=False
        )
    eager, _ = _losses(vipkg.Reparam, False, "adam")
    torch.testing.assert_close(fallback.losses, eager, rtol=0, atol=0)
