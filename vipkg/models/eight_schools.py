"""Rubin's eight schools: the standard hierarchical-model test case."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import check_form, normal_log_prob
from vipkg.models._reference import load_reference

__all__ = ["eight_schools", "EIGHT_SCHOOLS_Y", "EIGHT_SCHOOLS_SIGMA"]

#: estimated treatment effects and their standard errors (Rubin 1981)
EIGHT_SCHOOLS_Y = (28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0)
EIGHT_SCHOOLS_SIGMA = (15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0)


def eight_schools(centered: bool = False, *, form: str = "tensor", dtype=None) -> Model:
    """Eight schools: ``y_j ~ N(theta_j, sigma_j)``, ``theta_j ~ N(mu, tau)``.

    Priors ``mu ~ N(0, 5)``, ``tau ~ HalfCauchy(5)``. The non-centered form
    (default) has sites ``mu``, ``tau``, ``theta_tilde`` with
    ``theta = mu + tau * theta_tilde``; the centered form samples ``theta``
    directly and has a funnel-shaped posterior.

    Parameters
    ----------
    centered : bool
    form : {"tensor", "pyro"}
        Hand-written batched log density or the Pyro program; they agree.

    Returns
    -------
    Model
        ``reference`` holds long-run NUTS posterior means reported in the
        literature (``mu`` about 4.4, ``tau`` about 3.6), and the moments of a long
        NUTS run of vipkg's own target (``unconstrained_mean`` / ``unconstrained_sd``,
        ``site_mean`` / ``site_sd``, ``source``; see :mod:`vipkg.models.hard`).

    References
    ----------
    .. [1] Rubin, D. B. "Estimation in Parallel Randomized Experiments". Journal of
       Educational Statistics 6 (1981).
    .. [2] Gelman, A. et al. Bayesian Data Analysis, 3rd ed., section 5.5 (2013).
    """
    check_form(form)
    dtype = dtype or torch.get_default_dtype()
    y = torch.tensor(EIGHT_SCHOOLS_Y, dtype=dtype)
    sigma = torch.tensor(EIGHT_SCHOOLS_SIGMA, dtype=dtype)
    name = "eight_schools" + ("[centered]" if centered else "")
    reference = {"mu": 4.4, "tau": 3.6}
    # Both parameterizations share one NUTS run (drawn non-centred, where NUTS does not
    # diverge): the posterior over (mu, tau, theta) is the same.
    reference.update(load_reference("eight_schools_centered" if centered else "eight_schools", {}, dtype))
    if form == "pyro":
        model = Model.from_pyro(_pyro_eight_schools, y, sigma, centered, name=name)
        model.reference = reference
        return model
    local = "theta" if centered else "theta_tilde"
    log_half_cauchy_norm = math.log(2.0 / (math.pi * 5.0))

    def thetas(latents):
        mu, tau = latents["mu"][:, None], latents["tau"][:, None]
        return latents["theta"] if centered else mu + tau * latents["theta_tilde"]

    def log_joint(latents, data):
        mu, tau, loc = latents["mu"], latents["tau"], latents[local]
        lp = normal_log_prob(mu, 0.0, 5.0) + log_half_cauchy_norm - torch.log1p((tau / 5.0) ** 2)
        if centered:
            lp = lp + normal_log_prob(loc, mu[:, None], tau[:, None]).sum(-1)
        else:
            lp = lp + normal_log_prob(loc, 0.0, 1.0).sum(-1)
        return lp + normal_log_prob(data["y"], thetas(latents), data["sigma"]).sum(-1)

    def pointwise(latents, data):
        return {"y": normal_log_prob(data["y"], thetas(latents), data["sigma"])}

    return Model(
        {
            "mu": Site(torch.Size([]), constraints.real),
            "tau": Site(torch.Size([]), constraints.positive),
            local: Site(torch.Size([8]), constraints.real),
        },
        log_joint,
        data={"y": y, "sigma": sigma},
        name=name,
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_eight_schools, (y, sigma, centered), {}),
        observed={"y": y},
    )


def _pyro_eight_schools(y, sigma, centered):
    import pyro
    import pyro.distributions as dist

    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", 8):
        if centered:
            theta = pyro.sample("theta", dist.Normal(mu, tau))
        else:
            theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
            theta = mu + tau * theta_tilde
        pyro.sample("y", dist.Normal(theta, sigma), obs=y)
