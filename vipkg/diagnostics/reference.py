"""Reference posteriors to check a fit against: exact where known, otherwise NUTS."""

from __future__ import annotations

import torch

from vipkg._rng import seeded

__all__ = ["reference_draws", "laplace"]


def reference_draws(model, n: int = 1000, *, method: str = "auto", warmup: int = 500, seed: int = 0):
    """Draws from the model's posterior as named constrained sites ``{site: Tensor[n, *shape]}``.

    Parameters
    ----------
    model : vipkg.Model
    n : int
        Number of draws.
    method : {"auto", "exact", "nuts"}
        ``"exact"`` uses a closed-form Gaussian posterior (``reference["mean"]`` and
        ``reference["cov"]`` over the flat unconstrained vector of an all-real model);
        ``"nuts"`` runs Pyro's NUTS on the model's Pyro program (``model.pyro_model``);
        ``"auto"`` takes the first that applies.
    warmup : int
        NUTS warm-up steps.
    seed : int

    Returns
    -------
    dict of str to Tensor, or None when no reference applies under ``"auto"``.

    References
    ----------
    .. [1] Hoffman, M. D., Gelman, A. "The No-U-Turn Sampler". JMLR 15 (2014).
    """
    if method not in ("auto", "exact", "nuts"):
        raise ValueError(f"method must be 'auto', 'exact' or 'nuts', got {method!r}.")
    ref = model.reference or {}
    exact_ok = "mean" in ref and "cov" in ref and model.is_continuous and model._identity
    if method == "exact" or (method == "auto" and exact_ok):
        if not exact_ok:
            raise ValueError(
                f"model {model.name!r} has no closed-form Gaussian reference; use method='nuts'."
            )
        mean = torch.as_tensor(ref["mean"], dtype=torch.float64)
        cov = torch.as_tensor(ref["cov"], dtype=torch.float64)
        with seeded(seed):
            u = torch.distributions.MultivariateNormal(mean, cov).sample((n,))
        return model.constrain(u)
    if model.pyro_model is None:
        if method == "nuts":
            raise ValueError(f"model {model.name!r} has no Pyro program to run NUTS on.")
        return None
    from pyro.infer import MCMC, NUTS

    fn, args, kwargs = model.pyro_model
    with seeded(seed):
        mcmc = MCMC(NUTS(fn), num_samples=n, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(*args, **kwargs)
    samples = mcmc.get_samples()
    return {k: samples[k].detach() for k in model.sites if k in samples}


def laplace(model, *, max_iter: int = 500, dtype=torch.float64):
    """The MAP point of the unconstrained log joint and the Laplace covariance there.

    L-BFGS (strong Wolfe line search) from the origin, then the inverse Hessian of
    ``-log p(x, u)`` at the optimum, both in the model's unconstrained space.

    Parameters
    ----------
    model : vipkg.Model
        Continuous (needs the unconstrained view).
    max_iter : int
    dtype : torch.dtype

    Returns
    -------
    (Tensor [dim], Tensor [dim, dim])
        The MAP point and the Laplace covariance.

    References
    ----------
    .. [1] MacKay, D. J. C. Information Theory, Inference, and Learning Algorithms,
       chapter 27 (2003).
    """
    x = torch.zeros(1, model.dim, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS(
        [x], max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        v = -model.log_joint_unconstrained(x).sum()
        v.backward()
        return v

    opt.step(closure)
    xmap = x.detach()[0]
    H = torch.autograd.functional.hessian(lambda z: -model.log_joint_unconstrained(z[None])[0], xmap)
    return xmap, torch.linalg.inv(H)
