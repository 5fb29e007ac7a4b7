"""Stein variational gradient descent and its mirrored version for constrained targets.

The kernel step is a pure function of ``(particles, scores)``
(:func:`svgd_direction`, :func:`mirrored_svgd_direction`), so a data-parallel
version can all-gather both and evaluate the direction at its own particles
(``at=``). The estimators wrap it: they compute the scores by autograd through
the model's log joint and write minus the direction into ``.grad``, so any torch
optimizer that minimises moves the particles along the Stein direction.
"""

from __future__ import annotations

import math

import torch

from vipkg.estimators.base import Estimator, IncompatibleEstimatorError, StepInfo
from vipkg.guides.particles import MirrorMap, Particles, as_mirror_map
from vipkg.objectives import ELBO

__all__ = ["RBF", "IMQ", "SVGD", "MirroredSVGD", "svgd_direction", "mirrored_svgd_direction"]

#: Above this many particles the median heuristic looks at an evenly strided subset
#: of this size, so the bandwidth costs O(MEDIAN_SUBSET^2) memory, not O(n^2).
MEDIAN_SUBSET = 1024
#: Default number of kernel entries per chunk (rows x particles): 2^24 is 128 MiB in float64.
CHUNK_ELEMENTS = 1 << 24


# ------------------------------------------------------------------------ kernels
class Kernel:
    """A radial kernel ``k(x, y) = f(||x - y||^2)`` with a bandwidth ``h``.

    Subclasses give ``profile(r, h) -> (f(r), f'(r))`` and the median heuristic
    ``median_bandwidth(med, n)`` from the median squared pairwise distance.
    """

    def __init__(self, bandwidth="median"):
        if isinstance(bandwidth, str):
            if bandwidth != "median":
                raise ValueError(f"bandwidth must be 'median' or a positive number, got {bandwidth!r}.")
        elif not (isinstance(bandwidth, (int, float)) and math.isfinite(bandwidth) and bandwidth > 0):
            raise ValueError(f"bandwidth must be 'median' or a positive number, got {bandwidth!r}.")
        self.bandwidth = bandwidth

    def profile(self, r: torch.Tensor, h: torch.Tensor, inplace: bool = False):  # pragma: no cover
        """``(f(r), f'(r))``; ``f'`` may be a scalar ``c`` (number or 0-d tensor) meaning ``f' = c f``.

        ``inplace=True`` lets the kernel overwrite ``r`` (the caller's scratch block).
        """
        raise NotImplementedError

    def median_bandwidth(self, med: torch.Tensor, n: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def h(self, x: torch.Tensor, r: torch.Tensor | None = None) -> torch.Tensor | float:
        """The bandwidth for particles ``x [n, d]`` (``r``: their squared distances, if at hand)."""
        if self.bandwidth != "median":
            return float(self.bandwidth)  # a Python number: no host-to-device copy per step
        n = x.shape[0]
        if r is None:
            sub = x if n <= MEDIAN_SUBSET else x[:: -(-n // MEDIAN_SUBSET)]
            r = _sqdist(sub, sub)
        h = self.median_bandwidth(torch.median(r.reshape(-1)), n)
        # Coincident particles give a zero median; any positive h is then as good as another.
        return torch.where(h > 0, h, 1.0)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, h=None) -> torch.Tensor:
        """The Gram matrix ``[len(x), len(y)]`` (bandwidth from ``x`` unless given)."""
        h = self.h(x) if h is None else h
        return self.profile(_sqdist(x, y), h, inplace=True)[0]

    def __repr__(self):
        return f"{type(self).__name__}(bandwidth={self.bandwidth!r})"


class RBF(Kernel):
    """Gaussian kernel ``k(x, y) = exp(-||x - y||^2 / h)``.

    Parameters
    ----------
    bandwidth : "median" or float
        ``h``; ``"median"`` is the heuristic of Liu & Wang (2016),
        ``h = med^2 / log n`` with ``med`` the median of the ``n x n`` pairwise distances
        (diagonal included, as in the reference code and Pyro), so that
        ``sum_j k(x_i, x_j) ~ 1`` (``h = 1`` for a single particle). Above ``MEDIAN_SUBSET``
        particles the median is taken over an evenly strided subset.

    References
    ----------
    .. [1] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
       Bayesian Inference Algorithm". NeurIPS (2016).
    """

    def profile(self, r, h, inplace=False):
        c = -1.0 / h
        k = r.mul_(c).exp_() if inplace else torch.exp(r * c)
        return k, c

    def median_bandwidth(self, med, n):
        return med / math.log(n) if n > 1 else torch.ones_like(med)


class IMQ(Kernel):
    """Inverse multiquadric kernel ``k(x, y) = (c^2 + ||x - y||^2 / h)^beta``.

    Heavier tails than :class:`RBF`, so far-away particles still interact
    (Gorham & Mackey 2017); the default kernel of mirrored SVGD.

    Parameters
    ----------
    bandwidth : "median" or float
        ``h``; ``"median"`` uses the median squared pairwise distance (as in the
        reference implementation of Shi et al. 2022).
    beta : float
        Exponent in ``(-1, 0)``.
    c : float
        Offset, ``c > 0``.

    References
    ----------
    .. [1] Gorham, J., Mackey, L. "Measuring Sample Quality with Kernels". ICML (2017).
    .. [2] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    """

    def __init__(self, bandwidth="median", beta: float = -0.5, c: float = 1.0):
        super().__init__(bandwidth)
        if not (isinstance(beta, (int, float)) and -1 < beta < 0):
            raise ValueError(f"IMQ needs beta in (-1, 0), got {beta!r}.")
        if not (isinstance(c, (int, float)) and c > 0):
            raise ValueError(f"IMQ needs c > 0, got {c!r}.")
        self.beta, self.c = float(beta), float(c)

    def profile(self, r, h, inplace=False):
        if not inplace:
            base = r / h + self.c**2
            k = base.pow(self.beta)
            return k, (self.beta / h) * k / base
        base = r.div_(h).add_(self.c**2)
        k = base.pow(self.beta)
        # f'(r) = (beta / h) base^(beta - 1); base is scratch from here on.
        return k, base.reciprocal_().mul_(k).mul_(self.beta / h)

    def median_bandwidth(self, med, n):
        return med

    def __repr__(self):
        return f"IMQ(bandwidth={self.bandwidth!r}, beta={self.beta}, c={self.c})"


def _sqdist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # cdist's fused path measured faster than ||x||^2 + ||y||^2 - 2 x.y written out.
    return torch.cdist(x, y).square_()


# ------------------------------------------------------------- pure kernel steps
def _stein_direction(x, scores, kernel, at, chunk_size, a=None, b=None, sign=1.0):
    # ``sign = -1`` gives ``-phi`` (an estimator's .grad) in the same final kernel.
    n = x.shape[0]
    if scores.shape != x.shape:
        raise ValueError(
            f"scores must have the particles' shape {tuple(x.shape)}, got {tuple(scores.shape)}."
        )
    # Distances are translation invariant; centring keeps r accurate in float32 when
    # the particles sit far from the origin (|x|^2 >> ||x - y||^2).
    center = x.mean(0)
    x = x - center
    t = x if at is None else at - center
    m = t.shape[0]
    rows = max(1, CHUNK_ELEMENTS // n) if chunk_size is None else int(chunk_size)
    if rows < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
    full = None
    if at is None and rows >= n and (n <= MEDIAN_SUBSET or kernel.bandwidth != "median"):
        full = _sqdist(x, x)  # one block: the median and the step share it
    h = kernel.h(x, full)
    ax = x if a is None else a * x
    rhs = None
    bbx = None if b is None else b * (b * x).sum(-1, keepdim=True)
    d = x.shape[1]
    out = []
    for start in range(0, m, rows):
        tc = t[start : start + rows]
        r = full if full is not None else _sqdist(tc, x)
        k, dk = kernel.profile(r, h, inplace=True)
        # sum_j k(x_j, t) s_j + sum_j A_j grad_{x_j} k(x_j, t), grad_{x_j} k = 2 f'(r) (x_j - t),
        # A_j = diag(a_j) - b_j b_j^T (identity for plain SVGD), as matrix products.
        if not (isinstance(dk, torch.Tensor) and dk.dim() > 0):
            # f' = c f (RBF): one matmul serves the driving and the repulsive term, and the
            # repulsive term is c times its sum with k for weights, so c is applied once, in the
            # final fused multiply-add (nine elementwise kernels became four).
            rhs = torch.cat([scores, ax], -1) if rhs is None else rhs
            both = k @ rhs
            drive, rep = both[:, :d], both[:, d:]
            rep = torch.addcmul(rep, tc, k.sum(-1, keepdim=True) if a is None else k @ a, value=-1.0)
            if b is not None:
                rep = rep - k @ bbx + (k * (tc @ b.T)) @ b
            if isinstance(dk, torch.Tensor):
                phi = torch.addcmul(drive, rep, dk, value=2.0)
            else:
                phi = torch.add(drive, rep, alpha=2.0 * dk)
        else:
            drive, rep = k @ scores, dk @ ax
            rep = rep - tc * (dk.sum(-1, keepdim=True) if a is None else dk @ a)
            if b is not None:
                rep = rep - dk @ bbx + (dk * (tc @ b.T)) @ b
            phi = torch.add(drive, rep, alpha=2.0)
        out.append(phi.mul_(sign / n))
    return out[0] if len(out) == 1 else torch.cat(out, 0)


def svgd_direction(particles, scores, kernel, *, at=None, chunk_size=None) -> torch.Tensor:
    """The SVGD direction ``phi(t) = mean_j [k(x_j, t) grad log p(x_j) + grad_{x_j} k(x_j, t)]``.

    A pure function (no autograd, no host reads), vectorized over particles and
    chunked over rows of the ``n x n`` kernel so that memory stays bounded.

    Parameters
    ----------
    particles : Tensor
        ``x [n, d]``.
    scores : Tensor
        ``grad log p(x_j)`` ``[n, d]`` (minibatch-scaled by the model where it subsamples).
    kernel : Kernel
        :class:`RBF` or :class:`IMQ`; a median bandwidth is computed from ``particles``.
    at : Tensor, optional
        Points ``[m, d]`` where to evaluate ``phi`` (default: the particles); lets a
        data-parallel caller gather every particle and score but update only its own.
    chunk_size : int, optional
        Kernel rows per block (default: as many as fit in 2^24 entries).

    Returns
    -------
    Tensor
        ``phi [m, d]``; particles move along ``+phi``.

    References
    ----------
    .. [1] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
       Bayesian Inference Algorithm". NeurIPS (2016).
    """
    return _stein_direction(particles, scores, kernel, at, chunk_size)


def mirrored_svgd_direction(theta, dual_scores, kernel, inv_hessian, *, at=None, chunk_size=None):
    """The mirrored SVGD direction in dual coordinates (Shi, Liu & Mackey 2022, MSVGD).

    ``g(t) = mean_j [k(theta_j, t) s_j + (grad^2 psi(theta_j))^{-1} grad_{theta_j} k(theta_j, t)]``
    with ``s_j`` the dual scores (``(grad^2 psi)^{-1} grad log p + div (grad^2 psi)^{-1}``,
    see :meth:`vipkg.guides.particles.MirrorMap.dual_score`); the dual variables move along ``+g``.

    Parameters
    ----------
    theta : Tensor
        Primal coordinates ``[n, d]`` (the first ``D - 1`` coordinates on the simplex).
    dual_scores : Tensor
        ``[n, d]``.
    kernel : Kernel
        Evaluated on ``theta``.
    inv_hessian : tuple
        ``(a, b)`` with ``(grad^2 psi(theta_j))^{-1} = diag(a_j) - b_j b_j^T`` (``b`` may be ``None``).
    at, chunk_size
        As in :func:`svgd_direction`.

    References
    ----------
    .. [1] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    """
    a, b = inv_hessian
    return _stein_direction(theta, dual_scores, kernel, at, chunk_size, a, b)


# --------------------------------------------------------------------- estimators
def _check_objective(name, objective):
    if not isinstance(objective, ELBO):
        raise IncompatibleEstimatorError(
            f"{name} transports particles along the steepest descent direction of KL(q || p), the ELBO's "
            f"divergence; it has no version for {objective!r}. Use objective=ELBO()."
        )


def _scores(model, guide, x):
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        log_p = guide.log_joint(model, x)
        (score,) = torch.autograd.grad(log_p.sum(), x)
    return log_p.detach(), score


class SVGD(Estimator):
    """Stein variational gradient descent on a :class:`~vipkg.guides.particles.Particles` guide.

    Each estimate computes ``grad log p`` at every particle (the model's minibatch
    scaling makes it unbiased for the full data), the direction
    :func:`svgd_direction` and writes ``-phi`` into ``particles.grad``: a step of any
    minimising torch optimizer moves the particles along ``+phi``.

    Parameters
    ----------
    kernel : Kernel
        Default ``RBF(bandwidth="median")``.
    chunk_size : int, optional
        Kernel rows per block, to bound memory for many particles.

    Notes
    -----
    ``num_particles`` of :func:`vipkg.fit` is ignored: the guide's particles are the
    sample. ``StepInfo.loss`` is minus the mean log joint over the particles (SVGD has
    no tractable ELBO: the particles carry no density); ``log_weights`` is log p per
    particle, ``[n, 1]``.

    References
    ----------
    .. [1] Liu, Q., Wang, D. "Stein Variational Gradient Descent: A General Purpose
       Bayesian Inference Algorithm". NeurIPS (2016).
    """

    #: owns its step (moves the particles): not a part of a PerSite estimator
    composable = False

    def __init__(self, kernel: Kernel | None = None, *, chunk_size: int | None = None):
        kernel = RBF() if kernel is None else kernel
        if not isinstance(kernel, Kernel):
            raise ValueError(
                f"kernel must be a vipkg.estimators.stein kernel such as RBF() or IMQ(), got {kernel!r}."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.kernel, self.chunk_size = kernel, chunk_size

    def __repr__(self):
        return f"SVGD(kernel={self.kernel!r})"

    def check(self, model, guide, objective) -> None:
        if not isinstance(guide, Particles):
            raise IncompatibleEstimatorError(
                f"SVGD moves particles and needs a Particles guide, got {type(guide).__name__}. "
                "Use vipkg.guides.particles.Particles(model, n=100); for Gaussian or flow guides use "
                "Reparam or STL."
            )
        if guide.mirror is not None:
            raise IncompatibleEstimatorError(
                f"this Particles guide lives on a constrained support through {guide.mirror!r}; "
                "use MirroredSVGD for it, or Particles(model) without mirror= for SVGD."
            )
        _check_objective("SVGD", objective)

    def estimate(self, model, guide, objective, num_particles):
        p = guide.particles
        log_p, score = _scores(model, guide, p)
        p.grad = _stein_direction(p.detach(), score, self.kernel, None, self.chunk_size, sign=-1.0)
        return StepInfo(loss=-log_p.mean(), log_weights=log_p[:, None])


class MirroredSVGD(Estimator):
    """Mirrored SVGD (MSVGD) for targets on a constrained set, e.g. the simplex.

    The particles are kept in dual coordinates ``eta = grad psi(theta)`` of a mirror
    map ``psi``; each estimate writes minus the mirrored Stein direction
    (:func:`mirrored_svgd_direction`) into ``dual.grad``, so an optimizer step updates
    ``eta`` and the particles ``grad psi*(eta)`` never leave the support.

    Parameters
    ----------
    mirror : MirrorMap or "entropic", optional
        Must match the guide's mirror map (``Particles(model, mirror=...)``); default:
        the guide's. ``"entropic"`` is :class:`~vipkg.guides.particles.EntropicSimplex`.
    kernel : Kernel
        Evaluated on the primal coordinates; default ``IMQ(bandwidth="median")`` as in
        the paper.
    chunk_size : int, optional

    Notes
    -----
    The score is ``grad log p`` with respect to the constrained coordinates (on the
    simplex, the first ``D - 1``, the last being ``1 - sum``); the model's log density
    is taken with respect to Lebesgue measure on those coordinates. ``StepInfo`` is as
    for :class:`SVGD`.

    References
    ----------
    .. [1] Shi, J., Liu, C., Mackey, L. "Sampling with Mirrored Stein Operators". ICLR (2022).
    .. [2] Liu, Q., Wang, D. "Stein Variational Gradient Descent". NeurIPS (2016).
    """

    #: owns its step (moves the particles): not a part of a PerSite estimator
    composable = False

    def __init__(
        self, mirror: MirrorMap | str | None = None, kernel: Kernel | None = None, *, chunk_size=None
    ):
        self.mirror = None if mirror is None else as_mirror_map(mirror)
        kernel = IMQ() if kernel is None else kernel
        if not isinstance(kernel, Kernel):
            raise ValueError(
                f"kernel must be a vipkg.estimators.stein kernel such as IMQ() or RBF(), got {kernel!r}."
            )
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.kernel, self.chunk_size = kernel, chunk_size

    def __repr__(self):
        return f"MirroredSVGD(mirror={self.mirror!r}, kernel={self.kernel!r})"

    def check(self, model, guide, objective) -> None:
        if not isinstance(guide, Particles) or guide.mirror is None:
            want = self.mirror or "EntropicSimplex()"
            what = type(guide).__name__ + (" without a mirror map" if isinstance(guide, Particles) else "")
            raise IncompatibleEstimatorError(
                f"MirroredSVGD needs a Particles guide on the constrained support, got {what}. "
                f"Use Particles(model, n=50, mirror={want}); for unconstrained particles use SVGD."
            )
        if self.mirror is not None and self.mirror != guide.mirror:
            raise IncompatibleEstimatorError(
                f"MirroredSVGD was given mirror map {self.mirror!r} but the guide's particles are "
                f"parameterised by {guide.mirror!r}; make them agree (or leave MirroredSVGD's mirror unset)."
            )
        _check_objective("MirroredSVGD", objective)

    def estimate(self, model, guide, objective, num_particles):
        mirror = guide.mirror
        eta = guide.dual
        x = mirror.to_full(eta.detach())
        log_p, grad = _scores(model, guide, x)
        s = mirror.dual_score(x, grad)
        a, b = mirror.inv_hessian(x)
        eta.grad = _stein_direction(mirror.primal(x), s, self.kernel, None, self.chunk_size, a, b, sign=-1.0)
        return StepInfo(loss=-log_p.mean(), log_weights=log_p[:, None])
