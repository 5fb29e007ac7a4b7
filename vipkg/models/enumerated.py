"""Models whose discrete sites are summed out exactly: a mixture with unknown weights, a Gaussian HMM,
Cormack-Jolly-Seber capture-recapture on the dipper data.

Each exists as a hand-written marginal log density (``form="tensor"``: log-sum-exp over assignments, the
forward algorithm over hidden states) and as the Pyro program with its discrete sites marked
``infer={"enumerate": "parallel"}`` (``form="pyro"``), which :meth:`vipkg.Model.from_pyro` sums out with
Pyro's enumeration and tensor contraction. The two agree (``tests/models/test_enumerated.py``); the
Pyro form also gives the posterior marginals of the discrete sites
(:func:`vipkg.diagnostics.enumerated_marginals`). Both forms are continuous models, so every guide and
estimator applies.
"""

from __future__ import annotations

import csv
import math
from importlib import resources

import torch
from torch.distributions import constraints
from torch.distributions.utils import clamp_probs

from vipkg.model import Model, Site
from vipkg.models._common import check_form, normal_log_prob

__all__ = ["weighted_mixture", "gaussian_hmm", "capture_recapture"]

_ENUM = {"enumerate": "parallel"}


def _lognormal_log_prob(x, loc, scale):
    return normal_log_prob(x.log(), loc, scale) - x.log()


def _dirichlet_ones_log_prob(w):
    # Dirichlet(1, ..., 1) is uniform on the simplex: log Gamma(k).
    return torch.full(w.shape[:-1], math.lgamma(w.shape[-1]), dtype=w.dtype, device=w.device)


# --------------------------------------------------------------------------- mixture
_MIX_LOCS = (-4.0, 0.0, 4.0)
_MIX_WEIGHTS = (0.5, 0.3, 0.2)


def weighted_mixture(
    n: int = 200,
    k: int = 3,
    *,
    prior_scale: float = 10.0,
    form: str = "tensor",
    seed: int = 0,
    dtype=None,
) -> Model:
    """A 1-D Gaussian mixture with unknown weights, locations and scale; assignments summed out.

    ``w ~ Dirichlet(1_k)``, ``mu_j ~ N(0, prior_scale^2)``, ``sigma ~ LogNormal(0, 1)``,
    ``z_n ~ Categorical(w)`` (enumerated), ``x_n ~ N(mu_{z_n}, sigma^2)``; ``n`` synthetic points from
    weights (0.5, 0.3, 0.2) and locations (-4, 0, 4) (``k = 3``; other ``k``: equal weights, locations
    spread over [-4, 4]), ``sigma = 1``. The Pyro tutorial's GMM.

    Parameters
    ----------
    n, k : int
        Data points and components.
    prior_scale : float
    form : {"tensor", "pyro"}
        ``"tensor"``: log-sum-exp over components by hand; ``"pyro"``: the Pyro program with
        ``z`` marked for enumeration (``model.enumeration`` gives its posterior marginals).
    seed : int
    dtype : torch.dtype, optional

    Returns
    -------
    Model
        Sites ``weights [k]`` (simplex), ``locs [k]`` (real), ``scale`` (positive);
        ``reference = {"weights", "locs", "scale", "assignments"}`` (the truth).

    References
    ----------
    .. [1] Bishop, C. M. Pattern Recognition and Machine Learning, section 9.2 (2006).
    .. [2] Pyro tutorial "Gaussian Mixture Model" (tutorial/source/gmm.ipynb).
    .. [3] Obermeyer, F. et al. "Tensor Variable Elimination for Plated Factor Graphs". ICML (2019).
    """
    check_form(form)
    if not isinstance(n, int) or n < 1 or not isinstance(k, int) or k < 2:
        raise ValueError(f"weighted_mixture needs an int n >= 1 and an int k >= 2, got n={n!r}, k={k!r}.")
    if not prior_scale > 0:
        raise ValueError(f"prior_scale must be positive, got {prior_scale!r}.")
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    if k == 3:
        locs, weights = (
            torch.tensor(_MIX_LOCS, dtype=torch.float64),
            torch.tensor(_MIX_WEIGHTS, dtype=torch.float64),
        )
    else:
        locs, weights = (
            torch.linspace(-4.0, 4.0, k, dtype=torch.float64),
            torch.full((k,), 1.0 / k, dtype=torch.float64),
        )
    z = torch.multinomial(weights, n, replacement=True, generator=g)
    x = (locs[z] + torch.randn(n, generator=g, dtype=torch.float64)).to(dtype)
    reference = {"weights": weights.to(dtype), "locs": locs.to(dtype), "scale": 1.0, "assignments": z}
    if form == "pyro":
        model = Model.from_pyro(_pyro_weighted_mixture, x, k, float(prior_scale), name="weighted_mixture")
        model.reference = reference
        return model
    s = float(prior_scale)
    sites = {
        "weights": Site(torch.Size([k]), constraints.simplex),
        "locs": Site(torch.Size([k]), constraints.independent(constraints.real, 1)),
        "scale": Site(torch.Size([]), constraints.positive),
    }

    def log_joint(latents, data):
        w, mu, sd = latents["weights"], latents["locs"], latents["scale"]
        prior = (
            _dirichlet_ones_log_prob(w)
            + normal_log_prob(mu, 0.0, s).sum(-1)
            + _lognormal_log_prob(sd, 0.0, 1.0)
        )
        # [S, n, k]: every datum under every component, then the assignment summed out.
        comp = (
            normal_log_prob(data["x"][None, :, None], mu[:, None, :], sd[:, None, None]) + w.log()[:, None, :]
        )
        return prior + torch.logsumexp(comp, -1).sum(-1)

    return Model(
        sites,
        log_joint,
        data={"x": x},
        name="weighted_mixture",
        reference=reference,
        pyro_model=(_pyro_weighted_mixture, (x, k, s), {}),
        observed={"x": x},
    )


def _pyro_weighted_mixture(x, k, prior_scale):
    import pyro
    import pyro.distributions as dist
    from pyro.ops.indexing import Vindex

    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(k, dtype=x.dtype)))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(k, dtype=x.dtype), prior_scale).to_event(1))
    scale = pyro.sample("scale", dist.LogNormal(torch.zeros((), dtype=x.dtype), 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Categorical(weights), infer=_ENUM)
        pyro.sample("x", dist.Normal(Vindex(locs)[..., z], scale), obs=x)


# --------------------------------------------------------------------------- HMM
def gaussian_hmm(
    num_sequences: int = 4,
    length: int = 30,
    k: int = 2,
    *,
    loc_scale: float = 5.0,
    noise: float = 1.0,
    form: str = "tensor",
    seed: int = 0,
    dtype=None,
) -> Model:
    """A hidden Markov model with Gaussian emissions; hidden states summed out along a ``pyro.markov`` chain.

    ``T_i ~ Dirichlet(1_k)`` (each row of the transition matrix), ``mu_j ~ N(0, loc_scale^2)``; per
    sequence ``x_0 ~ Categorical(1/k)``, ``x_t ~ Categorical(T_{x_{t-1}})`` (enumerated),
    ``y_t ~ N(mu_{x_t}, noise^2)``. ``num_sequences`` synthetic sequences of ``length`` steps from sticky
    transitions (0.9 on the diagonal) and locations spread over [-2, 2].

    Parameters
    ----------
    num_sequences, length, k : int
        Sequences (a plate), steps per sequence (a Markov chain), hidden states.
    loc_scale : float
    noise : float
        Known emission standard deviation (large values make the states ambiguous).
    form : {"tensor", "pyro"}
        ``"tensor"``: the forward algorithm by hand; ``"pyro"``: the Pyro program, states marked for
        enumeration inside ``pyro.markov`` (dimensions recycled along the chain).
    seed : int
    dtype : torch.dtype, optional

    Returns
    -------
    Model
        Sites ``transition [k, k]`` (rows on the simplex), ``locs [k]`` (real);
        ``reference = {"transition", "locs", "states"}`` (the truth).

    References
    ----------
    .. [1] Rabiner, L. R. "A Tutorial on Hidden Markov Models and Selected Applications in Speech
       Recognition". Proc. IEEE 77 (1989).
    .. [2] Obermeyer, F. et al. "Tensor Variable Elimination for Plated Factor Graphs". ICML (2019).
    """
    check_form(form)
    for label, v, lo in (("num_sequences", num_sequences, 1), ("length", length, 1), ("k", k, 2)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"gaussian_hmm: {label} must be an int >= {lo}, got {v!r}.")
    dtype = dtype or torch.get_default_dtype()
    g = torch.Generator().manual_seed(seed)
    trans = torch.full((k, k), 0.1 / (k - 1), dtype=torch.float64) + (0.9 - 0.1 / (k - 1)) * torch.eye(
        k, dtype=torch.float64
    )
    locs = torch.linspace(-2.0, 2.0, k, dtype=torch.float64)
    states = torch.empty(num_sequences, length, dtype=torch.long)
    states[:, 0] = torch.randint(0, k, (num_sequences,), generator=g)
    for t in range(1, length):
        states[:, t] = torch.multinomial(trans[states[:, t - 1]], 1, generator=g).squeeze(-1)
    if not noise > 0:
        raise ValueError(f"gaussian_hmm: noise must be positive, got {noise!r}.")
    sd = float(noise)
    y = (locs[states] + sd * torch.randn(num_sequences, length, generator=g, dtype=torch.float64)).to(dtype)
    reference = {"transition": trans.to(dtype), "locs": locs.to(dtype), "states": states}
    s = float(loc_scale)
    if form == "pyro":
        model = Model.from_pyro(_pyro_gaussian_hmm, y, k, s, sd, name="gaussian_hmm")
        model.reference = reference
        return model
    sites = {
        "transition": Site(torch.Size([k, k]), constraints.independent(constraints.simplex, 1)),
        "locs": Site(torch.Size([k]), constraints.independent(constraints.real, 1)),
    }

    def log_joint(latents, data):
        trans, mu = latents["transition"], latents["locs"]
        y = data["y"]
        prior = _dirichlet_ones_log_prob(trans).sum(-1) + normal_log_prob(mu, 0.0, s).sum(-1)
        em = normal_log_prob(y[None, :, :, None], mu[:, None, None, :], sd)  # [S, N, T, k]
        log_trans = trans.log()[:, None]  # [S, 1, k, k]
        alpha = em[:, :, 0] - math.log(k)
        for t in range(1, y.shape[-1]):
            alpha = torch.logsumexp(alpha[..., :, None] + log_trans, -2) + em[:, :, t]
        return prior + torch.logsumexp(alpha, -1).sum(-1)

    return Model(
        sites,
        log_joint,
        data={"y": y},
        name="gaussian_hmm",
        reference=reference,
        pyro_model=(_pyro_gaussian_hmm, (y, k, s, sd), {}),
        observed={"y": y},
    )


def _pyro_gaussian_hmm(y, k, loc_scale, noise):
    import pyro
    import pyro.distributions as dist
    from pyro.ops.indexing import Vindex

    trans = pyro.sample("transition", dist.Dirichlet(torch.ones(k, k, dtype=y.dtype)).to_event(1))
    locs = pyro.sample("locs", dist.Normal(torch.zeros(k, dtype=y.dtype), loc_scale).to_event(1))
    init = torch.full((k,), 1.0 / k, dtype=y.dtype)
    with pyro.plate("sequences", y.shape[0], dim=-1):
        x = None
        for t in pyro.markov(range(y.shape[1])):
            probs = init if x is None else Vindex(trans)[..., x, :]
            x = pyro.sample(f"x_{t}", dist.Categorical(probs), infer=_ENUM)
            pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., x], noise), obs=y[:, t])


# --------------------------------------------------------------------------- capture-recapture
def _dipper(dtype):
    path = resources.files("vipkg.models").joinpath("data", "dipper_capture_history.csv")
    with path.open() as f:
        rows = [[float(v) for v in row[1:]] for row in csv.reader(f) if row]
    return torch.tensor(rows, dtype=dtype)


def capture_recapture(*, form: str = "tensor", dtype=None) -> Model:
    """Cormack-Jolly-Seber capture-recapture on the dipper data: constant survival and recapture.

    ``phi ~ U(0, 1)`` (survival), ``rho ~ U(0, 1)`` (recapture); for each of 294 birds over 7 years,
    ``z_t ~ Bernoulli(phi z_{t-1})`` (alive, enumerated) after its first capture and
    ``y_t ~ Bernoulli(rho z_t)`` (captured). Pyro's ``examples/capture_recapture/cjs.py::model_1`` on its
    bundled dipper data (``vipkg/models/data/``, source in its README), with Pyro's masking convention:
    before and at the first capture the bird is alive and its capture is not scored (the model is
    conditional on first capture). Pyro's example updates its mask in place
    (``first_capture_mask |= ...``) after handing it to ``poutine.mask``, so by the time its trace is
    scored every mask is the last one and the occasions before each first capture are scored too; this
    program builds a new mask per occasion, which scores what the model states.

    Parameters
    ----------
    form : {"tensor", "pyro"}
        ``"tensor"``: the two-state forward algorithm per bird by hand; ``"pyro"``: Pyro's program, ``z_t``
        marked for enumeration in a ``pyro.markov`` chain inside the ``animals`` plate.
    dtype : torch.dtype, optional

    Returns
    -------
    Model
        Sites ``phi`` and ``rho`` (``unit_interval``).

    References
    ----------
    .. [1] Cormack, R. M. "Estimates of survival from the sighting of marked animals". Biometrika 51
       (1964); Jolly, G. M. (1965); Seber, G. A. F. (1965).
    .. [2] Lebreton, J.-D., Burnham, K. P., Clobert, J., Anderson, D. R. "Modeling survival and testing
       biological hypotheses using marked animals". Ecological Monographs 62 (1992).
    .. [3] Pyro example ``examples/capture_recapture/cjs.py`` (Jankowiak, Obermeyer).
    """
    check_form(form)
    dtype = dtype or torch.get_default_dtype()
    history = _dipper(dtype)
    if form == "pyro":
        return Model.from_pyro(_pyro_cjs, history, name="capture_recapture")
    sites = {
        "phi": Site(torch.Size([]), constraints.unit_interval),
        "rho": Site(torch.Size([]), constraints.unit_interval),
    }

    def log_joint(latents, data):
        phi, rho = latents["phi"][:, None], latents["rho"][:, None]  # [S, 1] against [S, N] birds
        h = data["history"]
        N, T = h.shape
        S = phi.shape[0]
        seen = torch.zeros(N, dtype=torch.bool, device=h.device)
        # alpha[..., s]: log p(alive = s now, captures so far); the program starts every bird alive.
        alpha = torch.zeros(S, N, 2, dtype=phi.dtype, device=phi.device)
        alpha[..., 0] = -math.inf
        zeros = torch.zeros(S, N, dtype=phi.dtype, device=phi.device)
        # The capture probability given alive = 0 / 1; Pyro's Bernoulli clamps probabilities to (eps, 1-eps).
        q = clamp_probs(torch.stack([zeros, rho.expand(S, N)], -1))
        for t in range(T):
            m = seen.to(phi.dtype)
            # P(alive next | alive before = 0 / 1): phi * before after the first capture, 1 before it.
            p = clamp_probs(torch.stack([zeros + (1 - m), m * phi + (1 - m)], -1))
            trans = torch.stack([torch.log1p(-p), p.log()], -1)  # [S, N, before, next]
            alpha = torch.logsumexp(alpha[..., :, None] + trans, -2)
            y = h[:, t][None, :, None]
            y_lp = y * q.log() + (1 - y) * torch.log1p(-q)
            alpha = alpha + torch.where(seen[None, :, None], y_lp, torch.zeros_like(y_lp))
            seen = seen | h[:, t].bool()
        return torch.logsumexp(alpha, -1).sum(-1)

    return Model(
        sites,
        log_joint,
        data={"history": history},
        name="capture_recapture",
        pyro_model=(_pyro_cjs, (history,), {}),
        observed={"history": history},
    )


def _pyro_cjs(capture_history):
    import pyro
    import pyro.distributions as dist
    import pyro.poutine as poutine

    N, T = capture_history.shape
    dtype = capture_history.dtype
    zero, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
    phi = pyro.sample("phi", dist.Uniform(zero, one))
    rho = pyro.sample("rho", dist.Uniform(zero, one))
    with pyro.plate("animals", N, dim=-1):
        z = torch.ones(N, dtype=dtype)
        first_capture_mask = torch.zeros(N, dtype=torch.bool)
        for t in pyro.markov(range(T)):
            with poutine.mask(mask=first_capture_mask):
                m = first_capture_mask.to(dtype)
                z = pyro.sample(f"z_{t}", dist.Bernoulli(m * phi * z + (1 - m)), infer=_ENUM)
                pyro.sample(f"y_{t}", dist.Bernoulli(rho * z), obs=capture_history[:, t])
            first_capture_mask = first_capture_mask | capture_history[:, t].bool()
