"""Categorical, one-hot categorical and Bernoulli families over named discrete sites.

Like the Gamma/Beta/Dirichlet guides these live in the sites' own space and
cover named sites (per-datum sites such as cluster assignments ``c [N]``
included: every entry gets its own probabilities). Their draws are the sites
flattened and concatenated in model order, ``[*batch, numel]`` (integers for
:class:`Categorical`, one-hot 0./1. vectors for :class:`OneHotCategorical`,
0./1. for :class:`Bernoulli`). They have no reparameterized draws: fit them
with :class:`~vipkg.estimators.score.ScoreFunction` (with a control variate)
or, for :class:`Categorical` and :class:`OneHotCategorical`,
:class:`~vipkg.estimators.relaxed.GumbelSoftmax`.

All expose :meth:`log_prob_parts`, the per-site, per-entry log densities that
score-function estimators use to Rao-Blackwellize.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Distribution, Independent, constraints

from vipkg.guides.positive import _NamedSiteGuide, _select_sites, _unwrap

__all__ = ["Categorical", "OneHotCategorical", "Bernoulli", "num_categories"]


def num_categories(support) -> int | None:
    """``K`` for a support ``{0, ..., K-1}`` (``integer_interval(0, K-1)``); ``None`` otherwise."""
    s = _unwrap(support)
    if isinstance(s, constraints.integer_interval) and int(s.lower_bound) == 0:
        return int(s.upper_bound) + 1
    return None


def _is_categorical(support) -> bool:
    k = num_categories(support)
    return k is not None and k >= 2


def _is_boolean(support) -> bool:
    return isinstance(_unwrap(support), type(constraints.boolean))


def _is_one_hot(support) -> bool:
    """Pyro's and torch's ``OneHotCategorical`` support (``constraints.one_hot``), batched or not."""
    return isinstance(_unwrap(support), type(constraints.one_hot))


def _logit_parameters(family, names, shapes, logits, dtype, what) -> nn.ParameterDict:
    """Initial logits per site, ``{site: Parameter[shapes[site]]}``, from ``None``, a tensor (one
    site) or ``{site: tensor}``; ``what`` says in errors what the shape is."""
    if logits is not None and not isinstance(logits, dict):
        if len(names) != 1:
            raise ValueError(
                f"{family} covers several sites {names}; give logits as a dict {{site: tensor}}."
            )
        logits = {names[0]: logits}
    logits = logits or {}
    unknown = set(logits) - set(names)
    if unknown:
        raise ValueError(f"{family}: logits given for unknown site(s) {sorted(unknown)}; sites: {names}.")
    out = nn.ParameterDict()
    for k in names:
        shape = shapes[k]
        if k in logits:
            t = torch.as_tensor(logits[k], dtype=dtype)
            try:
                t = t.expand(shape).clone()
            except RuntimeError:
                raise ValueError(
                    f"{family}: logits[{k!r}] must broadcast to {what} = {list(shape)}, got {list(t.shape)}."
                ) from None
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{family}: logits[{k!r}] has NaN or infinite entries.")
        else:
            t = torch.zeros(shape, dtype=dtype)
        out[k] = nn.Parameter(t)
    return out


class _DiscreteGuide(_NamedSiteGuide):
    def _site_log_probs(self, z):  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob_parts(self, model, z):
        """Named sites and per-site, per-entry log densities for draws ``z [*batch, numel]``.

        Returns ``(latents, parts)``: ``latents = {site: Tensor[n, *shape]}`` and
        ``parts = [(frozenset({site}), log_q [n, *shape]), ...]`` with ``n`` the
        flattened batch; each entry of a site is an independent factor of the guide.
        """
        flat = z.reshape(-1, z.shape[-1])
        latents = self._split(flat)
        lps = self._site_log_probs(latents)
        return latents, [(frozenset({k}), lps[k]) for k in self.site_names]


class Categorical(_DiscreteGuide):
    """Independent categorical distributions over every entry of integer sites ``{0, ..., K-1}``.

    Parameters
    ----------
    model : vipkg.Model
    sites : str or list of str, optional
        The categorical sites it covers (default: all sites with support
        ``integer_interval(0, K-1)``, as Pyro's ``Categorical`` declares). It must
        cover every site of the model (use ``Composite`` to mix families).
    logits : Tensor or dict of site to Tensor, optional
        Initial logits, shape ``[*site_shape, K]`` per site (default zeros: uniform).
    dtype : torch.dtype, optional

    Notes
    -----
    ``guide()`` is ``Independent(Categorical(logits), 1)`` over the sites
    flattened and concatenated; sites with fewer categories than the largest
    are padded with ``-inf`` logits, which have probability zero.
    :meth:`site_logits` gives each site's ``[*shape, K]`` logits (what
    ``GumbelSoftmax`` relaxes).

    References
    ----------
    .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    .. [2] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with
       Gumbel-Softmax". ICLR (2017).
    """

    def __init__(self, model, sites=None, *, logits=None, dtype=None):
        names = _select_sites(model, sites, _is_categorical, "Categorical", "categorical (integer 0..K-1)")
        super().__init__(model, names)
        dtype = dtype or torch.get_default_dtype()
        self.num_categories = {k: num_categories(model.sites[k].support) for k in names}
        self.max_categories = max(self.num_categories.values())
        shapes = {k: (*self.site_shapes[k], self.num_categories[k]) for k in names}
        self.raw_logits = _logit_parameters("Categorical", names, shapes, logits, dtype, "[*site_shape, K]")

    def site_logits(self) -> dict[str, torch.Tensor]:
        """Logits per site, ``{site: Tensor[*shape, K]}``."""
        return {k: self.raw_logits[k] for k in self.site_names}

    @property
    def probs(self) -> dict[str, torch.Tensor]:
        """Category probabilities per site, ``{site: Tensor[*shape, K]}``."""
        return {k: torch.softmax(v, -1) for k, v in self.site_logits().items()}

    def _flat_logits(self):
        parts = []
        for k in self.site_names:
            v = self.raw_logits[k].reshape(-1, self.num_categories[k])
            pad = self.max_categories - v.shape[-1]
            if pad:
                v = torch.cat([v, v.new_full((v.shape[0], pad), float("-inf"))], -1)
            parts.append(v)
        # One site (every part of a chain's Composite): no copy, one autograd node fewer per step.
        return torch.cat(parts, 0) if len(parts) > 1 else parts[0]

    def forward(self) -> Independent:
        return Independent(TorchCategorical(logits=self._flat_logits(), validate_args=False), 1)

    def sample_and_log_prob(self, shape=()):
        """Draws ``[*shape, numel]`` (no gradient path) and their log density ``[*shape]``.

        The same operations as ``guide().sample(shape)`` and ``guide().log_prob(z)`` (the same
        draws from the same random numbers, the same values and gradients bit for bit), without
        building the two distribution objects: a chain with hundreds of categorical sites has one
        such part per site, each drawn every step, and the objects cost more than the arithmetic.
        """
        shape = torch.Size(shape)
        logits = self._flat_logits()
        # Categorical's own operations in its order, so that draws and values stay bit-identical
        logits = logits - logits.logsumexp(dim=-1, keepdim=True)
        with torch.no_grad():
            probs = torch.softmax(logits, dim=-1)
            z = torch.multinomial(probs, shape.numel(), True).T.reshape(shape + logits.shape[:-1])
        log_pmf = logits.expand(*z.shape, logits.shape[-1])
        log_q = log_pmf.gather(-1, z.unsqueeze(-1)).squeeze(-1).sum(-1)
        return z, log_q

    def _site_log_probs(self, latents):
        out = {}
        for k in self.site_names:
            logp = torch.log_softmax(self.raw_logits[k], -1)
            idx = latents[k].long()
            out[k] = torch.gather(logp.expand(*idx.shape, logp.shape[-1]), -1, idx.unsqueeze(-1)).squeeze(-1)
        return out

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the guide (sum over every entry of every site)."""
        return sum(
            TorchCategorical(logits=self.raw_logits[k], validate_args=False).entropy().sum()
            for k in self.site_names
        )


def _one_hot_sample(logits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """One-hot draws ``[*shape, *logits.shape]``, as ``torch.distributions.OneHotCategorical.sample``."""
    # torch's OneHotCategorical builds its inner Categorical with argument validation on, whose
    # ``if not valid.all()`` reads on the host every step; the draw is written out instead.
    idx = TorchCategorical(logits=logits, validate_args=False).sample(shape)
    out = torch.zeros(*idx.shape, logits.shape[-1], dtype=logits.dtype, device=logits.device)
    return out.scatter_(-1, idx.unsqueeze(-1), 1.0)


def _one_hot_log_prob(logits: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``torch.distributions.OneHotCategorical(logits=logits).log_prob(value)``, without the host read
    of its inner Categorical's argument check: the log probability of the category ``argmax value``."""
    return TorchCategorical(logits=logits, validate_args=False).log_prob(value.argmax(-1))


class _OneHotSites(Distribution):
    """Independent one-hot categorical draws of named sites, flattened and concatenated:
    ``[*batch, numel]``. Each site's density is ``torch.distributions.OneHotCategorical``'s."""

    arg_constraints: dict = {}

    def __init__(self, guide):
        self._guide = guide
        super().__init__(torch.Size(), torch.Size([guide.numel]), validate_args=False)

    def sample(self, sample_shape=()):
        g, shape = self._guide, torch.Size(sample_shape)
        with torch.no_grad():
            draws = [_one_hot_sample(g.raw_logits[k], shape).reshape(*shape, -1) for k in g.site_names]
        return torch.cat(draws, -1) if len(draws) > 1 else draws[0]

    def log_prob(self, value):
        g, batch = self._guide, value.shape[:-1]
        per = g._split(value)
        total = 0.0
        for k in g.site_names:
            total = total + _one_hot_log_prob(g.raw_logits[k], per[k]).reshape(*batch, -1).sum(-1)
        return total


class OneHotCategorical(_DiscreteGuide):
    """Independent one-hot categorical distributions over every entry of one-hot sites ``[..., K]``.

    Parameters
    ----------
    model : vipkg.Model
    sites : str or list of str, optional
        The one-hot sites it covers (default: all sites with support
        ``constraints.one_hot``, as Pyro's ``OneHotCategorical`` declares). It must
        cover every site of the model (use ``Composite`` to mix families).
    logits : Tensor or dict of site to Tensor, optional
        Initial logits, of the site's shape ``[..., K]`` per site (default zeros: uniform).
    dtype : torch.dtype, optional

    Notes
    -----
    A site of shape ``[*b, K]`` is ``prod(b)`` independent categorical entries, each a
    one-hot vector over the last dimension; its ``log q`` is
    ``torch.distributions.OneHotCategorical(logits).log_prob``. Draws are float
    0./1. vectors, flattened and concatenated in model order as ``[*batch, numel]``
    (``constrain`` gives each site its shape back). :meth:`site_logits` gives the
    ``[*b, K]`` logits that ``GumbelSoftmax`` relaxes: its draws then have the site's
    own shape, which is what the model accepts, so no conversion is needed. In a
    Pyro program, though, ``OneHotCategorical.log_prob`` scores ``argmax y`` and passes
    the relaxation no gradient from the site's own prior (see ``GumbelSoftmax``).

    References
    ----------
    .. [1] Ranganath, R., Gerrish, S., Blei, D. M. "Black Box Variational
       Inference". AISTATS (2014).
    .. [2] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with
       Gumbel-Softmax". ICLR (2017).
    """

    def __init__(self, model, sites=None, *, logits=None, dtype=None):
        names = _select_sites(model, sites, _is_one_hot, "OneHotCategorical", "one-hot categorical")
        for k in names:
            shape = model.sites[k].shape
            if len(shape) == 0 or shape[-1] < 2:
                raise ValueError(
                    f"OneHotCategorical: site {k!r} has shape {list(shape)}; a one-hot site needs a last "
                    "dimension K >= 2 (the categories)."
                )
        super().__init__(model, names)
        dtype = dtype or torch.get_default_dtype()
        self.num_categories = {k: int(self.site_shapes[k][-1]) for k in names}
        self.raw_logits = _logit_parameters(
            "OneHotCategorical", names, self.site_shapes, logits, dtype, "the site's shape [..., K]"
        )

    def site_logits(self) -> dict[str, torch.Tensor]:
        """Logits per site, ``{site: Tensor[*shape]}`` (the last dimension the categories)."""
        return {k: self.raw_logits[k] for k in self.site_names}

    @property
    def probs(self) -> dict[str, torch.Tensor]:
        """Category probabilities per site, ``{site: Tensor[*shape]}``."""
        return {k: torch.softmax(v, -1) for k, v in self.site_logits().items()}

    def forward(self) -> _OneHotSites:
        return _OneHotSites(self)

    def _site_log_probs(self, latents):
        return {k: _one_hot_log_prob(self.raw_logits[k], latents[k]) for k in self.site_names}

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the guide (sum over every entry of every site)."""
        return sum(
            TorchCategorical(logits=self.raw_logits[k], validate_args=False).entropy().sum()
            for k in self.site_names
        )


class Bernoulli(_DiscreteGuide):
    """Independent Bernoulli distributions over every entry of boolean sites.

    Parameters
    ----------
    model : vipkg.Model
    sites : str or list of str, optional
        The boolean sites it covers (default: all sites with support
        ``constraints.boolean``, as Pyro's ``Bernoulli`` declares); it must cover
        every site of the model.
    logits : float, Tensor [numel] or dict of site to Tensor, optional
        Initial logits (default 0: probability 1/2).
    dtype : torch.dtype, optional

    Notes
    -----
    Draws are floats 0./1. (as ``torch.distributions.Bernoulli`` gives), flattened
    and concatenated in model order.

    References
    ----------
    .. [1] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in
       Belief Networks". ICML (2014).
    """

    def __init__(self, model, sites=None, *, logits=None, dtype=None):
        names = _select_sites(model, sites, _is_boolean, "Bernoulli", "boolean")
        super().__init__(model, names)
        dtype = dtype or torch.get_default_dtype()
        if logits is None:
            t = torch.zeros(self.numel, dtype=dtype)
        elif isinstance(logits, dict):
            if set(logits) != set(names):
                raise ValueError(
                    f"Bernoulli: logits given per site must name exactly {names}, got {list(logits)}."
                )
            t = torch.cat(
                [
                    torch.as_tensor(logits[k], dtype=dtype).expand(self.site_shapes[k]).reshape(-1)
                    for k in names
                ]
            )
        else:
            t = torch.as_tensor(logits, dtype=dtype)
            if t.dim() == 0:
                t = t.expand(self.numel)
            if t.shape != (self.numel,):
                raise ValueError(
                    f"Bernoulli: logits must be a scalar or have shape ({self.numel},), got {list(t.shape)}."
                )
        if not bool(torch.isfinite(t).all()):
            raise ValueError("Bernoulli: logits has NaN or infinite entries.")
        self.logits = nn.Parameter(t.clone())

    @property
    def probs(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def forward(self) -> Independent:
        return Independent(TorchBernoulli(logits=self.logits, validate_args=False), 1)

    def _site_log_probs(self, latents):
        per = self._split(self.logits)
        return {
            k: TorchBernoulli(logits=per[k], validate_args=False).log_prob(latents[k].to(self.logits.dtype))
            for k in self.site_names
        }
