"""Path-gradient estimators: log q with stopped parameters (STL, DReG) and the fast path for flows.

The reparameterization gradient of ``log q_phi(z_phi)`` has two parts: the path
term through the draw ``z`` and the score term ``d log q_phi(z) / d phi`` at fixed
``z``. The score term has mean zero, so dropping it keeps the estimator unbiased
for the ELBO while removing noise that does not vanish even when ``q`` equals the
posterior. Every estimator here draws the same particles as
:class:`~vipkg.estimators.reparam.Reparam` for the same torch seed.
"""

from __future__ import annotations

import math

import normflows as nf
import torch

from vipkg.estimators.base import (
    Draw,
    Estimator,
    IncompatibleEstimatorError,
    Part,
    StepInfo,
    datum_bound,
    datum_scale,
    estimate_parts,
    named_latents,
    surrogate_backward,
)
from vipkg.guides.base import stopped_log_prob
from vipkg.objectives import ELBO, IWAE, importance_ess

__all__ = [
    "STL",
    "DReG",
    "FastPath",
    "stopped_log_prob",
    "fast_path_forward",
    "fast_path_pullback",
    "SUPPORTED_FAST_PATH_LAYERS",
]


def _require_rsample(name, guide):
    if not guide().has_rsample:
        raise IncompatibleEstimatorError(
            f"{name} differentiates through reparameterized draws, but {type(guide).__name__} has none. "
            "Use ScoreFunction (any guide) or, for Gamma/Beta/Dirichlet, RSVI."
        )


class STL(Estimator):
    """ "Sticking the landing": the pathwise gradient without the score term.

    Draws ``z`` by the guide's reparameterized path and evaluates ``log q(z)``
    with stopped parameters, so the gradient flows only through ``z``. For the
    ELBO it is unbiased, and its variance goes to zero as the guide approaches
    the exact posterior.

    Parameters
    ----------
    allow_biased : bool
        With ``k > 1`` importance samples (``IWAE``, ``Renyi``) the same
        construction gives Roeder et al.'s importance-weighted STL, whose weights
        ``w~_k`` multiply path terms only; its mean is not the gradient of the
        bound (Tucker et al. 2019, section 3). It is refused unless this flag is
        set; :class:`DReG` is the unbiased estimator for IWAE.

    Notes
    -----
    The loss returned is the true loss: the stopped ``log q`` has the same value
    as the live one.

    References
    ----------
    .. [1] Roeder, G., Wu, Y., Duvenaud, D. "Sticking the Landing: Simple,
       Lower-Variance Gradient Estimators for Variational Inference". NeurIPS (2017).
    .. [2] Tucker, G., Lawson, D., Gu, S., Maddison, C. J. "Doubly Reparameterized
       Gradient Estimators for Monte Carlo Objectives". ICLR (2019).
    """

    #: A part estimator: it serves one part of a Composite guide as well as a whole guide.
    composable = True
    log_q_form = "stopped"

    def __init__(self, allow_biased: bool = False):
        if not isinstance(allow_biased, bool):
            raise ValueError(f"allow_biased must be a bool, got {allow_biased!r}.")
        self.allow_biased = allow_biased

    def __repr__(self):
        return "STL(allow_biased=True)" if self.allow_biased else "STL()"

    def check(self, model, guide, objective) -> None:
        _require_rsample("STL", guide)
        if not isinstance(objective, ELBO) and objective.k > 1 and not self.allow_biased:
            raise IncompatibleEstimatorError(
                f"STL with {objective!r} ({objective.k} importance samples) is biased for the bound "
                "(Tucker et al. 2019). Use DReG() for IWAE, STL with ELBO(), or STL(allow_biased=True) "
                "for Roeder et al.'s importance-weighted variant."
            )

    def draw(self, guide, model, shape) -> Draw:
        """Reparameterized draws with ``log q`` at stopped parameters; the Jacobian of the map to
        the sites depends only on the draw, so its path gradient stays."""
        z, log_q = guide.rsample_and_stopped_log_prob(shape)
        return Draw(*named_latents(guide, model, z, shape, log_q))

    def estimate(self, model, guide, objective, num_particles):
        return estimate_parts(model, guide, objective, num_particles, [Part(self, guide, model)])


class DReG(Estimator):
    """Doubly reparameterized gradient of the IWAE bound for the guide's parameters.

    For each group of ``k`` draws with normalized weights ``w~_i``, the gradient is
    ``sum_i w~_i^2 d log w_i / d z_i  d z_i / d phi`` with ``log q`` at stopped
    parameters: the score terms of the IWAE gradient rewritten by a second
    reparameterization, so the signal-to-noise ratio no longer falls with ``k``.
    The model's own parameters ``theta`` (a VAE's decoder) take the IWAE gradient
    itself, ``sum_i w~_i d log p_theta(x, z_i) / d theta``, which has no score term.

    Notes
    -----
    Only the IWAE objective (any ``k``; ``k = 1`` is STL) is accepted. The
    reported loss is minus the IWAE bound of the drawn particles. On a minibatch of a
    model that factorizes over its data points (:attr:`vipkg.Model.datum_plate`, a VAE)
    the bound is each data point's own IWAE bound over its ``k`` draws, summed and
    scaled by ``N / B``, and the weights are per data point.

    One backward pass serves both weightings: the model reads the draws through a view
    whose gradient is multiplied by ``w~_i`` on its way back, and the surrogate is
    ``sum_i (w~_i log p(x, z_i) - w~_i^2 log q_stop(z_i))``; ``theta`` sees ``w~_i``, the
    path to ``phi`` through the model ``w~_i^2``, the path through ``log q`` ``w~_i^2``.

    References
    ----------
    .. [1] Tucker, G., Lawson, D., Gu, S., Maddison, C. J. "Doubly Reparameterized
       Gradient Estimators for Monte Carlo Objectives". ICLR (2019), eq. (5)-(6).
    .. [2] Rainforth, T. et al. "Tighter Variational Bounds are Not Necessarily
       Better". ICML (2018).
    .. [3] Burda, Y., Grosse, R., Salakhutdinov, R. "Importance Weighted
       Autoencoders". ICLR (2016).
    """

    #: An update estimator: its weights ``w~_i^2`` need every site of a draw at once.
    composable = False

    @property
    def trains_model_params(self) -> bool:
        return True

    @property
    def per_datum_bounds(self) -> bool:
        return True

    def check(self, model, guide, objective) -> None:
        if not isinstance(objective, IWAE):
            raise IncompatibleEstimatorError(
                f"DReG estimates the gradient of the IWAE bound, got {objective!r}. "
                "Use objective=IWAE(k), or STL() for the ELBO."
            )
        _require_rsample("DReG", guide)

    def estimate(self, model, guide, objective, num_particles):
        shape = torch.Size(objective.sample_shape(num_particles))
        z, log_q = guide.rsample_and_stopped_log_prob(shape)
        latents, log_q = named_latents(guide, model, z, shape, log_q)
        # The model reads the draws through views whose gradient gets the weights (below).
        seen = {k: v.view_as(v) for k, v in latents.items()}
        scale = datum_scale(model)
        if scale is None:
            log_p = model.log_joint(seen).reshape(shape)
            log_w = log_p - log_q.reshape(shape)
            w = torch.softmax(log_w.detach(), dim=-1)
            bound = objective.per_group(log_w.detach())
            surrogate = -((w * log_p - w.square() * log_q.reshape(shape)).sum(-1)).mean()
            weights = {k: w.reshape(-1) for k in seen}
        else:
            from vipkg.guides.minibatch import datum_log_q

            lp_d, rest = model.log_joint_by_datum(seen)
            lq_d = datum_log_q(guide, model, model, latents, stopped=True)
            lw = (lp_d - lq_d).reshape(*shape, -1)
            w = torch.softmax(lw.detach(), dim=1)  # over each data point's k draws
            rest = rest.reshape(shape)
            bound, log_w = datum_bound(objective, lw.detach(), rest.detach(), scale)
            lp = lp_d.reshape(lw.shape)
            surrogate = -(
                scale * (w * lp - w.square() * lq_d.reshape(lw.shape)).sum((1, 2)) + rest.mean(-1)
            ).mean()
            axes = {k: a for k, (_, a) in model.minibatch_of.local_sites.items()}
            n, B = math.prod(shape), w.shape[-1]
            weights = {k: w.reshape(n, *(1,) * axes[k], B) for k in seen}
        for k, v in seen.items():
            if v.requires_grad:
                wk = weights[k].reshape(*weights[k].shape, *(1,) * (v.dim() - weights[k].dim()))
                v.register_hook(lambda g, wk=wk: g * wk)
        loss = -bound.mean()
        surrogate_backward(guide, loss + (surrogate - surrogate.detach()))
        return StepInfo(loss=loss, log_weights=log_w.detach())


# --------------------------------------------------------------------------- fast path
#
# Each handler pushes a batch x [n, d] through one layer in the sampling direction and
# carries g = grad_x log q(x) along:  g_y = J^{-T} (g_x - grad_x log|det J(x)|).
# y keeps its graph to the parameters (the sampling path); g is a constant.


def _grad(out, x):
    return torch.autograd.grad(out, x, retain_graph=True)[0]


def _push_permute(layer, x, g):
    # A permutation is orthogonal: J^{-T} = J, so g moves like x.
    return layer(x)[0], None, layer(g)[0]


def _push_affine_const(layer, x, g):
    # AffineConstFlow.forward directly: ActNorm's forward would read its init flag on the host.
    y, ld = nf.flows.AffineConstFlow.forward(layer, x)
    return y, ld, g * torch.exp(-layer.s.detach())


def _push_lu_linear_permute(layer, x, g):
    # Sampling direction is y = P^{-1} W^{-1} (x - b), W = L U, so J^{-T} g = P^{-1} W^T g.
    y, ld = layer(x)
    with torch.no_grad():
        lower, upper = layer.linear._create_lower_upper()
        gy = layer.permutation.inverse(g @ lower @ upper)[0]
    return y, ld, gy


def _push_invertible_affine(layer, x, g):
    # Sampling direction is y = x M with M = W^{-1}; row-vector form of J^{-T} g is g W^T.
    y, ld = layer(x)
    with torch.no_grad():
        W = layer._assemble_W() if layer.use_lu else layer.W
        gy = g @ W.T
    return y, ld, gy


def _scale_and_log(coupling, raw):
    if coupling.scale_map == "exp":
        return torch.exp(raw), raw
    if coupling.scale_map == "sigmoid":
        s = torch.sigmoid(raw + 2)
        return 1 / s, -torch.log(s)
    if coupling.scale_map == "sigmoid_inv":
        s = torch.sigmoid(raw + 2)
        return s, torch.log(s)
    raise IncompatibleEstimatorError(f"FastPath: unknown scale_map {coupling.scale_map!r} of AffineCoupling.")


def _push_affine_coupling_block(block, x, g):
    split, coupling, merge = block.flows
    (x1, x2), _ = split(x)
    (g1, g2), _ = split(g)  # split/merge select coordinates: orthogonal, g moves like x
    param = coupling.param_map(x1)
    sum_dims = list(range(1, x2.dim()))
    if coupling.scale:
        a, log_a = _scale_and_log(coupling, param[:, 1::2, ...])
        y2 = x2 * a + param[:, 0::2, ...]
        ld = log_a.sum(sum_dims)
        gy2 = g2 / a.detach()
        # The only VJP through the conditioner: grad_{x1} of log|det| + <y2, g_y2>.
        gy1 = g1 - _grad(ld.sum() + (y2 * gy2).sum(), x1)
    else:
        y2 = x2 + param
        ld = None
        gy2 = g2
        gy1 = g1 - _grad((y2 * gy2).sum(), x1)
    return merge([x1, y2])[0], ld, merge([gy1, gy2])[0]


def _push_masked_affine(layer, x, g):
    b = layer.b
    xm = b * x
    s, t = layer.s(xm), layer.t(xm)
    y = xm + (1 - b) * (x * torch.exp(s) + t)
    ld = ((1 - b) * s).sum(list(range(1, b.dim())))
    gy_tr = (1 - b) * g * torch.exp(-s.detach())
    v = _grad(ld.sum() + (y * gy_tr).sum(), x)
    return y, ld, gy_tr + b * (g - v)


def _push_spline_coupling(layer, x, g, inverse=False):
    # Elementwise coupling with an elementwise map on the conditioning part too:
    # J = [[diag(a), 0], [C, diag(b)]] in (identity, transform) blocks, in either
    # direction; read a, b and the needed products off VJPs of the layer's own pass.
    prq = layer.prqct
    y, ld = layer.inverse(x) if inverse else layer(x)
    m_tr = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device).index_fill(0, prq.transform_features, 1.0)
    m_id = 1 - m_tr
    grad_ld = _grad(ld.sum(), x)
    b = _grad((y * m_tr).sum(), x)
    a = _grad((y * m_id).sum(), x)
    gy_tr = m_tr * (g - grad_ld) / torch.where(m_tr > 0, b, torch.ones_like(b))
    ct = _grad((y * gy_tr).sum(), x)
    gy_id = m_id * (g - grad_ld - ct) / torch.where(m_id > 0, a, torch.ones_like(a))
    return y, ld, gy_tr + gy_id


# Inverse (density-evaluation) direction, for the forward KL: the same recursion
# pushed through h = f^{-1}, i.e. the pullback of the target through the flow.


def _pull_permute(layer, y, g):
    return layer.inverse(y)[0], None, layer.inverse(g)[0]


def _pull_affine_const(layer, y, g):
    x, ld = layer.inverse(y)
    return x, ld, g * torch.exp(layer.s.detach())


def _pull_lu_linear_permute(layer, y, g):
    # Inverse direction is x = W P y + b, so J^{-T} g = W^{-T} P g with W^T = U^T L^T.
    x, ld = layer.inverse(y)
    with torch.no_grad():
        lower, upper = layer.linear._create_lower_upper()
        pg = layer.permutation(g)[0].T
        v = torch.linalg.solve_triangular(upper.T, pg, upper=False)
        gx = torch.linalg.solve_triangular(lower.T, v, upper=True, unitriangular=True).T
    return x, ld, gx


def _pull_invertible_affine(layer, y, g):
    # Inverse direction is x = y W (row form), so J^{-T} g is g W^{-T} in row form.
    x, ld = layer.inverse(y)
    with torch.no_grad():
        W = layer._assemble_W() if layer.use_lu else layer.W
        gx = torch.linalg.solve(W, g.T).T
    return x, ld, gx


def _pull_affine_coupling_block(block, y, g):
    split, coupling, merge = block.flows
    (y1, y2), _ = merge.inverse(y)
    (g1, g2), _ = merge.inverse(g)
    param = coupling.param_map(y1)
    if coupling.scale:
        a, log_a = _scale_and_log(coupling, param[:, 1::2, ...])
        x2 = (y2 - param[:, 0::2, ...]) / a
        ld = -log_a.sum(list(range(1, y2.dim())))
        gx2 = g2 * a.detach()
        gx1 = g1 - _grad(ld.sum() + (x2 * gx2).sum(), y1)
    else:
        x2 = y2 - param
        ld = None
        gx2 = g2
        gx1 = g1 - _grad((x2 * gx2).sum(), y1)
    return split.inverse([y1, x2])[0], ld, split.inverse([gx1, gx2])[0]


def _pull_masked_affine(layer, y, g):
    b = layer.b
    ym = b * y
    s, t = layer.s(ym), layer.t(ym)
    x = ym + (1 - b) * (y - t) * torch.exp(-s)
    ld = -((1 - b) * s).sum(list(range(1, b.dim())))
    gx_tr = (1 - b) * g * torch.exp(s.detach())
    v = _grad(ld.sum() + (x * gx_tr).sum(), y)
    return x, ld, gx_tr + b * (g - v)


def _pull_spline_coupling(layer, y, g):
    return _push_spline_coupling(layer, y, g, inverse=True)


# (type, sampling direction, inverse direction); order matters: ActNorm is an AffineConstFlow.
_HANDLERS = [
    (nf.flows.AffineCouplingBlock, _push_affine_coupling_block, _pull_affine_coupling_block),
    (nf.flows.MaskedAffineFlow, _push_masked_affine, _pull_masked_affine),
    (nf.flows.Permute, _push_permute, _pull_permute),
    (nf.flows.AffineConstFlow, _push_affine_const, _pull_affine_const),
    (nf.flows.LULinearPermute, _push_lu_linear_permute, _pull_lu_linear_permute),
    (nf.flows.InvertibleAffine, _push_invertible_affine, _pull_invertible_affine),
    (nf.flows.CoupledRationalQuadraticSpline, _push_spline_coupling, _pull_spline_coupling),
]


#: normflows layer types FastPath can push the score through (ActNorm via AffineConstFlow).
SUPPORTED_FAST_PATH_LAYERS = (
    "AffineCouplingBlock",
    "MaskedAffineFlow",
    "Permute",
    "AffineConstFlow",
    "ActNorm",
    "LULinearPermute",
    "InvertibleAffine",
    "CoupledRationalQuadraticSpline",
)


def _handler(layer, inverse=False):
    for cls, push, pull in _HANDLERS:
        if isinstance(layer, cls):
            return pull if inverse else push
    return None


def _base_sample_and_score(q0, n):
    z, log_q = q0(n)
    g = _base_score(q0, z)
    if not z.requires_grad:
        # A fixed base: the coupling VJPs still need a graph from x to differentiate.
        z = z.detach().requires_grad_()
    return z, log_q, g


def fast_path_forward(guide, n: int):
    """Draw ``n`` particles and carry ``grad_z log q(z)`` (stopped parameters) along the flow.

    Returns
    -------
    z : Tensor ``[n, dim]``
        Draws, differentiable in the flow's parameters (the sampling path).
    log_q : Tensor ``[n]``
        Their log density (detached).
    score : Tensor ``[n, dim]``
        ``grad_z log q(z)`` at stopped parameters (detached), computed without an inverse pass.

    References
    ----------
    .. [1] Vaitl, L., Winkler, L., Richter, L., Kessel, P. "Fast and Unified Path
       Gradient Estimators for Normalizing Flows". ICLR (2024), Proposition 3.2.
    """
    x, log_q, g = _base_sample_and_score(guide.flow.q0, n)
    log_q = log_q.detach()
    for layer in guide.flow.flows:
        fn = _handler(layer)
        if fn is None:
            raise IncompatibleEstimatorError(_unsupported_message(layer))
        x, ld, g = fn(layer, x, g)
        if ld is not None:
            log_q = log_q - ld.detach()
    return x, log_q, g.detach()


def _unsupported_message(layer):
    return (
        f"FastPath cannot propagate the score through a {type(layer).__name__} layer; supported "
        f"normflows layers: {', '.join(SUPPORTED_FAST_PATH_LAYERS)}. Use STL() for any flow."
    )


class FastPath(Estimator):
    """Path gradients for normalizing flows without an inverse pass (Vaitl et al. 2024).

    ``kl="reverse"`` (default): the ELBO's path gradient
    ``E_q[(grad_z log q(z) - grad_z log p(x, z)) dz/dtheta]`` with ``grad_z log q`` at
    stopped parameters. The slow way (:class:`STL`) re-evaluates ``log q`` by the
    inverse pass and differentiates it; here the score is carried along the
    sampling pass, layer by layer, ``g_y = J^{-T}(g_x - grad_x log|det J(x)|)``,
    which for a coupling layer is a single vector-Jacobian product through its
    conditioner. One backward pass through the sampling path with cotangent
    ``g_q - g_p`` then gives the gradient.

    ``kl="forward"``: maximum likelihood, ``KL(p || q)``, with the target's energy
    entering through its gradient. ``KL(p || q_theta)`` equals ``KL(p#_theta || q_0)``
    where ``p#`` is the target pulled back to the base space by the inverse pass
    ``eps = T^{-1}(x)``; its path gradient is
    ``E_p[(grad_eps log p#(eps) - grad_eps log q_0(eps)) deps/dtheta]``, with
    ``grad log p#`` carried along the inverse pass by the same recursion. Without
    draws from p, the expectation uses self-normalized importance weights of draws
    from q (detached), so the estimate has the O(1/n) bias of self-normalization;
    the base distribution's own parameters get their ordinary likelihood gradient.
    The reported loss is the self-normalized estimate of ``KL(p || q)``.

    Works with :class:`vipkg.guides.Flow` guides built from the layers in
    :data:`SUPPORTED_FAST_PATH_LAYERS`, with ``objective=ELBO()`` (which only sets
    the number of draws for the forward KL).

    Parameters
    ----------
    kl : {"reverse", "forward"}

    References
    ----------
    .. [1] Vaitl, L., Winkler, L., Richter, L., Kessel, P. "Fast and Unified Path
       Gradient Estimators for Normalizing Flows". ICLR (2024), sections 3-4.
    .. [2] Roeder, G., Wu, Y., Duvenaud, D. "Sticking the Landing". NeurIPS (2017).
    """

    #: An update estimator: the score is carried through the whole flow, not one part.
    composable = False

    def __init__(self, kl: str = "reverse"):
        if kl not in ("reverse", "forward"):
            raise ValueError(
                f"FastPath: kl must be 'reverse' (the ELBO) or 'forward' (maximum likelihood), got {kl!r}."
            )
        self.kl = kl

    def __repr__(self):
        return "FastPath()" if self.kl == "reverse" else "FastPath(kl='forward')"

    def check(self, model, guide, objective) -> None:
        from vipkg.guides.flow import Flow

        if not isinstance(guide, Flow):
            raise IncompatibleEstimatorError(
                f"FastPath needs a vipkg.guides.Flow guide, got {type(guide).__name__}. "
                "Use STL() for Gaussian guides (it is the same gradient)."
            )
        if not isinstance(objective, ELBO):
            raise IncompatibleEstimatorError(
                f"FastPath estimates the reverse- or forward-KL path gradient, got {objective!r}. "
                "Use objective=ELBO(), or DReG() for IWAE."
            )
        for layer in guide.flow.flows:
            if _handler(layer) is None:
                raise IncompatibleEstimatorError(_unsupported_message(layer))

    def estimate(self, model, guide, objective, num_particles):
        shape = objective.sample_shape(num_particles)
        if self.kl == "forward":
            return self._forward_kl(model, guide, shape)
        z, log_q, g_q = fast_path_forward(guide, math.prod(shape))
        log_p, g_p = _log_p_and_grad(guide, model, z)
        log_w = (log_p - log_q).reshape(shape)
        # First-order surrogate in z around the draws: value log_w, gradient (g_p - g_q) dz/dtheta.
        lin = ((z - z.detach()) * (g_p - g_q)).sum(-1).reshape(shape)
        loss = -objective(log_w + lin)
        surrogate_backward(guide, loss)
        return StepInfo(loss=loss.detach(), log_weights=log_w)

    def _forward_kl(self, model, guide, shape):
        with torch.no_grad():
            x, log_q = guide.rsample_and_log_prob((math.prod(shape),))
        log_p, g = _log_p_and_grad(guide, model, x)
        log_w = log_p - log_q
        w = torch.softmax(log_w, dim=0)
        eps, g_sharp = fast_path_pullback(guide, x, g)
        q0 = guide.flow.q0
        g0 = _base_score(q0, eps.detach())
        path = (w * (eps * (g_sharp - g0)).sum(-1)).sum()
        base = -(w * q0.log_prob(eps.detach())).sum()
        # Self-normalized KL(p || q): sum w log w_i - log mean w, with the unknown log Z estimated.
        kl = (w * log_w).sum() - (torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))
        surrogate = path + base
        surrogate_backward(guide, kl + (surrogate - surrogate.detach()))
        return StepInfo(
            loss=kl, log_weights=log_w.reshape(shape), extras={"ess": importance_ess(log_w, normalized=True)}
        )


def _log_p_and_grad(guide, model, z):
    zd = z.detach().requires_grad_()
    with torch.enable_grad():
        log_p = guide.log_joint(model, zd)
        g_p = torch.autograd.grad(log_p.sum(), zd)[0]
    return log_p.detach(), g_p


def _base_score(q0, z):
    if isinstance(q0, nf.distributions.DiagGaussian) and q0.temperature is None:
        with torch.no_grad():
            return -(z - q0.loc) * torch.exp(-2 * q0.log_scale)
    zd = z.detach().requires_grad_()
    with torch.enable_grad():
        return torch.autograd.grad(q0.log_prob(zd).sum(), zd)[0]


def fast_path_pullback(guide, x: torch.Tensor, score: torch.Tensor):
    """Map draws ``x`` to the base space by the inverse pass, carrying the pulled-back score.

    Parameters
    ----------
    guide : vipkg.guides.Flow
    x : Tensor ``[n, dim]``
        Points in the target space (no graph needed).
    score : Tensor ``[n, dim]``
        ``grad_x log p(x)`` of the target.

    Returns
    -------
    eps : Tensor ``[n, dim]``
        ``T^{-1}(x)``, differentiable in the flow's parameters.
    score_sharp : Tensor ``[n, dim]``
        ``grad_eps log p#(eps)`` at stopped parameters, ``p#`` the target pulled back
        to the base space (detached).

    References
    ----------
    .. [1] Vaitl, L., Winkler, L., Richter, L., Kessel, P. "Fast and Unified Path
       Gradient Estimators for Normalizing Flows". ICLR (2024), section 4.
    """
    y = x.detach().requires_grad_()
    g = score.detach()
    for layer in reversed(guide.flow.flows):
        fn = _handler(layer, inverse=True)
        if fn is None:
            raise IncompatibleEstimatorError(_unsupported_message(layer))
        y, _, g = fn(layer, y, g)
    return y, g.detach()
