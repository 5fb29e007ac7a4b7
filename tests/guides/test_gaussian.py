import pytest
import torch

import vipkg
from vipkg.guides import FullRankNormal, LowRankNormal, MeanFieldNormal

FAMILIES = {
    "meanfield": MeanFieldNormal,
    "fullrank": FullRankNormal,
    "lowrank": lambda m, **kw: LowRankNormal(m, rank=2, **kw),
}


@pytest.fixture
def model():
    return vipkg.models.eight_schools()


@pytest.mark.parametrize("name", FAMILIES)
def test_rsample_and_log_prob_consistent_with_distribution(name, model):
    guide = FAMILIES[name](model, loc=torch.linspace(-1, 1, model.dim), init_scale=0.5)
    z, log_q = guide.rsample_and_log_prob((7, 3))
    assert z.shape == (7, 3, model.dim) and log_q.shape == (7, 3)
    assert torch.allclose(log_q, guide().log_prob(z), atol=1e-4)
    assert z.requires_grad and log_q.requires_grad


@pytest.mark.parametrize("name", FAMILIES)
def test_sampling_moments(name, model):
    guide = FAMILIES[name](model, loc=torch.linspace(-1, 1, model.dim), init_scale=0.5)
    z, _ = guide.rsample_and_log_prob((20000,))
    assert torch.allclose(z.mean(0), guide.loc.detach(), atol=0.03)
    cov = torch.cov(z.detach().T)
    L = guide.scale_tril.detach() if hasattr(guide, "scale_tril") else torch.diag(guide.scale.detach())
    assert torch.allclose(cov, L @ L.T, atol=0.02)


def test_initial_values_are_respected(model):
    d = model.dim
    loc = torch.arange(d, dtype=torch.float32)
    g = MeanFieldNormal(model, loc=loc, scale=2.0)
    assert torch.equal(g.loc.detach(), loc)
    assert torch.allclose(g.scale, torch.full((d,), 2.0))
    L = torch.eye(d) * 0.3 + torch.tril(torch.ones(d, d), -1) * 0.1
    g = FullRankNormal(model, scale_tril=L)
    assert torch.allclose(g.scale_tril, L, atol=1e-6)
    W, D = torch.ones(d, 2) * 0.2, torch.full((d,), 0.5)
    g = LowRankNormal(model, rank=2, cov_factor=W, cov_diag=D)
    assert torch.allclose(g.covariance_matrix, W @ W.T + torch.diag(D), atol=1e-6)
    assert torch.allclose(g.scale_tril @ g.scale_tril.T, g.covariance_matrix, atol=1e-5)


def test_properties_are_differentiable(model):
    g = FullRankNormal(model)
    g.scale_tril.sum().backward()
    assert g.raw_scale_tril.grad is not None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"loc": torch.zeros(3)}, r"loc must have shape \(10,\)"),
        ({"scale": -1.0}, "strictly positive"),
        ({"loc": torch.full((10,), float("nan"))}, "NaN"),
    ],
)
def test_bad_initial_values(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MeanFieldNormal(model, **kwargs)


def test_full_rank_rejects_non_triangular(model):
    with pytest.raises(ValueError, match="lower triangular"):
        FullRankNormal(model, scale_tril=torch.ones(10, 10))


def test_low_rank_rejects_bad_rank(model):
    with pytest.raises(ValueError, match="rank"):
        LowRankNormal(model, rank=0)
