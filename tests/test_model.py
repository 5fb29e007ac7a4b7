import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.mcmc.util import initialize_model
from torch.distributions import constraints

import vipkg
from vipkg import Model, ModelError
from vipkg.models.eight_schools import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y


def _eight_schools_pyro(y, sigma):
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)


def _data():
    return torch.tensor(EIGHT_SCHOOLS_Y, dtype=torch.float64), torch.tensor(
        EIGHT_SCHOOLS_SIGMA, dtype=torch.float64
    )


def test_from_pyro_eight_schools_matches_pyro_potential_with_jacobian():
    y, sigma = _data()
    model = Model.from_pyro(_eight_schools_pyro, y, sigma)
    assert list(model.sites) == ["mu", "tau", "theta"]
    assert model.dim == 10
    _, potential, _, _ = initialize_model(_eight_schools_pyro, model_args=(y, sigma))
    u = torch.randn(6, 10, dtype=torch.float64) * 1.5
    ours = model.log_joint_unconstrained(u)
    theirs = torch.stack([-potential({"mu": r[0], "tau": r[1], "theta": r[2:]}) for r in u])
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0)
    # Without the Jacobian the two differ by exactly log|dtau/du| = u_tau.
    plain = model.log_joint(model.constrain(u))
    assert torch.allclose(ours - plain, u[:, 1], atol=1e-10)


def test_from_pyro_trace_log_prob_on_constrained_values():
    y, sigma = _data()
    model = Model.from_pyro(_eight_schools_pyro, y, sigma)
    latents = {"mu": torch.tensor([0.3]), "tau": torch.tensor([2.0]), "theta": torch.randn(1, 8)}
    latents = {k: v.double() for k, v in latents.items()}
    cond = pyro.poutine.condition(_eight_schools_pyro, data={k: v[0] for k, v in latents.items()})
    tr = pyro.poutine.trace(cond).get_trace(y, sigma)
    assert torch.allclose(model.log_joint(latents), tr.log_prob_sum().reshape(1), atol=1e-8)


def test_from_pyro_rejects_changing_sites():
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        pyro.sample("a", dist.Normal(0.0, 1.0))
        if calls["n"] > 1:
            pyro.sample("b", dist.Normal(0.0, 1.0))

    # The vectorization check runs the program again, so the change is found as it is built.
    with pytest.raises(ModelError, match="changed its latent sites"):
        Model.from_pyro(flaky).log_joint({"a": torch.zeros(2)})


def test_from_pyro_local_latents_in_subsampled_plate_are_local_sites():
    def local(x):
        with pyro.plate("data", 100, subsample_size=10):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    model = Model.from_pyro(local, torch.zeros(3))
    assert model.local_sites == {"z": ("data", 0)} and model.sites["z"].shape == (100,)
    with pytest.raises(ModelError, match="evaluated on a minibatch"):
        model.log_joint({"z": torch.zeros(2, 100)})


def test_from_pyro_nan_data_names_argument():
    y, sigma = _data()
    y[3] = float("nan")
    with pytest.raises(ValueError, match="argument .y. has 1 NaN"):
        Model.from_pyro(_eight_schools_pyro, y, sigma)


def test_from_log_density_simplex_roundtrip_and_jacobian():
    alpha = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    target = torch.distributions.Dirichlet(alpha)
    model = Model.from_log_density(target.log_prob, 3, support=constraints.simplex)
    assert model.dim == 2
    u = torch.randn(5, 2, dtype=torch.float64)
    x = model.constrain(u)["x"]
    assert torch.allclose(x.sum(-1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(model.unconstrain({"x": x}), u, atol=1e-10)
    # The pushforward of the unconstrained density integrates the Dirichlet correctly:
    # check it against torch's own transformed distribution.
    t = torch.distributions.biject_to(constraints.simplex)
    expected = target.log_prob(x) + t.log_abs_det_jacobian(u, x)
    assert torch.allclose(model.log_joint_unconstrained(u), expected)


def test_positive_support_jacobian_normalizes():
    """exp(log_joint_unconstrained) integrates to 1 for a normalized positive density."""
    target = torch.distributions.Gamma(
        torch.tensor(3.0, dtype=torch.float64), torch.tensor(2.0, dtype=torch.float64)
    )
    model = Model.from_log_density(lambda x: target.log_prob(x).sum(-1), 1, support=constraints.positive)
    u = torch.linspace(-12, 6, 20001, dtype=torch.float64)[:, None]
    dens = model.log_joint_unconstrained(u).exp()
    assert math.isclose(float(torch.trapezoid(dens, u[:, 0])), 1.0, rel_tol=1e-6)


def test_wrong_output_shape_error_names_shapes():
    model = Model.from_log_density(lambda x: -0.5 * (x**2), 3)
    with pytest.raises(ModelError, match=r"returned shape \(4, 3\), expected \(4,\)"):
        model.log_joint_unconstrained(torch.zeros(4, 3))


def test_wrong_input_shape_error():
    model = Model.from_log_density(lambda x: -0.5 * (x**2).sum(-1), 3)
    with pytest.raises(ModelError, match=r"\[S, 3\]"):
        model.log_joint_unconstrained(torch.zeros(4, 2))


def test_nan_in_data_names_argument():
    with pytest.raises(ValueError, match="'X'"):
        Model(
            {"x": vipkg.Site(torch.Size([1]))},
            lambda z, d: z["x"].sum(-1),
            data={"X": torch.tensor([1.0, math.inf])},
        )


def test_bad_dim():
    with pytest.raises(ModelError, match="positive int"):
        Model.from_log_density(lambda x: x.sum(-1), 0)


def test_to_moves_data_and_dtype():
    model = vipkg.models.linear_regression_conjugate(n=10, d=2)
    m64 = model.to(dtype=torch.float64)
    assert m64.data["X"].dtype == torch.float64
    assert model.data["X"].dtype == torch.get_default_dtype()
    assert m64.sites == model.sites
