"""Models with discrete latent sites: a Gaussian mixture with per-datum assignments, a sigmoid belief net.

Both expose their log joint split into terms (``Model.log_joint_terms``) so
score-function estimators can Rao-Blackwellize per datum. The mixture's tensor
form also accepts its assignments as (relaxed) one-hot vectors with a trailing
category dimension, which is what ``GumbelSoftmax`` hands it. Both have discrete
sites, so ``model.is_continuous`` is False and Gaussian guides refuse them: fit
them with ``Composite.auto(model)`` and its ``PerSite`` estimator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import check_form, normal_log_prob

__all__ = ["discrete_mixture", "sigmoid_belief_net"]

_MEANS = ((-3.0, -1.0), (3.0, -1.0), (0.0, 3.0))


def _mixture_data(n, k, sigma, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    if k <= len(_MEANS):
        means = torch.tensor(_MEANS[:k], dtype=torch.float64)
    else:
        angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = 3.5 * torch.stack([angle.cos(), angle.sin()], -1)
    c = torch.arange(n) % k
    x = means[c] + sigma * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x.to(dtype), means.to(dtype), c


def discrete_mixture(
    n: int = 150,
    k: int = 3,
    *,
    sigma: float = 0.6,
    prior_scale: float = 5.0,
    form: str = "tensor",
    seed: int = 0,
    dtype=None,
    enumerate: bool = False,
) -> Model:
    """A 2-D Gaussian mixture with ``k`` clusters and a categorical assignment per datum.

    ``mu_j ~ N(0, prior_scale^2 I)``, ``c_n ~ Categorical(1/k)``,
    ``x_n ~ N(mu_{c_n}, sigma^2 I)``; ``n`` synthetic points, an equal number per
    cluster, around well separated true means.

    Parameters
    ----------
    n, k : int
        Data points and clusters.
    sigma : float
        Known within-cluster standard deviation.
    prior_scale : float
    form : {"tensor", "pyro"}
        The tensor form also accepts ``c`` as a (relaxed) one-hot ``[S, n, k]``
        (for ``GumbelSoftmax``); the Pyro form takes integer assignments only.
    seed : int
    dtype : torch.dtype, optional
    enumerate : bool
        Sum the assignments ``c`` out exactly: the model has the site ``mu`` only (continuous, so
        every guide and estimator applies). The Pyro form enumerates ``c`` with Pyro's machinery
        (``Model.from_pyro(..., enumerate=["c"])``, whose ``model.enumeration`` gives the
        assignments' posterior marginals); the tensor form is the log-sum-exp over clusters.

    Returns
    -------
    Model
        Sites ``mu [k, 2]`` (real) and ``c [n]`` (``integer_interval(0, k-1)``; absent with
        ``enumerate=True``);
        ``reference = {"means": true means [k, 2], "assignments": [n]}``. The model
        has discrete sites, so ``model.is_continuous`` is False: fit it with a
        ``Composite`` guide (e.g. ``MeanFieldNormal`` + ``Reparam`` for ``mu``,
        ``Categorical`` + ``ScoreFunction`` for ``c``).

    References
    ----------
    .. [1] Bishop, C. M. Pattern Recognition and Machine Learning, section 9.2 (2006).
    .. [2] Blei, D. M., Kucukelbir, A., McAuliffe, J. D. "Variational Inference: A
       Review for Statisticians". JASA 112 (2017).
    """
    check_form(form)
    if not isinstance(n, int) or n < 1 or not isinstance(k, int) or k < 2:
        raise ValueError(f"discrete_mixture needs an int n >= 1 and an int k >= 2, got n={n!r}, k={k!r}.")
    if not (sigma > 0 and prior_scale > 0):
        raise ValueError(f"sigma and prior_scale must be positive, got {sigma!r} and {prior_scale!r}.")
    dtype = dtype or torch.get_default_dtype()
    x, means, c_true = _mixture_data(n, k, sigma, seed, dtype)
    reference = {"means": means, "assignments": c_true}
    sites = {
        "mu": Site(torch.Size([k, 2]), constraints.real),
        "c": Site(torch.Size([n]), constraints.integer_interval(0, k - 1)),
    }
    term_sites = {"mu": {"mu"}, "c": {"c"}, "x": {"mu", "c"}}
    s, sd = float(prior_scale), float(sigma)
    log_pi = -math.log(k)

    def terms(latents, data):
        mu, c, x = latents["mu"], latents["c"], data["x"]
        # [S, n, k]: every datum under every cluster; selecting after is cheaper than gathering means.
        ll = normal_log_prob(x[None, :, None, :] - mu[:, None, :, :], 0.0, sd).sum(-1)
        if c.is_floating_point() and c.dim() == 3:
            lik = (c * ll).sum(-1)
            prior_c = c.sum(-1) * log_pi
        else:
            lik = torch.gather(ll, -1, c.long().unsqueeze(-1)).squeeze(-1)
            prior_c = torch.full_like(lik, log_pi)
        return {"mu": normal_log_prob(mu, 0.0, s).reshape(mu.shape[0], -1).sum(-1), "c": prior_c, "x": lik}

    def log_joint(latents, data):
        t = terms(latents, data)
        return t["mu"] + t["c"].sum(-1) + t["x"].sum(-1)

    def pointwise(latents, data):
        return {"x": terms(latents, data)["x"]}

    if form == "pyro":
        options = {"enumerate": ["c"] if enumerate else False}
        model = Model.from_pyro(_pyro_mixture, x, k, sigma, prior_scale, name="discrete_mixture", **options)
        model.reference = reference
        return model
    if enumerate:

        def marginal(latents, data):
            mu, x = latents["mu"], data["x"]
            ll = normal_log_prob(x[None, :, None, :] - mu[:, None, :, :], 0.0, sd).sum(-1)
            prior = normal_log_prob(mu, 0.0, s).reshape(mu.shape[0], -1).sum(-1)
            return prior + torch.logsumexp(ll + log_pi, -1).sum(-1)

        return Model(
            {"mu": sites["mu"]},
            marginal,
            data={"x": x},
            name="discrete_mixture",
            reference=reference,
            pyro_model=(_pyro_mixture, (x, k, sigma, prior_scale), {}),
            observed={"x": x},
        )
    return Model(
        sites,
        log_joint,
        data={"x": x},
        name="discrete_mixture",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_mixture, (x, k, sigma, prior_scale), {}),
        observed={"x": x},
        log_joint_terms=terms,
        term_sites=term_sites,
    )


def _pyro_mixture(x, k, sigma, prior_scale):
    import pyro
    import pyro.distributions as dist
    from pyro.ops.indexing import Vindex

    mu = pyro.sample("mu", dist.Normal(0.0, prior_scale).expand([k, 2]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        c = pyro.sample("c", dist.Categorical(logits=torch.zeros(k, dtype=x.dtype)))
        pyro.sample("x", dist.Normal(Vindex(mu)[..., c, :], sigma).to_event(1), obs=x)


def _binarized_digits(n, dtype):
    from sklearn.datasets import load_digits

    X = torch.as_tensor(load_digits().data[:n], dtype=torch.float64) / 16.0
    return (X > 0.5).to(dtype)


def sigmoid_belief_net(
    n: int = 100,
    hidden: int = 8,
    *,
    prior_scale: float = 1.0,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """A Bayesian one-layer sigmoid belief net on binarized 8x8 scikit-learn digits.

    ``h_nj ~ Bernoulli(1/2)`` (``n x hidden`` binary latent units),
    ``W ~ N(0, prior_scale^2)`` (``hidden x 64``), ``b ~ N(0, prior_scale^2)`` (64),
    ``x_n ~ Bernoulli(sigmoid(h_n W + b))`` on the first ``n`` digits, pixels
    thresholded at half intensity. The data are bundled with scikit-learn.

    Parameters
    ----------
    n : int
        Number of digits (at most 1797).
    hidden : int
        Binary latent units per digit.
    prior_scale : float
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        Sites ``W [hidden, 64]``, ``b [64]`` (real) and ``h [n, hidden]``
        (``boolean``). ``model.is_continuous`` is False: fit it with a
        ``Composite`` guide (``Bernoulli`` + ``ScoreFunction`` for ``h``).

    References
    ----------
    .. [1] Neal, R. M. "Connectionist Learning of Belief Networks". Artificial
       Intelligence 56 (1992).
    .. [2] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in
       Belief Networks". ICML (2014).
    """
    check_form(form)
    if not isinstance(n, int) or not 1 <= n <= 1797:
        raise ValueError(f"sigmoid_belief_net: n must be an int in [1, 1797], got {n!r}.")
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"sigmoid_belief_net: hidden must be a positive int, got {hidden!r}.")
    dtype = dtype or torch.get_default_dtype()
    X = _binarized_digits(n, dtype)
    s = float(prior_scale)
    sites = {
        "W": Site(torch.Size([hidden, 64]), constraints.real),
        "b": Site(torch.Size([64]), constraints.real),
        "h": Site(torch.Size([n, hidden]), constraints.boolean),
    }
    term_sites = {"W": {"W"}, "b": {"b"}, "h": {"h"}, "x": {"W", "b", "h"}}

    def terms(latents, data):
        W, b, h, x = latents["W"], latents["b"], latents["h"], data["x"]
        logits = torch.bmm(h.to(W.dtype), W) + b[:, None, :]  # [S, n, 64]
        lik = (x * logits - F.softplus(logits)).sum(-1)
        S = W.shape[0]
        return {
            "W": normal_log_prob(W, 0.0, s).reshape(S, -1).sum(-1),
            "b": normal_log_prob(b, 0.0, s).sum(-1),
            # Bernoulli(1/2) per unit: entries [S, n, hidden] line up with h for Rao-Blackwellization.
            "h": torch.full(h.shape, -math.log(2.0), dtype=W.dtype, device=W.device),
            "x": lik,
        }

    def log_joint(latents, data):
        t = terms(latents, data)
        S = t["W"].shape[0]
        return sum(v.reshape(S, -1).sum(-1) for v in t.values())

    if form == "pyro":
        return Model.from_pyro(_pyro_sbn, X, hidden, prior_scale, name="sigmoid_belief_net")
    return Model(
        sites,
        log_joint,
        data={"x": X},
        name="sigmoid_belief_net",
        pointwise_log_likelihood=lambda latents, data: {"x": terms(latents, data)["x"]},
        pyro_model=(_pyro_sbn, (X, hidden, prior_scale), {}),
        observed={"x": X},
        log_joint_terms=terms,
        term_sites=term_sites,
    )


def _pyro_sbn(x, hidden, prior_scale):
    import pyro
    import pyro.distributions as dist

    W = pyro.sample("W", dist.Normal(0.0, prior_scale).expand([hidden, 64]).to_event(2))
    b = pyro.sample("b", dist.Normal(0.0, prior_scale).expand([64]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(0.5 * torch.ones(hidden, dtype=x.dtype)).to_event(1))
        logits = (h.unsqueeze(-1) * W).sum(-2) + b
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
