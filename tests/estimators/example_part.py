"""A part estimator written outside the library: one class, no other code.

It shows the whole protocol a new part estimator needs: ``composable = True``, a
``check`` and a ``draw`` that returns a :class:`~vipkg.estimators.base.Draw`. It then
works on a single family (its ``estimate`` is the one-part builder) and per site in
a :class:`~vipkg.estimators.per_site.PerSite` with no further code.
"""

from __future__ import annotations

import torch

from vipkg.estimators.base import (
    Draw,
    Estimator,
    IncompatibleEstimatorError,
    Part,
    estimate_parts,
    named_latents,
)


class Antithetic(Estimator):
    """Pathwise gradient with antithetic noise: the second half of the groups reuses ``-eps``.

    Every draw is still marginally ``q``, so the average of the per-draw gradients is
    unbiased; pairing ``eps`` with ``-eps`` cancels the odd part of the integrand.
    For location-scale families with ``loc`` and ``scale`` (``MeanFieldNormal``).

    References
    ----------
    .. [1] Hammersley, J. M., Morton, K. W. "A New Monte Carlo Technique: Antithetic
       Variates". Mathematical Proceedings of the Cambridge Philosophical Society 52 (1956).
    """

    composable = True

    def check(self, model, guide, objective) -> None:
        if not (hasattr(guide, "loc") and hasattr(guide, "scale") and guide.unconstrained):
            raise IncompatibleEstimatorError(
                f"Antithetic needs a location-scale family over the unconstrained vector, got "
                f"{type(guide).__name__}."
            )

    def draw(self, guide, model, shape) -> Draw:
        shape = torch.Size(shape)
        loc, scale = guide.loc, guide.scale
        half = (shape[0] + 1) // 2
        eps = torch.randn(half, *shape[1:], loc.shape[-1], dtype=loc.dtype, device=loc.device)
        eps = torch.cat([eps, -eps])[: shape[0]]
        z = loc + scale * eps
        return Draw(*named_latents(guide, model, z, shape, guide().log_prob(z)))

    def estimate(self, model, guide, objective, num_particles):
        return estimate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])
