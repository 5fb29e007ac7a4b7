"""Categorical and Bernoulli families over named discrete sites.

Like the Gamma/Beta/Dirichlet guides these live in the sites' own space and
cover named sites (per-datum sites such as cluster assignments ``c [N]``
included: every entry gets its own probabilities). Their draws are the sites
flattened and concatenated in model order, ``[*batch, numel]`` (integers for
:class:`Categorical`, 0./1. for :class:`Bernoulli`). They have no
reparameterized draws: fit them with
:class:`~vipkg.estimators.score.ScoreFunction` (with a control variate) or,
for :class:`Categorical`, :class:`~vipkg.estimators.relaxed.GumbelSoftmax`.

Both expose :meth:`log_prob_parts`, the per-site, per-entry log densities that
score-function estimators use to Rao-Blackwellize.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Bernoulli as TorchBernoulli
from torch.distributions import Categorical as TorchCategorical
from torch.distributions import Independent, constraints

from vipkg.guides.positive import _NamedSiteGuide, _select_sites, _unwrap

__all__ = ["Categorical", "Bernoulli", "num_categories"]


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
        if logits is not None and not isinstance(logits, dict):
            if len(names) != 1:
                raise ValueError(
                    f"Categorical covers several sites {names}; give logits as a dict {{site: tensor}}."
                )
            logits = {names[0]: logits}
        logits = logits or {}
        unknown = set(logits) - set(names)
        if unknown:
            raise ValueError(
                f"Categorical: logits given for unknown site(s) {sorted(unknown)}; sites: {names}."
            )
        self.raw_logits = nn.ParameterDict()
        for k in names:
            shape = (*self.site_shapes[k], self.num_categories[k])
            if k in logits:
                t = torch.as_tensor(logits[k], dtype=dtype)
                try:
                    t = t.expand(shape).clone()
                except RuntimeError:
                    raise ValueError(
                        f"Categorical: logits[{k!r}] must broadcast to [*site_shape, K] = {list(shape)}, "
                        f"got {list(t.shape)}."
                    ) from None
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"Categorical: logits[{k!r}] has NaN or infinite entries.")
            else:
                t = torch.zeros(shape, dtype=dtype)
            self.raw_logits[k] = nn.Parameter(t)

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
        return torch.cat(parts, 0)

    def forward(self) -> Independent:
        return Independent(TorchCategorical(logits=self._flat_logits(), validate_args=False), 1)

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
