import matplotlib
import pytest
import torch

import vipkg
from vipkg.diagnostics import plot_gradient_variance, plot_khat, plot_posteriors, reference_draws
from vipkg.guides import FullRankNormal, MeanFieldNormal

matplotlib.use("Agg")


def _fits():
    model = vipkg.models.gaussian(torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 0.6], [0.6, 1.0]]))
    out = {}
    for label, family in (("mf", MeanFieldNormal), ("fr", FullRankNormal)):
        out[label] = vipkg.fit(
            model,
            family(model),
            vipkg.Reparam(),
            steps=200,
            lr=0.05,
            progress=False,
            diagnostics=vipkg.GradientVariance(every=50, repeats=4),
        )
    return model, out


def test_plots_draw_one_artist_per_fit():
    import matplotlib.pyplot as plt

    model, fits = _fits()
    ax = plot_gradient_variance(fits)
    assert [line.get_label() for line in ax.get_lines()] == ["mf", "fr"]
    assert len(ax.get_lines()[0].get_xdata()) == 5 and ax.get_yscale() == "log"
    ax = plot_khat({"mf": 0.3, "fr": 0.9})
    assert len(ax.patches) == 2
    axes = plot_posteriors(fits, reference=reference_draws(model, 500), n=300)
    assert axes.size >= 1
    plt.close("all")


def test_reference_draws_exact_and_nuts_agree_with_the_truth():
    mean = torch.tensor([1.0, -1.0], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.6], [0.6, 1.0]], dtype=torch.float64)
    exact = reference_draws(vipkg.models.gaussian(mean, cov, dtype=torch.float64), 4000, seed=0)
    assert torch.allclose(exact["x"].mean(0), mean, atol=0.06)
    model = vipkg.models.gaussian(mean, cov, form="pyro", dtype=torch.float64)
    model.reference = {}
    nuts = reference_draws(model, 300, warmup=150, seed=0)
    assert nuts["x"].shape == (300, 2)
    assert torch.allclose(nuts["x"].mean(0), mean, atol=0.25)
    with pytest.raises(ValueError, match="method"):
        reference_draws(model, 10, method="mcmc")
    with pytest.raises(ValueError, match="no closed-form"):
        reference_draws(model, 10, method="exact")


def test_laplace_is_exact_for_a_gaussian_posterior():
    from vipkg.diagnostics import laplace

    model = vipkg.models.linear_regression_conjugate(n=50, d=3, dtype=torch.float64)
    mean, cov = laplace(model)
    assert torch.allclose(mean, model.reference["mean"], atol=1e-8)
    assert torch.allclose(cov, model.reference["cov"], atol=1e-8)
