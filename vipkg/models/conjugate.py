"""Conjugate models with exact posteriors: Dirichlet-multinomial and Gamma-Poisson."""

from __future__ import annotations

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import check_form

__all__ = ["dirichlet_multinomial", "gamma_poisson", "gamma_log_prob", "poisson_log_prob"]


def gamma_log_prob(x: torch.Tensor, concentration, rate) -> torch.Tensor:
    """Elementwise log Gamma(x | concentration, rate), written out (no Distribution per call)."""
    a = torch.as_tensor(concentration, dtype=x.dtype, device=x.device)
    b = torch.as_tensor(rate, dtype=x.dtype, device=x.device)
    return torch.xlogy(a, b) + torch.xlogy(a - 1.0, x) - b * x - torch.lgamma(a)


def poisson_log_prob(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Elementwise log Poisson(x | rate) for float counts ``x``."""
    return torch.xlogy(x, rate) - rate - torch.lgamma(x + 1.0)


def _positive_vector(value, K, name, dtype):
    t = torch.as_tensor(value, dtype=torch.float64)
    if t.dim() == 0:
        t = t.expand(K)
    if t.shape != (K,):
        raise ValueError(f"{name} must be a scalar or have shape ({K},), got {tuple(t.shape)}.")
    if not bool((t > 0).all()) or not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite and strictly positive.")
    return t.clone()


def dirichlet_multinomial(
    K: int = 5,
    *,
    prior=1.0,
    counts=None,
    total_count: int = 50,
    seed: int = 0,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """Category probabilities under a Dirichlet prior: ``theta ~ Dir(prior)``, ``counts ~ Mult(N, theta)``.

    Parameters
    ----------
    K : int
        Number of categories (at least 2).
    prior : float or Tensor [K]
        Dirichlet prior concentration.
    counts : Tensor [K] of non-negative integers, optional
        Observed counts. Default: ``total_count`` draws from a multinomial whose
        probabilities are drawn from a Dirichlet(1) with a torch generator seeded
        with ``seed``.
    total_count : int
        Number of trials of the synthetic counts.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        One site ``theta`` on the simplex, shape ``[K]``. ``reference`` holds the
        exact posterior ``Dirichlet(concentration)`` with ``concentration = prior + counts``,
        its ``mean``, the ``prior``, the ``counts`` and the exact ``log_evidence``
        (the Dirichlet-multinomial marginal likelihood).

    References
    ----------
    .. [1] Gelman, A. et al. Bayesian Data Analysis, 3rd ed., section 3.4 (2013).
    """
    check_form(form)
    if isinstance(K, bool) or not isinstance(K, int) or K < 2:
        raise ValueError(f"dirichlet_multinomial needs K >= 2 categories (an int), got {K!r}.")
    dtype = dtype or torch.get_default_dtype()
    alpha0 = _positive_vector(prior, K, "prior", dtype)
    if counts is None:
        if isinstance(total_count, bool) or not isinstance(total_count, int) or total_count < 1:
            raise ValueError(f"total_count must be a positive int, got {total_count!r}.")
        g = torch.Generator().manual_seed(seed)
        p = torch._standard_gamma(torch.ones(K, dtype=torch.float64), generator=g)
        p = p / p.sum()
        counts = torch.bincount(torch.multinomial(p, total_count, replacement=True, generator=g), minlength=K)
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.shape != (K,) or bool((counts < 0).any()) or not torch.equal(counts, counts.round()):
        raise ValueError(f"counts must be {K} non-negative integers, got {counts.tolist()}.")
    N = float(counts.sum())
    post = alpha0 + counts
    log_coef = torch.lgamma(torch.tensor(N + 1.0, dtype=torch.float64)) - torch.lgamma(counts + 1.0).sum()
    log_evidence = (
        log_coef
        + torch.lgamma(alpha0.sum())
        - torch.lgamma(alpha0.sum() + N)
        + (torch.lgamma(post) - torch.lgamma(alpha0)).sum()
    )
    reference = {
        "concentration": post.to(dtype),
        "mean": (post / post.sum()).to(dtype),
        "prior": alpha0.to(dtype),
        "counts": counts.to(dtype),
        "log_evidence": float(log_evidence),
    }
    alpha0, counts = alpha0.to(dtype), counts.to(dtype)
    if form == "pyro":
        model = Model.from_pyro(
            _pyro_dirichlet_multinomial, alpha0, counts, int(N), name="dirichlet_multinomial"
        )
        model.reference = reference
        return model
    log_norm = float(torch.lgamma(alpha0.double().sum()) - torch.lgamma(alpha0.double()).sum())
    log_coef = float(log_coef)

    def _lik(theta, data):
        return torch.xlogy(data["counts"], theta).sum(-1) + log_coef

    def log_joint(latents, data):
        theta = latents["theta"]
        prior_lp = torch.xlogy(data["prior"] - 1.0, theta).sum(-1) + log_norm
        return prior_lp + _lik(theta, data)

    def pointwise(latents, data):
        return {"counts": _lik(latents["theta"], data)[:, None]}

    return Model(
        {"theta": Site(torch.Size([K]), constraints.simplex)},
        log_joint,
        data={"prior": alpha0, "counts": counts},
        name="dirichlet_multinomial",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_dirichlet_multinomial, (alpha0, counts, int(N)), {}),
        observed={"counts": counts},
    )


def _pyro_dirichlet_multinomial(prior, counts, total_count):
    import pyro
    import pyro.distributions as dist

    theta = pyro.sample("theta", dist.Dirichlet(prior))
    pyro.sample("counts", dist.Multinomial(total_count, probs=theta), obs=counts)


def gamma_poisson(
    n: int = 20,
    groups: int = 3,
    *,
    concentration: float = 2.0,
    rate: float = 1.0,
    seed: int = 0,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """Poisson rates per group under a Gamma prior: ``lam_g ~ Gamma(a, b)``, ``x_gi ~ Poisson(lam_g)``.

    Synthetic data from a torch generator seeded with ``seed``: true rates drawn
    from the prior, ``n`` counts per group.

    Parameters
    ----------
    n : int
        Counts per group.
    groups : int
        Number of independent rates.
    concentration, rate : float
        Gamma prior ``a``, ``b`` (rate parameterization, mean ``a / b``).
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        One positive site ``lam`` of shape ``[groups]``. ``reference`` holds the exact
        posterior ``Gamma(concentration, rate)`` per group (``a + sum_i x_gi``,
        ``b + n``), its ``mean``, the true rates ``lam_true`` and the exact
        ``log_evidence`` (a product of negative-binomial-type marginals).

    References
    ----------
    .. [1] Gelman, A. et al. Bayesian Data Analysis, 3rd ed., section 2.6 (2013).
    """
    check_form(form)
    for name, v in (("n", n), ("groups", groups)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"gamma_poisson: {name} must be a positive int, got {v!r}.")
    a, b = float(concentration), float(rate)
    if not (a > 0 and b > 0):
        raise ValueError(f"gamma_poisson: concentration and rate must be > 0, got {a}, {b}.")
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    lam_true = torch._standard_gamma(torch.full((groups,), a, dtype=torch.float64), generator=g) / b
    x = torch.poisson(lam_true[:, None].expand(groups, n), generator=g)  # [groups, n]
    sx = x.sum(-1)
    post_a, post_b = a + sx, torch.full((groups,), b + n, dtype=torch.float64)
    log_evidence = (
        a * torch.log(torch.tensor(b, dtype=torch.float64))
        - torch.lgamma(torch.tensor(a, dtype=torch.float64))
        + torch.lgamma(post_a)
        - post_a * torch.log(post_b)
        - torch.lgamma(x + 1.0).sum(-1)
    ).sum()
    reference = {
        "concentration": post_a.to(dtype),
        "rate": post_b.to(dtype),
        "mean": (post_a / post_b).to(dtype),
        "lam_true": lam_true.to(dtype),
        "log_evidence": float(log_evidence),
    }
    # Observations as [n, groups] so that the Pyro form's group plate is the rightmost dim.
    xT = x.T.contiguous().to(dtype)
    a_t, b_t = torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype)
    if form == "pyro":
        model = Model.from_pyro(_pyro_gamma_poisson, a_t, b_t, xT, name="gamma_poisson")
        model.reference = reference
        return model

    def log_joint(latents, data):
        lam = latents["lam"]  # [S, groups]
        ll = poisson_log_prob(data["x"], lam[:, None, :]).sum((-1, -2))
        return gamma_log_prob(lam, data["a"], data["b"]).sum(-1) + ll

    def pointwise(latents, data):
        lam = latents["lam"]
        return {"x": poisson_log_prob(data["x"], lam[:, None, :]).reshape(lam.shape[0], -1)}

    return Model(
        {"lam": Site(torch.Size([groups]), constraints.positive)},
        log_joint,
        data={"a": a_t, "b": b_t, "x": xT},
        name="gamma_poisson",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_gamma_poisson, (a_t, b_t, xT), {}),
        observed={"x": xT},
    )


def _pyro_gamma_poisson(a, b, xT):
    import pyro
    import pyro.distributions as dist

    with pyro.plate("groups", xT.shape[-1], dim=-1):
        lam = pyro.sample("lam", dist.Gamma(a, b))
        with pyro.plate("obs", xT.shape[0], dim=-2):
            pyro.sample("x", dist.Poisson(lam), obs=xT)
