"""The Pyro front-end: checked vectorization, Pyro's shape validation, deterministic sites, warnings."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

import vipkg
from vipkg.frontends.pyro import PyroProgramWarning, PyroVectorizationWarning, _is_sample
from vipkg.guides import MeanFieldNormal


def _pyro_log_joint(fn, values, *args, **kwargs):
    """Pyro's own log density of ``fn`` at one particle's values."""
    tr = poutine.trace(poutine.condition(fn, data=values)).get_trace(*args, **kwargs)
    return tr.log_prob_sum()


def _assert_matches_pyro(model, fn, latents, *args, **kwargs):
    S = next(iter(latents.values())).shape[0]
    got = model.log_joint(latents)
    ref = torch.stack(
        [_pyro_log_joint(fn, {k: v[i] for k, v in latents.items()}, *args, **kwargs) for i in range(S)]
    )
    torch.testing.assert_close(got, ref.to(got.dtype), rtol=1e-5, atol=1e-4)


def _non_enumerated_plate():
    # pyro tests/infer/test_valid_models.py::test_enum_discrete_non_enumerated_plate_ok (enumerate
    # annotations dropped): ``a.size(0)`` is the particle count under a particle plate.
    pyro.sample("w", dist.Bernoulli(0.5))
    with pyro.plate("non_enum", 2):
        a = pyro.sample("a", dist.Bernoulli(0.5).expand_by([2]))
    p = (1.0 + a.sum(-1)) / (2.0 + a.size(0))
    with pyro.plate("enum_1", 3):
        pyro.sample("b", dist.Bernoulli(p).expand_by([3]))


def _draws(fn, S, *args, seed=0):
    torch.manual_seed(seed)
    traces = [poutine.trace(fn).get_trace(*args) for _ in range(S)]
    names = [n for n, s in traces[0].nodes.items() if _is_sample(s) and not s["is_observed"]]
    return {n: torch.stack([t.nodes[n]["value"] for t in traces]) for n in names}


def test_particle_dim_misuse_falls_back_with_one_warning():
    with pytest.warns(PyroVectorizationWarning, match="torch.func.vmap") as record:
        model = vipkg.Model.from_pyro(_non_enumerated_plate)
    assert len([w for w in record if w.category is PyroVectorizationWarning]) == 1
    message = str(next(w.message for w in record if w.category is PyroVectorizationWarning))
    assert "_non_enumerated_plate" in message and "site" in message and "Likely cause" in message
    assert model.vectorization == "vmap"
    # S = 3 equals the plate size, where the plated run is silently wrong: vmap and the loop are not.
    loop = vipkg.Model.from_pyro(_non_enumerated_plate, vectorize="loop")
    for S in (1, 3, 4):
        draws = _draws(_non_enumerated_plate, S, seed=S)
        _assert_matches_pyro(model, _non_enumerated_plate, draws)
        _assert_matches_pyro(loop, _non_enumerated_plate, draws)
    unchecked = vipkg.Model.from_pyro(_non_enumerated_plate, vectorize="plate")
    with pytest.raises(AssertionError):
        _assert_matches_pyro(unchecked, _non_enumerated_plate, _draws(_non_enumerated_plate, 3, seed=3))


def test_programs_that_vmap_cannot_run_fall_back_to_a_loop():
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        scale = 2.0 if mu.item() > 5.0 else 1.0  # a host read: neither the plate nor vmap can run it
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, scale), obs=y)

    y = torch.randn(8)
    with pytest.warns(PyroVectorizationWarning, match="one particle at a time"):
        m = vipkg.Model.from_pyro(model, y)
    assert m.vectorization == "loop"
    _assert_matches_pyro(m, model, {"mu": torch.randn(5)}, y)
    result = vipkg.fit(m, MeanFieldNormal(m), vipkg.Reparam(), steps=30, num_particles=4, progress=False)
    assert torch.isfinite(result.losses).all()


def test_silently_wrong_plated_run_is_caught_on_the_first_draws():
    # Right at the counts checked when the model is built, wrong at 16 particles: only the
    # check on the fit's first draws can see it.
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        scale = 2.0 if mu.numel() > 12 else 1.0
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, scale), obs=y)

    y = torch.randn(20) + 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = vipkg.Model.from_pyro(model, y)
    assert m.vectorization == "plate"
    with pytest.warns(PyroVectorizationWarning, match="particle 0 of 16"):
        vipkg.fit(m, MeanFieldNormal(m), vipkg.Reparam(), steps=3, num_particles=16, progress=False)
    assert m.vectorization == "vmap"
    _assert_matches_pyro(m, model, {"mu": torch.randn(16)}, y)


def test_vectorized_programs_stay_vectorized_and_match_pyro():
    def model(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[-1]]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal((x * w).sum(-1), sigma), obs=y)

    x, y = torch.randn(40, 3), torch.randn(40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = vipkg.Model.from_pyro(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_matches_pyro(m, model, _draws(model, 6, x, y), x, y)
    assert m.vectorization == "plate"
    with pytest.raises(
        vipkg.ModelError, match=r"latent sites \['sigma', 'w'\]; got \['data', 'sigma', 'w'\]"
    ):
        m.log_joint({"data": torch.zeros(2), "sigma": torch.ones(2), "w": torch.zeros(2, 3)})


def test_building_the_model_leaves_the_rng_alone():
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    vipkg.Model.from_pyro(lambda: pyro.sample("a", dist.Normal(0.0, 1.0)))
    assert torch.equal(torch.rand(3), expected)


def test_observed_batch_dims_without_a_plate():
    # The plate-less style of Pyro's HMC/NUTS tests: observations with batch dims, no plate.
    def model(y):
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        pyro.sample("y", dist.Normal(loc, 1.0).to_event(1), obs=y)

    y = torch.randn(100, 2)
    m = vipkg.Model.from_pyro(model, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _assert_matches_pyro(m, model, {"loc": torch.randn(5, 2)}, y)
    assert m.vectorization == "plate"


def test_shape_mistakes_get_pyros_message():
    def model(x, y):
        a = pyro.sample("a", dist.Normal(0.0, 1.0))
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(a + b * x, 1.0), obs=y)

    x, y = torch.randn(30), torch.randn(30)
    with pytest.raises(
        vipkg.ModelError,
        match=r'(?s)model .model.: at site "y", invalid log_prob shape.*'
        r"Expected \[30\], actual \[30, 30\]",
    ):
        vipkg.Model.from_pyro(model, x[:, None], y)
    vipkg.Model.from_pyro(model, x, y)


def test_data_errors_name_the_argument():
    def model(x, *rest, scale):
        pyro.sample("a", dist.Normal(x.sum(), scale.sum()))

    bad = torch.tensor([0.0, float("inf")])
    with pytest.raises(ValueError, match="argument 'x' has 1 NaN"):
        vipkg.Model.from_pyro(model, bad, scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"argument 'rest\[1\]' has 1 NaN"):
        vipkg.Model.from_pyro(model, torch.ones(2), torch.ones(2), bad, scale=torch.ones(2))
    with pytest.raises(ValueError, match="argument 'scale' has 1 NaN"):
        vipkg.Model.from_pyro(model, torch.ones(2), scale=bad)


@pytest.mark.parametrize("vectorize", ["auto", "vmap", "loop"])
def test_deterministic_sites_are_exported(vectorize):
    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.deterministic("twice_mu", 2.0 * mu)
        pyro.deterministic("shifted", mu + torch.arange(3.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(10)
    m = vipkg.Model.from_pyro(model, y, vectorize=vectorize)
    assert set(m.observed) == {"y"}
    result = vipkg.fit(m, MeanFieldNormal(m), vipkg.Reparam(), steps=20, progress=False)
    draws = result.sample(50, seed=0)
    assert draws["shifted"].shape == (50, 3)
    torch.testing.assert_close(draws["twice_mu"], 2.0 * draws["mu"])
    posterior = result.to_arviz(n=100).posterior
    assert {"mu", "twice_mu", "shifted"} <= set(posterior.data_vars)
    assert posterior["shifted"].shape == (1, 100, 3)
    assert abs(float((posterior["twice_mu"] - 2 * posterior["mu"]).max())) < 1e-6


def test_enumerate_annotations_warn():
    def model(y):
        z = pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(z, 1.0), obs=y)

    # Enumerated by default (tests/test_enumeration.py); with enumeration off the annotation warns.
    with pytest.warns(PyroProgramWarning, match=r"sites \['z'\] are marked for enumeration"):
        vipkg.Model.from_pyro(model, torch.tensor(1.0), enumerate=False)


def test_vectorize_argument_is_checked():
    with pytest.raises(ValueError, match="vectorize must be"):
        vipkg.Model.from_pyro(lambda: pyro.sample("a", dist.Normal(0.0, 1.0)), vectorize="jit")


def test_the_programs_own_errors_are_not_taken_for_batching_errors():
    # Float64 latents into a float32 program: it fails one particle at a time too, so the
    # error is the program's, raised as it is, not a vectorization warning.
    locs = torch.tensor([0.0, 1.0, 2.0])

    def model(y):
        z = pyro.sample("z", dist.OneHotCategorical(torch.ones(3) / 3))
        pyro.sample("y", dist.Normal(z @ locs, 1.0), obs=y)

    m = vipkg.Model.from_pyro(model, torch.tensor(1.0))
    assert m.vectorization == "plate"
    z = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeError, match="dtype"):
            m.log_joint({"z": z})
    assert m.vectorization == "plate"
