import pytest
import torch

import vipkg
from vipkg.estimators.control_variates import LeaveOneOut
from vipkg.estimators.per_site import PerSite
from vipkg.estimators.reparam import Reparam
from vipkg.estimators.score import ScoreFunction
from vipkg.guides import MeanFieldNormal
from vipkg.guides.composite import Composite
from vipkg.guides.discrete import Bernoulli
from vipkg.model import ModelError
from vipkg.models.mixture import discrete_mixture, sigmoid_belief_net

MODELS = {
    "discrete_mixture": discrete_mixture,
    "sigmoid_belief_net": lambda **kw: sigmoid_belief_net(n=40, **kw),
}


def _latents(model, S=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in model.sites.items():
        if s.is_discrete:
            hi = int(getattr(s.support, "upper_bound", 1))
            out[k] = torch.randint(0, hi + 1, (S, *s.shape), generator=g)
            if hi == 1 and not hasattr(s.support, "upper_bound"):
                out[k] = out[k].double()  # boolean sites hold 0./1.
        else:
            out[k] = torch.randn(S, *s.shape, generator=g, dtype=torch.float64)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tensor_and_pyro_forms_agree(name):
    a = MODELS[name](form="tensor", dtype=torch.float64)
    b = MODELS[name](form="pyro", dtype=torch.float64)
    assert list(a.sites) == list(b.sites)
    assert {k: (s.shape, s.is_discrete) for k, s in a.sites.items()} == {
        k: (s.shape, s.is_discrete) for k, s in b.sites.items()
    }
    assert not a.is_continuous and not b.is_continuous
    lat = _latents(a)
    assert torch.allclose(a.log_joint(lat), b.log_joint(lat), rtol=1e-9)
    pa, pb = a.pointwise_log_likelihood(lat), b.pointwise_log_likelihood(lat)
    assert set(pa) == set(pb) and all(torch.allclose(pa[k], pb[k]) for k in pa)
    # The Pyro front-end found the same dependencies as the hand-written terms.
    assert a.term_sites == b.term_sites
    ta, tb = a.log_joint_terms(lat), b.log_joint_terms(lat)
    for k in ta:
        assert torch.allclose(ta[k].reshape(5, -1).sum(-1), tb[k].reshape(5, -1).sum(-1))
    total = sum(v.reshape(5, -1).sum(-1) for v in ta.values())
    assert torch.allclose(total, a.log_joint(lat))


def test_mixture_accepts_one_hot_assignments():
    model = discrete_mixture(dtype=torch.float64)
    lat = _latents(model)
    one_hot = dict(lat, c=torch.nn.functional.one_hot(lat["c"], 3).double())
    assert torch.allclose(model.log_joint(lat), model.log_joint(one_hot))


def test_mixture_reference_and_errors():
    model = discrete_mixture(n=30, k=3)
    assert model.reference["means"].shape == (3, 2) and model.sites["c"].shape == (30,)
    with pytest.raises(ValueError, match="k >= 2"):
        discrete_mixture(k=1)
    with pytest.raises(ValueError, match="1797"):
        sigmoid_belief_net(n=5000)
    with pytest.raises(ModelError, match="discrete"):
        _ = model.dim


def test_sigmoid_belief_net_fits_with_a_composite_guide():
    model = sigmoid_belief_net(n=40, hidden=4, dtype=torch.float64)
    guide = Composite(model, {("W", "b"): MeanFieldNormal, "h": Bernoulli}, dtype=torch.float64)
    est = PerSite({("W", "b"): Reparam(), "h": ScoreFunction(LeaveOneOut())})
    r = vipkg.fit(model, guide, est, steps=150, num_particles=8, lr=0.05, progress=False)
    assert torch.isfinite(r.losses).all()
    assert r.losses[-20:].mean() < r.losses[:20].mean() - 100
