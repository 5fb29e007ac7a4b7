import pytest
import torch

import vipkg
from tests.helpers import assert_forms_agree
from vipkg.guides import MeanFieldNormal
from vipkg.models.conjugate import dirichlet_multinomial, gamma_poisson
from vipkg.models.gamma_def import sparse_gamma_def

F64 = torch.float64
MODELS = {
    "dirichlet_multinomial": dirichlet_multinomial,
    "gamma_poisson": gamma_poisson,
    "sparse_gamma_def": lambda **kw: sparse_gamma_def(n=30, **kw),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tensor_and_pyro_forms_agree(name):
    """The same check as tests/models/test_zoo.py, for these models before they join the ZOO."""
    make = MODELS[name]
    assert_forms_agree(make(form="tensor", dtype=F64), make(form="pyro", dtype=F64), pointwise_required=True)


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("form", ["tensor", "pyro"])
def test_every_model_fits_ten_steps(name, form):
    model = MODELS[name](form=form)
    r = vipkg.fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=10, progress=False)
    assert torch.isfinite(r.losses).all()


def test_dirichlet_multinomial_reference_is_exact():
    model = dirichlet_multinomial(5, prior=(0.8, 1.5, 1.0, 2.0, 0.7), counts=(3, 0, 7, 2, 5), dtype=F64)
    ref = model.reference
    assert torch.equal(ref["concentration"], torch.tensor([3.8, 1.5, 8.0, 4.0, 5.7], dtype=F64))
    theta = torch.distributions.Dirichlet(ref["concentration"]).sample((4,))
    post = torch.distributions.Dirichlet(ref["concentration"]).log_prob(theta)
    # log p(x) = log p(x, theta) - log p(theta | x) at any theta
    assert torch.allclose(
        model.log_joint({"theta": theta}) - post, torch.full((4,), ref["log_evidence"], dtype=F64)
    )
    # and the Pyro Dirichlet-multinomial agrees on the evidence
    import pyro.distributions as dist

    dm = dist.DirichletMultinomial(ref["prior"], total_count=17).log_prob(ref["counts"])
    assert abs(float(dm) - ref["log_evidence"]) < 1e-10


def test_gamma_poisson_reference_is_exact():
    model = gamma_poisson(n=7, groups=4, concentration=1.5, rate=0.5, seed=3, dtype=F64)
    ref = model.reference
    post = torch.distributions.Gamma(ref["concentration"], ref["rate"])
    lam = post.sample((5,))
    assert torch.allclose(
        model.log_joint({"lam": lam}) - post.log_prob(lam).sum(-1),
        torch.full((5,), ref["log_evidence"], dtype=F64),
    )
    assert model.data["x"].shape == (7, 4)


def test_sparse_gamma_def_shapes_and_data():
    model = sparse_gamma_def(n=20, K1=4, K2=2, dtype=F64)
    assert {k: tuple(s.shape) for k, s in model.sites.items()} == {
        "w1": (4, 64),
        "w2": (2, 4),
        "z2": (20, 2),
        "z1": (20, 4),
    }
    x = model.data["x"]
    assert x.shape == (20, 64) and float(x.max()) <= 16 and float(x.min()) >= 0
    assert model.pointwise_log_likelihood(model.constrain(torch.zeros(3, model.dim, dtype=F64)))[
        "x"
    ].shape == (3, 20)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: dirichlet_multinomial(1), "K >= 2"),
        (lambda: dirichlet_multinomial(3, counts=(1, -1, 2)), "non-negative integers"),
        (lambda: dirichlet_multinomial(3, prior=(1.0, 0.0, 1.0)), "strictly positive"),
        (lambda: gamma_poisson(n=0), "n must be a positive int"),
        (lambda: gamma_poisson(rate=-1.0), "must be > 0"),
        (lambda: sparse_gamma_def(n=5000), "between 1 and 1797"),
        (lambda: sparse_gamma_def(K1=0), "K1 must be a positive int"),
        (lambda: gamma_poisson(form="stan"), "form"),
    ],
)
def test_bad_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()
