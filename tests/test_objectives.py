import math

import pytest
import torch

import vipkg
from vipkg import ELBO, IWAE, Renyi
from vipkg.guides import MeanFieldNormal


def test_bounds_on_known_weights():
    lw = torch.log(torch.tensor([[1.0, 3.0]]))
    assert math.isclose(float(ELBO()(lw)), 0.5 * math.log(3.0), rel_tol=1e-6)
    assert math.isclose(float(IWAE(2)(lw)), math.log(2.0), rel_tol=1e-6)
    # Renyi(alpha=0) is IWAE; Renyi(alpha=2) = -log mean(1/w)
    assert math.isclose(float(Renyi(0.0, k=2)(lw)), math.log(2.0), rel_tol=1e-6)
    assert math.isclose(float(Renyi(2.0, k=2)(lw)), -math.log((1 + 1 / 3) / 2), rel_tol=1e-6)


def test_iwae_bound_at_least_elbo_and_increases_with_k():
    model = vipkg.models.eight_schools()
    guide = MeanFieldNormal(model, init_scale=1.0)
    with torch.no_grad():
        z, log_q = guide.rsample_and_log_prob((4000, 64))
        lw = (guide.log_joint(model, z) - log_q).double()
    means, ses = [], []
    for k in (1, 4, 16, 64):
        per = IWAE(k).per_group(lw[:, :k])
        means.append(float(per.mean()))
        ses.append(float(per.std() / math.sqrt(per.numel())))
    assert math.isclose(means[0], float(ELBO()(lw[:, :1])), rel_tol=1e-9)
    for (a, sa), (b, sb) in zip(zip(means, ses), zip(means[1:], ses[1:])):
        assert b - a > 3 * math.hypot(sa, sb), (means, ses)


def test_renyi_between_bounds():
    model = vipkg.models.gaussian(dim=3)
    guide = MeanFieldNormal(model, loc=torch.ones(3), init_scale=0.7)
    with torch.no_grad():
        z, log_q = guide.rsample_and_log_prob((20000, 8))
        lw = guide.log_joint(model, z) - log_q
    elbo, iwae, renyi = ELBO()(lw), IWAE(8)(lw), Renyi(0.5, k=8)(lw)
    assert elbo < renyi < iwae < 0.0  # log p(x) = 0 for the normalized target


@pytest.mark.parametrize(
    "make, match",
    [(lambda: IWAE(0), "k >= 1"), (lambda: Renyi(1.0), "ELBO"), (lambda: Renyi(0.5, k=0), "k >= 1")],
)
def test_invalid_hyperparameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_invalid_num_particles():
    with pytest.raises(ValueError, match="num_particles"):
        ELBO().sample_shape(0)
