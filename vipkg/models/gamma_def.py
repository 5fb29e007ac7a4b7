"""The sparse gamma deep exponential family on scikit-learn's digits."""

from __future__ import annotations

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import check_form
from vipkg.models.conjugate import gamma_log_prob, poisson_log_prob

__all__ = ["sparse_gamma_def", "load_digits_counts"]


def load_digits_counts(n: int = 100, *, dtype=None) -> torch.Tensor:
    """The first ``n`` of scikit-learn's bundled 8x8 digits as pixel counts ``[n, 64]`` in 0..16."""
    from sklearn.datasets import load_digits

    X = load_digits().data
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= X.shape[0]:
        raise ValueError(
            f"n must be an int between 1 and {X.shape[0]} (images in the digits set), got {n!r}."
        )
    return torch.as_tensor(X[:n], dtype=dtype or torch.get_default_dtype())


def _mix(z, w):
    """``z @ w`` over the last two dims; ``w`` may carry a particle dim as ``[S, 1, ...]``."""
    return (z.unsqueeze(-1) * w).sum(-2)


def sparse_gamma_def(
    n: int = 100,
    K1: int = 5,
    K2: int = 3,
    *,
    alpha_w: float = 0.1,
    beta_w: float = 0.3,
    alpha_z: float = 0.1,
    beta_z: float = 0.1,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """Two-layer sparse gamma deep exponential family with a Poisson likelihood on digit pixels.

    ``w1 [K1, 64], w2 [K2, K1] ~ Gamma(alpha_w, beta_w)``;
    per image ``z2 [K2] ~ Gamma(alpha_z, beta_z)``,
    ``z1 [K1] ~ Gamma(alpha_z, alpha_z / (z2 @ w2))`` (so ``E[z1 | z2] = z2 @ w2``),
    ``x [64] ~ Poisson(z1 @ w1)``.

    Parameters
    ----------
    n : int
        Number of images (the first ``n`` of scikit-learn's bundled digits, pixel
        values 0..16 as counts).
    K1, K2 : int
        Widths of the bottom and top latent layers.
    alpha_w, beta_w, alpha_z, beta_z : float
        Gamma shapes and rates; shapes of 0.1 make the weights and codes sparse.
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        Positive sites ``w1``, ``w2`` (global) and ``z2 [n, K2]``, ``z1 [n, K1]``
        (per image). No closed-form reference.

    References
    ----------
    .. [1] Ranganath, R., Tang, L., Charlin, L., Blei, D. M. "Deep Exponential
       Families". AISTATS (2015).
    .. [2] Naesseth, C. A., Ruiz, F. J. R., Linderman, S. W., Blei, D. M.
       "Reparameterization Gradients through Acceptance-Rejection Sampling
       Algorithms". AISTATS (2017).
    """
    check_form(form)
    for name, v in (("K1", K1), ("K2", K2)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"sparse_gamma_def: {name} must be a positive int, got {v!r}.")
    for name, v in (("alpha_w", alpha_w), ("beta_w", beta_w), ("alpha_z", alpha_z), ("beta_z", beta_z)):
        if not float(v) > 0:
            raise ValueError(f"sparse_gamma_def: {name} must be > 0, got {v!r}.")
    dtype = dtype or torch.get_default_dtype()
    x = load_digits_counts(n, dtype=dtype)
    D = x.shape[1]
    hyper = {
        k: torch.tensor(float(v), dtype=dtype)
        for k, v in (("aw", alpha_w), ("bw", beta_w), ("az", alpha_z), ("bz", beta_z))
    }
    reference = {"data": "sklearn digits", "n": n}
    if form == "pyro":
        model = Model.from_pyro(
            _pyro_def, x, K1, K2, hyper["aw"], hyper["bw"], hyper["az"], hyper["bz"], name="sparse_gamma_def"
        )
        model.reference = reference
        return model

    def _lik(latents, data):
        return poisson_log_prob(data["x"], _mix(latents["z1"], latents["w1"].unsqueeze(1))).sum(-1)  # [S, n]

    def log_joint(latents, data):
        w1, w2, z2, z1 = latents["w1"], latents["w2"], latents["z2"], latents["z1"]
        aw, bw, az, bz = data["aw"], data["bw"], data["az"], data["bz"]
        lp = gamma_log_prob(w1, aw, bw).sum((-1, -2)) + gamma_log_prob(w2, aw, bw).sum((-1, -2))
        lp = lp + gamma_log_prob(z2, az, bz).sum((-1, -2))
        mean1 = _mix(z2, w2.unsqueeze(1))  # [S, n, K1]
        lp = lp + gamma_log_prob(z1, az, az / mean1).sum((-1, -2))
        return lp + _lik(latents, data).sum(-1)

    def pointwise(latents, data):
        return {"x": _lik(latents, data)}

    return Model(
        {
            "w1": Site(torch.Size([K1, D]), constraints.positive),
            "w2": Site(torch.Size([K2, K1]), constraints.positive),
            "z2": Site(torch.Size([n, K2]), constraints.positive),
            "z1": Site(torch.Size([n, K1]), constraints.positive),
        },
        log_joint,
        data={"x": x, **hyper},
        name="sparse_gamma_def",
        reference=reference,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_def, (x, K1, K2, hyper["aw"], hyper["bw"], hyper["az"], hyper["bz"]), {}),
        observed={"x": x},
    )


def _pyro_def(x, K1, K2, aw, bw, az, bz):
    import pyro
    import pyro.distributions as dist

    n, D = x.shape
    w1 = pyro.sample("w1", dist.Gamma(aw, bw).expand([K1, D]).to_event(2))
    w2 = pyro.sample("w2", dist.Gamma(aw, bw).expand([K2, K1]).to_event(2))
    with pyro.plate("data", n, dim=-1):
        z2 = pyro.sample("z2", dist.Gamma(az, bz).expand([K2]).to_event(1))
        # Under vipkg's particle plate w2 arrives as [S, 1, K2, K1]: _mix broadcasts it against [S, n, K2].
        z1 = pyro.sample("z1", dist.Gamma(az, az / _mix(z2, w2)).to_event(1))
        pyro.sample("x", dist.Poisson(_mix(z1, w1)).to_event(1), obs=x)
