"""Amortized families: local posteriors whose parameters an encoder network computes from each datum.

A model with local latent sites (one per data point, in a subsampled ``pyro.plate``, see
:attr:`vipkg.Model.local_sites`) has as many local posteriors as data points. Instead of
parameters per data point (a :class:`~vipkg.guides.MeanFieldNormal` over the sites, indexed
by the minibatch), an amortized family has one ``nn.Module``, the *encoder*, that maps the
rows of a data entry to the parameters of each row's local posterior (Kingma & Welling
2014; Mnih & Gregor 2014). The encoder's parameters are the family's parameters: fitting the
family trains the encoder, and the fitted encoder gives the posterior of any new datum.

- :class:`AmortizedNormal`: independent Gaussians over the unconstrained view of each row's
  sites (``encoder(x_rows) -> (loc, raw_scale)``, ``scale = softplus(raw_scale)``), mapped
  through ``torch.distributions.biject_to(site.support)`` with its log-Jacobian.
- :class:`AmortizedCategorical`, :class:`AmortizedOneHotCategorical`,
  :class:`AmortizedBernoulli`: ``encoder(x_rows) -> logits``, for discrete codes.

They follow the conventions of the guides over named sites (:mod:`vipkg.guides.discrete`):
draws are the sites flattened and concatenated, ``[*batch, numel]``; :meth:`log_prob_parts`
gives one factor per row (per site and entry for the discrete families) for score-function
estimators' per-datum Rao-Blackwellization; the categorical families expose
``site_logits()`` and ``entropy()`` for :class:`~vipkg.estimators.relaxed.GumbelSoftmax`.

On a minibatch (:func:`vipkg.guides.minibatch.minibatch_guide`, which ``vipkg.fit`` calls
every step) the family's view applies the encoder to the minibatch's rows only, read from
the minibatch model's data, and reports ``log_q_scale = N / B`` like every local view. The
full family (``guide()`` outside a fit: ``FitResult.sample``, ``to_arviz``) applies the encoder
to all ``N`` rows.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, biject_to, constraints

from vipkg.guides.discrete import _is_boolean, _is_categorical, _is_one_hot, _one_hot_sample, num_categories
from vipkg.guides.positive import _NamedSiteGuide, _select_sites, _unwrap
from vipkg.model import ModelError

__all__ = [
    "Amortized",
    "AmortizedNormal",
    "AmortizedCategorical",
    "AmortizedOneHotCategorical",
    "AmortizedBernoulli",
]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def _is_continuous(support) -> bool:
    return not getattr(_unwrap(support), "is_discrete", False)


def _event_dim(support) -> int:
    """The number of trailing dimensions of a site that its support couples (0 for elementwise)."""
    return int(getattr(support, "event_dim", 0))


class _AmortizedDistribution(Distribution):
    """The family at one evaluation of its encoder: flat draws ``[*batch, numel]``."""

    arg_constraints: dict = {}

    def __init__(self, family, params):
        self._family, self._params = family, params
        super().__init__(torch.Size(), torch.Size([family.numel]), validate_args=False)

    @property
    def has_rsample(self) -> bool:
        return self._family.reparameterized

    def rsample(self, sample_shape=()):
        if not self._family.reparameterized:
            raise NotImplementedError(f"{type(self._family).__name__} has no reparameterized draws.")
        return self._family._draw(self._params, torch.Size(sample_shape))[0]

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self._family._sample(self._params, torch.Size(sample_shape))

    def log_prob(self, value):
        batch = value.shape[:-1]
        lps = self._family._site_log_probs(self._params, self._family._split(value))
        total = 0.0
        for lp in lps.values():
            total = total + lp.reshape(*batch, -1).sum(-1)
        return total

    def entropy(self):
        return self._family._entropy(self._params)


class Amortized(_NamedSiteGuide):
    """Base class of the amortized families (see the module's description).

    Parameters
    ----------
    model : vipkg.Model
    encoder : torch.nn.Module
        Maps the rows ``data[idx]`` (``[B, *row_shape]``) to the parameters of those rows'
        local posteriors; registered as the submodule ``encoder``, so its parameters are the
        family's.
    data : str or Tensor
        The name of the entry of ``model.data`` whose rows the encoder reads (a Pyro
        program's tensor arguments are named by its parameters, e.g. ``"x"``), or the
        tensor itself ``[N, ...]``. Its first dimension indexes the plate's data points.
    sites : str or list of str, optional
        The sites it covers (default: every site it can represent). They must be the local
        sites of one subsampled plate and every site of ``model`` (combine with other
        families through :class:`~vipkg.guides.Composite`). On a model without subsampled
        plates (all data points at once) the first dimension of every site is the datum.
    dtype : torch.dtype, optional
        Converts the encoder (``encoder.to(dtype)``); by default it keeps its own.
    """

    #: Whether draws are reparameterized (pathwise gradients).
    reparameterized = False
    _family = "Amortized"
    _what = "local"

    def __init__(self, model, encoder, data="x", sites=None, *, dtype=None, _accepts=None):
        if not isinstance(encoder, nn.Module):
            raise ValueError(
                f"{self._family}: encoder must be a torch.nn.Module mapping data rows to the local "
                f"posterior's parameters, got {type(encoder).__name__}."
            )
        if not any(p.is_floating_point() for p in encoder.parameters()):
            raise ValueError(
                f"{self._family}: the encoder {type(encoder).__name__} has no parameters; the family's "
                "parameters are the encoder's (a fixed posterior needs no fitting)."
            )
        names = _select_sites(model, sites, _accepts, self._family, self._what)
        super().__init__(model, names)
        local = dict(getattr(model, "local_sites", {}) or {})
        if any(k in local for k in names):
            outside = [k for k in names if k not in local]
            plates = {local[k][0] for k in names if k in local}
            if outside or len(plates) != 1:
                where = {k: local[k][0] for k in names if k in local}
                raise ModelError(
                    f"{self._family} covers sites {names}, which must all be local sites of one "
                    f"subsampled plate; local (site: plate): {where}, not local: {outside}. Guide "
                    "global sites with their own family in a Composite."
                )
            (self.plate,) = plates
            self.axes = {k: local[k][1] for k in names}
            self.size = int(model.plates[self.plate].size)
        else:
            # No subsampling: every data point at once; the datum is each site's first dimension.
            self.plate, self.axes = None, {k: 0 for k in names}
            empty = [k for k in names if len(self.site_shapes[k]) == 0]
            if empty:
                raise ModelError(
                    f"{self._family}: site(s) {empty} of model {model.name!r} are scalars; an amortized "
                    "family needs one row per datum (a site in a pyro.plate)."
                )
            self.size = int(self.site_shapes[names[0]][0])
        for k in names:
            a = self.axes[k]
            if a >= len(self.site_shapes[k]) - _event_dim(model.sites[k].support):
                raise ModelError(f"{self._family}: site {k!r} has its plate at an event dimension ({a}).")
        if isinstance(data, str):
            available = {k: tuple(v.shape) for k, v in (getattr(model, "data", {}) or {}).items()}
            if data not in available:
                raise ValueError(
                    f"{self._family}: data={data!r} is not an entry of model {model.name!r}'s data "
                    f"{available}; name the argument whose rows the encoder reads, or pass the tensor."
                )
            self.data_name, rows = data, model.data[data]
        elif isinstance(data, torch.Tensor):
            self.data_name, rows = None, data
        else:
            raise ValueError(
                f"{self._family}: data must be a data name or a tensor, got {type(data).__name__}."
            )
        if rows.dim() == 0 or rows.shape[0] != self.size:
            raise ValueError(
                f"{self._family}: the data {data if isinstance(data, str) else 'tensor'!r} has shape "
                f"{tuple(rows.shape)}; its first dimension must be the plate's {self.size} data points."
            )
        self.encoder = encoder if dtype is None else encoder.to(dtype)
        if rows.is_floating_point():
            rows = rows.to(self.dtype)
        # Not persistent: the data is the model's, not part of the fitted state.
        self.register_buffer("_rows", rows, persistent=False)
        self._index = None
        self._inputs = None
        self._full_shapes = dict(self.site_shapes)
        self._supports = {k: model.sites[k].support for k in names}

    # ----------------------------------------------------------------- rows
    @property
    def index(self) -> torch.Tensor | None:
        """The data points of this view (``None``: all of them)."""
        return self._index

    def inputs(self) -> torch.Tensor:
        """The rows the encoder is applied to: the minibatch's in a view, all otherwise."""
        return self._rows if self._inputs is None else self._inputs

    def minibatch_view(self, index: torch.Tensor, data: Mapping[str, torch.Tensor] | None = None):
        """The family on the data points ``index`` (a view sharing the encoder).

        Parameters
        ----------
        index : LongTensor [B]
            The minibatch's data points.
        data : mapping, optional
            The minibatch model's data; the rows are read from ``data[self.data_name]`` there
            (moved like the model), else from the family's own copy.
        """
        view = copy.copy(self)  # shares _parameters / _modules / _buffers: same encoder, same data
        source = None if data is None or self.data_name is None else data.get(self.data_name)
        if source is None:
            source = self._rows
        rows = source.index_select(0, index.to(source.device))
        if rows.is_floating_point():
            rows = rows.to(self.dtype)
        view.__dict__["_index"] = index
        view.__dict__["_inputs"] = rows
        B = int(index.shape[0])
        shapes = {}
        for k, shp in self._full_shapes.items():
            s = list(shp)
            s[self.axes[k]] = B
            shapes[k] = torch.Size(s)
        view.__dict__["site_shapes"] = shapes
        view.__dict__["_numels"] = [max(1, math.prod(s)) for s in shapes.values()]
        view.__dict__["numel"] = sum(view._numels)
        return view

    def with_model(self, model, data=None):
        """The same family (the same encoder, shared) on another model, e.g. held-out rows.

        ``data`` defaults to this family's data name (or, for a family given a tensor, must be
        given).
        """
        data = self.data_name if data is None else data
        if data is None:
            raise ValueError(f"{self._family}.with_model: this family was given a tensor; pass data=.")
        return self._rebuild(model, data)

    def _rebuild(self, model, data):  # pragma: no cover - abstract
        raise NotImplementedError

    # ------------------------------------------------------------- encoder
    def _row_shape(self, shape: torch.Size, axis: int) -> tuple[int, ...]:
        return tuple(shape[:axis]) + tuple(shape[axis + 1 :])

    def _encode(self) -> tuple[dict[str, list[torch.Tensor]], int]:
        """``({site: [tensor, ...]}, B)``: the encoder's outputs per site, ``[B, ...]`` each (unshaped)."""
        x = self.inputs()
        out = self.encoder(x)
        n_out = self._n_outputs
        if isinstance(out, Mapping):
            missing = set(self.site_names) - set(out)
            if missing:
                raise ValueError(
                    f"{self._family}: the encoder returned a dict without site(s) {sorted(missing)}; "
                    f"it must have an entry per site {self.site_names}."
                )
            per = {k: out[k] for k in self.site_names}
        elif len(self.site_names) == 1:
            per = {self.site_names[0]: out}
        else:
            raise ValueError(
                f"{self._family} covers several sites {self.site_names}: the encoder must return a dict "
                "{site: output}."
            )
        result = {}
        for k, v in per.items():
            if isinstance(v, (tuple, list)):
                parts = list(v)
            elif n_out == 1:
                parts = [v]
            else:
                if v.shape[-1] % n_out:
                    raise ValueError(
                        f"{self._family}: the encoder's output for site {k!r} has shape {list(v.shape)}; "
                        f"a single tensor is split in {n_out} along its last dimension, which must then "
                        f"be divisible by {n_out} (or return a tuple of {n_out} tensors)."
                    )
                parts = list(v.chunk(n_out, dim=-1))
            if len(parts) != n_out:
                raise ValueError(
                    f"{self._family}: site {k!r} needs {n_out} encoder outputs, got {len(parts)}."
                )
            result[k] = parts
        return result, x.shape[0]

    def _shaped(self, k: str, t: torch.Tensor, B: int, row_shape, what: str) -> torch.Tensor:
        """An encoder output ``[B, *row_shape]`` (or ``[B, prod(row_shape)]``) in the site's layout."""
        if t.dim() == 0 or t.shape[0] != B or t[0].numel() != math.prod(row_shape):
            raise ValueError(
                f"{self._family}: the encoder's {what} for site {k!r} has shape {list(t.shape)}; "
                f"expected {[B, *row_shape]} (one row per datum of the batch)."
            )
        t = t.reshape(B, *row_shape)
        return t.movedim(0, self.axes[k]) if self.axes[k] else t

    def _params(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self) -> _AmortizedDistribution:
        return _AmortizedDistribution(self, self._params())

    def _flat(self, per: dict, batch: torch.Size) -> torch.Tensor:
        flat = [per[k].reshape(*batch, -1) for k in self.site_names]
        return torch.cat(flat, -1) if len(flat) > 1 else flat[0]

    def rsample_and_log_prob(self, shape=()):
        if not self.reparameterized:
            raise NotImplementedError(
                f"{self._family} has no reparameterized draws; use ScoreFunction (or GumbelSoftmax for "
                "the categorical families)."
            )
        return self._draw(self._params(), torch.Size(shape))

    def _sample(self, params, shape):
        """Flat draws ``[*shape, numel]`` (no gradient path)."""
        with torch.no_grad():
            return self._flat(self._sample_sites(params, shape), shape)

    def sample_and_log_prob(self, shape=()):
        """Draws ``[*shape, numel]`` without a path to the encoder and their (live) log density."""
        params = self._params()
        z = self._sample(params, torch.Size(shape))
        return z, _AmortizedDistribution(self, params).log_prob(z)

    def log_prob_parts(self, model, z):
        """Named sites and independent factors for draws ``z [*batch, numel]``.

        Returns ``(latents, parts)``: ``latents = {site: Tensor[n, *shape]}`` and
        ``parts = [(frozenset({site}), log_q [n, *local]), ...]`` with ``n`` the flattened batch;
        each datum (and, for the discrete families, each entry) is an independent factor.
        """
        flat = z.reshape(-1, z.shape[-1])
        latents = self._split(flat)
        lps = self._site_log_probs(self._params(), latents)
        return latents, [(frozenset({k}), lps[k]) for k in self.site_names]

    def datum_log_prob(self, latents: Mapping[str, torch.Tensor], stopped: bool = False) -> torch.Tensor:
        """``log q(z_i | x_i)`` of each row, ``[n, B]``, for named draws ``{site: [n, *shape]}``.

        ``stopped``: the encoder's outputs are detached, so the gradient reaches the encoder only
        through the draws (STL, DReG). Per-datum bounds (IWAE per data point) weight each row's
        draws with it.
        """
        params = self._params()
        if stopped:
            params = {
                k: tuple(t.detach() for t in v) if isinstance(v, tuple) else v.detach()
                for k, v in params.items()
            }
        lps = self._site_log_probs(params, {k: latents[k] for k in self.site_names})
        out = None
        for k, lp in lps.items():
            a = self.axes[k] + 1
            lp = lp.movedim(a, 1)
            lp = lp.reshape(*lp.shape[:2], -1).sum(-1)
            out = lp if out is None else out + lp
        return out


def _row_factor(lp: torch.Tensor, axis: int) -> torch.Tensor:
    """``lp [n, *shape]`` summed over the dimensions after the plate axis: one factor per datum."""
    keep = axis + 2  # the particle dimension, the dimensions up to and including the plate
    return lp.reshape(*lp.shape[:keep], -1).sum(-1) if lp.dim() > keep else lp


class AmortizedNormal(Amortized):
    """Independent Gaussians per datum whose parameters an encoder computes: ``q(z_i | x_i)``.

    For each site, ``u_i ~ N(loc_i, diag(scale_i^2))`` over the site's unconstrained view and
    ``z_i = T(u_i)`` with ``T = biject_to(site.support)`` (the identity for real sites); ``log q``
    subtracts ``log |det dT/du|``. ``(loc, raw_scale) = encoder(x[idx])``, each
    ``[B, *row_shape]`` (or ``[B, prod(row_shape)]``; ``row_shape`` is a row's unconstrained
    shape) or one tensor ``[B, 2 * prod(row_shape)]`` split in two, or a dict ``{site: ...}`` of
    those for several sites; ``scale = softplus(raw_scale)``.

    Parameters
    ----------
    model : vipkg.Model
    encoder : torch.nn.Module
        ``x_rows [B, ...] -> (loc, raw_scale)`` (see above).
    data : str or Tensor
        The data entry (name in ``model.data``, or the tensor) whose rows the encoder reads.
    sites : str or list of str, optional
        The continuous local sites it covers (default: every continuous site).
    dtype : torch.dtype, optional

    Notes
    -----
    Reparameterized: fit it with ``Reparam`` or ``STL`` (whose
    :meth:`rsample_and_stopped_log_prob` stops the encoder's outputs and keeps the path through
    the draw), or ``ScoreFunction``. :meth:`log_prob_parts` has one factor per datum and site,
    so a model that exposes its per-datum log-joint terms gets per-datum score costs (NVIL's
    learning signal).

    References
    ----------
    .. [1] Kingma, D. P., Welling, M. "Auto-Encoding Variational Bayes". ICLR (2014).
    .. [2] Rezende, D. J., Mohamed, S., Wierstra, D. "Stochastic Backpropagation and
       Approximate Inference in Deep Generative Models". ICML (2014).
    .. [3] Roeder, G., Wu, Y., Duvenaud, D. "Sticking the Landing: Simple, Lower-Variance
       Gradient Estimators for Variational Inference". NeurIPS (2017).
    """

    reparameterized = True
    _family = "AmortizedNormal"
    _what = "continuous"
    _n_outputs = 2

    def __init__(self, model, encoder, data="x", sites=None, *, dtype=None):
        super().__init__(model, encoder, data, sites, dtype=dtype, _accepts=_is_continuous)
        self._transforms = {k: biject_to(self._supports[k]) for k in self.site_names}
        self._real = {k: isinstance(_unwrap(self._supports[k]), constraints._Real) for k in self.site_names}

    def _rebuild(self, model, data):
        return AmortizedNormal(model, self.encoder, data, self.site_names)

    def _ushape(self, k: str) -> torch.Size:
        return torch.Size(self._transforms[k].inverse_shape(self.site_shapes[k]))

    def _params(self):
        """``{site: (loc, scale)}`` in the site's unconstrained layout (the view's rows)."""
        out, B = self._encode()
        params = {}
        for k, (loc, raw) in out.items():
            row = self._row_shape(self._ushape(k), self.axes[k])
            loc = self._shaped(k, loc, B, row, "loc")
            raw = self._shaped(k, raw, B, row, "raw_scale")
            params[k] = (loc, F.softplus(raw))
        return params

    def loc_scale(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{site: (loc, scale)}``: the Gaussians over the sites' unconstrained views at the rows."""
        return self._params()

    def _constrain_site(self, k, u):
        if self._real[k]:
            return u, None
        t = self._transforms[k]
        z = t(u)
        return z, t.log_abs_det_jacobian(u, z)

    def _draws(self, params, shape, stopped=False):
        per, lps = {}, {}
        for k, (loc, scale) in params.items():
            eps = torch.randn(*shape, *loc.shape, dtype=loc.dtype, device=loc.device)
            u = loc + scale * eps
            lq = -0.5 * eps.square() - torch.log(scale) - _HALF_LOG_2PI
            if stopped:
                # log q at stopped encoder outputs: the value, and -eps / scale as its gradient in u.
                lq = lq.detach() + (-eps / scale).detach() * (u - u.detach())
            z, ladj = self._constrain_site(k, u)
            lq = lq.reshape(*shape, -1).sum(-1)
            if ladj is not None:
                lq = lq - ladj.reshape(*shape, -1).sum(-1)
            per[k], lps[k] = z, lq
        return per, sum(lps.values())

    def _draw(self, params, shape):
        per, log_q = self._draws(params, shape)
        return self._flat(per, shape), log_q

    def _sample_sites(self, params, shape):
        return self._draws(params, shape)[0]

    def rsample_and_stopped_log_prob(self, shape=()):
        """Reparameterized draws and ``log q(z)`` with the encoder's outputs stopped: the
        gradient reaches the encoder only through the draw (STL, DReG)."""
        shape = torch.Size(shape)
        per, log_q = self._draws(self._params(), shape, stopped=True)
        return self._flat(per, shape), log_q

    def _site_log_probs(self, params, latents):
        out = {}
        for k in self.site_names:
            loc, scale = params[k]
            shape = self.site_shapes[k]
            z = latents[k].reshape(-1, *shape)
            if self._real[k]:
                u, ladj = z, None
            else:
                t = self._transforms[k]
                u = t.inv(z)
                ladj = t.log_abs_det_jacobian(u, z)
            lq = -0.5 * ((u - loc) / scale).square() - torch.log(scale) - _HALF_LOG_2PI
            # Per entry of the site's batch shape (its support's event dimensions summed), less log |J|.
            bd = len(shape) - _event_dim(self._supports[k])
            if lq.dim() > 1 + bd:
                lq = lq.reshape(*lq.shape[: 1 + bd], -1).sum(-1)
            if ladj is not None:
                lq = lq - ladj
            out[k] = _row_factor(lq, self.axes[k])
        return out

    def _entropy(self, params):
        raise NotImplementedError(f"{self._family} has no closed-form entropy over its sites.")


class _AmortizedLogits(Amortized):
    _n_outputs = 1

    def _logit_shape(self, k):  # pragma: no cover - abstract
        raise NotImplementedError

    def _params(self):
        """``{site: logits}`` in the site's layout (the view's rows)."""
        out, B = self._encode()
        return {
            k: self._shaped(k, v[0], B, self._row_shape(self._logit_shape(k), self.axes[k]), "logits")
            for k, v in out.items()
        }

    def logits(self) -> dict[str, torch.Tensor]:
        """Logits per site at the rows, in the site's layout."""
        return self._params()

    def _site_log_probs(self, params, latents):
        return {k: self._entry_log_prob(params[k], latents[k]) for k in self.site_names}


class _Categorical(_AmortizedLogits):
    def site_logits(self) -> dict[str, torch.Tensor]:
        """Logits per site at the rows, ``{site: Tensor[*shape, K]}`` (what ``GumbelSoftmax`` relaxes)."""
        return self._params()

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the family at its rows (summed over every entry of every site)."""
        return self._entropy(self._params())

    def _entropy(self, params):
        return sum(
            torch.distributions.Categorical(logits=v, validate_args=False).entropy().sum()
            for v in params.values()
        )

    @property
    def probs(self) -> dict[str, torch.Tensor]:
        """Category probabilities per site at the rows, ``{site: Tensor[..., K]}``."""
        return {k: torch.softmax(v, -1) for k, v in self.site_logits().items()}


class AmortizedCategorical(_Categorical):
    """Independent categoricals per datum over integer sites ``{0, ..., K-1}``: ``logits = encoder(x[idx])``.

    The encoder returns ``[B, *row_shape, K]`` (or ``[B, prod(row_shape) * K]``) logits, or a
    dict ``{site: logits}``; ``row_shape`` is the site's shape without the plate's dimension.

    Parameters
    ----------
    model : vipkg.Model
    encoder : torch.nn.Module
    data : str or Tensor
    sites : str or list of str, optional
        The categorical local sites it covers (default: every categorical site).
    dtype : torch.dtype, optional

    Notes
    -----
    Fit it with ``ScoreFunction`` (with a control variate such as NVIL's ``Learned``) or
    ``GumbelSoftmax`` (whose one-hot relaxations the model's log joint must accept).

    References
    ----------
    .. [1] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in Belief
       Networks". ICML (2014).
    .. [2] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with Gumbel-Softmax".
       ICLR (2017).
    """

    _family = "AmortizedCategorical"
    _what = "categorical (integer 0..K-1)"

    def __init__(self, model, encoder, data="x", sites=None, *, dtype=None):
        super().__init__(model, encoder, data, sites, dtype=dtype, _accepts=_is_categorical)
        self.num_categories = {k: num_categories(self._supports[k]) for k in self.site_names}

    def _rebuild(self, model, data):
        return AmortizedCategorical(model, self.encoder, data, self.site_names)

    def _logit_shape(self, k):
        return torch.Size([*self.site_shapes[k], self.num_categories[k]])

    def _sample_sites(self, params, shape):
        return {
            k: torch.distributions.Categorical(logits=v, validate_args=False).sample(shape)
            for k, v in params.items()
        }

    def _entry_log_prob(self, logits, z):
        logp = torch.log_softmax(logits, -1)
        idx = z.long()
        return torch.gather(logp.expand(*idx.shape, logp.shape[-1]), -1, idx.unsqueeze(-1)).squeeze(-1)


class AmortizedOneHotCategorical(_Categorical):
    """Independent one-hot categoricals per datum over one-hot sites ``[..., K]``: logits from an encoder.

    The encoder returns logits of a row's shape ``[B, *row_shape]`` (the last dimension the
    ``K`` categories; or ``[B, prod(row_shape)]``), or a dict ``{site: logits}``.

    Parameters
    ----------
    model : vipkg.Model
    encoder : torch.nn.Module
    data : str or Tensor
    sites : str or list of str, optional
        The one-hot local sites it covers (default: every one-hot site).
    dtype : torch.dtype, optional

    Notes
    -----
    Draws are float one-hot vectors; ``site_logits()`` has the sites' own shape, so
    ``GumbelSoftmax``'s relaxed draws fit the model as they are (a categorical VAE's codes).

    References
    ----------
    .. [1] Jang, E., Gu, S., Poole, B. "Categorical Reparameterization with Gumbel-Softmax".
       ICLR (2017).
    .. [2] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in Belief
       Networks". ICML (2014).
    """

    _family = "AmortizedOneHotCategorical"
    _what = "one-hot categorical"

    def __init__(self, model, encoder, data="x", sites=None, *, dtype=None):
        super().__init__(model, encoder, data, sites, dtype=dtype, _accepts=_is_one_hot)
        for k in self.site_names:
            shape = self.site_shapes[k]
            if len(shape) < 2 or shape[-1] < 2 or self.axes[k] >= len(shape) - 1:
                raise ValueError(
                    f"{self._family}: site {k!r} has shape {list(shape)}; it needs a datum dimension and "
                    "a last dimension K >= 2 (the categories)."
                )
        self.num_categories = {k: int(self.site_shapes[k][-1]) for k in self.site_names}

    def _rebuild(self, model, data):
        return AmortizedOneHotCategorical(model, self.encoder, data, self.site_names)

    def _logit_shape(self, k):
        return self.site_shapes[k]

    def _sample_sites(self, params, shape):
        return {k: _one_hot_sample(v, shape) for k, v in params.items()}

    def _entry_log_prob(self, logits, z):
        # log softmax at the drawn category (argmax of the one-hot value), with no host read.
        logp = torch.log_softmax(logits, -1)
        idx = z.argmax(-1, keepdim=True)
        return torch.gather(logp.expand(*z.shape), -1, idx).squeeze(-1)


class AmortizedBernoulli(_AmortizedLogits):
    """Independent Bernoullis per datum over boolean sites: ``logits = encoder(x[idx])``.

    The encoder returns ``[B, *row_shape]`` (or ``[B, prod(row_shape)]``) logits, or a dict
    ``{site: logits}``.

    Parameters
    ----------
    model : vipkg.Model
    encoder : torch.nn.Module
    data : str or Tensor
    sites : str or list of str, optional
        The boolean local sites it covers (default: every boolean site).
    dtype : torch.dtype, optional

    Notes
    -----
    Draws are floats 0./1.; fit it with ``ScoreFunction`` and a control variate (NVIL's
    sigmoid belief networks are this family with a learned baseline).

    References
    ----------
    .. [1] Mnih, A., Gregor, K. "Neural Variational Inference and Learning in Belief
       Networks". ICML (2014).
    """

    _family = "AmortizedBernoulli"
    _what = "boolean"

    def __init__(self, model, encoder, data="x", sites=None, *, dtype=None):
        super().__init__(model, encoder, data, sites, dtype=dtype, _accepts=_is_boolean)

    def _rebuild(self, model, data):
        return AmortizedBernoulli(model, self.encoder, data, self.site_names)

    def _logit_shape(self, k):
        return self.site_shapes[k]

    def _sample_sites(self, params, shape):
        return {k: torch.bernoulli(torch.sigmoid(v).expand(*shape, *v.shape)) for k, v in params.items()}

    def _entry_log_prob(self, logits, z):
        z = z.to(logits.dtype)
        return -F.binary_cross_entropy_with_logits(logits.expand(z.shape), z, reduction="none")

    def _entropy(self, params):
        total = 0.0
        for v in params.values():
            p = torch.sigmoid(v)
            total = total + F.binary_cross_entropy_with_logits(v, p, reduction="sum")
        return total

    def entropy(self) -> torch.Tensor:
        """Exact entropy of the family at its rows (summed over every entry of every site)."""
        return self._entropy(self._params())

    @property
    def probs(self) -> dict[str, torch.Tensor]:
        """Probabilities of 1 per site at the rows, ``{site: Tensor[*shape]}``."""
        return {k: torch.sigmoid(v) for k, v in self.logits().items()}
