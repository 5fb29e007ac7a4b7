"""Shared checks: unbiasedness against an exact gradient, closed-form Gaussian ELBO."""

from __future__ import annotations

import math

import torch


def assert_unbiased(samples: dict, exact: dict, n_se: float = 4.0, atol: float = 1e-6) -> dict:
    """Every coordinate's sample mean is within ``n_se`` standard errors of ``exact``.

    Coordinates whose estimates never vary (exact zeros such as the upper triangle
    of a Cholesky factor) must equal the exact value within ``atol``. Returns the
    largest |z| per parameter so callers can report it.
    """
    worst = {}
    for name, g in samples.items():
        g = g.double()
        R = g.shape[0]
        mean = g.mean(0)
        se = g.std(0) / math.sqrt(R)
        ex = exact[name].double().to(mean.device)
        fixed = se < 1e-12
        assert torch.allclose(mean[fixed], ex[fixed], atol=atol), f"{name}: constant coordinates differ"
        z = ((mean - ex) / se)[~fixed].abs()
        worst[name] = float(z.max()) if z.numel() else 0.0
        assert worst[name] < n_se, (
            f"{name}: mean gradient deviates from the exact one by {worst[name]:.2f} standard errors "
            f"(limit {n_se}); mean={mean.flatten()[:6]}, exact={ex.flatten()[:6]}"
        )
    return worst


def random_gaussian_target(d: int = 5, seed: int = 3):
    """``vipkg.models.gaussian`` with a random, well-conditioned covariance, in float64."""
    import vipkg

    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    cov = A @ A.T / d + 0.5 * torch.eye(d, dtype=torch.float64)
    mean = torch.randn(d, generator=g, dtype=torch.float64)
    return vipkg.models.gaussian(mean, cov, dtype=torch.float64)


def guide_covariance(guide) -> torch.Tensor:
    if hasattr(guide, "covariance_matrix"):
        return guide.covariance_matrix
    if hasattr(guide, "scale_tril"):
        L = guide.scale_tril
        return L @ L.T
    return torch.diag_embed(guide.scale.pow(2))


def gaussian_elbo(guide, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """Closed-form ELBO of a Gaussian guide against the normalized target N(mean, cov),
    built from the guide's own ``loc`` / covariance properties (so it is differentiable
    in whatever raw parameters the guide uses)."""
    mu, C = guide.loc, guide_covariance(guide)
    d = mu.shape[0]
    prec = torch.linalg.inv(cov.to(C))
    diff = mu - mean.to(mu)
    cross = -0.5 * (torch.trace(prec @ C) + diff @ prec @ diff) - 0.5 * torch.logdet(2 * math.pi * cov.to(C))
    entropy = 0.5 * torch.logdet(C) + 0.5 * d * (1 + math.log(2 * math.pi))
    return cross + entropy


def exact_loss_gradient(guide, elbo: torch.Tensor) -> dict:
    names, params = zip(*guide.named_parameters())
    grads = torch.autograd.grad(-elbo, params, allow_unused=True)
    return {n: (torch.zeros_like(p) if g is None else g) for n, p, g in zip(names, params, grads)}


def exported_estimator_classes() -> list:
    """Every concrete Estimator class that ``vipkg.estimators`` exports."""
    import inspect

    from vipkg import estimators
    from vipkg.estimators import Estimator

    return [
        obj
        for name in estimators.__all__
        if inspect.isclass(obj := getattr(estimators, name))
        and issubclass(obj, Estimator)
        and obj is not Estimator
        and not inspect.isabstract(obj)
    ]


def assert_forms_agree(a, b, *, pointwise_required: bool = False) -> None:
    """A model's ``form="tensor"`` and ``form="pyro"`` (both float64) are the same model: sites,
    shapes, the unconstrained log joint at random points, and the per-datum log likelihoods."""
    assert list(a.sites) == list(b.sites)
    assert {k: s.shape for k, s in a.sites.items()} == {k: s.shape for k, s in b.sites.items()}
    u = torch.randn(6, a.dim, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # rtol 1e-7: Pyro builds scalar hyper-parameters such as HalfCauchy(5.0) as float32
    # tensors, which costs ~1e-9 relative even in a float64 run.
    assert torch.allclose(a.log_joint_unconstrained(u), b.log_joint_unconstrained(u), rtol=1e-7, atol=1e-8)
    pa, pb = a.pointwise_log_likelihood(a.constrain(u)), b.pointwise_log_likelihood(b.constrain(u))
    assert set(pa) == set(pb)
    assert pa or not pointwise_required
    for k in pa:
        assert pa[k].shape == pb[k].shape
        assert torch.allclose(pa[k], pb[k], atol=1e-8)
