import json
import math
import tomllib
from pathlib import Path

import pytest
import torch

import vipkg.models
import vipkg.models.hard as hard
from tests.helpers import assert_forms_agree
from vipkg.models import HARD_POSTERIORS, ZOO
from vipkg.models._reference import data_checksum, reference_path
from vipkg.models.eight_schools import EIGHT_SCHOOLS_Y

F64 = torch.float64
NUTS_REFERENCES = ["random_walk", "eight_schools_centered", "ar_series", "stochastic_volatility"]
#: constructors with small non-default sizes: odd lengths exercise the scan's padding
SMALL = {
    "random_walk": lambda **kw: hard.random_walk(T=9, missing=0.3, **kw),
    "ar_series": lambda **kw: hard.ar_series(k=2, T=30, **kw),
    "stochastic_volatility": lambda **kw: hard.stochastic_volatility(T=7, **kw),
}


def _assert_forms_agree(make):
    assert_forms_agree(make(form="tensor", dtype=F64), make(form="pyro", dtype=F64), pointwise_required=True)


@pytest.mark.parametrize("name", sorted(HARD_POSTERIORS))
def test_tensor_and_pyro_forms_agree(name):
    _assert_forms_agree(HARD_POSTERIORS[name])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forms_agree_away_from_the_defaults(name):
    _assert_forms_agree(SMALL[name])
    # The NUTS moments describe the default arguments only.
    assert "unconstrained_mean" not in SMALL[name]().reference


def test_suite_is_registered():
    assert list(HARD_POSTERIORS) == [
        "correlated_regression",
        "random_walk",
        "eight_schools_centered",
        "ar_series",
        "stochastic_volatility",
    ]
    for name in ("correlated_regression", "random_walk", "ar_series", "stochastic_volatility"):
        assert ZOO[name] is HARD_POSTERIORS[name]
        assert name in vipkg.models.__all__
    assert HARD_POSTERIORS["eight_schools_centered"]().name == "eight_schools[centered]"


def test_stochastic_volatility_gradient_is_finite_at_the_origin():
    # u = 0 puts phi at exactly 0, where pow-based AR(1) powers have a 0 * inf gradient.
    model = hard.stochastic_volatility(dtype=F64)
    u = torch.zeros(2, model.dim, dtype=F64, requires_grad=True)
    (g,) = torch.autograd.grad(model.log_joint_unconstrained(u).sum(), u)
    assert torch.isfinite(g).all()


# ------------------------------------------------------------------------ correlated regression
def test_correlated_regression_is_ill_conditioned():
    model = hard.correlated_regression(dtype=F64)
    X = model.data["X"]
    assert X.shape == (442, 14)
    assert torch.allclose(X.mean(0), torch.zeros(14, dtype=F64), atol=1e-12)
    cond = float(torch.linalg.cond(X.T @ X))
    assert cond >= 1e4
    assert math.isclose(cond, model.reference["cond_XtX"], rel_tol=1e-6)
    cov = model.reference["cov"]
    sd = cov.diagonal().sqrt()
    corr = (cov / sd[:, None] / sd[None, :]).fill_diagonal_(0)
    assert corr.abs().max() > 0.99
    assert math.isclose(float(corr.abs().max()), model.reference["max_abs_corr"], rel_tol=1e-9)


def test_correlated_regression_closed_form_matches_a_direct_computation():
    noise, prior = 0.7, 1.0
    model = hard.correlated_regression(noise_scale=noise, prior_scale=prior, dtype=F64)
    ref, X, y = model.reference, model.data["X"], model.data["y"]
    precision = X.T @ X / noise**2 + torch.eye(14, dtype=F64) / prior**2
    cov = torch.linalg.inv(precision)
    mean = torch.linalg.solve(precision, X.T @ y / noise**2)
    assert torch.allclose(ref["mean"], mean, rtol=1e-9, atol=1e-10)
    assert torch.allclose(ref["cov"], cov, rtol=1e-8, atol=1e-12)
    assert torch.equal(ref["unconstrained_mean"], ref["mean"]) and torch.equal(
        ref["site_mean"]["w"], ref["mean"]
    )
    assert torch.allclose(ref["site_sd"]["w"], cov.diagonal().sqrt(), rtol=1e-8)
    # The evidence from the n x n Gaussian marginal of y, not the d x d route the model takes.
    marginal = noise**2 * torch.eye(442, dtype=F64) + prior**2 * X @ X.T
    log_evidence = torch.distributions.MultivariateNormal(torch.zeros(442, dtype=F64), marginal).log_prob(y)
    assert math.isclose(ref["log_evidence"], float(log_evidence), rel_tol=1e-10)
    # And the model's own log joint: log p(y, w) - log p(w | y) is the evidence at any w.
    w = torch.randn(3, 14, dtype=F64)
    post = torch.distributions.MultivariateNormal(ref["mean"], ref["cov"])
    assert torch.allclose(model.log_joint({"w": w}) - post.log_prob(w), log_evidence.expand(3), rtol=1e-9)
    assert ref["source"] == "closed form"


# ----------------------------------------------------------------------------------- random walk
def test_random_walk_missing_observations_contribute_nothing(monkeypatch):
    base = hard.random_walk(dtype=F64)
    observed = base.data["observed"]
    assert int((~observed).sum()) == 10  # 20 % of T = 50
    u = torch.randn(4, base.dim, generator=torch.Generator().manual_seed(1), dtype=F64)
    original = hard._random_walk_data

    def altered(shift_missing, shift_seen):
        def data(*args):
            x, y, obs, truth = original(*args)
            return x, y + torch.where(obs, shift_seen, shift_missing), obs, truth

        return data

    for form in ("tensor", "pyro"):
        before = hard.random_walk(form=form, dtype=F64).log_joint_unconstrained(u)
        monkeypatch.setattr(hard, "_random_walk_data", altered(100.0, 0.0))
        after = hard.random_walk(form=form, dtype=F64).log_joint_unconstrained(u)
        assert torch.equal(before, after), form
        monkeypatch.setattr(hard, "_random_walk_data", altered(0.0, 1.0))
        assert not torch.allclose(before, hard.random_walk(form=form, dtype=F64).log_joint_unconstrained(u))
        monkeypatch.setattr(hard, "_random_walk_data", original)
    assert base.pointwise_log_likelihood(base.constrain(u))["y"].shape == (4, 40)
    assert base.observed["y"].shape == (40,)


def test_random_walk_reference_smooths_the_observations():
    model = hard.random_walk(dtype=F64)
    ref, y, seen = model.reference, model.data["y"], model.data["observed"]
    x_mean = ref["site_mean"]["x"]
    # The posterior mean follows the data where it is seen (sigma_y = 0.5) ...
    assert (x_mean[seen] - y[seen]).abs().max() < 1.0
    # ... and, being a smoother, is closer to the true walk than the raw observations are.
    rmse = lambda a: float((a - ref["x_true"][seen]).square().mean().sqrt())  # noqa: E731
    assert rmse(x_mean[seen]) < rmse(y[seen])
    # Where y is missing the walk is less certain than where it is seen.
    assert ref["site_sd"]["x"][~seen].mean() > ref["site_sd"]["x"][seen].mean()
    for site in ("sigma_x", "sigma_y"):
        assert abs(float(ref["site_mean"][site]) - 0.5) < 3 * float(ref["site_sd"][site])


# ---------------------------------------------------------------------------------- NUTS files
@pytest.fixture(scope="module")
def records():
    return {n: json.loads(reference_path(n).read_text()) for n in NUTS_REFERENCES + ["eight_schools"]}


@pytest.mark.parametrize("name", NUTS_REFERENCES + ["eight_schools"])
def test_reference_file_fits_its_model(name, records):
    rec = records[name]
    model = (
        HARD_POSTERIORS[name](dtype=F64) if name in HARD_POSTERIORS else vipkg.models.eight_schools(dtype=F64)
    )
    ref = model.reference
    assert rec["dim"] == model.dim
    assert rec["sites"] == {k: list(s.shape) for k, s in model.sites.items()}
    # The data the chains saw is the data the constructor builds today.
    checksum = data_checksum(model.data)
    assert rec["data_checksum"].keys() == checksum.keys()
    for k, v in checksum.items():
        assert math.isclose(rec["data_checksum"][k], v, rel_tol=1e-12, abs_tol=1e-12), k
    assert ref["unconstrained_mean"].shape == ref["unconstrained_sd"].shape == (model.dim,)
    assert torch.isfinite(ref["unconstrained_mean"]).all()
    assert (ref["unconstrained_sd"] > 0).all() and torch.isfinite(ref["unconstrained_sd"]).all()
    assert set(ref["site_mean"]) == set(ref["site_sd"]) == set(model.sites)
    start = 0
    for site, s in model.sites.items():
        assert ref["site_mean"][site].shape == ref["site_sd"][site].shape == s.shape
        assert (ref["site_sd"][site] > 0).all()
        n = s.numel
        if site in ("mu", "x", "h_std", "theta", "theta_tilde", "alpha", "beta"):
            # Real sites are their own unconstrained coordinates.
            flat = ref["unconstrained_mean"][start : start + n]
            assert torch.allclose(ref["site_mean"][site].reshape(-1), flat, rtol=1e-12)
        else:
            assert bool(s.support.check(ref["site_mean"][site]).all()), site
        start += n
    diag = rec["diagnostics"]
    assert diag["max_rhat"] <= 1.01
    assert diag["min_ess_bulk"] >= 1000 and diag["min_ess_tail"] >= 1000
    # Reference quality: each mean is known to within 5 % of its posterior sd.
    assert diag["max_mcse_mean_over_sd"] < 0.05
    assert ref["source"].startswith("Pyro NUTS") and f"max R-hat {diag['max_rhat']:.4f}" in ref["source"]
    assert rec["settings"]["chains"] >= 4 and rec["settings"]["warmup"] >= 1000
    assert {"torch", "pyro", "arviz"} <= set(rec["versions"]) and rec["date"]


def test_reference_files_ship_with_the_package():
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    assert "models/references/*.json" in pyproject["tool"]["setuptools"]["package-data"]["vipkg"]
    shipped = sorted(p.stem for p in Path(vipkg.models.__file__).parent.joinpath("references").glob("*.json"))
    assert shipped == sorted(NUTS_REFERENCES + ["eight_schools"])


def test_eight_schools_references_agree_with_the_literature():
    centered = hard.eight_schools_centered(dtype=F64).reference
    noncentered = vipkg.models.eight_schools(dtype=F64).reference
    for ref in (centered, noncentered):
        # Long-run NUTS values reported for this model: E[mu] ~ 4.4, E[tau] ~ 3.6.
        assert abs(float(ref["site_mean"]["mu"]) - 4.4) < 0.2
        assert abs(float(ref["site_mean"]["tau"]) - 3.6) < 0.2
    # One run feeds both files: the shared sites have the same moments.
    for k in ("mu", "tau"):
        assert torch.allclose(centered["site_mean"][k], noncentered["site_mean"][k])
    # Each school's mean is shrunk from its estimate toward mu.
    y, mu = torch.tensor(EIGHT_SCHOOLS_Y, dtype=F64), centered["site_mean"]["mu"]
    theta = centered["site_mean"]["theta"]
    assert ((theta - mu).abs() < (y - mu).abs()).all()


def test_ar_series_reference_is_plausible():
    model = hard.ar_series(dtype=F64)
    ref = model.reference
    alpha, beta, sigma = (ref["site_mean"][k] for k in ("alpha", "beta", "sigma"))
    # With weak priors the fit passes through the means, as least squares does.
    lag_means, target_mean = model.data["lags"].mean(0), model.data["y"].mean()
    assert abs(float(alpha + beta @ lag_means - target_mean)) < 0.05
    assert ((beta - ref["beta"]).abs() < 3 * ref["site_sd"]["beta"]).all()
    assert abs(float(sigma) - 0.5) < 3 * float(ref["site_sd"]["sigma"])
    # The lags are far from zero, so alpha is far less certain than the level of the series
    # (about sigma / sqrt(n)): it trades against sum(beta).
    assert float(ref["site_sd"]["alpha"]) > 3 * float(sigma) / len(model.data["y"]) ** 0.5


def test_stochastic_volatility_reference_is_plausible():
    model = hard.stochastic_volatility(dtype=F64)
    ref, y = model.reference, model.data["y"]
    mu, phi = ref["site_mean"]["mu"], ref["site_mean"]["phi"]
    # E[log y^2] = E[h] + E[log eps^2] = mu - 1.27 for eps ~ N(0, 1).
    assert abs(float(mu) - float((y.square().log() + 1.2704).mean())) < 2 * float(ref["site_sd"]["mu"])
    assert 0 < float(phi) < 1
    for site in ("mu", "phi", "sigma_h"):
        assert abs(float(ref["site_mean"][site]) - ref[site]) < 3 * float(ref["site_sd"][site]), site
    # 100 returns say little about each innovation, but something: on average the posterior
    # is narrower than the N(0, 1) prior.
    assert float(ref["site_sd"]["h_std"].mean()) < 0.99
