"""Gaussian VI in the Bures–Wasserstein space: FB-GVI (Diao et al. 2023) and BW-SGD (Lambert et al. 2022).

``FBGVI()`` and ``BWSGD()`` choose their step from the target's smoothness and adapt it
(see ``adaptive`` in :class:`FBGVI`); ``FBGVI(step_size)`` takes a fixed step.

Both estimators move a :class:`~vipkg.guides.FullRankNormal` ``q = N(m, Sigma)`` towards
``pi ∝ exp(-V)``, ``V(z) = -log p(x, z)`` in the model's unconstrained space, with
steps that own their update (no torch optimizer):

* forward (gradient) step on the potential: ``m <- m - eta E[grad V(X)]``,
  ``Sigma_half = M Sigma M`` with ``M = I - eta E[Hess V(X)]``;
* FB-GVI: backward (JKO) step on the entropy, in closed form,
  ``Sigma <- 1/2 (Sigma_half + 2 eta I + (Sigma_half (Sigma_half + 4 eta I))^{1/2})``;
* BW-SGD: one explicit step on both, ``Sigma <- M Sigma M`` with ``M = I - eta (E[Hess V] - Sigma^{-1})``.

Their :meth:`estimate` writes the Euclidean gradient of minus the ELBO into
``.grad`` (Bonnet's and Price's theorems), so the variance diagnostics show the
noise of the very direction the steps follow.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo, surrogate_backward
from vipkg.guides.gaussian import FullRankNormal
from vipkg.objectives import ELBO

__all__ = ["FBGVI", "BWSGD", "smoothness_constant", "smoothness_step_size"]

_HESSIAN_MODES = ("autograd", "stein")
_EXPECTATIONS = ("sample", "mean")
# Entries of the [rows, S, d] block of Hessian rows built per batched backward pass;
# bounds memory at large d * S without a Python loop per particle.
_HESSIAN_CHUNK_ENTRIES = 1 << 22
# The adaptive step never exceeds _CAP * safety / L (L: the largest |eigenvalue| of E_q[Hess V] now):
# 2 / L with the default safety, where BW-SGD's explicit step is still stable for a Gaussian target.
# A cap at 1 / L halved the progress on centred eight schools; none at all diverged on the funnel.
_CAP = 4.0


# --------------------------------------------------------------------------- derivatives of V
def _hessian_rows(g: torch.Tensor, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``[r, S, d]`` rows ``H_s[i, :]`` for ``i`` in ``rows`` of every particle's Hessian.

    ``g = grad V`` per particle ``[S, d]``; each particle's gradient depends on its own
    ``x`` only, so one vector-Jacobian product with ``e_i`` in every particle slot gives
    row ``i`` of all ``S`` Hessians at once.
    """
    S, d = x.shape
    basis = torch.zeros(rows.numel(), S, d, dtype=x.dtype, device=x.device)
    basis[torch.arange(rows.numel(), device=x.device), :, rows] = 1.0
    try:
        (out,) = torch.autograd.grad(g, x, basis, retain_graph=True, is_grads_batched=True)
    except RuntimeError:
        # Some log densities (e.g. Pyro programs) have ops without a vmap rule:
        # fall back to one backward pass per row (a loop over dimensions, not particles).
        out = torch.stack([torch.autograd.grad(g, x, b, retain_graph=True)[0] for b in basis])
    return out


def _potential(model, x: torch.Tensor, hessian: bool):
    """``V [S]``, ``grad V [S, d]`` and (if asked) per-particle Hessians ``[S, d, d]`` at ``x [S, d]``."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        V = -model.log_joint_unconstrained(x)
        (g,) = torch.autograd.grad(V.sum(), x, create_graph=hessian)
        if not hessian:
            return V.detach(), g.detach(), None
        S, d = x.shape
        if not g.requires_grad:  # V affine in x: its Hessian is zero
            return V.detach(), g.detach(), x.new_zeros(S, d, d)
        chunk = max(1, _HESSIAN_CHUNK_ENTRIES // (S * d))
        idx = torch.arange(d, device=x.device)
        H = torch.cat([_hessian_rows(g, x, idx[i : i + chunk]) for i in range(0, d, chunk)], dim=0)
    H = H.detach().transpose(0, 1)  # [S, d(row), d(col)]
    return V.detach(), g.detach(), 0.5 * (H + H.transpose(-1, -2))


@dataclasses.dataclass
class _Moments:
    """Monte Carlo (or point) estimates of ``E_q[grad V]`` and ``E_q[Hess V]`` plus the loss."""

    grad: torch.Tensor  # [d]
    hess: torch.Tensor  # [d, d], symmetric
    loss: torch.Tensor  # scalar, minus the ELBO estimate
    log_weights: torch.Tensor  # [S, 1]
    eps: torch.Tensor | None = None  # [S, d] standard-normal noise of the draws (None: at the mean)
    V: torch.Tensor | None = None  # [S] potential at the draws (at the mean for expectation="mean")
    H: torch.Tensor | None = None  # [S, d, d] per-draw Hessians (autograd mode)
    z: torch.Tensor | None = None  # [S, d]
    g: torch.Tensor | None = None  # [S, d] per-draw grad V


def _gaussian_entropy(L: torch.Tensor) -> torch.Tensor:
    d = L.shape[-1]
    return L.diagonal().log().sum() + 0.5 * d * (1.0 + math.log(2 * math.pi))


# ----------------------------------------------------------------------------- the estimators
class _BuresWasserstein(Estimator):
    """Shared machinery: moments of V's derivatives under q, the gradient surrogate, the in-place write."""

    #: owns its step (moves the Gaussian in the Bures-Wasserstein space): not composable per site
    composable = False

    def __init__(
        self,
        step_size: float | None = None,
        *,
        hessian: str = "autograd",
        num_samples: int | None = None,
        expectation: str = "sample",
        adaptive: bool | None = None,
        safety: float = 0.5,
        grow: float = 1.1,
        shrink: float = 0.5,
    ):
        name = type(self).__name__
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, (int, float)):
                raise ValueError(
                    f"{name}: step_size must be a positive number or None (chosen from the target), "
                    f"got {step_size!r}."
                )
            if not (math.isfinite(step_size) and step_size > 0):
                raise ValueError(
                    f"{name}: step_size must be a positive finite number, got {step_size!r}; "
                    "about 1/L works, where L bounds V's Hessian (see smoothness_step_size), or leave "
                    "it out to have it chosen from the target."
                )
        if adaptive is None:
            adaptive = step_size is None
        if not isinstance(adaptive, bool):
            raise ValueError(f"{name}: adaptive must be True, False or None, got {adaptive!r}.")
        if not adaptive and step_size is None:
            raise ValueError(
                f"{name}: adaptive=False needs a step_size; leave adaptive out to have the step chosen "
                "from the target and adapted."
            )
        for label, value, lo, hi in (("safety", safety, 0.0, math.inf), ("grow", grow, 1.0, math.inf)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo < value < hi:
                raise ValueError(f"{name}: {label} must be a number above {lo:g}, got {value!r}.")
        if isinstance(shrink, bool) or not isinstance(shrink, (int, float)) or not 0 < shrink < 1:
            raise ValueError(f"{name}: shrink must be a number in (0, 1), got {shrink!r}.")
        if hessian not in _HESSIAN_MODES:
            raise ValueError(f"{name}: unknown hessian mode {hessian!r}; use one of {_HESSIAN_MODES}.")
        if expectation not in _EXPECTATIONS:
            raise ValueError(
                f"{name}: unknown expectation {expectation!r}; use 'sample' (Monte Carlo over q) or "
                "'mean' (derivatives at the mean: exact for a quadratic V)."
            )
        if expectation == "mean" and hessian == "stein":
            raise ValueError(
                f"{name}: expectation='mean' evaluates V's derivatives at one point, where Stein's "
                "identity has no draws to average over; use hessian='autograd' with it."
            )
        if num_samples is not None and (
            isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1
        ):
            raise ValueError(
                f"{name}: num_samples must be a positive int (draws per step) or None (use the "
                f"caller's num_particles), got {num_samples!r}."
            )
        self.step_size = None if step_size is None else float(step_size)
        self.hessian = hessian
        self.num_samples = num_samples
        self.expectation = expectation
        self.adaptive = adaptive
        self.safety = float(safety)
        self.grow = float(grow)
        self.shrink = float(shrink)
        # On-device state of the adaptive rule (a 0-d tensor each, created at the first step on the
        # guide's device): the current step, and how many proposed steps were accepted / rejected.
        self._eta: torch.Tensor | None = None
        self._accepted: torch.Tensor | None = None
        self._rejected: torch.Tensor | None = None

    def __repr__(self) -> str:
        extra = f", num_samples={self.num_samples}" if self.num_samples is not None else ""
        if self.expectation != "sample":
            extra += f", expectation={self.expectation!r}"
        if self.adaptive and self.step_size is not None:
            extra += ", adaptive=True"
        step = "None" if self.step_size is None else f"{self.step_size:g}"
        return f"{self.name}(step_size={step}, hessian={self.hessian!r}{extra})"

    # ------------------------------------------------------------------ step-size state
    @property
    def current_step_size(self) -> float | None:
        """The step the next :meth:`step` takes (reads the device; ``None`` before the first step
        of an adaptive run, whose step is then chosen from the target)."""
        if not self.adaptive:
            return self.step_size
        return None if self._eta is None else float(self._eta)

    @property
    def step_counts(self) -> dict[str, int]:
        """Accepted and rejected proposals of the adaptive rule so far (reads the device)."""
        if self._accepted is None:
            return {"accepted": 0, "rejected": 0}
        return {"accepted": int(self._accepted), "rejected": int(self._rejected)}

    def state_dict(self) -> dict:
        if not self.adaptive or self._eta is None:
            return {}
        return {
            "eta": self._eta.clone(),
            "eta_min": self._eta_min.clone(),
            "accepted": self._accepted.clone(),
            "rejected": self._rejected.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self._eta = self._accepted = self._rejected = None
            return
        self._eta = state["eta"].clone()
        self._eta_min = state["eta_min"].clone()
        self._accepted = state["accepted"].clone()
        self._rejected = state["rejected"].clone()

    # ------------------------------------------------------------------ protocol
    def check(self, model, guide, objective) -> None:
        if not isinstance(guide, FullRankNormal):
            raise IncompatibleEstimatorError(
                f"{self.name} moves a Gaussian N(m, Sigma) with a dense covariance in the "
                f"Bures-Wasserstein space, but got a {type(guide).__name__} guide. Use "
                f"FullRankNormal(model), or Reparam for other families."
            )
        if not isinstance(objective, ELBO) or objective.k != 1:
            raise IncompatibleEstimatorError(
                f"{self.name} minimises KL(q || p), i.e. maximises the ELBO, but got objective "
                f"{objective!r}. Use ELBO(), or Reparam for IWAE/Renyi bounds."
            )

    def _moments(self, model, guide, num_particles: int) -> _Moments:
        L = guide.scale_tril.detach()
        m = guide.loc.detach()
        if self.expectation == "mean":
            V, g, H = _potential(model, m.unsqueeze(0), hessian=True)
            grad, hess = g[0], H[0]
            # Second-order (delta-method) E_q[V]: exact when V is quadratic.
            expected_V = V[0] + 0.5 * (hess * (L @ L.T)).sum()
            loss = expected_V - _gaussian_entropy(L)
            return _Moments(grad, hess, loss, (-loss).reshape(1, 1), V=V, H=H, z=m.unsqueeze(0), g=g)
        S = self.num_samples if self.num_samples is not None else num_particles
        with torch.no_grad():
            z, log_q = guide.rsample_and_log_prob((S,))
        V, g, H = _potential(model, z, hessian=self.hessian == "autograd")
        grad = g.mean(0)
        if self.hessian == "autograd":
            hess = H.mean(0)
        else:
            # Stein: E[Hess V] = E[Sigma^{-1} (X - m) grad V(X)^T]; needs only gradients.
            # E[Sigma^{-1}(X - m)] = 0, so subtracting from g_s the mean of the *other*
            # draws' gradients (independent of X_s) keeps it unbiased and removes the
            # large E[grad V] term that otherwise dominates the noise far from the mode.
            w = torch.cholesky_solve((z - m).T, L)  # [d, S]
            if S > 1:
                hess = (w @ g * S - w.sum(1, keepdim=True) * g.sum(0)) / (S * (S - 1))
            else:
                hess = w @ g
            hess = 0.5 * (hess + hess.T)
        log_w = -V - log_q
        eps = torch.linalg.solve_triangular(L, (z - m).T, upper=False).T
        return _Moments(grad, hess, -log_w.mean(), log_w.unsqueeze(-1), eps=eps, V=V, H=H, z=z, g=g)

    def estimate(self, model, guide, objective, num_particles: int) -> StepInfo:
        """Write an unbiased estimate of the gradient of minus the ELBO into the guide's ``.grad``.

        ``dLoss/dm = E[grad V]`` (Bonnet) and ``dLoss/dSigma = (E[Hess V] - Sigma^{-1}) / 2``
        (Price); autograd chains them into ``loc`` and the factor's parameters. Unbiased for
        ``expectation='sample'``; with ``'mean'`` it is exact for quadratic V only.
        """
        mom = self._moments(model, guide, num_particles)
        L = guide.scale_tril
        G_sigma = 0.5 * (mom.hess - torch.cholesky_inverse(L.detach()))
        surrogate = (mom.grad * guide.loc).sum() + (G_sigma * (L @ L.T)).sum()
        loss = mom.loss + (surrogate - surrogate.detach())
        surrogate_backward(guide, loss)
        return StepInfo(loss=mom.loss, log_weights=mom.log_weights)

    def step(self, model, guide, objective, num_particles: int, optimizer=None) -> StepInfo:
        """One Bures–Wasserstein step written into the guide in place; ``optimizer`` is ignored.

        With a fixed step (``step_size`` given, ``adaptive`` off) the step is always taken.
        Adaptive (the default without ``step_size``): the proposal is scored against the current
        Gaussian with the same standard-normal noise (common random numbers), and is taken when the
        ELBO estimate is finite and not significantly worse; otherwise the Gaussian stays and the
        step shrinks. Every decision is a ``torch.where`` on device: no host reads.

        ``StepInfo.loss`` is minus the ELBO estimate of the draws used, before the update.
        """
        mom = self._moments(model, guide, num_particles)
        with torch.no_grad():
            L = guide.scale_tril
            m = guide.loc
            if not self.adaptive:
                eta = self.step_size
                guide.loc.copy_(m - eta * mom.grad)
                guide.set_scale_tril(self._covariance_step(L, mom.hess, eta))
                return StepInfo(loss=mom.loss, log_weights=mom.log_weights)
            # Overflow far in a tail gives non-finite derivatives: such a step is refused (the step
            # shrinks), and zeros stand in so that no linear-algebra kernel sees a NaN.
            finite = torch.isfinite(mom.grad).all() & torch.isfinite(mom.hess).all()
            mom.grad = torch.where(finite, mom.grad, torch.zeros_like(mom.grad))
            mom.hess = torch.where(finite, mom.hess, torch.zeros_like(mom.hess))
            if mom.H is not None:
                mom.H = torch.where(torch.isfinite(mom.H), mom.H, torch.zeros_like(mom.H))
            mom.g = torch.where(torch.isfinite(mom.g), mom.g, torch.zeros_like(mom.g))
            curvature = self._curvature(mom, L)
            if self._eta is None:
                self._init_state(curvature, L)
            # Never step beyond _CAP * safety / L of the curvature seen now: the test on fresh draws
            # alone let an ever-growing step through on the funnel (a few heavy-tailed draws decide
            # a proposal's fate there), so the target's smoothness bounds the growth.
            eta = torch.minimum(self._eta, _CAP * self.safety / curvature)
            loc_new = m - eta * mom.grad
            L_new = self._covariance_step(L, mom.hess, eta)
            ok = finite & self._accept(model, mom, m, L, loc_new, L_new)
            guide.loc.copy_(torch.where(ok, loc_new, m))
            guide.set_scale_tril(torch.where(ok, L_new, L))
            self._eta = torch.where(ok, eta * self.grow, eta * self.shrink).clamp_min(self._eta_min)
            self._accepted = self._accepted + ok.to(self._accepted.dtype)
            self._rejected = self._rejected + (~ok).to(self._rejected.dtype)
        return StepInfo(loss=mom.loss, log_weights=mom.log_weights)

    def _curvature(self, mom: _Moments, L: torch.Tensor) -> torch.Tensor:
        """A local smoothness estimate (0-d tensor): the largest ``|eigenvalue|`` of the averaged
        Hessian ``E_q[Hess V]`` and, in Stein mode (whose Hessian estimate is noisy), of the largest
        secant ``|g_s - g_t| / |x_s - x_t|`` between the draws' gradients. The per-draw Hessians'
        maximum was tried: on funnels it is set by the sharpest draw and stalls the step."""
        tiny = torch.finfo(L.dtype).tiny
        L_hat = torch.linalg.eigvalsh(mom.hess).abs().amax()
        if mom.H is None and mom.z.shape[0] > 1:
            dz = torch.cdist(mom.z, mom.z)
            dg = torch.cdist(mom.g, mom.g)
            off = ~torch.eye(dz.shape[0], dtype=torch.bool, device=dz.device)
            secant = torch.where(off & (dz > 0), dg / dz.clamp_min(tiny), torch.zeros_like(dz))
            L_hat = torch.maximum(L_hat, secant.amax())
        # A zero curvature (V affine) leaves the step to the adaptive rule.
        return L_hat.clamp_min(tiny)

    def _init_state(self, curvature: torch.Tensor, L: torch.Tensor) -> None:
        start = self.step_size if self.step_size is not None else self.safety / curvature
        self._eta = torch.as_tensor(start, dtype=L.dtype, device=L.device).clone()
        # 1e-8 of the first choice: a floor so that a run of rejections cannot underflow the step.
        self._eta_min = self._eta * 1e-8
        self._accepted = torch.zeros((), dtype=torch.long, device=L.device)
        self._rejected = torch.zeros((), dtype=torch.long, device=L.device)

    def _accept(self, model, mom: _Moments, m, L, loc_new, L_new) -> torch.Tensor:
        """Whether the proposal ``N(loc_new, L_new L_new^T)`` is no worse than ``N(m, L L^T)``: a bool
        0-d tensor. Both are scored on the same noise, so the difference of the two ELBO
        estimates has far less variance than either; "worse" means by more than two standard
        errors of that difference, or half a nat (a strict decrease would refuse half the steps at
        the optimum and let the step decay to nothing)."""
        dH = L_new.diagonal().log().sum() - L.diagonal().log().sum()
        if mom.eps is None:  # expectation="mean": the same second-order model of E_q[V] at the new mean
            V_new = -model.log_joint_unconstrained(loc_new.unsqueeze(0))[0]
            Sig, Sig_new = L @ L.T, L_new @ L_new.T
            diff = V_new - mom.V[0] + 0.5 * (mom.hess * (Sig_new - Sig)).sum() - dH
            return torch.isfinite(diff) & (diff <= 0) & torch.isfinite(L_new).all()
        # Fresh noise: the step was fitted to mom's draws, on which any step looks good (with
        # them an ever-growing step passed the test and then diverged on the next draws).
        eps = torch.randn_like(mom.eps)
        z = torch.cat([m + eps @ L.T, loc_new + eps @ L_new.T])
        V_old, V_new = (-model.log_joint_unconstrained(z)).chunk(2)
        d = V_new - V_old  # per-draw difference of E_q[V]; the entropy's is exact
        S = d.shape[0]
        se = d.std() / math.sqrt(S) if S > 1 else d.new_zeros(())
        diff = d.mean() - dH
        # At most half a nat worse: once q is far off, V's spread (and the standard error) is
        # large, and a tolerance of 2 se alone let BW-SGD random-walk into divergence.
        tol = torch.clamp(2.0 * se, max=0.5)
        return torch.isfinite(diff) & (diff <= tol) & torch.isfinite(L_new).all()

    def _covariance_step(self, L: torch.Tensor, hess: torch.Tensor, eta) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


def _cholesky_of_gram(B: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor of ``B B^T`` from a QR of ``B^T``, never forming ``B B^T``.

    Squaring would square the condition number; QR keeps float32 runs SPD.
    """
    R = torch.linalg.qr(B.T, mode="r").R
    d = R.diagonal()
    sign = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return (R * sign.unsqueeze(-1)).T


class FBGVI(_BuresWasserstein):
    """Forward-backward Gaussian VI: a gradient step on ``E_q[V]``, a JKO step on the entropy.

    One step from ``q = N(m, Sigma)``, ``X ~ q`` (or ``X = m``)::

        m         <- m - eta E[grad V(X)]
        Sigma_1/2 <- M Sigma M,       M = I - eta E[Hess V(X)]
        Sigma     <- 1/2 (Sigma_1/2 + 2 eta I + (Sigma_1/2 (Sigma_1/2 + 4 eta I))^{1/2})

    The last line is the exact JKO (proximal) step of the negative entropy in the
    Bures–Wasserstein space; its eigenvalues are at least ``eta``, so Sigma stays SPD
    whatever the Hessian estimate. The symmetric square root comes from an SVD of
    ``M L`` (``Sigma = L L^T``): ``Sigma_1/2`` and its root share eigenvectors.

    Parameters
    ----------
    step_size : float, optional
        ``eta``. The convergence theory needs ``eta <= 1/L`` for ``L``-smooth V
        (:func:`smoothness_step_size`). Above ``1/L`` the target is no longer a
        fixed point (for a Gaussian target, eigen-directions with ``eta a > 1`` settle
        at variance ``eta^2 a`` instead of ``1/a``), but the step stays stable.
        Default ``None``: chosen from the target and adapted (``adaptive``).
    adaptive : bool, optional
        Default: on exactly when ``step_size`` is not given. The first step is
        ``safety / L`` with ``L`` the largest ``|eigenvalue|`` of ``E_q[Hess V]`` at the
        first draws (plus the gradients' secants in Stein mode); every step is capped at
        ``4 safety / L`` of the curvature at that step's draws. Each proposal is scored
        against the current Gaussian on fresh draws with common noise; a proposal whose
        ELBO estimate is non-finite or worse by more than ``min(2 se, 0.5)`` nats is
        refused (the Gaussian stays) and the step multiplied by ``shrink``; a taken one
        multiplies it by ``grow``. Decisions are ``torch.where`` on device (no host reads);
        the step and the counts are checkpointed (:meth:`state_dict`). Costs one extra
        log-joint evaluation of ``2 S`` draws per step, no derivatives.
    safety, grow, shrink : float
        ``0.5``, ``1.1`` and ``0.5``: see ``adaptive``.
    hessian : {"autograd", "stein"}
        ``"autograd"``: per-draw Hessians by batched Hessian-vector products
        (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. vmap over
        directions; all particles in each pass). ``"stein"``: Hessian-free,
        ``E[Hess V] = E[Sigma^{-1}(X - m) grad V(X)^T]`` symmetrised; costs only the
        gradients but is noisier.
    num_samples : int, optional
        Draws per step; default the caller's ``num_particles`` (``fit``, diagnostics).
        Large values give the averaged (nearly deterministic) variant.
    expectation : {"sample", "mean"}
        ``"mean"`` evaluates the derivatives at ``X = m`` instead of averaging over
        ``q``: exact expectations when V is quadratic (Gaussian targets), a
        deterministic Laplace-like scheme otherwise.

    Notes
    -----
    On the zoo's non-log-concave targets (funnel, eight schools centred and not, sparse
    gamma DEF) a fixed step tuned for one data set diverges on another; the adaptive
    default fits all of them (tests/estimators/test_bures_default_step.py).
    Use it through ``vipkg.fit(model, FullRankNormal(model), FBGVI(), ...)``:
    ``fit`` builds an optimizer, which :meth:`step` ignores; ``lr`` has no effect.
    :meth:`estimate` writes the ordinary ELBO gradient (see the module docstring), so
    gradient-variance diagnostics work as for any estimator.

    References
    ----------
    .. [1] Diao, M. Z., Balasubramanian, K., Chewi, S., Salim, A. "Forward-backward
       Gaussian variational inference via JKO in the Bures-Wasserstein Space". ICML (2023).
    .. [2] Lambert, M., Chewi, S., Bach, F., Bonnabel, S., Rigollet, P. "Variational
       inference via Wasserstein gradient flows". NeurIPS (2022).
    """

    def _covariance_step(self, L, hess, eta):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        U, s, _ = torch.linalg.svd((eye - eta * hess) @ L)
        lam = s.square()  # eigenvalues of Sigma_1/2 = (M L)(M L)^T, never negative
        new = 0.5 * (lam + 2 * eta + torch.sqrt(lam * (lam + 4 * eta)))
        return _cholesky_of_gram(U * new.sqrt())


class BWSGD(_BuresWasserstein):
    """Bures–Wasserstein (stochastic) gradient descent on ``KL(q || pi)``.

    One step from ``q = N(m, Sigma)``::

        m     <- m - eta E[grad V(X)]
        Sigma <- M Sigma M,   M = I - eta (E[Hess V(X)] - Sigma^{-1})

    Explicit in the entropy, so it needs small steps where Sigma is small and is
    unstable for ``eta > 1/L`` (for a Gaussian target the fixed point's
    eigen-directions have multiplier ``1 - 2 eta a``); compare :class:`FBGVI`.
    Takes the same parameters as :class:`FBGVI`; without ``step_size`` its step is chosen
    from the target's smoothness and adapted by the same rule (refusing steps that make
    the ELBO estimate worse), which is what keeps this explicit scheme stable.

    References
    ----------
    .. [1] Lambert, M., Chewi, S., Bach, F., Bonnabel, S., Rigollet, P. "Variational
       inference via Wasserstein gradient flows". NeurIPS (2022).
    .. [2] Diao, M. Z., Balasubramanian, K., Chewi, S., Salim, A. "Forward-backward
       Gaussian variational inference via JKO in the Bures-Wasserstein Space". ICML (2023).
    """

    def _covariance_step(self, L, hess, eta):
        eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device)
        M = eye - eta * (hess - torch.cholesky_inverse(L))
        return _cholesky_of_gram(M @ L)


# ------------------------------------------------------------------------------ step sizes
def _points(model, guide_or_point, num_samples: int, seed: int | None) -> torch.Tensor:
    if isinstance(guide_or_point, torch.nn.Module):
        loc = guide_or_point.loc.detach()
        g = torch.Generator(device=loc.device)
        g.manual_seed(0 if seed is None else seed)
        with torch.no_grad():
            L = guide_or_point.scale_tril.detach()
            eps = torch.randn(num_samples, loc.shape[-1], generator=g, dtype=loc.dtype, device=loc.device)
            return torch.cat([loc.unsqueeze(0), loc + eps @ L.T])
    x = torch.as_tensor(guide_or_point)
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[-1] != model.dim:
        raise ValueError(
            f"points must have shape ({model.dim},) or (n, {model.dim}) in the model's unconstrained "
            f"space, got {tuple(x.shape)}; or pass a guide with loc and scale_tril."
        )
    return x


def smoothness_constant(
    model,
    guide_or_point,
    *,
    num_samples: int = 32,
    method: str = "auto",
    power_iterations: int = 100,
    seed: int | None = 0,
) -> float:
    """Estimate ``L``, the largest ``|eigenvalue|`` of V's Hessian over a set of points.

    Parameters
    ----------
    model : vipkg.Model
    guide_or_point : FullRankNormal or Tensor
        A Gaussian guide (its mean and ``num_samples`` draws from it are used) or
        points ``[d]`` / ``[n, d]`` in the model's unconstrained space.
    num_samples : int
        Draws from the guide.
    method : {"auto", "eigvalsh", "power"}
        Dense per-point Hessians and ``eigvalsh`` (``auto`` for ``d <= 256``) or power
        iteration on batched Hessian-vector products (memory ``O(n d)``).
    power_iterations : int
    seed : int, optional
        Seed of the draws and of the power-iteration start (a private generator).

    Returns
    -------
    float
        The estimate of ``L`` (a lower bound on the true smoothness constant).

    References
    ----------
    .. [1] Diao, M. Z., Balasubramanian, K., Chewi, S., Salim, A. "Forward-backward
       Gaussian variational inference via JKO in the Bures-Wasserstein Space". ICML (2023).
    """
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}.")
    if method not in ("auto", "eigvalsh", "power"):
        raise ValueError(f"unknown method {method!r}; use 'auto', 'eigvalsh' or 'power'.")
    x = _points(model, guide_or_point, num_samples, seed)
    if method == "eigvalsh" or (method == "auto" and x.shape[-1] <= 256):
        _, _, H = _potential(model, x, hessian=True)
        L = torch.linalg.eigvalsh(H).abs().max()
    else:
        g = torch.Generator(device=x.device)
        g.manual_seed(0 if seed is None else seed)
        v = torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
        v = v / v.norm(dim=-1, keepdim=True)
        with torch.enable_grad():
            xx = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(-model.log_joint_unconstrained(xx).sum(), xx, create_graph=True)
            lam = x.new_zeros(x.shape[0])
            for _ in range(power_iterations):
                # Particles are independent, so one VJP gives every point's H v at once.
                (hv,) = torch.autograd.grad(grad, xx, v, retain_graph=True)
                lam = (hv * v).sum(-1).abs()
                v = hv / hv.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        L = lam.max()
    L = float(L)
    if not math.isfinite(L):
        raise ValueError(f"V's Hessian is not finite at the given points of model {model.name!r}.")
    return L


def smoothness_step_size(
    model, guide_or_point, *, num_samples: int = 32, safety: float = 1.0, **kwargs
) -> float:
    """A step size ``safety / L`` for :class:`FBGVI` / :class:`BWSGD` from :func:`smoothness_constant`.

    ``L`` is estimated from finitely many points, so it can miss sharper regions:
    lower ``safety`` (e.g. 0.5) for BW-SGD or strongly curved posteriors.

    References
    ----------
    .. [1] Diao, M. Z., Balasubramanian, K., Chewi, S., Salim, A. "Forward-backward
       Gaussian variational inference via JKO in the Bures-Wasserstein Space". ICML (2023).
    """
    if not (isinstance(safety, (int, float)) and math.isfinite(safety) and safety > 0):
        raise ValueError(f"safety must be a positive number, got {safety!r}.")
    L = smoothness_constant(model, guide_or_point, num_samples=num_samples, **kwargs)
    if L <= 0:
        raise ValueError(
            f"V's Hessian vanishes at every point tried (model {model.name!r}); there is no curvature "
            "to set a step size from. Pass step_size yourself."
        )
    return safety / L
