import normflows as nf
import pytest
import torch

import vipkg
from vipkg.guides.flow import Flow, FlowDistribution

F64 = torch.float64


def _randomize(guide, scale=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in guide.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


CONSTRUCTORS = {
    "real_nvp_swap": lambda m: Flow.real_nvp(m, layers=3, hidden=8, dtype=F64),
    "real_nvp_shuffle": lambda m: Flow.real_nvp(m, layers=3, hidden=8, permute="shuffle", dtype=F64),
    "real_nvp_lu": lambda m: Flow.real_nvp(m, layers=3, hidden=8, permute="lu", actnorm=False, dtype=F64),
    "neural_spline": lambda m: Flow.neural_spline(m, layers=2, hidden=8, dtype=F64),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_sampling_and_inverse_log_density_agree(name):
    model = vipkg.models.gaussian(dim=5, dtype=F64)
    guide = CONSTRUCTORS[name](model)
    _randomize(guide)
    z, log_q = guide.rsample_and_log_prob((3, 4))
    assert z.shape == (3, 4, 5) and log_q.shape == (3, 4) and z.dtype == F64
    assert torch.allclose(guide.log_prob(z), log_q, atol=1e-10)
    q = guide()
    assert isinstance(q, FlowDistribution) and q.has_rsample
    assert q.event_shape == (5,) and q.batch_shape == ()
    assert torch.allclose(q.log_prob(z), log_q, atol=1e-10)
    assert not q.sample((2,)).requires_grad
    assert q.rsample((2,)).requires_grad
    # reparameterized draws reach every parameter
    z.sum().backward()
    assert all(p.grad is not None for p in guide.parameters())


def test_density_is_normalized():
    model = vipkg.models.gaussian(dim=2, dtype=F64)
    guide = Flow.real_nvp(model, layers=4, hidden=16, dtype=F64)
    _randomize(guide, 0.1)  # larger random weights give tails beyond the grid
    t = torch.linspace(-9, 9, 601, dtype=F64)
    h = float(t[1] - t[0])
    grid = torch.cartesian_prod(t, t)
    with torch.no_grad():
        mass = float(guide.log_prob(grid).exp().sum()) * h * h
    assert abs(mass - 1.0) < 1e-4


def test_wraps_user_flow_and_trains_it_in_place():
    torch.manual_seed(0)
    model = vipkg.models.gaussian(torch.tensor([1.0, -2.0, 0.5]), dim=3, dtype=F64)
    layers = [
        nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 2], init_zeros=True)),
        nf.flows.Permute(3, mode="swap"),
        nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 2], init_zeros=True)),
    ]
    user_flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(3), layers)
    guide = Flow(model, user_flow, dtype=F64)
    assert guide.flow.flows[0] is layers[0]  # the user's modules, not copies
    assert guide.dtype == F64
    assert {id(p) for p in user_flow.parameters()} == {id(p) for p in guide.parameters()}
    before = layers[0].flows[1].param_map.net[-1].weight.detach().clone()
    r = vipkg.fit(model, guide, vipkg.Reparam(), steps=300, num_particles=16, lr=2e-2, seed=0, progress=False)
    assert not torch.equal(before, layers[0].flows[1].param_map.net[-1].weight)
    draws = r.sample(4000, seed=1)["x"]
    assert torch.allclose(draws.mean(0), model.reference["mean"], atol=0.1)
    # the flow's log density stays exact after training (sampling vs inverse pass)
    z, log_q = guide.rsample_and_log_prob((5,))
    assert torch.allclose(guide.log_prob(z), log_q, atol=1e-10)


def test_a_list_of_layers_gets_a_trainable_gaussian_base():
    model = vipkg.models.gaussian(dim=4, dtype=F64)
    guide = Flow(model, [nf.flows.Permute(4, mode="swap"), nf.flows.AffineConstFlow((4,))])
    assert isinstance(guide.base, nf.distributions.DiagGaussian)
    assert {n for n, _ in guide.named_parameters()} >= {"flow.q0.loc", "flow.q0.log_scale"}
    assert guide.dtype == torch.get_default_dtype()
    guide = Flow(model, torch.nn.ModuleList([nf.flows.Permute(4, mode="swap")]))
    assert len(guide.layers) == 1


def test_actnorm_is_marked_initialized():
    model = vipkg.models.gaussian(dim=4, dtype=F64)
    act = nf.flows.ActNorm((4,))
    guide = Flow(model, [act], dtype=F64)
    assert float(act.data_dep_init_done) == 1.0
    z, _ = guide.rsample_and_log_prob((10,))
    assert torch.equal(act.s, torch.zeros_like(act.s))  # no data-dependent re-initialisation


def test_fit_with_neural_spline_runs_on_constrained_model():
    model = vipkg.models.eight_schools()
    guide = Flow.neural_spline(model, layers=2, hidden=8)
    r = vipkg.fit(model, guide, vipkg.Reparam(), steps=20, num_particles=4, progress=False)
    assert torch.isfinite(r.losses).all()
    draws = r.sample(10)
    assert set(draws) == set(model.sites) and (draws["tau"] > 0).all()


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda m: Flow(m, "realnvp"), TypeError, "NormalizingFlow"),
        (lambda m: Flow(m, [nf.flows.AffineConstFlow((3,))]), ValueError, "5-dimensional"),
        (lambda m: Flow(m, [lambda z: (z, 0)]), TypeError, "not a torch Module"),
        (lambda m: Flow.real_nvp(m, permute="random"), ValueError, "permute"),
        (lambda m: Flow.real_nvp(m, layers=0), ValueError, "layers"),
        (lambda m: Flow.neural_spline(m, bins=1), ValueError, "bins"),
        (lambda m: Flow.real_nvp(vipkg.models.gaussian(dim=1)), ValueError, "MeanFieldNormal"),
    ],
)
def test_bad_arguments(make, err, match):
    model = vipkg.models.gaussian(dim=5)
    with pytest.raises(err, match=match):
        make(model)
