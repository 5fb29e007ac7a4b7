"""The zoo's enumerated models (``vipkg/models/enumerated.py``) and ``discrete_mixture(enumerate=True)``.

Each model's hand-written marginal (``form="tensor"``) equals its Pyro program with the discrete sites
summed out by vipkg's enumeration (``form="pyro"``), to 1e-7 relative in float64 (``test_zoo.py`` checks
the same for the registered models at their defaults; here at other sizes too); the capture-recapture
model also equals Pyro's own ``TraceEnum_ELBO`` on the registry's copy of Pyro's ``cjs.py::model_1``; the
Pyro forms' posterior marginals equal the tensor forms' responsibilities / forward-backward posteriors.
"""

from __future__ import annotations

import math

import pytest
import torch

import vipkg
from tests.helpers import assert_forms_agree
from vipkg.models import capture_recapture, discrete_mixture, gaussian_hmm, weighted_mixture


def _u(model, S=5, seed=0):
    return torch.randn(S, model.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: weighted_mixture(n=30, k=4, **kw),
        lambda **kw: gaussian_hmm(num_sequences=3, length=7, k=3, noise=1.5, **kw),
        lambda **kw: capture_recapture(**kw),
        lambda **kw: discrete_mixture(n=40, enumerate=True, **kw),
    ],
    ids=["weighted_mixture", "gaussian_hmm", "capture_recapture", "discrete_mixture"],
)
def test_tensor_and_enumerated_pyro_forms_agree(make):
    a, b = make(form="tensor", dtype=torch.float64), make(form="pyro", dtype=torch.float64)
    assert b.vectorization == "plate" and b.enumeration.sites
    assert a.is_continuous and b.is_continuous
    assert_forms_agree(a, b)


def test_capture_recapture_equals_pyro_traceenum_elbo():
    from pyro.infer import TraceEnum_ELBO
    from pyro.poutine import condition

    from tests.pyro_programs.programs import PROGRAMS, default_dtype
    from vipkg.models.enumerated import _pyro_cjs

    model = capture_recapture(dtype=torch.float64)
    with default_dtype(torch.float64):
        # The same dipper data as the Pyro-programs registry's copy of Pyro's example.
        fn, args, _ = next(p for p in PROGRAMS if p.name == "cjs_model_1").make()
    assert torch.equal(model.data["history"], args[0])
    phi = torch.tensor([0.55, 0.8, 0.3], dtype=torch.float64)
    rho = torch.tensor([0.9, 0.6, 0.45], dtype=torch.float64)
    got = model.log_joint({"phi": phi, "rho": rho})
    for i in range(3):
        values = {"phi": phi[i], "rho": rho[i]}
        ref = -TraceEnum_ELBO(max_plate_nesting=1).loss(
            condition(_pyro_cjs, data=values), lambda *a: None, args[0]
        )
        assert math.isclose(float(got[i]), ref, rel_tol=1e-9), (float(got[i]), ref)


def test_mixture_marginals_are_the_responsibilities():
    model = discrete_mixture(n=30, form="pyro", enumerate=True, dtype=torch.float64)
    mu = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 3
    probs = model.enumeration.marginals({"mu": mu}, model.data)["c"]
    x = model.data["x"]
    ll = torch.distributions.Normal(mu[:, None, :, :], 0.6).log_prob(x[None, :, None, :]).sum(-1)
    assert probs.shape == (4, 30, 3)
    assert torch.allclose(probs, torch.softmax(ll, -1), atol=1e-10)


def test_hmm_marginals_are_forward_backward_posteriors():
    model = gaussian_hmm(num_sequences=2, length=5, form="pyro", dtype=torch.float64)
    trans = torch.tensor([[[0.7, 0.3], [0.4, 0.6]]], dtype=torch.float64)
    locs = torch.tensor([[-1.0, 1.5]], dtype=torch.float64)
    probs = model.enumeration.marginals({"transition": trans, "locs": locs}, model.data)
    y = model.data["y"]
    em = torch.distributions.Normal(locs[0], 1.0).log_prob(y[..., None])  # [N, T, k]
    lt = trans[0].log()
    T = y.shape[1]
    alpha = [em[:, 0] - math.log(2)]
    for t in range(1, T):
        alpha.append(torch.logsumexp(alpha[-1][..., :, None] + lt, -2) + em[:, t])
    beta = [torch.zeros_like(alpha[0])]
    for t in range(T - 1, 0, -1):
        beta.insert(0, torch.logsumexp(lt + (em[:, t] + beta[0])[..., None, :], -1))
    for t in range(T):
        post = torch.softmax(alpha[t] + beta[t], -1)
        assert torch.allclose(probs[f"x_{t}"][0], post, atol=1e-10), t


def test_discrete_mixture_enumerate_option_fits():
    model = discrete_mixture(n=60, form="pyro", enumerate=True)
    result = vipkg.fit(
        model,
        vipkg.guides.MeanFieldNormal(model),
        vipkg.Reparam(),
        steps=200,
        lr=0.05,
        seed=0,
        progress=False,
    )
    marg = vipkg.diagnostics.enumerated_marginals(result, num_samples=100)["c"]
    # Well separated clusters: nearly every point is assigned with confidence after the fit.
    assert float((marg.max(-1).values > 0.9).double().mean()) > 0.9
