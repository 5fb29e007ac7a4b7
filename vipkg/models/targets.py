"""Small analytic targets: Haario's banana (twisted Gaussian)."""

from __future__ import annotations

import torch
from torch.distributions import constraints

from vipkg.model import Model, Site
from vipkg.models._common import check_form, normal_log_prob

__all__ = ["banana", "banana_sample"]


def _check_banana(dim, scale, curvature):
    if not isinstance(dim, int) or dim < 2:
        raise ValueError(f"banana needs dim >= 2, got {dim!r}.")
    if not scale > 0:
        raise ValueError(f"banana needs scale > 0, got {scale!r}.")


def banana(
    dim: int = 2, *, scale: float = 10.0, curvature: float = 0.03, form: str = "tensor", dtype=None
) -> Model:
    """Haario's banana: ``x1 ~ N(0, scale^2)``, ``x2_1 ~ N(curvature (x1^2 - scale^2), 1)``, rest ``N(0, 1)``.

    A Gaussian ``N(0, diag(scale^2, 1, ...))`` pushed through the volume-preserving
    twist ``x2_1 -> x2_1 + curvature (x1^2 - scale^2)``, so the density is
    normalized and its moments are known. Synthetic: no data.

    Parameters
    ----------
    dim : int
        Total dimension (``x1`` plus ``dim - 1`` coordinates of ``x2``), at least 2.
    scale : float
        Standard deviation of ``x1`` (Haario et al.: 10).
    curvature : float
        Twist ``b`` (Haario et al.: 0.03 moderately, 0.1 strongly non-linear).
    form : {"tensor", "pyro"}

    Returns
    -------
    Model
        Sites ``x1 []`` and ``x2 [dim - 1]``. ``reference``: ``mean`` (zeros) and
        diagonal ``cov`` of the flat vector ``(x1, x2)``, with
        ``var(x2_1) = 1 + 2 curvature^2 scale^4``; ``log_evidence = 0``.

    References
    ----------
    .. [1] Haario, H., Saksman, E., Tamminen, J. "Adaptive Proposal Distribution for
       Random Walk Metropolis Algorithm". Computational Statistics 14 (1999).
    """
    check_form(form)
    _check_banana(dim, scale, curvature)
    dtype = dtype or torch.get_default_dtype()
    s, b = float(scale), float(curvature)
    var = torch.ones(dim, dtype=dtype)
    var[0] = s**2
    var[1] = 1 + 2 * b**2 * s**4
    reference = {"mean": torch.zeros(dim, dtype=dtype), "cov": torch.diag(var), "log_evidence": 0.0}
    if form == "pyro":
        # Tensor hyper-parameters keep Pyro's densities in the requested dtype (python
        # floats would become float32 scalars and cost ~1e-8 in a float64 run).
        st, bt = torch.tensor(s, dtype=dtype), torch.tensor(b, dtype=dtype)
        model = Model.from_pyro(_pyro_banana, dim, st, bt, name="banana")
        model.reference = reference
        return model

    def log_joint(latents, data):
        x1, x2 = latents["x1"], latents["x2"]
        twisted = x2[..., 0] - b * (x1.square() - s**2)
        return (
            normal_log_prob(x1, 0.0, s)
            + normal_log_prob(twisted, 0.0, 1.0)
            + normal_log_prob(x2[..., 1:], 0.0, 1.0).sum(-1)
        )

    return Model(
        {"x1": Site(torch.Size([]), constraints.real), "x2": Site(torch.Size([dim - 1]), constraints.real)},
        log_joint,
        name="banana",
        reference=reference,
        pyro_model=(_pyro_banana, (dim, s, b), {}),
    )


def banana_sample(
    n: int, dim: int = 2, *, scale: float = 10.0, curvature: float = 0.03, seed: int = 0, dtype=None
):
    """``n`` exact draws ``{"x1": [n], "x2": [n, dim - 1]}`` from :func:`banana`'s target.

    Draws come from a torch generator seeded with ``seed`` (the global RNG is not touched).

    References
    ----------
    .. [1] Haario, H., Saksman, E., Tamminen, J. "Adaptive Proposal Distribution for
       Random Walk Metropolis Algorithm". Computational Statistics 14 (1999).
    """
    _check_banana(dim, scale, curvature)
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.get_default_dtype()
    z = torch.randn(n, dim, generator=g, dtype=dtype)
    x1 = scale * z[:, 0]
    x2 = z[:, 1:].clone()
    x2[:, 0] += curvature * (x1.square() - scale**2)
    return {"x1": x1, "x2": x2}


def _pyro_banana(dim, scale, curvature):
    import pyro
    import pyro.distributions as dist

    x1 = pyro.sample("x1", dist.Normal(0.0, scale))
    first = torch.zeros(dim - 1, dtype=x1.dtype, device=x1.device)
    first[0] = 1.0
    loc = (curvature * (x1.square() - scale**2)).unsqueeze(-1) * first
    pyro.sample("x2", dist.Normal(loc, 1.0).to_event(1))
