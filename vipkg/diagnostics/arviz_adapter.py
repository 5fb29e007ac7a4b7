"""The one place vipkg talks to ArviZ.

ArviZ 0.23 (Python 3.11) builds ``InferenceData`` from dicts of arrays;
ArviZ >= 1.0 (Python >= 3.12) builds an xarray ``DataTree``. Everything else
in vipkg goes through :func:`to_arviz`, :func:`from_dict` and :func:`psislw`
so that the version split stays here.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from vipkg._rng import seeded

__all__ = ["to_arviz", "from_dict", "psislw"]


def _arviz():
    import arviz

    return arviz


def _major() -> int:
    return int(_arviz().__version__.split(".")[0])


def _np(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        return t.detach().cpu().double().numpy() if t.is_floating_point() else t.detach().cpu().numpy()
    return np.asarray(t)


def from_dict(groups: dict[str, dict[str, np.ndarray]], dims=None, coords=None):
    """``InferenceData`` (ArviZ 0.x) or ``DataTree`` (ArviZ 1.x) from ``{group: {var: array}}``.

    Arrays in the groups ``posterior``, ``sample_stats`` and ``log_likelihood``
    carry leading ``(chain, draw)`` dimensions; other groups are stored as given.
    """
    az = _arviz()
    with warnings.catch_warnings():
        # ArviZ warns about groups outside its schema (our optimisation trace) and
        # about a single chain; both are intended.
        warnings.simplefilter("ignore")
        if _major() >= 1:  # pragma: no cover - needs Python >= 3.12
            return az.from_dict(groups, dims=dims, coords=coords)
        sampled = {k: v for k, v in groups.items() if k in ("posterior", "sample_stats", "log_likelihood")}
        data = az.from_dict(
            posterior=sampled.get("posterior"),
            sample_stats=sampled.get("sample_stats"),
            log_likelihood=sampled.get("log_likelihood"),
            observed_data=groups.get("observed_data"),
            dims=dims,
            coords=coords,
        )
        import xarray as xr

        for name, variables in groups.items():
            if name in sampled or name == "observed_data" or not variables:
                continue
            ds = xr.Dataset({k: _as_dataarray(v) for k, v in variables.items()})
            data.add_groups({name: ds})
        return data


def _as_dataarray(v):
    import xarray as xr

    if isinstance(v, xr.DataArray):
        return v
    return xr.DataArray(np.asarray(v))


def psislw(log_weights: np.ndarray):
    """Pareto-smoothed log importance weights and the tail shape estimate k-hat.

    References
    ----------
    .. [1] Vehtari, A., Simpson, D., Gelman, A., Yao, Y., Gabry, J. "Pareto Smoothed
       Importance Sampling". JMLR 25 (2024).
    """
    az = _arviz()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _major() >= 1:  # pragma: no cover - needs Python >= 3.12
            import arviz_stats

            lw, k = arviz_stats.psislw(np.asarray(log_weights))
            return np.asarray(lw), float(k)
        lw, k = az.psislw(np.asarray(log_weights, dtype=float))
        return np.asarray(lw), float(k)


@torch.no_grad()
def to_arviz(result, n: int = 1000, seed: int | None = 0):
    """A :class:`~vipkg.fit.FitResult` as ArviZ data.

    Groups: ``posterior`` (``n`` guide draws as named constrained sites, and the model's
    deterministic quantities at them, one chain; for a particle guide the particles
    themselves, whatever ``n``),
    ``sample_stats`` (``log_p``, ``log_q``, ``log_weight`` and the normalized Pareto-smoothed
    ``psis_log_weight`` per draw; only ``log_p`` for particles),
    ``log_likelihood`` (when the model has per-datum terms), ``observed_data``
    (when known) and ``optimization`` (loss per step, gradient variance per
    recorded step, elapsed seconds, estimator name). For a model with local sites in
    subsampled plates, whose log joint exists per minibatch only, ``posterior``,
    ``observed_data`` and ``optimization``. For a model with enumerated sites
    (:meth:`vipkg.Model.from_pyro`), ``posterior`` also holds one draw of each enumerated site per
    guide draw (Pyro's ``infer_discrete``) and ``enumerated_marginals`` their probabilities
    averaged over the draws (:func:`vipkg.diagnostics.enumerated_marginals`).
    """
    model, guide = result.model, result.guide
    if model.is_subsampled:
        # The log joint of a model with local sites exists per minibatch only: export the draws.
        with seeded(seed, guide.device):
            draws = result.sample(n)
        groups = {"posterior": {k: _np(v)[None] for k, v in draws.items()}}
        if getattr(model, "observed", None):
            groups["observed_data"] = {k: _np(v) for k, v in model.observed.items()}
        groups["optimization"] = _optimization_group(result)
        return from_dict(groups)
    if getattr(guide, "is_empirical", False):
        # A particle approximation is its particles: export each one as a draw (``n`` is
        # ignored) and no log q, which point masses do not have.
        z = guide.particles.detach()
        log_p = guide.log_joint(model, z)
        latents = guide.constrain(model, z)
        stats = {"log_p": _np(log_p)[None]}
    else:
        with seeded(seed, guide.device):
            z, log_q = guide.sample_and_log_prob((n,))
        log_p = guide.log_joint(model, z)
        latents = guide.constrain(model, z)
        log_w = _np(log_p - log_q)
        stats = {"log_p": _np(log_p)[None], "log_q": _np(log_q)[None], "log_weight": log_w[None]}
        if n >= 100 and np.isfinite(log_w).all():  # PSIS needs a tail to fit
            smoothed, _ = psislw(log_w)
            stats["psis_log_weight"] = smoothed[None]
    posterior = {k: _np(v)[None] for k, v in latents.items()}
    posterior.update({k: _np(v)[None] for k, v in model.deterministic(latents).items()})
    groups = {"posterior": posterior, "sample_stats": stats}
    enumeration = getattr(model, "enumeration", None)
    if enumeration is not None:
        # Sites summed out of the log joint: one posterior draw each per guide draw (infer_discrete),
        # and their exact conditional marginals averaged over the guide draws.
        with seeded(seed, guide.device):
            posterior.update({k: _np(v)[None] for k, v in enumeration.sample(latents, model.data).items()})
        marginals = enumeration.marginals(latents, model.data)
        groups["enumerated_marginals"] = {k: _np(v.mean(0)) for k, v in marginals.items()}
    pointwise = model.pointwise_log_likelihood(latents)
    if pointwise:
        groups["log_likelihood"] = {k: _np(v)[None] for k, v in pointwise.items()}
    if getattr(model, "observed", None):
        groups["observed_data"] = {k: _np(v) for k, v in model.observed.items()}
    groups["optimization"] = _optimization_group(result)
    return from_dict(groups)


def _optimization_group(result) -> dict:
    import xarray as xr

    losses = _np(result.losses)
    out = {
        "loss": xr.DataArray(losses, dims=["step"], coords={"step": np.arange(len(losses))}),
        "elapsed": xr.DataArray(np.float64(result.elapsed)),
        "estimator": xr.DataArray(np.str_(result.estimator.name)),
        "objective": xr.DataArray(np.str_(repr(result.objective))),
    }
    diag = result.diagnostics or {}
    if diag.get("gradient_variance"):
        steps = np.asarray(diag["steps"])
        gv = diag["gradient_variance"]
        out["grad_trace"] = xr.DataArray(
            np.array([g.total_trace for g in gv]), dims=["diag_step"], coords={"diag_step": steps}
        )
        out["grad_mean_snr"] = xr.DataArray(
            np.array([g.mean_snr for g in gv]), dims=["diag_step"], coords={"diag_step": steps}
        )
        for name in gv[0].trace:
            out[f"grad_trace__{name}"] = xr.DataArray(
                np.array([g.trace[name] for g in gv]), dims=["diag_step"], coords={"diag_step": steps}
            )
    return out
