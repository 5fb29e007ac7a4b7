"""Models: a batched log joint over named latent sites.

A :class:`Model` is the only thing estimators see of a probabilistic program.
It is a small immutable value: the latent sites with their shapes and supports,
a function ``log_joint(latents, data) -> Tensor[S]`` and the data it closes over.
Keeping the data out of the closure is what lets :meth:`Model.to` move a model
to another device or dtype without the user rewriting anything.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import Transform

__all__ = ["Model", "Site", "Plate", "ModelError"]

#: Data key under which a minibatch view carries a subsampled plate's indices.
SUBSAMPLE_KEY = "_subsample:"

LogJointFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]


class ModelError(ValueError):
    """A model, its data or a log density does not fit what vipkg expects."""


@dataclasses.dataclass(frozen=True)
class Site:
    """One latent site: its shape per particle and its support.

    Parameters
    ----------
    shape : torch.Size
        Shape of one draw of the site, without the particle dimension.
    support : torch.distributions.constraints.Constraint
        Where the site lives (``real``, ``positive``, ``simplex`` ...).
    """

    shape: torch.Size
    support: constraints.Constraint = constraints.real

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_discrete(self) -> bool:
        return bool(getattr(self.support, "is_discrete", False))


@dataclasses.dataclass(frozen=True)
class Plate:
    """A subsampled plate of local latent sites: ``size`` data points, ``subsample_size`` per step.

    Parameters
    ----------
    size : int
        Number of data points (the full size of the plate).
    subsample_size : int
        Data points per minibatch.
    """

    size: int
    subsample_size: int


def _check_data(data: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            bad = int((~torch.isfinite(value)).sum())
            raise ValueError(
                f"data argument {name!r} has {bad} NaN or infinite value(s) out of "
                f"{value.numel()}; vipkg needs finite data (drop or impute those entries)."
            )
        out[name] = value
    return out


def _is_real(support: constraints.Constraint) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return isinstance(support, constraints._Real)


class Model:
    """A probabilistic model as a batched log joint over named latent sites.

    Parameters
    ----------
    sites : mapping of str to Site
        The latent sites, in a fixed order (this order defines the flat
        unconstrained vector).
    log_joint_fn : callable
        ``log_joint_fn(latents, data) -> Tensor[S]`` where every latent value has
        a leading particle dimension ``S``; returns log p(x, z) per particle,
        summed over data (scaled by N / batch when minibatching).
    data : mapping of str to Tensor, optional
        Observed data and constants; moved by :meth:`to`. Checked for NaN/inf.
    name : str, optional
        Shown in reports and errors.
    reference : dict, optional
        A known answer (exact posterior mean / covariance, ...) for tests and plots.
    pointwise_log_likelihood : callable, optional
        ``fn(latents, data) -> dict[name, Tensor[S, N]]`` per-datum log likelihoods
        (for ``arviz.loo``).
    pyro_model : tuple, optional
        ``(fn, args, kwargs)`` of an equivalent Pyro program, when there is one.
    observed : mapping of str to Tensor, optional
        Observed values by site name, for ArviZ's ``observed_data`` group.
    log_joint_terms : callable, optional
        ``fn(latents, data) -> dict[term, Tensor[S, *local]]``: the log joint split
        into factors whose sum (over every dimension but the first) is the log joint.
        With ``term_sites`` it lets score-function estimators Rao-Blackwellize:
        each site's score is multiplied only by the terms that depend on it.
    term_sites : mapping of str to iterable of str, optional
        For each term, the latent sites it depends on.
    term_plates : mapping of str to mapping of str to int, optional
        For each term, the plates it lies in and the (negative, right-aligned) dimension
        of its local shape each one indexes, as ``pyro.plate(..., dim=)`` counts them:
        ``{"x": {"data": -1}}`` for a term ``[S, B]``. With ``term_sites`` it tells
        which terms are per datum of a subsampled plate (:attr:`datum_plate`), for
        bounds that importance-weight each datum's draws (:meth:`log_joint_by_datum`).
    deterministic : callable, optional
        ``fn(latents, data) -> dict[name, Tensor[S, *shape]]``: quantities computed
        from the latents that are worth reporting with them (Pyro's
        ``pyro.deterministic`` sites); exported with the posterior.
    params : mapping of str to Tensor, or nn.Module, optional
        The model's own parameters (leaf tensors that ``log_joint_fn`` reads, e.g. a
        decoder's weights): :func:`vipkg.fit` trains them with the guide's
        (variational EM). An ``nn.Module`` stands for its ``named_parameters()``.
    param_transforms : mapping of str to Transform, optional
        For parameters stored unconstrained, the map to their constrained value
        (:meth:`param_values` applies it; Pyro's ``pyro.param(..., constraint=)``).
    plates : mapping of str to Plate, optional
        Subsampled plates that hold local latent sites.
    local_sites : mapping of str to (str, int), optional
        For each local latent site, its plate and the axis of its shape that the
        plate indexes (the site's shape has the plate's full ``size`` there).
        The log joint of such a model is evaluated on minibatches
        (:meth:`minibatch`), never on all the data at once.
    per_datum : tuple of str, optional
        Entries of ``data`` whose leading dimension indexes data points, when the log
        joint is the prior plus a sum over those rows with global latents only (zero
        rows give the prior). Lets :func:`vipkg.distributed.shard` split the data
        across processes.

    Notes
    -----
    The unconstrained view maps each site through
    ``torch.distributions.biject_to(site.support)`` and concatenates the
    flattened results into ``Tensor[S, dim]``; :meth:`log_joint_unconstrained`
    adds the log absolute determinant of that map so that a density over the
    unconstrained vector is a proper density (Kucukelbir et al. 2017).

    References
    ----------
    .. [1] Kucukelbir, A., Tran, D., Ranganath, R., Gelman, A., Blei, D. M.
       "Automatic Differentiation Variational Inference". JMLR 18 (2017).
    """

    def __init__(
        self,
        sites: Mapping[str, Site],
        log_joint_fn: LogJointFn,
        *,
        data: Mapping[str, Any] | None = None,
        name: str = "model",
        reference: dict[str, Any] | None = None,
        pointwise_log_likelihood: Callable | None = None,
        pyro_model: tuple | None = None,
        observed: Mapping[str, torch.Tensor] | None = None,
        log_joint_terms: Callable | None = None,
        term_sites: Mapping[str, Any] | None = None,
        term_plates: Mapping[str, Mapping[str, int]] | None = None,
        per_datum: tuple[str, ...] = (),
        deterministic: Callable | None = None,
        params: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
        param_transforms: Mapping[str, Transform] | None = None,
        plates: Mapping[str, Plate] | None = None,
        local_sites: Mapping[str, tuple[str, int]] | None = None,
    ):
        if not sites:
            raise ModelError(f"model {name!r} has no latent sites; there is nothing to infer.")
        self.sites: dict[str, Site] = {k: Site(torch.Size(s.shape), s.support) for k, s in sites.items()}
        self._fn = log_joint_fn
        self.data = _check_data(data or {})
        self.name = name
        self.reference = reference or {}
        self.pointwise_log_likelihood_fn = pointwise_log_likelihood
        self.pyro_model = pyro_model
        self.observed = dict(observed or {})
        self.per_datum = tuple(per_datum)
        self._deterministic_fn = deterministic
        if isinstance(params, torch.nn.Module):
            params = dict(params.named_parameters())
        self._params: dict[str, torch.Tensor] = dict(params or {})
        for k, p in self._params.items():
            if not isinstance(p, torch.Tensor) or not p.is_leaf or not p.is_floating_point():
                raise ModelError(
                    f"model {name!r}: parameter {k!r} must be a floating-point leaf tensor (an "
                    f"nn.Parameter), got {type(p).__name__}."
                )
        self._param_transforms = dict(param_transforms or {})
        self.plates: dict[str, Plate] = dict(plates or {})
        self.local_sites: dict[str, tuple[str, int]] = dict(local_sites or {})
        for k, (plate, axis) in self.local_sites.items():
            if plate not in self.plates or k not in self.sites:
                raise ModelError(f"model {name!r}: local site {k!r} names unknown plate {plate!r} or site.")
            if self.sites[k].shape[axis] != self.plates[plate].size:
                raise ModelError(
                    f"model {name!r}: local site {k!r} has shape {tuple(self.sites[k].shape)}, whose axis "
                    f"{axis} should be plate {plate!r}'s size {self.plates[plate].size}."
                )
        #: The full model this one is a minibatch of (None for a full model).
        self.minibatch_of: Model | None = None
        #: How a Pyro program's particles are evaluated (``"plate"`` or ``"loop"``), shared with copies.
        self._vectorization: dict | None = None
        unknown = [k for k in self.per_datum if k not in self.data]
        if unknown:
            raise ModelError(
                f"model {name!r}: per_datum names {unknown}, which are not in its data {sorted(self.data)}."
            )
        if (log_joint_terms is None) != (term_sites is None):
            raise ModelError(
                f"model {name!r}: log_joint_terms and term_sites go together (the terms, and the "
                "latent sites each depends on); pass both or neither."
            )
        self._terms_fn = log_joint_terms
        self.term_sites = None
        if term_sites is not None:
            self.term_sites = {t: frozenset(v) for t, v in term_sites.items()}
            for t, v in self.term_sites.items():
                unknown = set(v) - set(sites)
                if unknown:
                    raise ModelError(
                        f"model {name!r}: term {t!r} depends on unknown site(s) {sorted(unknown)}; "
                        f"the latent sites are {list(sites)}."
                    )
        self.term_plates: dict[str, dict[str, int]] | None = None
        if term_plates is not None:
            if self.term_sites is None:
                raise ModelError(
                    f"model {name!r}: term_plates needs log_joint_terms and term_sites (which terms "
                    "depend on which sites) to go with it."
                )
            self.term_plates = {t: dict(v) for t, v in term_plates.items()}
            for t, v in self.term_plates.items():
                bad = {p: d for p, d in v.items() if not isinstance(d, int) or d >= 0}
                if t not in self.term_sites or bad:
                    raise ModelError(
                        f"model {name!r}: term_plates[{t!r}] = {v!r}: every entry must be a term of "
                        "term_sites mapped to {plate: negative dim}."
                    )
        self._transforms: dict[str, Transform] = {}
        self._ushapes: dict[str, torch.Size] = {}
        for k, s in self.sites.items():
            if s.is_discrete:
                # Discrete sites have no unconstrained view; only guides over named
                # sites (and score-function estimators) can handle them.
                continue
            t = biject_to(s.support)
            self._transforms[k] = t
            self._ushapes[k] = torch.Size(t.inverse_shape(s.shape))
        self._real = {k: _is_real(s.support) for k, s in self.sites.items()}
        # All-real models (the common case) skip the transform machinery in the hot path.
        self._identity = all(self._real.values())
        self._split = [math.prod(self._ushapes[k]) for k in self._ushapes]
        self._discrete = [k for k, s in self.sites.items() if s.is_discrete]

    # ------------------------------------------------------------------ basics
    def __repr__(self) -> str:
        sites = ", ".join(f"{k}: {tuple(s.shape)} {s.support}" for k, s in self.sites.items())
        return f"Model({self.name!r}, sites={{{sites}}}, dim={self.dim if self.is_continuous else 'n/a'})"

    @property
    def is_continuous(self) -> bool:
        return not self._discrete

    @property
    def dim(self) -> int:
        """Length of the flat unconstrained latent vector."""
        self._require_continuous("dim")
        return sum(self._split)

    @property
    def is_subsampled(self) -> bool:
        """Whether the model has local latent sites in subsampled plates (see :meth:`minibatch`)."""
        return bool(self.local_sites)

    def _require_minibatch(self, what: str) -> None:
        if self.local_sites:
            raise ModelError(
                f"model {self.name!r} has local latent sites {sorted(self.local_sites)} in subsampled "
                f"plate(s) {sorted(self.plates)}: `{what}` is evaluated on a minibatch, "
                "model.minibatch(model.subsample_indices()) (vipkg.fit does this every step)."
            )

    def subsample_indices(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One minibatch per subsampled plate: ``{plate: LongTensor[subsample_size]}`` drawn without
        replacement from torch's generator (so a seeded fit draws the same minibatches on resume)."""
        device = next(iter(self.data.values())).device if self.data else None
        return {
            name: torch.randperm(p.size, generator=generator, device=device)[: p.subsample_size]
            for name, p in self.plates.items()
        }

    def minibatch(self, indices: Mapping[str, torch.Tensor]) -> Model:
        """The model on one minibatch: local sites have ``subsample_size`` rows (those of
        ``indices``) and the log joint is the unbiased estimate of the full one (the
        minibatch's terms scaled by ``size / subsample_size``, as ``pyro.plate`` does).

        Parameters
        ----------
        indices : mapping of str to LongTensor
            For every subsampled plate, the data points of the minibatch.
        """
        if not self.local_sites:
            return self
        if set(indices) != set(self.plates):
            raise ModelError(
                f"model {self.name!r}: minibatch takes indices for plates {sorted(self.plates)}, got "
                f"{sorted(indices)}."
            )
        data = dict(self.data)
        for name, idx in indices.items():
            plate = self.plates[name]
            if idx.dim() != 1 or idx.shape[0] != plate.subsample_size or idx.is_floating_point():
                raise ModelError(
                    f"model {self.name!r}: plate {name!r} takes {plate.subsample_size} integer indices per "
                    f"minibatch, got a {idx.dtype} tensor of shape {tuple(idx.shape)}."
                )
            data[SUBSAMPLE_KEY + name] = idx
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.data = data
        new.sites = dict(self.sites)
        for k, (plate, axis) in self.local_sites.items():
            shape = list(self.sites[k].shape)
            shape[axis] = self.plates[plate].subsample_size
            new.sites[k] = Site(torch.Size(shape), self.sites[k].support)
        new._ushapes = {
            k: torch.Size(t.inverse_shape(new.sites[k].shape)) for k, t in self._transforms.items()
        }
        new._split = [math.prod(new._ushapes[k]) for k in new._ushapes]
        new.local_sites = {}
        new.minibatch_of = self
        return new

    def _require_continuous(self, what: str) -> None:
        if self._discrete:
            raise ModelError(
                f"model {self.name!r} has discrete site(s) {self._discrete}; `{what}` needs every site "
                "continuous. Use a guide over named sites with a score-function estimator."
            )

    # -------------------------------------------------------------- parameters
    @property
    def has_parameters(self) -> bool:
        """Whether the model has parameters of its own for :func:`vipkg.fit` to learn."""
        return bool(self._params)

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The model's own trainable tensors (unconstrained where they have a constraint)."""
        return list(self._params.items())

    def parameters(self) -> list[torch.Tensor]:
        return list(self._params.values())

    def param_values(self) -> dict[str, torch.Tensor]:
        """The model's parameters at their current values, constrained (detached)."""
        out = {}
        for k, p in self._params.items():
            t = self._param_transforms.get(k)
            out[k] = (p if t is None else t(p)).detach()
        return out

    def to(self, device=None, dtype=None) -> Model:
        """A copy of the model with floating data on ``device`` / ``dtype``.

        The model's parameters are moved in place (like ``nn.Module.to``), so that the
        code that reads them, and the copy, keep sharing them.
        """
        for p in self._params.values():
            target_dtype = dtype if dtype is not None else p.dtype
            if (device is not None and p.device != torch.device(device)) or p.dtype != target_dtype:
                p.data = p.data.to(device=device, dtype=target_dtype)
        data = {}
        for k, v in self.data.items():
            v = v.to(device=device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            data[k] = v
        new = object.__new__(Model)
        new.__dict__.update(self.__dict__)
        new.data = data
        return new

    # --------------------------------------------------------------- log joint
    def log_joint(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """log p(x, z) per particle for constrained latents ``{site: Tensor[S, *shape]}``."""
        self._require_minibatch("log_joint")
        out = self._fn(dict(latents), self.data)
        first = next(iter(latents.values()))
        S = first.shape[0]
        if out.shape != (S,):
            raise ModelError(
                f"the log joint of model {self.name!r} returned shape {tuple(out.shape)}, "
                f"expected ({S},): one value per particle (the leading dimension of the latents), "
                "summed over data and event dimensions."
            )
        return out

    @property
    def has_terms(self) -> bool:
        """Whether the log joint is available split into factors (see ``log_joint_terms``)."""
        return self._terms_fn is not None

    def log_joint_terms(self, latents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The log joint's factors ``{term: Tensor[S, *local]}``; they sum to :meth:`log_joint`."""
        if self._terms_fn is None:
            raise ModelError(
                f"model {self.name!r} does not expose its log joint split into terms; build it with "
                "log_joint_terms= and term_sites= (Pyro models do this automatically)."
            )
        self._require_minibatch("log_joint_terms")
        return self._terms_fn(dict(latents), self.data)

    @property
    def datum_plate(self) -> str | None:
        """The subsampled plate over which the model factorizes into one factor per datum, if any.

        It is the plate of every latent site (all are local sites of one plate) when the model
        exposes its terms with their plates (``term_plates``) and each term either lies in the
        plate or depends on no latent site. Then ``log p(x, z) = rest + sum_i log p(x_i, z_i)``
        and a bound can weight each datum's draws on its own (:meth:`log_joint_by_datum`).
        None otherwise (a minibatch model answers for the full model it was cut from).
        """
        full = self.minibatch_of or self
        if not full.local_sites or full.term_plates is None or full.term_sites is None:
            return None
        plates = {p for p, _ in full.local_sites.values()}
        if len(plates) != 1 or set(full.local_sites) != set(full.sites):
            return None
        (plate,) = plates
        for t, deps in full.term_sites.items():
            if deps and plate not in full.term_plates.get(t, {}):
                return None
        return plate

    def log_joint_by_datum(self, latents: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The log joint of a minibatch split by datum: ``(per_datum [S, B], rest [S])``.

        ``per_datum[:, i]`` is ``log p(x_i, z_i)`` of the minibatch's ``i``-th data point,
        *unscaled*; ``rest`` holds the terms outside the plate (which depend on no latent site).
        The minibatch's log joint is ``rest + (N / B) * per_datum.sum(-1)``.
        """
        plate = self.datum_plate
        if plate is None or self.minibatch_of is None:
            raise ModelError(
                f"model {self.name!r} does not factorize over the data points of a minibatch: its latent "
                "sites must all be local sites of one subsampled plate, and it must expose its terms "
                "with their plates (log_joint_terms, term_sites, term_plates; Pyro programs and the "
                "zoo's VAEs do). Evaluate it on a minibatch, model.minibatch(model.subsample_indices())."
            )
        p = self.plates[plate]
        scale = p.size / p.subsample_size
        terms = self.log_joint_terms(latents)
        S = next(iter(latents.values())).shape[0]
        per, rest = None, None
        for t, v in terms.items():
            d = self.term_plates.get(t, {}).get(plate)
            if d is None:
                v = v.reshape(v.shape[0], -1).sum(-1)
                rest = v if rest is None else rest + v
                continue
            axis = v.dim() + d
            if axis < 1 or v.shape[axis] != p.subsample_size:
                raise ModelError(
                    f"model {self.name!r}: term {t!r} has shape {tuple(v.shape)}, with no dimension "
                    f"{d} of size {p.subsample_size} for plate {plate!r} (term_plates says it lies there)."
                )
            v = v.movedim(axis, 1).reshape(v.shape[0], p.subsample_size, -1).sum(-1) / scale
            per = v if per is None else per + v
        if per is None:
            raise ModelError(f"model {self.name!r}: no term lies in plate {plate!r}.")
        return per.expand(S, -1), (per.new_zeros(S) if rest is None else rest.expand(S))

    def log_joint_unconstrained(self, u: torch.Tensor) -> torch.Tensor:
        """log p(x, T(u)) + log |det dT/du| per particle for ``u: Tensor[S, dim]``."""
        if self._identity:
            return self.log_joint(self.constrain(u))
        latents, ladj = self._constrain_with_ladj(u)
        return self.log_joint(latents) + ladj

    # ------------------------------------------------------ unconstrained view
    def _check_flat(self, u: torch.Tensor) -> None:
        if u.dim() != 2 or u.shape[-1] != self.dim:
            raise ModelError(
                f"model {self.name!r} expects unconstrained latents of shape [S, {self.dim}], "
                f"got {tuple(u.shape)}."
            )

    def constrain(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        """Map ``u: Tensor[S, dim]`` to named constrained sites ``{site: Tensor[S, *shape]}``."""
        return self._constrain_with_ladj(u, with_ladj=False)[0]

    def _constrain_with_ladj(self, u: torch.Tensor, with_ladj: bool = True):
        self._check_flat(u)
        S = u.shape[0]
        parts = u.split(self._split, dim=-1) if len(self._split) > 1 else (u,)
        latents: dict[str, torch.Tensor] = {}
        ladj = u.new_zeros(S) if with_ladj else None
        for (name, t), part in zip(self._transforms.items(), parts):
            shape = self._ushapes[name]
            # A vector site's slice already has its shape; a reshape would add a view and its
            # backward node to every step.
            v = part if part.shape[1:] == shape else part.reshape(S, *shape)
            if self._real[name]:
                latents[name] = v
                continue
            x = t(v)
            latents[name] = x
            if with_ladj:
                ladj = ladj + t.log_abs_det_jacobian(v, x).reshape(S, -1).sum(-1)
        return latents, ladj

    def unconstrain(self, latents: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Map named constrained sites ``{site: Tensor[S, *shape]}`` to ``Tensor[S, dim]``."""
        self._require_continuous("unconstrain")
        missing = set(self._transforms) - set(latents)
        if missing:
            raise ModelError(f"unconstrain: missing site(s) {sorted(missing)} of model {self.name!r}.")
        pieces = []
        for name, t in self._transforms.items():
            x = latents[name]
            S = x.shape[0]
            pieces.append(t.inv(x).reshape(S, -1))
        return torch.cat(pieces, dim=-1)

    def pointwise_log_likelihood(self, latents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-datum log likelihoods ``{observed: Tensor[S, N]}``; empty when the model has none."""
        if self.pointwise_log_likelihood_fn is None:
            return {}
        self._require_minibatch("pointwise_log_likelihood")
        return self.pointwise_log_likelihood_fn(dict(latents), self.data)

    def deterministic(self, latents: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Derived quantities ``{name: Tensor[S, *shape]}`` (``pyro.deterministic`` sites); may be empty."""
        if self._deterministic_fn is None:
            return {}
        self._require_minibatch("deterministic")
        return self._deterministic_fn(dict(latents), self.data)

    @property
    def vectorization(self) -> str:
        """How particles are evaluated: ``"plate"``, ``"vmap"`` or ``"loop"`` (Pyro programs, see
        :meth:`from_pyro`), ``"native"`` (every other model)."""
        return "native" if self._vectorization is None else self._vectorization["mode"]

    # -------------------------------------------------------------- front-ends
    @classmethod
    def from_log_density(
        cls,
        fn: Callable[[torch.Tensor], torch.Tensor],
        dim: int,
        support: constraints.Constraint = constraints.real,
        *,
        name: str = "log_density",
        site: str = "x",
        params: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
    ) -> Model:
        """A model from a plain log density over a vector.

        Parameters
        ----------
        fn : callable
            Maps ``Tensor[S, dim]`` (in the space given by ``support``) to ``Tensor[S]``.
        dim : int
            Length of the vector.
        support : Constraint
            Support of the vector (``real`` by default; ``positive``, ``simplex`` ...).
            With a non-real support the unconstrained view adds the log-Jacobian.
        site : str
            Name of the single latent site.
        params : nn.Module or mapping of str to Tensor, optional
            Parameters ``fn`` reads (e.g. ``fn`` is a method of this module):
            :func:`vipkg.fit` learns them with the guide.
        """
        from vipkg.frontends.log_density import log_density_model  # frontends -> model: import here

        return log_density_model(cls, fn, dim, support, name=name, site=site, params=params)

    @classmethod
    def from_pyro(
        cls,
        fn: Callable,
        *args,
        name: str | None = None,
        vectorize: str = "auto",
        enumerate: str | list | bool | None = "auto",
        max_plate_nesting: int | None = None,
        **kwargs,
    ) -> Model:
        """A model from any Pyro program.

        The program is traced once to find its latent sites (name, shape, support)
        and its observed sites. Discrete latent sites are allowed (guides over
        named sites handle them); for programs with discrete sites the model also
        exposes its log joint per site (:meth:`log_joint_terms`) with each site's
        dependencies from Pyro's provenance tracking, which score-function
        estimators use to Rao-Blackwellize per site and per datum. Particles are
        vectorized by running the program under an outer ``pyro.plate`` left of
        every plate and batch dimension it uses, conditioned on the latent values,
        so there is no Python loop over particles.

        The vectorized evaluation is checked against Pyro's own trace of the
        program run one particle at a time: when the model is built (on prior
        draws, at particle counts equal to no size in the program) and the first
        time each particle count is evaluated (the guide's first draws). A
        program that fails or differs under the particle plate (``locs[z]``,
        ``torch.mm``, ``z.size(0)``) is evaluated with ``torch.func.vmap`` over
        particles where that is right, otherwise one particle at a time, with a
        :class:`~vipkg.frontends.pyro.PyroVectorizationWarning` naming the
        site and the likely pattern; :attr:`vectorization` says which is used.
        Shapes are validated with Pyro's own check (a log-prob dimension no plate
        declares, inside a plate, is a :class:`ModelError`).

        Finite discrete sites marked ``infer={"enumerate": "parallel"}`` (or by
        ``config_enumerate``), or named in ``enumerate=``, are summed out exactly
        with Pyro's enumeration and tensor contraction (as ``TraceEnum_ELBO``
        does for model-side sites; plates and ``pyro.markov`` included, see
        :mod:`vipkg.frontends.pyro_enum`): the model's sites are the others, its
        log joint is marginal over the enumerated ones, and
        ``model.enumeration`` gives their posterior marginals and draws
        (:func:`vipkg.diagnostics.enumerated_marginals`). With
        ``enumerate=False`` annotated sites are guided like other discrete sites,
        with a :class:`~vipkg.frontends.pyro.PyroProgramWarning`.

        The program's ``pyro.param`` and ``PyroModule`` parameters are the model's
        own (:meth:`named_parameters`; :func:`vipkg.fit` learns them with the
        guide). They live in a parameter store private to the model (Pyro's
        ``ParamStoreDict.scope``), initialized from the program's initial values:
        the global store is neither read nor changed, and two models never share a
        parameter by name. :meth:`param_values` gives their constrained values.

        Parameters
        ----------
        fn : callable
            A Pyro model. Observed values come in through ``obs=`` or arguments.
        *args, **kwargs
            Passed to ``fn`` on every call. Tensor arguments are checked for NaN/inf
            (errors name them as ``fn``'s signature does).
        vectorize : {"auto", "plate", "vmap", "loop"}
            ``"auto"``: the checked particle plate, falling back to ``vmap`` and then
            to a loop; ``"plate"``: the particle plate unchecked; ``"vmap"``:
            ``torch.func.vmap`` over particles; ``"loop"``: one particle at a time.
        enumerate : {"auto"} or list of str or False, optional
            ``"auto"`` (default): sum out the sites the program marks for parallel
            enumeration; a list: sum out exactly these sites; ``False`` or ``None``:
            enumerate nothing. Sequential enumeration is refused (:class:`ModelError`).
        max_plate_nesting : int, optional
            The program's plate depth (as for Pyro's ``TraceEnum_ELBO``); inferred
            from a trace when omitted. Particles sit at ``-(max_plate_nesting + 1)``,
            enumeration dimensions left of them.

        References
        ----------
        .. [1] Bingham, E. et al. "Pyro: Deep Universal Probabilistic Programming".
           JMLR 20 (2019).
        .. [2] Obermeyer, F. et al. "Tensor Variable Elimination for Plated Factor
           Graphs". ICML (2019).
        """
        from vipkg.frontends.pyro import pyro_model  # frontends -> model: import here

        return pyro_model(
            cls,
            fn,
            args,
            kwargs,
            name=name or getattr(fn, "__name__", "pyro_model"),
            vectorize=vectorize,
            enumerate=enumerate,
            max_plate_nesting=max_plate_nesting,
        )
