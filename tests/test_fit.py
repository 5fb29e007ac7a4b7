import pytest
import torch

import vipkg
from vipkg.guides import FullRankNormal, LowRankNormal, MeanFieldNormal


def test_full_rank_recovers_conjugate_posterior():
    model = vipkg.models.linear_regression_conjugate(n=100, d=5)
    guide = FullRankNormal(model)
    steps = 3000
    result = vipkg.fit(
        model,
        guide,
        vipkg.Reparam(),
        steps=steps,
        lr=0.02,
        num_particles=32,
        progress=False,
        scheduler=lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, 0.01 ** (1 / steps)),
    )
    mean, cov = model.reference["mean"], model.reference["cov"]
    L = guide.scale_tril.detach()
    mean_err = (guide.loc.detach() - mean).norm() / mean.norm()
    cov_err = (L @ L.T - cov).norm() / cov.norm()
    assert mean_err < 0.05, mean_err
    assert cov_err < 0.05, cov_err
    # The ELBO of the exact posterior equals the log evidence: the final loss is within MC noise of it.
    assert abs(float(result.losses[-200:].mean()) + model.reference["log_evidence"]) < 0.1


def test_fit_reaches_gaussian_target_each_family():
    model = vipkg.models.gaussian(torch.tensor([1.0, -2.0, 0.5]), torch.diag(torch.tensor([1.0, 4.0, 0.25])))
    for family in (MeanFieldNormal, FullRankNormal, lambda m: LowRankNormal(m, rank=1)):
        guide = family(model)
        vipkg.fit(model, guide, vipkg.Reparam(), steps=1500, lr=0.03, progress=False)
        assert torch.allclose(guide.loc.detach(), model.reference["mean"], atol=0.1)


def test_same_seed_same_losses_and_caller_rng_untouched():
    model = vipkg.models.eight_schools()
    runs = []
    for _ in range(2):
        torch.manual_seed(99)
        before = torch.get_rng_state()
        r = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=60, seed=7, progress=False)
        assert torch.equal(torch.get_rng_state(), before)
        runs.append(r.losses)
    assert torch.equal(runs[0], runs[1])
    other = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=60, seed=8, progress=False)
    assert not torch.equal(other.losses, runs[0])


def test_nan_loss_names_step_and_estimator():
    calls = {"n": 0}

    def density(x):
        calls["n"] += 1
        out = -0.5 * (x**2).sum(-1)
        return out * float("nan") if calls["n"] == 38 else out

    model = vipkg.Model.from_log_density(density, 2)
    with pytest.raises(vipkg.NonFiniteLossError, match=r"step 37 with estimator Reparam\(\)"):
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=100, progress=False)


def test_fit_argument_validation():
    model = vipkg.models.gaussian(dim=2)
    guide = MeanFieldNormal(model)
    with pytest.raises(ValueError, match="steps"):
        vipkg.fit(model, guide, vipkg.Reparam(), steps=0)
    with pytest.raises(ValueError, match="lr"):
        vipkg.fit(model, guide, vipkg.Reparam(), lr=-1.0)
    with pytest.raises(ValueError, match="num_particles"):
        vipkg.fit(model, guide, vipkg.Reparam(), num_particles=0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        vipkg.fit(model, guide, vipkg.Reparam(), optimizer="lbfgs-ish")


def test_optimizer_by_class_and_factory():
    model = vipkg.models.gaussian(dim=2)
    r1 = vipkg.fit(
        model,
        MeanFieldNormal(model),
        vipkg.Reparam(),
        steps=20,
        optimizer=torch.optim.SGD,
        lr=0.1,
        progress=False,
    )
    r2 = vipkg.fit(
        model,
        MeanFieldNormal(model),
        vipkg.Reparam(),
        steps=20,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.1),
        progress=False,
    )
    assert torch.equal(r1.losses, r2.losses)


def test_result_sample_and_timing():
    model = vipkg.models.eight_schools()
    r = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=50, progress=False)
    draws = r.sample(300)
    assert set(draws) == {"mu", "tau", "theta_tilde"}
    assert draws["theta_tilde"].shape == (300, 8)
    assert bool((draws["tau"] > 0).all())
    assert r.elapsed > 0 and r.ms_per_step > 0 and r.losses.shape == (50,)


def test_progress_bar_runs(capsys):
    model = vipkg.models.gaussian(dim=2)
    vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=30, progress=True)
    assert "Reparam" in capsys.readouterr().err


def test_compile_matches_eager():
    model = vipkg.models.logistic_regression("synthetic", n=200, d=5)
    eager = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=30, progress=False)
    compiled = vipkg.fit(
        model, MeanFieldNormal(model), vipkg.Reparam(), steps=30, progress=False, compile=True
    )
    assert torch.allclose(eager.losses, compiled.losses, rtol=1e-4, atol=1e-3)


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not finite."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _nan_gradient_density(bad_calls):
    calls = {"n": 0}

    def density(x):
        calls["n"] += 1
        if calls["n"] in bad_calls:
            x = _NaNGradient.apply(x)
        return -0.5 * ((x - 1.0) ** 2).sum(-1)

    return vipkg.Model.from_log_density(density, 2)


def test_non_finite_gradient_with_finite_loss_names_step_and_parameters():
    model = _nan_gradient_density({38})
    with pytest.raises(
        vipkg.NonFiniteLossError,
        match=r"at step 38 with .*parameter\(s\) loc, raw_scale are no longer finite \(the gradient or "
        r"update of step 37",
    ):
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=100, progress=False)


def test_skip_counts_steps_undone_for_their_update_alone():
    """The loss of these steps is finite; only their gradient (so their update) is not."""
    model = _nan_gradient_density({8, 31})
    guide = MeanFieldNormal(model)
    r = vipkg.fit(model, guide, vipkg.Reparam(), steps=200, lr=0.05, progress=False, nan_policy="skip")
    assert r.skipped_steps == 2
    assert torch.isnan(r.losses).nonzero().flatten().tolist() == [7, 30]
    assert all(torch.isfinite(p).all() for p in guide.parameters())
    assert torch.allclose(guide.loc.detach(), torch.ones(2), atol=0.2)


def test_runaway_parameters_caught_by_pyro_validation_are_non_finite_errors():
    """lr=1e3 sends tau = exp(u) to inf: Pyro's argument check raises a ValueError on a particle
    count's first (checked) evaluation, the non-finite loss check afterwards (Pyro programs run
    without argument validation once checked); either must come out as NonFiniteLossError naming
    the step (and, under skip, count the steps)."""
    import pyro

    model = vipkg.models.eight_schools(centered=True, form="pyro")
    with pyro.validation_enabled(True):
        runaway = r"at step 1 .*(refused the guide's draws|no longer finite)"
        with pytest.raises(vipkg.NonFiniteLossError, match=runaway):
            vipkg.fit(model, FullRankNormal(model), vipkg.Reparam(), steps=50, lr=1e3, progress=False)
        with pytest.raises(vipkg.NonFiniteLossError, match=r"steps were skipped"):
            vipkg.fit(
                model,
                FullRankNormal(model),
                vipkg.Reparam(),
                steps=50,
                lr=1e3,
                progress=False,
                nan_policy="skip",
            )


def test_model_errors_are_not_relabelled():
    def density(x):
        raise ValueError("my model is broken")

    model = vipkg.Model.from_log_density(density, 2)
    with pytest.raises(ValueError, match="my model is broken") as info:
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=5, progress=False)
    assert not isinstance(info.value, vipkg.NonFiniteLossError)


def test_impossible_jump_of_the_bound_is_divergence():
    calls = {"n": 0}

    def density(x):
        calls["n"] += 1
        out = -0.5 * (x**2).sum(-1)
        return out + 1e7 if calls["n"] > 120 else out  # a bound that suddenly means nothing

    model = vipkg.Model.from_log_density(density, 2)
    with pytest.raises(vipkg.NonFiniteLossError, match=r"diverged at step 120"):
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=300, progress=False)


@pytest.mark.parametrize("seed", range(4))
def test_fast_early_progress_is_not_divergence(seed):
    """From far away the loss falls by orders of magnitude in the first steps; that is progress."""
    model = vipkg.models.gaussian(torch.full((3,), 100.0), dim=3)
    r = vipkg.fit(
        model, MeanFieldNormal(model), vipkg.Reparam(), steps=400, lr=0.5, seed=seed, progress=False
    )
    assert float(r.losses[0]) > 1e4 and float(r.losses[-20:].mean()) < 100


def _shifted_density(shift, calls_from, calls_to=10**9):
    calls = {"n": 0}

    def density(x):
        calls["n"] += 1
        out = -0.5 * (x**2).sum(-1)
        return out + shift if calls_from < calls["n"] <= calls_to else out

    return vipkg.Model.from_log_density(density, 2)


def test_a_run_of_steps_whose_loss_explodes_upwards_is_divergence():
    model = _shifted_density(-1e7, 120)  # from step 120 on the loss is 1e7 higher: the guide ran away
    with pytest.raises(
        vipkg.NonFiniteLossError, match=r"diverged in steps 100-149 .*rose to a median of 1e\+07"
    ):
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=300, progress=False)


def test_a_single_upward_spike_is_not_divergence():
    """One draw in a far tail can make one step's loss huge; that alone is noise, not divergence."""
    model = _shifted_density(-1e9, 120, 121)
    r = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=300, progress=False)
    assert float(r.losses[120]) > 1e8 and float(r.losses[-20:].mean()) < 10


def _no_gradient_warnings(fit_call):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fit_call()


def test_a_log_density_that_leaves_autograd_is_reported_once_naming_the_parameters():
    import re

    np_fn = lambda x: -0.5 * ((x - 3.0) ** 2).sum(-1)  # noqa: E731
    model = vipkg.Model.from_log_density(lambda x: torch.as_tensor(np_fn(x.detach().numpy())), 1)
    with pytest.warns(UserWarning, match=r"gradient for loc.*NumPy round trip") as record:
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=120, progress=False)
    hits = [w for w in record if "gradient" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in hits]
    assert re.search(r"log joint at the guide's draws carries no gradient", str(hits[0].message))
    assert hits[0].filename == __file__  # points at the user's fit call


def test_a_model_parameter_the_log_joint_never_reads_is_reported():
    unused = torch.nn.Linear(1, 1)
    model = vipkg.Model.from_log_density(lambda x: -0.5 * (x**2).sum(-1), 2, params=unused)
    with pytest.warns(UserWarning, match=r"no gradient for model\.weight, model\.bias.*never reads"):
        vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=4, check_every=2, progress=False)


def test_normal_fits_do_not_report_gradients():
    from vipkg.guides import Flow

    model = vipkg.models.eight_schools()
    _no_gradient_warnings(
        lambda: vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=60, progress=False)
    )
    # A flow's coupling nets start with a zero last layer: its earlier layers get gradient from step 2 on.
    g = vipkg.models.gaussian(torch.tensor([1.0, -2.0]), torch.eye(2))
    _no_gradient_warnings(
        lambda: vipkg.fit(
            g, Flow.real_nvp(g, layers=2), vipkg.Reparam(), steps=4, check_every=1, progress=False
        )
    )
    # A minibatch fit leaves the rows of local parameters outside the minibatch at zero: not reported.
    import pyro
    import pyro.distributions as dist

    x = torch.linspace(-1.0, 2.0, 9)

    def hierarchical(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=2) as ind:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[ind])

    local = vipkg.Model.from_pyro(hierarchical, x)
    guide, est = vipkg.estimators.per_site.auto(local)
    _no_gradient_warnings(lambda: vipkg.fit(local, guide, est, steps=4, check_every=2, progress=False))
    for p in guide.parameters():
        assert p.grad is not None and bool((p.grad == 0).any()) == (p.numel() == len(x)), p.grad


def test_bound_on_fresh_draws_with_its_standard_error():
    model = vipkg.models.linear_regression_conjugate(n=50, d=2)
    result = vipkg.fit(model, FullRankNormal(model), vipkg.Reparam(), steps=400, lr=0.05, progress=False)
    before = torch.get_rng_state()
    elbo, se = result.bound(n=4000, seed=0)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left alone
    assert result.bound(n=4000, seed=0) == (elbo, se) and result.bound(n=4000, seed=1) != (elbo, se)
    assert 0 < se < 0.1
    # A lower bound on the log evidence, and (the guide near the exact posterior) close to it.
    log_z = model.reference["log_evidence"]
    assert elbo < log_z + 3 * se and elbo > log_z - 0.5, (elbo, se, log_z)
    # It agrees with the training losses' tail (minus the bound, on other draws) within their noise.
    assert abs(elbo + float(result.losses[-100:].mean())) < 0.5
    # The fit's own objective: the IWAE bound lies between the ELBO and log Z.
    iwae, iwae_se = result.bound(n=2000, objective=vipkg.IWAE(16))
    assert elbo - 3 * se < iwae < log_z + 3 * iwae_se
    assert result.bound(n=1000).se > result.bound(n=4000).se


def test_bound_refuses_particles_and_subsampled_models_saying_what_to_use():
    model = vipkg.models.gaussian(dim=2)
    svgd = vipkg.fit(model, vipkg.guides.Particles(model, n=8), vipkg.SVGD(), steps=2, progress=False)
    with pytest.raises(ValueError, match=r"particles without a density, so it has no bound"):
        svgd.bound()
    import pyro
    import pyro.distributions as dist

    def local(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x), subsample_size=2):
            pyro.sample("z", dist.Normal(mu, 1.0))

    sub = vipkg.Model.from_pyro(local, torch.zeros(6))
    guide, est = vipkg.estimators.per_site.auto(sub)
    result = vipkg.fit(sub, guide, est, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"subsampled plate.*vipkg.models.heldout_elbo.*minibatch bounds"):
        result.bound()
    with pytest.raises(ValueError, match=r"n must be an int >= 2"):
        svgd.bound(n=1)
