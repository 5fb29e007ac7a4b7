"""Sparse GP classification at fixed kernel hyper-parameters (whitened inducing values)."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import _HALF_LOG_2PI, check_batch_size, check_form, minibatch

__all__ = ["gp_classification", "load_classification", "rbf_kernel"]

DATASETS = ("moons", "breast_cancer")


def load_classification(dataset: str = "moons", *, n: int | None = None, seed: int = 0, dtype=None):
    """Standardized inputs ``X [N, D]`` and labels ``y [N]`` in {0, 1}, rows in a seeded random order.

    ``"moons"``: synthetic two interleaved half circles in 2-D (``n`` rows, default
    200, Gaussian noise 0.2), drawn from a torch generator seeded with ``seed``.
    ``"breast_cancer"``: scikit-learn's bundled Wisconsin diagnostic breast cancer
    data (569 rows, 30 features), nothing downloaded; ``n`` keeps the first ``n``
    rows of the seeded permutation. Shuffled rows let callers take the first rows
    as a training split and the rest as a held-out split.
    """
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    if dataset == "moons":
        n = 200 if n is None else n
        if not isinstance(n, int) or n < 2:
            raise ValueError(f"moons needs n >= 2 rows, got {n!r}.")
        t = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
        y = (torch.arange(n) % 2).to(torch.float64)
        upper = torch.stack([torch.cos(t), torch.sin(t)], -1)
        lower = torch.stack([1 - torch.cos(t), 0.5 - torch.sin(t)], -1)
        noise = 0.2 * torch.randn(n, 2, generator=g, dtype=torch.float64)
        X = torch.where(y[:, None] == 1, lower, upper) + noise
    elif dataset == "breast_cancer":
        from sklearn.datasets import load_breast_cancer

        raw = load_breast_cancer()
        X = torch.as_tensor(raw.data, dtype=torch.float64)
        y = torch.as_tensor(raw.target, dtype=torch.float64)
        if n is not None and (not isinstance(n, int) or not 2 <= n <= X.shape[0]):
            raise ValueError(
                f"breast_cancer has {X.shape[0]} rows; n must be an int in [2, {X.shape[0]}], got {n!r}."
            )
    else:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {DATASETS}.")
    perm = torch.randperm(X.shape[0], generator=g)
    if n is not None:
        perm = perm[:n]
    X, y = X[perm], y[perm]
    X = (X - X.mean(0)) / X.std(0).clamp_min(1e-12)
    return X.to(dtype), y.to(dtype)


def rbf_kernel(A: torch.Tensor, B: torch.Tensor, lengthscale: float, outputscale: float) -> torch.Tensor:
    """``outputscale * exp(-|a - b|^2 / (2 lengthscale^2))`` for rows of ``A [n, D]`` and ``B [m, D]``.

    References
    ----------
    .. [1] Rasmussen, C. E., Williams, C. K. I. Gaussian Processes for Machine Learning,
       eq. 4.9. MIT Press (2006).
    """
    d2 = (A.unsqueeze(-2) - B.unsqueeze(-3)).pow(2).sum(-1)
    return outputscale * torch.exp(-0.5 * d2 / lengthscale**2)


def gp_classification(
    dataset: str = "moons",
    *,
    n: int | None = None,
    num_inducing: int = 16,
    lengthscale: float | None = None,
    outputscale: float = 2.0,
    num_quadrature: int = 20,
    jitter: float = 1e-6,
    batch_size: int | None = None,
    form: str = "tensor",
    seed: int = 0,
    dtype=None,
) -> Model:
    """Sparse variational GP classification (probit) over whitened inducing values ``u``.

    The GP prior has zero mean and an RBF kernel with *fixed* ``lengthscale``
    (default ``sqrt(D)``) and ``outputscale``; the inducing inputs ``Z`` are the
    first ``num_inducing`` (shuffled) rows of ``X``. With ``K_ZZ = L L^T`` and
    ``A = L^{-1} K_ZX`` the log joint is the SVGP one (Hensman et al. 2015):
    ``log N(u; 0, I) + sum_i E_{N(f; A_i^T u, k_ii - |A_i|^2)}[log Phi((2 y_i - 1) f)]``,
    the expectation by ``num_quadrature``-point Gauss-Hermite quadrature. Any
    guide over ``u`` and any estimator then give a lower bound on the marginal
    likelihood of the sparse GP. :func:`vipkg.gp.SVGP` is the same model with
    learned hyper-parameters and inducing points, from a GPyTorch ``ApproximateGP``.

    Parameters
    ----------
    dataset : {"moons", "breast_cancer"}
        See :func:`load_classification` (synthetic 2-D, or bundled with scikit-learn).
    n : int, optional
        Number of rows.
    num_inducing : int
    lengthscale, outputscale : float
    num_quadrature : int
    jitter : float
        Added to the diagonal of ``K_ZZ`` and to the conditional variances.
    batch_size : int, optional
        Minibatch size; the likelihood is scaled by ``N / batch_size``.
    form : {"tensor"}
        ``"pyro"`` raises ``ValueError``: the inner expectation over ``p(f | u)``
        is the SVGP bound's Jensen step, not the density of a generative program,
        so there is no Pyro program whose log joint equals this one.
    seed : int
        Seed of the synthetic data and of the row order.

    Returns
    -------
    Model
        One site ``u`` of shape ``[num_inducing]``. ``reference`` holds the
        inputs ``Z`` and the kernel settings; ``data`` holds ``X``, ``y``.

    References
    ----------
    .. [1] Hensman, J., Matthews, A., Ghahramani, Z. "Scalable Variational Gaussian
       Process Classification". AISTATS (2015).
    .. [2] Wolberg, W. H., Street, W. N., Mangasarian, O. L. Breast Cancer Wisconsin
       (Diagnostic) data set, UCI (1995), as bundled with scikit-learn.
    """
    check_form(form)
    if form == "pyro":
        raise ValueError(
            "gp_classification has no Pyro form: its log joint holds E_{p(f|u)}[log p(y|f)], the "
            "sparse variational GP bound's inner expectation, which is not the density of any Pyro "
            "program. Use form='tensor', or vipkg.gp.SVGP for a GPyTorch model."
        )
    from vipkg.gp import gauss_hermite, log_ndtr

    dtype = dtype or torch.get_default_dtype()
    X, y = load_classification(dataset, n=n, seed=seed, dtype=torch.float64)
    N, D = X.shape
    if not isinstance(num_inducing, int) or not 1 <= num_inducing <= N:
        raise ValueError(
            f"num_inducing must be an int in [1, {N}] (the number of rows), got {num_inducing!r}."
        )
    check_batch_size(batch_size, N)
    ls = math.sqrt(D) if lengthscale is None else float(lengthscale)
    if not (ls > 0 and outputscale > 0 and jitter >= 0):
        raise ValueError(
            f"lengthscale and outputscale must be positive and jitter non-negative, got {ls}, "
            f"{outputscale}, {jitter}."
        )
    Z = X[:num_inducing]
    Kzz = rbf_kernel(Z, Z, ls, outputscale) + jitter * torch.eye(num_inducing, dtype=torch.float64)
    L = torch.linalg.cholesky(Kzz)
    # Fixed hyper-parameters: the conditional p(f | u) is precomputed once, in float64.
    A = torch.linalg.solve_triangular(L, rbf_kernel(Z, X, ls, outputscale), upper=False)
    var = (outputscale + jitter - A.pow(2).sum(0)).clamp_min(1e-10)
    nodes, weights = gauss_hermite(num_quadrature, torch.float64)
    M = num_inducing

    def log_joint(latents, data):
        u = latents["u"]
        A, std, sign = data["A"], data["std"], data["sign"]
        idx, scale = minibatch(A.shape[1], batch_size, A.device)
        if idx is not None:
            A, std, sign = A[:, idx], std[idx], sign[idx]
        mean = u @ A  # [S, B]
        f = mean.unsqueeze(-1) + std.unsqueeze(-1) * data["gh_nodes"]  # [S, B, J]
        ell = log_ndtr(sign.unsqueeze(-1) * f) @ data["gh_weights"]
        return -0.5 * u.pow(2).sum(-1) - M * _HALF_LOG_2PI + scale * ell.sum(-1)

    return Model(
        {"u": Site(torch.Size([M]), constraints.real)},
        log_joint,
        data={
            "X": X.to(dtype),
            "y": y.to(dtype),
            "A": A.to(dtype),
            "std": var.sqrt().to(dtype),
            "sign": (2 * y - 1).to(dtype),
            "gh_nodes": nodes.to(dtype),
            "gh_weights": weights.to(dtype),
        },
        name=f"gp_classification[{dataset}]",
        reference={"Z": Z.to(dtype), "lengthscale": ls, "outputscale": float(outputscale), "jitter": jitter},
        observed={"y": y.to(dtype)},
    )
