"""Posterior marginals of the discrete sites an enumerated model sums out.

An enumerated model (:meth:`vipkg.Model.from_pyro` with sites marked for enumeration) has no guide
over its enumerated sites: given the other latents ``z``, their exact conditional posterior
``p(e | x, z)`` comes from the same tensor contraction that marginalizes them (Pyro's
``TraceEnum_ELBO.compute_marginals``). Averaged over guide draws ``z ~ q`` it is the variational
posterior marginal of each enumerated site.
"""

from __future__ import annotations

import torch

from vipkg._rng import seeded
from vipkg.model import ModelError

__all__ = ["enumerated_marginals"]


def _model_and_latents(result_or_model, guide, num_samples, seed):
    if guide is None:
        model, guide = result_or_model.model, result_or_model.guide
    else:
        model = result_or_model
    if getattr(model, "enumeration", None) is None:
        raise ModelError(
            f"model {getattr(model, 'name', model)!r} has no enumerated sites; enumerated_marginals needs a "
            "model built with Model.from_pyro(..., enumerate='auto' or [sites]) from a program with "
            "sites marked infer={'enumerate': 'parallel'}."
        )
    if getattr(guide, "is_empirical", False):
        latents = guide.constrain(model, guide.particles.detach())
    else:
        with torch.no_grad(), seeded(seed, getattr(guide, "device", None)):
            z = guide().sample((num_samples,))
        latents = guide.constrain(model, z)
    return model, {k: v.detach() for k, v in latents.items() if k in model.sites}


@torch.no_grad()
def enumerated_marginals(result_or_model, guide=None, num_samples: int = 1000, *, seed: int | None = 0):
    """Posterior probabilities of every value of every enumerated site, averaged over guide draws.

    Parameters
    ----------
    result_or_model : FitResult or Model
        A fit of an enumerated model, or the model itself (then pass ``guide``).
    guide : Guide, optional
        The guide, when ``result_or_model`` is a model.
    num_samples : int
        Guide draws to average over (a particle guide uses its particles).
    seed : int or None
        Seeds a forked RNG for the guide draws; the caller's stream is left as it was.

    Returns
    -------
    dict of str to Tensor
        ``{site: Tensor[*batch_shape, K]}``: ``E_q(z)[p(site = v_k | x, z)]`` for the ``K`` values of the
        site's support in their enumeration order (``0 .. K-1`` for Categorical, ``0, 1`` for Bernoulli).

    Notes
    -----
    For each guide draw ``z`` the conditional ``p(site | x, z)`` is exact: the enumerated factor graph
    is contracted down to the site's plates with its enumeration dimension kept, as Pyro's
    ``TraceEnum_ELBO.compute_marginals`` does. Posterior draws of the sites themselves (Pyro's
    ``infer_discrete``) are in ``model.enumeration.sample`` and in the ``posterior`` group of
    :meth:`FitResult.to_arviz`.

    References
    ----------
    .. [1] Obermeyer, F., Bingham, E., Jankowiak, M., Chiu, J., Pradhan, N., Rush, A., Goodman, N.
       "Tensor Variable Elimination for Plated Factor Graphs". ICML (2019).
    .. [2] Bingham, E. et al. "Pyro: Deep Universal Probabilistic Programming". JMLR 20 (2019).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"enumerated_marginals: num_samples must be a positive int, got {num_samples!r}.")
    model, latents = _model_and_latents(result_or_model, guide, num_samples, seed)
    probs = model.enumeration.marginals(latents, model.data)
    return {k: v.mean(0) for k, v in probs.items()}
