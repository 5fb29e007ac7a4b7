import math

import pytest
import torch

import vipkg
from vipkg.estimators.path import FastPath
from vipkg.guides.flow import Flow
from vipkg.models.flow_targets import gaussian_mixture, phi4, phi4_action

F64 = torch.float64


MAKERS = {
    "mixture_corners": lambda **kw: gaussian_mixture(3, **kw),
    "mixture_subset": lambda **kw: gaussian_mixture(5, num_modes=6, seed=2, **kw),
    "phi4": lambda **kw: phi4(4, **kw),
}


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_tensor_and_pyro_forms_agree(name):
    a = MAKERS[name](form="tensor", dtype=F64)
    b = MAKERS[name](form="pyro", dtype=F64)
    assert list(a.sites) == list(b.sites)
    assert {k: s.shape for k, s in a.sites.items()} == {k: s.shape for k, s in b.sites.items()}
    u = 1.5 * torch.randn(7, a.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.allclose(a.log_joint_unconstrained(u), b.log_joint_unconstrained(u), rtol=1e-10, atol=1e-10)
    assert a.pointwise_log_likelihood(a.constrain(u)) == b.pointwise_log_likelihood(b.constrain(u)) == {}


def test_mixture_is_normalized_with_exact_moments():
    model = gaussian_mixture(2, scale=0.5, dtype=F64)
    t = torch.linspace(-5, 5, 501, dtype=F64)
    h = float(t[1] - t[0])
    grid = torch.cartesian_prod(t, t)
    p = model.log_joint({"x": grid}).exp() * h * h
    assert abs(float(p.sum()) - 1.0) < 1e-6
    mean = (p[:, None] * grid).sum(0)
    cov = (p[:, None, None] * (grid - mean)[:, :, None] * (grid - mean)[:, None, :]).sum(0)
    assert torch.allclose(mean, model.reference["mean"], atol=1e-6)
    assert torch.allclose(cov, model.reference["cov"], atol=1e-6)
    # four modes at the corners (+-1, +-1); the density is higher there than at the origin
    means = model.reference["means"]
    assert {tuple(m.tolist()) for m in means} == {(-1.0, -1.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 1.0)}
    lp = model.log_joint({"x": torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=F64)})
    assert lp[0] > lp[1] + 1.0


def test_mixture_subset_is_seeded_and_distinct():
    a = gaussian_mixture(6, num_modes=10, seed=1).reference["means"]
    b = gaussian_mixture(6, num_modes=10, seed=1).reference["means"]
    c = gaussian_mixture(6, num_modes=10, seed=2).reference["means"]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(m.tolist()) for m in a}) == 10
    assert set(a.unique().tolist()) == {-1.0, 1.0}


def test_phi4_action_values_and_symmetries():
    kappa, lam, L = 0.3, 0.022, 4
    c = 0.7
    phi = torch.full((1, L, L), c, dtype=F64)
    expected = L * L * (-2 * kappa * 2 * c**2 + (1 - 2 * lam) * c**2 + lam * c**4)
    assert torch.allclose(phi4_action(phi, kappa, lam), torch.tensor([expected], dtype=F64))
    phi = torch.randn(5, L, L, generator=torch.Generator().manual_seed(0), dtype=F64)
    s = phi4_action(phi, kappa, lam)
    assert torch.allclose(phi4_action(-phi, kappa, lam), s)  # Z2 symmetry
    assert torch.allclose(phi4_action(torch.roll(phi, (1, 2), (-2, -1)), kappa, lam), s)  # translations
    assert torch.allclose(phi4_action(phi.transpose(-1, -2), kappa, lam), s)  # lattice rotation
    model = phi4(L, dtype=F64)
    assert model.dim == L * L and model.sites["phi"].shape == (L, L)
    assert torch.allclose(model.log_joint({"phi": phi}), -s)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: gaussian_mixture(13), "num_modes"),
        (lambda: gaussian_mixture(2, num_modes=5), "exceeds"),
        (lambda: gaussian_mixture(2, scale=0.0), "scale"),
        (lambda: gaussian_mixture(0), "dim"),
        (lambda: phi4(1), "L must be"),
        (lambda: phi4(4, lam=-1.0), "lam > 0"),
        (lambda: phi4(4, form="stan"), "form"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_flow_on_mixture_lowers_reverse_kl_over_seeds():
    """FastPath minimises KL(q || p); over seeds the median KL falls well below the start.

    Reverse KL is mode-seeking, so whether a run covers all four modes (and so whether the
    importance ESS rises) depends on the trajectory: measured over seeds 0-5, final ESS
    0.24, 0.07, 0.01, 0.19, 0.44, 0.26 from 0.24, so ESS is not asserted. KL went from 2.39
    to 0.63, 0.86, 0.90, 2.31, 0.44, 0.55: the median over three seeds has a wide margin.
    """
    model = gaussian_mixture(2, scale=0.3, dtype=F64)
    kls = []
    for seed in range(3):
        torch.manual_seed(seed)
        guide = Flow.real_nvp(model, layers=4, hidden=32, dtype=F64)

        def kl(guide=guide):
            with torch.no_grad(), vipkg._rng.seeded(9):
                z, log_q = guide.rsample_and_log_prob((4000,))
                # normalized target: KL(q || p) = -E[log w]
                return float(-(guide.log_joint(model, z) - log_q).mean())

        kl0 = kl()
        vipkg.fit(model, guide, FastPath(), steps=400, num_particles=64, lr=1e-2, seed=seed, progress=False)
        kls.append(kl())
    assert all(math.isfinite(k) for k in kls), kls
    assert sorted(kls)[1] < 0.5 * kl0, (kl0, kls)
