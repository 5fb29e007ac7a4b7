import arviz as az
import numpy as np
import torch

import vipkg
from vipkg.diagnostics import GradientVariance
from vipkg.guides import MeanFieldNormal


def _fit():
    model = vipkg.models.eight_schools()
    return vipkg.fit(
        model,
        MeanFieldNormal(model),
        vipkg.Reparam(),
        steps=100,
        progress=False,
        diagnostics=GradientVariance(every=50, repeats=4),
    )


def test_to_arviz_groups_and_netcdf_roundtrip(tmp_path):
    result = _fit()
    idata = result.to_arviz(200)
    for group in ("posterior", "sample_stats", "log_likelihood", "observed_data", "optimization"):
        assert group in idata.groups(), group
    post = idata.posterior
    assert post["theta_tilde"].shape == (1, 200, 8)
    assert bool((post["tau"] > 0).all())
    stats = idata.sample_stats
    np.testing.assert_allclose(stats["log_weight"], stats["log_p"] - stats["log_q"], rtol=1e-5, atol=1e-4)
    # Pareto-smoothed weights are normalized and keep the order of the raw ones.
    psis = stats["psis_log_weight"].values[0]
    np.testing.assert_allclose(np.exp(psis).sum(), 1.0, rtol=1e-8)
    raw = stats["log_weight"].values[0]
    assert np.argmax(psis) == np.argmax(raw) and np.argmin(psis) == np.argmin(raw)
    assert idata.optimization["loss"].shape == (100,)
    assert list(idata.optimization["diag_step"].values) == [0, 50, 100]
    assert str(idata.optimization["estimator"].values) == "Reparam"
    path = tmp_path / "fit.nc"
    idata.to_netcdf(str(path))
    back = az.from_netcdf(str(path))
    np.testing.assert_allclose(back.posterior["mu"], post["mu"])
    np.testing.assert_allclose(back.optimization["loss"], idata.optimization["loss"])


def test_posterior_draws_follow_the_guide():
    result = _fit()
    idata = result.to_arviz(4000)
    mu = torch.as_tensor(idata.posterior["mu"].values).reshape(-1)
    g = result.guide
    loc, scale = float(g.loc[0].detach()), float(g.scale[0].detach())
    assert abs(float(mu.mean()) - loc) < 4 * scale / 4000**0.5 + 1e-3


def test_loo_runs_on_export():
    idata = _fit().to_arviz(300)
    loo = az.loo(idata, pointwise=True)
    assert np.isfinite(loo.elpd_loo)


def test_psislw_adapter_khat_separates_good_and_poor_proposals():
    from vipkg.diagnostics.arviz_adapter import psislw

    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g, dtype=torch.float64)
    target = torch.distributions.Normal(0.0, 1.0)
    # a wider proposal gives bounded weights; a too-narrow one heavy-tailed weights
    good = target.log_prob(1.5 * x) - torch.distributions.Normal(0.0, 1.5).log_prob(1.5 * x)
    narrow = target.log_prob(0.4 * x) - torch.distributions.Normal(0.0, 0.4).log_prob(0.4 * x)
    lw_good, k_good = psislw(good.numpy())
    _, k_narrow = psislw(narrow.numpy())
    assert k_good < 0.5 < k_narrow
    assert np.isclose(np.logaddexp.reduce(lw_good), 0.0, atol=1e-8)  # normalized
