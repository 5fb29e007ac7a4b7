"""``fit(compile=True)``'s functional step: eager results, one compilation per configuration.

Graphs are captured with dynamo + AOT autograd (``aot_eager``): the capture is what could change a
trajectory, and inductor's C++ build takes ~30 s per graph on this CPU. Compilations are counted
with dynamo's own counter of unique graphs.
"""

import warnings

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

import vipkg
from vipkg.estimators.control_variates import LeaveOneOut, MovingAverage
from vipkg.estimators.per_site import PerSite
from vipkg.guides import Composite, FullRankNormal, MeanFieldNormal
from vipkg.models import logistic_regression

F64 = torch.float64


@pytest.fixture
def aot_eager(monkeypatch):
    real = torch.compile

    def compile_aot(fn, **kwargs):
        kwargs.pop("options", None)
        return real(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(torch, "compile", compile_aot)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model():
    return logistic_regression(dtype=F64)


def _fit(model, guide, est, compile, **kw):
    kw = {"steps": 40, "num_particles": 4, "lr": 0.02, "seed": 5, "progress": False, **kw}
    return vipkg.fit(model, guide, est, compile=compile, **kw)


def _mixed():
    import pyro
    import pyro.distributions as dist

    def prog():
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.3, dtype=F64)))
        pyro.sample("y", dist.Normal(mu + 2 * c, 1.0), obs=torch.tensor(1.5, dtype=F64))

    return vipkg.Model.from_pyro(prog)


CASES = {
    "reparam-meanfield": (lambda m: MeanFieldNormal(m, dtype=F64), vipkg.Reparam, {}),
    "stl-fullrank": (lambda m: FullRankNormal(m, dtype=F64), vipkg.STL, {}),
    "score-loo": (lambda m: MeanFieldNormal(m, dtype=F64), lambda: vipkg.ScoreFunction(LeaveOneOut()), {}),
    "reparam-iwae-adamw": (
        lambda m: MeanFieldNormal(m, dtype=F64),
        vipkg.Reparam,
        {"objective": vipkg.IWAE(4), "optimizer": "adamw"},
    ),
    "reparam-sgd-scheduled": (
        lambda m: MeanFieldNormal(m, dtype=F64),
        vipkg.Reparam,
        {"optimizer": "sgd", "lr": 1e-3, "scheduler": lambda o: torch.optim.lr_scheduler.StepLR(o, 10, 0.5)},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_functional_step_gives_the_eager_trajectory(case, model, aot_eager):
    make_guide, make_est, kw = CASES[case]
    eager = _fit(model, make_guide(model), make_est(), False, **kw)
    compiled = _fit(model, make_guide(model), make_est(), True, **kw)
    assert compiled.compile_note == "functional"
    # float64: Adam's bias correction is the one place where rounding differs (the step count is a
    # float32 tensor in both, read as a Python float by eager code).
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        dict(compiled.guide.named_parameters()), dict(eager.guide.named_parameters()), rtol=1e-10, atol=1e-10
    )


def test_per_site_parts_compile_as_one_function(aot_eager):
    model = _mixed()

    def guide():
        return Composite.auto(model, dtype=F64)

    def est():
        return PerSite({"c": vipkg.ScoreFunction(LeaveOneOut())})

    eager = _fit(model, guide(), est(), False)
    compiled = _fit(model, guide(), est(), True)
    assert compiled.compile_note == "functional"
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-10, atol=1e-10)


def test_a_second_fit_compiles_nothing_new(model, aot_eager):
    guide = MeanFieldNormal(model, dtype=F64)
    counter = dynamo_utils.counters["stats"]
    _fit(model, guide, vipkg.Reparam(), True)
    first = counter["unique_graphs"]
    assert first >= 1
    _fit(model, guide, vipkg.Reparam(), True)  # the same objects, a new optimizer
    _fit(model, guide, vipkg.Reparam(), True, lr=0.005)  # a new learning rate is an input
    assert counter["unique_graphs"] == first
    # A fresh guide of the same family and shapes, and a fresh estimator: the same graph.
    _fit(model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), True)
    assert counter["unique_graphs"] == first


def test_resume_continues_a_compiled_fit_bit_for_bit(model, aot_eager, tmp_path):
    def run(steps, resume, path):
        guide = MeanFieldNormal(model, dtype=F64)
        kw = {"checkpoint": path, "checkpoint_every": 10, "resume": resume, "steps": steps}
        return _fit(model, guide, vipkg.Reparam(), True, **kw)

    full = run(30, False, tmp_path / "full.pt")
    run(15, False, tmp_path / "split.pt")
    resumed = run(30, True, tmp_path / "split.pt")
    assert torch.equal(resumed.losses, full.losses)
    # And an eager resume of the compiled fit's checkpoint follows the same trajectory.
    guide = MeanFieldNormal(model, dtype=F64)
    run(15, False, tmp_path / "mixed.pt")
    eager = _fit(
        model, guide, vipkg.Reparam(), False, steps=30, checkpoint=tmp_path / "mixed.pt", resume=True
    )
    torch.testing.assert_close(eager.losses, full.losses, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "make_est, why",
    [
        (lambda: vipkg.ScoreFunction(MovingAverage(0.9)), "not a pure function"),
        (lambda: vipkg.DReG(), "not a pure function"),
    ],
)
def test_steps_that_are_not_pure_functions_say_so_and_compile_as_the_eager_step(
    make_est, why, model, aot_eager
):
    objective = vipkg.IWAE(4) if "DReG" in repr(make_est()) else vipkg.ELBO()
    eager = _fit(model, MeanFieldNormal(model, dtype=F64), make_est(), False, objective=objective, steps=8)
    compiled = _fit(model, MeanFieldNormal(model, dtype=F64), make_est(), True, objective=objective, steps=8)
    assert why in compiled.compile_note
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-10, atol=1e-10)


def test_reduce_overhead_inputs_keep_their_storage(model, monkeypatch):
    # CUDA graphs replay on fixed addresses: every input of the functional step (parameters,
    # optimizer state, learning rates) must be updated in place, never reallocated. On the CPU the
    # capture itself is skipped; what is checked is the bookkeeping it relies on.
    import vipkg._compiled as compiled_mod

    seen = {}
    real = compiled_mod.functional_step

    def spy(*args, **kwargs):
        step = real(*args, **kwargs)
        seen["step"] = step
        seen["before"] = [t.data_ptr() for t in step.static_inputs()]
        return step

    captured = {}
    real_compile = torch.compile

    def compile_aot(fn, **kwargs):
        captured.update(kwargs.pop("options", {}))
        return real_compile(fn, backend="aot_eager", **kwargs)

    monkeypatch.setattr(compiled_mod, "functional_step", spy)
    monkeypatch.setattr(torch, "compile", compile_aot)
    torch._dynamo.reset()
    sched = lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)  # noqa: E731
    result = _fit(
        model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), "reduce-overhead", scheduler=sched
    )
    torch._dynamo.reset()
    assert result.compile_note == "functional"
    assert captured.get("triton.cudagraphs") is True
    after = [t.data_ptr() for t in seen["step"].static_inputs()]
    assert after == seen["before"] and len(after) == 2 + 2 * 3 + 1  # loc, raw_scale; 3 Adam tensors each; lr
    with pytest.raises(ValueError, match="reduce-overhead"):
        _fit(model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), "fast")


def test_a_hyper_parameter_moved_inside_a_run_of_steps_is_not_missed(model, aot_eager):
    # Guards are checked once per run of steps; Adam's betas are compiled in as constants, so a
    # scheduler that cycles them (OneCycleLR's momentum) must send the step back through the guards.
    # With a stale graph the trajectory would leave the eager one at the first moved beta.
    def sched(o):
        return torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=12, cycle_momentum=True)

    kw = {"steps": 12, "scheduler": sched, "check_every": 12}
    eager = _fit(model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), False, **kw)
    compiled = _fit(model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), True, **kw)
    assert compiled.compile_note == "functional"
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-10, atol=1e-10)


def test_a_graph_the_cpp_wrapper_cannot_build_compiles_with_the_python_one(model, monkeypatch):
    import vipkg._compiled as compiled_mod

    real_compile, seen = torch.compile, {}

    def compile_spy(fn, **kwargs):
        options = kwargs.pop("options", {})
        compiled = real_compile(fn, backend="aot_eager", **kwargs)
        if options.get("cpp_wrapper"):

            def fails(*args):
                torch.randn(7)  # a failure after a draw: the retry must start from the same state
                raise RuntimeError("no C shim for this fallback kernel")

            compiled.aot_compile = fails
        return compiled

    real_step = compiled_mod.functional_step

    def spy(*args, **kwargs):
        seen["step"] = real_step(*args, **kwargs)
        return seen["step"]

    monkeypatch.setattr(torch, "compile", compile_spy)
    monkeypatch.setattr(compiled_mod, "functional_step", spy)
    torch._dynamo.reset()
    eager = _fit(model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall back to eager steps, no warning
        compiled = _fit(model, MeanFieldNormal(model, dtype=F64), vipkg.Reparam(), True)
    torch._dynamo.reset()
    step = seen["step"]
    assert "no C shim" in step.cpp_wrapper_error and step.aot_error is None
    torch.testing.assert_close(compiled.losses, eager.losses, rtol=1e-10, atol=1e-10)
