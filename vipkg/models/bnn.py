"""Bayesian neural-network regression on scikit-learn's bundled diabetes data."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import check_batch_size, check_form, minibatch, normal_log_prob

__all__ = ["bnn_regression", "load_regression"]

_LOG_2 = math.log(2.0)


def load_regression(dataset: str = "diabetes", *, dtype=None):
    """Standardized inputs ``X [N, D]`` and standardized targets ``y [N]``.

    ``"diabetes"``: scikit-learn's bundled diabetes data (Efron et al. 2004; 442
    patients, 10 baseline variables, disease progression after one year), loaded
    with ``scaled=False`` and standardized here; nothing is downloaded.
    """
    dtype = dtype or torch.get_default_dtype()
    if dataset != "diabetes":
        raise ValueError(f"unknown dataset {dataset!r}; use 'diabetes'.")
    from sklearn.datasets import load_diabetes

    raw = load_diabetes(scaled=False)
    X = torch.as_tensor(raw.data, dtype=torch.float64)
    y = torch.as_tensor(raw.target, dtype=torch.float64)
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-12)
    y = (y - y.mean()) / y.std()
    return X.to(dtype), y.to(dtype)


def bnn_regression(
    dataset: str = "diabetes",
    *,
    hidden: int = 8,
    prior_scale: float = 1.0,
    noise_prior_scale: float = 1.0,
    batch_size: int | None = None,
    form: str = "tensor",
    dtype=None,
) -> Model:
    """One-hidden-layer Bayesian neural network regression ``y ~ N(W2 . tanh(W1^T x + b1) + b2, sigma^2)``.

    Priors: every weight and bias ``N(0, prior_scale^2)``, the noise scale
    ``sigma ~ HalfNormal(noise_prior_scale)`` (on the standardized targets).

    Parameters
    ----------
    dataset : {"diabetes"}
        See :func:`load_regression` (bundled with scikit-learn).
    hidden : int
        Width of the hidden layer.
    prior_scale, noise_prior_scale : float
    batch_size : int, optional
        Minibatch size; the likelihood is scaled by ``N / batch_size``.
    form : {"tensor", "pyro"}
        Hand-written batched log density, or the same model as a Pyro program;
        they agree to float precision.

    Returns
    -------
    Model
        Sites ``W1 [D, hidden]``, ``b1 [hidden]``, ``W2 [hidden]``, ``b2 []`` (real)
        and ``sigma []`` (positive); per-datum log likelihoods for ``arviz.loo``.
        The posterior is multimodal (hidden units can be permuted and their signs
        flipped), so a Gaussian guide finds one mode.

    References
    ----------
    .. [1] Neal, R. M. Bayesian Learning for Neural Networks. Springer (1996).
    .. [2] Blundell, C., Cornebise, J., Kavukcuoglu, K., Wierstra, D. "Weight
       Uncertainty in Neural Networks". ICML (2015).
    .. [3] Efron, B., Hastie, T., Johnstone, I., Tibshirani, R. "Least Angle
       Regression". Annals of Statistics 32 (2004) (the diabetes data).
    """
    check_form(form)
    if not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}.")
    if not (prior_scale > 0 and noise_prior_scale > 0):
        raise ValueError(
            f"prior_scale and noise_prior_scale must be positive, got {prior_scale} and {noise_prior_scale}."
        )
    X, y = load_regression(dataset, dtype=dtype)
    N, D = X.shape
    check_batch_size(batch_size, N)
    name = f"bnn_regression[{dataset}]"
    args = (X, y, hidden, prior_scale, noise_prior_scale, batch_size)
    if form == "pyro":
        return Model.from_pyro(_pyro_bnn, *args, name=name)
    ps, ns = float(prior_scale), float(noise_prior_scale)

    def predict(latents, X):
        h = torch.tanh(X @ latents["W1"] + latents["b1"].unsqueeze(-2))  # [S, N, H]
        return (h @ latents["W2"].unsqueeze(-1)).squeeze(-1) + latents["b2"].unsqueeze(-1)  # [S, N]

    def log_joint(latents, data):
        X, y = data["X"], data["y"]
        idx, scale = minibatch(X.shape[0], batch_size, X.device)
        if idx is not None:
            X, y = X[idx], y[idx]
        sigma = latents["sigma"]
        ll = normal_log_prob(y, predict(latents, X), sigma.unsqueeze(-1)).sum(-1)
        prior = (
            normal_log_prob(latents["W1"], 0.0, ps).sum((-2, -1))
            + normal_log_prob(latents["b1"], 0.0, ps).sum(-1)
            + normal_log_prob(latents["W2"], 0.0, ps).sum(-1)
            + normal_log_prob(latents["b2"], 0.0, ps)
            + normal_log_prob(sigma, 0.0, ns)
            + _LOG_2
        )
        return prior + (ll if idx is None else scale * ll)

    def pointwise(latents, data):
        return {"y": normal_log_prob(data["y"], predict(latents, data["X"]), latents["sigma"].unsqueeze(-1))}

    real = constraints.real
    return Model(
        {
            "W1": Site(torch.Size([D, hidden]), real),
            "b1": Site(torch.Size([hidden]), real),
            "W2": Site(torch.Size([hidden]), real),
            "b2": Site(torch.Size([]), real),
            "sigma": Site(torch.Size([]), constraints.positive),
        },
        log_joint,
        data={"X": X, "y": y},
        name=name,
        pointwise_log_likelihood=pointwise,
        pyro_model=(_pyro_bnn, args, {}),
        observed={"y": y},
    )


def _pyro_bnn(X, y, hidden, prior_scale, noise_prior_scale, batch_size):
    import pyro
    import pyro.distributions as dist

    D = X.shape[-1]
    W1 = pyro.sample("W1", dist.Normal(0.0, prior_scale).expand([D, hidden]).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(0.0, prior_scale).expand([hidden]).to_event(1))
    W2 = pyro.sample("W2", dist.Normal(0.0, prior_scale).expand([hidden]).to_event(1))
    b2 = pyro.sample("b2", dist.Normal(0.0, prior_scale))
    sigma = pyro.sample("sigma", dist.HalfNormal(noise_prior_scale))
    with pyro.plate("data", X.shape[0], subsample_size=batch_size) as idx:
        # Under vipkg's particle plate W1 is [S, 1, D, H]: broadcasting X [N, D, 1]
        # against it keeps the data plate at dim -1 after the sums.
        h = torch.tanh((X[idx].unsqueeze(-1) * W1).sum(-2) + b1)
        mean = (h * W2).sum(-1) + b2
        pyro.sample("y", dist.Normal(mean, sigma), obs=y[idx])
