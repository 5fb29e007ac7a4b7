"""Gumbel-softmax (Concrete) relaxation of categorical sites, with straight-through and annealing."""

from __future__ import annotations

import dataclasses
import math

import torch

from vipkg.estimators.base import Draw, Estimator, IncompatibleEstimatorError, Part, estimate_parts
from vipkg.objectives import ELBO

__all__ = ["GumbelSoftmax", "Anneal", "straight_through"]


@dataclasses.dataclass(frozen=True)
class Anneal:
    """Jang et al.'s schedule ``tau_t = max(min_temperature, tau_0 exp(-rate * t))``.

    ``t`` is the number of steps taken, rounded down to a multiple of ``every``
    (the paper updates the temperature every N steps).
    """

    rate: float
    min_temperature: float = 0.5
    every: int = 1

    def __post_init__(self):
        if not (isinstance(self.rate, (int, float)) and self.rate >= 0 and math.isfinite(self.rate)):
            raise ValueError(f"Anneal: rate must be a finite number >= 0, got {self.rate!r}.")
        if not (isinstance(self.min_temperature, (int, float)) and self.min_temperature > 0):
            raise ValueError(f"Anneal: min_temperature must be > 0, got {self.min_temperature!r}.")
        if not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"Anneal: every must be a positive int, got {self.every!r}.")


def straight_through(y: torch.Tensor) -> torch.Tensor:
    """Exact one-hot ``argmax y`` in the forward pass, the gradient of the soft ``y`` backwards."""
    hard = torch.nn.functional.one_hot(y.argmax(-1), y.shape[-1]).to(y.dtype)
    return hard - y.detach() + y


def concrete_rsample(logits: torch.Tensor, tau: float, shape=()) -> torch.Tensor:
    """Relaxed one-hot draws ``softmax((logits + Gumbel) / tau)`` of batch ``shape``.

    Written out rather than through ``RelaxedOneHotCategorical``, whose inner
    ``Categorical`` validates its arguments with ``if not valid.all()``: a host sync
    on every step.
    """
    shape = torch.Size(shape) + logits.shape
    tiny = torch.finfo(logits.dtype).tiny
    u = torch.rand(shape, dtype=logits.dtype, device=logits.device).clamp_(tiny, 1.0)
    gumbel = -torch.log(-torch.log(u))
    return torch.softmax((logits + gumbel) / tau, dim=-1)


def concrete_log_prob(y: torch.Tensor, logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Log density of the Concrete distribution (Maddison et al. 2017, eq. 3) at ``y`` on the simplex.

    ``log (K-1)! + (K-1) log tau + sum_k (log pi_k - (tau + 1) log y_k) - K log sum_k pi_k y_k^(-tau)``;
    equal to ``RelaxedOneHotCategorical(tau, logits=logits).log_prob(y)``.
    """
    K = logits.shape[-1]
    log_pi = torch.log_softmax(logits, dim=-1)
    log_y = torch.log(y)
    return (
        math.lgamma(K)
        + (K - 1) * math.log(tau)
        + (log_pi - (tau + 1) * log_y).sum(-1)
        - K * torch.logsumexp(log_pi - tau * log_y, dim=-1)
    )


class GumbelSoftmax(Estimator):
    """Pathwise gradient through Gumbel-softmax (Concrete) relaxations of categorical sites.

    Each categorical site with logits ``l [*shape, K]`` is drawn as
    ``y = softmax((l + g) / tau)``, ``g`` standard Gumbel
    (``torch.distributions.RelaxedOneHotCategorical.rsample``), and handed to the
    model as a one-hot vector ``[*shape, K]`` on the simplex. For a one-hot site
    (:class:`~vipkg.guides.discrete.OneHotCategorical` guide, Pyro's
    ``OneHotCategorical``) that is the site's own shape; for an integer site
    (:class:`~vipkg.guides.discrete.Categorical` guide) the model's log joint must
    accept one-hot values in its place, e.g. by writing
    ``log p(x_n | c_n) = sum_k y_nk log p(x_n | mu_k)``; the zoo mixture and the
    categorical models in :mod:`vipkg.models.mixture` do.

    Parameters
    ----------
    temperature : float
        ``tau_0``; the relaxation is exact as ``tau -> 0`` and the gradient's bias
        shrinks, while its variance grows.
    hard : bool
        Straight-through: the model sees exact one-hot ``argmax y``, gradients
        flow through the soft ``y`` (Jang et al., section 2.2).
    anneal : Anneal, optional
        Temperature schedule over steps; its state is checkpointed.
    kl : {"analytic", "relaxed"}
        ``"analytic"`` (default, as in Jang et al.'s experiments): the entropy
        term is the exact categorical entropy of the guide and the bound is the
        discrete ELBO with a relaxed reconstruction. ``"relaxed"`` (Maddison et
        al.): ``log q`` is the Concrete density
        ``RelaxedOneHotCategorical(tau, logits).log_prob(y)`` of the relaxed draw,
        so the bound is the ELBO of the relaxed model; the model's prior term is
        whatever it computes at ``y`` (write it as a Concrete density for
        Maddison et al.'s relaxed KL).

    Notes
    -----
    Works with a :class:`vipkg.guides.discrete.Categorical` or
    :class:`vipkg.guides.discrete.OneHotCategorical` guide covering every site, or
    as the estimator of such a part of a ``Composite`` guide. The estimate is
    biased for the discrete ELBO at any ``tau > 0``; the tests measure the bias
    falling with ``tau`` against the exact gradient by enumeration.

    The gradient reaches the logits only through terms of the log joint that are
    differentiable in ``y``. Pyro's ``OneHotCategorical.log_prob`` scores
    ``argmax y`` and passes no gradient to ``y``, so in a Pyro program the site's
    own prior drops out of the gradient (a non-uniform prior is ignored: write it
    as ``pyro.factor(name, (y * probs.log()).sum(-1))`` against a uniform
    ``OneHotCategorical``, or use ``ScoreFunction``); and it validates its support,
    so soft draws (``hard=False``) are refused unless the distribution is built
    with ``validate_args=False``. ``hard=True`` hands the model exact one-hot
    vectors.

    References
    ----------
    .. [1] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with
       Gumbel-Softmax". ICLR (2017).
    .. [2] Maddison, C. J., Mnih, A., Teh, Y. W. "The Concrete Distribution: A
       Continuous Relaxation of Discrete Random Variables". ICLR (2017).
    """

    #: A part estimator: it serves one categorical part of a Composite guide as well as a whole guide.
    composable = True

    def __init__(
        self, temperature: float = 1.0, hard: bool = False, anneal: Anneal | None = None, kl="analytic"
    ):
        if not (isinstance(temperature, (int, float)) and temperature > 0 and math.isfinite(temperature)):
            raise ValueError(
                f"GumbelSoftmax: temperature must be a positive finite number, got {temperature!r}."
            )
        if anneal is not None and not isinstance(anneal, Anneal):
            raise ValueError(
                f"GumbelSoftmax: anneal must be None or Anneal(rate, min_temperature), got {anneal!r}."
            )
        if kl not in ("analytic", "relaxed"):
            raise ValueError(f"GumbelSoftmax: kl must be 'analytic' or 'relaxed', got {kl!r}.")
        self.temperature0 = float(temperature)
        self.hard = bool(hard)
        self.anneal = anneal
        self.kl = kl
        self._t = 0

    def __repr__(self):
        return f"GumbelSoftmax(temperature={self.temperature0}, hard={self.hard}, kl={self.kl!r})"

    @property
    def temperature(self) -> float:
        """The temperature of the next step."""
        if self.anneal is None:
            return self.temperature0
        t = (self._t // self.anneal.every) * self.anneal.every
        return max(self.anneal.min_temperature, self.temperature0 * math.exp(-self.anneal.rate * t))

    def check(self, model, guide, objective) -> None:
        if not callable(getattr(guide, "site_logits", None)):
            raise IncompatibleEstimatorError(
                "GumbelSoftmax relaxes categorical sites and needs a Categorical or OneHotCategorical guide "
                f"(site_logits()), "
                f"got {type(guide).__name__}; use ScoreFunction for other discrete guides."
            )
        if self.kl == "analytic" and type(objective) is not ELBO:
            raise IncompatibleEstimatorError(
                f"GumbelSoftmax(kl='analytic') uses the exact entropy and needs the ELBO, got {objective!r}; "
                "use kl='relaxed' for IWAE / Renyi."
            )

    # ------------------------------------------------------------ part protocol
    def draw_latents(self, guide, shape):
        """Relaxed one-hot latents ``{site: Tensor[*shape, *site_shape, K]}`` and ``log q [*shape]``.

        With ``kl="analytic"`` the returned ``log q`` is minus the guide's exact
        entropy, broadcast to ``shape`` (its mean is the ELBO's ``E[log q]``).
        """
        shape = torch.Size(shape)
        tau = self.temperature
        latents, log_q = {}, 0.0
        for k, logits in guide.site_logits().items():
            y = concrete_rsample(logits, tau, shape)
            if self.kl == "relaxed":
                lp = concrete_log_prob(y, logits, tau)
                log_q = log_q + lp.reshape(*shape, -1).sum(-1)
            latents[k] = straight_through(y) if self.hard else y
        if self.kl == "analytic":
            ent = guide.entropy()
            log_q = (-ent).expand(shape)
        return latents, log_q

    def draw(self, guide, model, shape) -> Draw:
        """Relaxed (or straight-through) one-hot sites ``[N, *site_shape, K]`` and their ``log q``."""
        shape = torch.Size(shape)
        n = math.prod(shape)
        latents, log_q = self.draw_latents(guide, shape)
        flat = {k: v.reshape(n, *v.shape[len(shape) :]) for k, v in latents.items()}
        return Draw(flat, log_q.reshape(n))

    @property
    def functional(self) -> bool:
        # An annealed temperature changes between steps (a new compiled graph each time).
        return self.anneal is None

    def after_step(self) -> None:
        """Advance the annealing clock (called once per estimate)."""
        self._t += 1

    def estimate(self, model, guide, objective, num_particles):
        tau = self.temperature
        info = estimate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])
        info.extras["temperature"] = torch.tensor(tau)
        return info

    def state_dict(self) -> dict:
        return {"t": self._t}

    def load_state_dict(self, state: dict) -> None:
        self._t = int(state.get("t", 0))
