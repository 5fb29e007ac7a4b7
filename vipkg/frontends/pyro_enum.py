"""Exact enumeration of a Pyro program's finite discrete sites (``Model.from_pyro(..., enumerate=)``).

Sites marked ``infer={"enumerate": "parallel"}`` (or named by the user) are summed out of the log
joint with Pyro's own machinery: :class:`pyro.poutine.enum` gives every enumerated site a tensor
dimension of its own, Pyro's ``TraceEnum_ELBO`` factor bookkeeping (``_compute_model_factors``: a
mask inside the log-sum-exp, the common subsampling scale outside) splits the log densities into
factors, and :func:`pyro.ops.contract.contract_to_tensor` eliminates the enumeration dimensions by
tensor variable elimination, plates and ``pyro.markov`` chains included. What is left is an
ordinary :class:`vipkg.Model` over the other latent sites, so every guide and estimator applies.

Particles are a ``pyro.plate`` at ``-(max_plate_nesting + 1)``, left of the program's plates, and the
enumeration dimensions are allocated left of it (as ``TraceEnum_ELBO(vectorize_particles=True)`` lays
them out); the contraction keeps the particle plate as its target, so ``S`` particles cost one pass.
As in :mod:`vipkg.frontends.pyro`, that pass is checked against the program run one particle at a time
and falls back to a loop over particles where the program is not batch-agnostic.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch.distributions import constraints, transform_to

from vipkg.model import ModelError, Site, _check_data

__all__ = ["enumerated_model", "Enumeration"]

_PARTICLE_PLATE = "_vipkg_particles"
_CHECK_SEED = 20261202


@functools.cache
def _messenger_classes():
    # Built on first use: importing vipkg must not import Pyro.
    from pyro.poutine.messenger import Messenger

    class _EnumConfig(Messenger):
        """Marks exactly the chosen sites for parallel enumeration (and unmarks every other one)."""

        def __init__(self, names):
            super().__init__()
            self.names = frozenset(names)

        def _pyro_sample(self, msg):
            if msg["is_observed"]:
                return
            infer = dict(msg["infer"] or {})
            if msg["name"] in self.names:
                infer["enumerate"] = "parallel"
            else:
                infer.pop("enumerate", None)
            msg["infer"] = infer

    return _EnumConfig


def _resolve(name, trace, enumerate_, latent):
    """The latent sites to enumerate: annotated ones (``"auto"``) or the named ones, checked."""
    if enumerate_ == "auto":
        chosen = []
        for n in latent:
            how = trace.nodes[n]["infer"].get("enumerate")
            if how is None:
                continue
            if how != "parallel":
                raise ModelError(
                    f"Pyro model {name!r}: site {n!r} is marked infer={{'enumerate': {how!r}}}; vipkg "
                    "sums out model sites in parallel only (as Pyro's TraceEnum_ELBO does for model-side "
                    "sites). Mark it 'parallel', or pass enumerate=False to guide it like any other "
                    "discrete site."
                )
            chosen.append(n)
    else:
        if isinstance(enumerate_, str) or not all(isinstance(n, str) for n in enumerate_):
            raise ValueError(
                "from_pyro: enumerate must be 'auto', False/None or a list of site names, got "
                f"{enumerate_!r}."
            )
        chosen = list(enumerate_)
        unknown = [n for n in chosen if n not in latent]
        if unknown:
            raise ModelError(
                f"Pyro model {name!r}: enumerate names {unknown}, which are not latent sample sites; "
                f"the latent sites are {list(latent)}."
            )
    for n in chosen:
        fn = trace.nodes[n]["fn"]
        if not getattr(fn, "has_enumerate_support", False):
            raise ModelError(
                f"Pyro model {name!r}: site {n!r} ({type(fn).__name__}) has no finite support to enumerate; "
                "enumeration needs a distribution with enumerate_support (Bernoulli, Categorical, "
                "OneHotCategorical, ...). Guide it instead (leave it out of enumerate=)."
            )
    return chosen


class Enumeration:
    """What an enumerated model knows about its summed-out sites (``model.enumeration``).

    Attributes
    ----------
    sites : dict of str to Site
        The enumerated sites with their shapes (as in one trace of the program) and supports.
    max_plate_nesting : int
        The program's plate depth; particles sit at ``-(max_plate_nesting + 1)``.

    References
    ----------
    .. [1] Obermeyer, F., Bingham, E., Jankowiak, M., Chiu, J., Pradhan, N., Rush, A., Goodman, N.
       "Tensor Variable Elimination for Plated Factor Graphs". ICML (2019).
    """

    def __init__(self, runner, sites, max_plate_nesting):
        self._runner = runner
        self.sites = sites
        self.max_plate_nesting = max_plate_nesting

    def marginals(self, latents, data) -> dict[str, torch.Tensor]:
        """``{site: Tensor[S, *batch_shape, K]}``: p(site = k-th support value | x, latents) per particle."""
        return self._runner.marginals(latents, data)

    def sample(self, latents, data) -> dict[str, torch.Tensor]:
        """``{site: Tensor[S, *shape]}``: one posterior draw of each enumerated site per particle
        (Pyro's ``infer_discrete``, forward filtering / backward sampling)."""
        return self._runner.sample(latents, data)


def enumerated_model(
    cls, fn, user_fn, args, kwargs, param_state, *, name, vectorize, enumerate, max_plate_nesting, trace
):
    """A :class:`vipkg.Model` with ``enumerate``'s sites summed out, or ``None`` when there are none.

    ``fn`` is the program in vipkg's private parameter store (``param_state``); ``user_fn`` the
    program as given; ``trace`` its prior trace with log probs computed. See
    :meth:`vipkg.Model.from_pyro` for the arguments.

    References
    ----------
    .. [1] Obermeyer, F. et al. "Tensor Variable Elimination for Plated Factor Graphs". ICML (2019).
    .. [2] Bingham, E. et al. "Pyro: Deep Universal Probabilistic Programming". JMLR 20 (2019).
    """
    import pyro.poutine as poutine

    from vipkg.frontends.pyro import (
        _CHECK_COUNTS,
        PyroVectorizationWarning,
        _is_deterministic,
        _is_sample,
        _is_scored,
        _rebuild,
        _sizes_in,
        _split_tensor_args,
    )

    data, arg_spec, kw_spec = _split_tensor_args(user_fn, args, kwargs)
    data = _check_data(data)
    # ``trace``: the program's prior trace (log probs computed), which the caller made once for both paths.
    latent = [n for n, s in trace.nodes.items() if _is_scored(s) and not s["is_observed"]]
    chosen = _resolve(name, trace, enumerate, latent)
    if not chosen:
        return None
    if vectorize == "vmap":
        raise ValueError(
            "from_pyro: vectorize='vmap' is not available with enumeration (Pyro's log-space einsum is an "
            "autograd.Function that torch.func.vmap cannot transform); use 'auto', 'plate' or 'loop', or "
            "enumerate=False."
        )
    left = [n for n in latent if n not in chosen and trace.nodes[n]["infer"].get("enumerate") is not None]
    if left:
        from vipkg.frontends.pyro import PyroProgramWarning

        warnings.warn(
            f"Pyro model {name!r}: sites {left} are marked for enumeration but not in "
            f"enumerate={enumerate!r}; vipkg guides them like any other discrete site (a score-function "
            "estimator).",
            PyroProgramWarning,
            stacklevel=4,
        )
    rest = [n for n in latent if n not in chosen]
    if not rest:
        raise ModelError(
            f"Pyro model {name!r}: every latent site is enumerated ({chosen}); nothing is left for a guide "
            "to fit. Enumerate fewer sites (enumerate=[...]) or pass enumerate=False to guide them."
        )
    nesting = 0
    for site in trace.nodes.values():
        if not _is_sample(site):
            continue
        nesting = max(nesting, len(site["fn"].batch_shape))
        if "log_prob" in site:
            nesting = max(nesting, site["log_prob"].dim())
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if site["name"] in rest:
            for frame in site["cond_indep_stack"]:
                full = getattr(frame, "full_size", None)
                if full is not None and full != frame.size:
                    raise ModelError(
                        f"Pyro model {name!r}: latent site {site['name']!r} lies in the subsampled plate "
                        f"{frame.name!r}; with enumeration vipkg supports subsampling of enumerated and "
                        "observed sites only. Use the full plate, or enumerate=False."
                    )
    if max_plate_nesting is not None:
        if not isinstance(max_plate_nesting, int) or max_plate_nesting < nesting:
            raise ModelError(
                f"Pyro model {name!r}: max_plate_nesting={max_plate_nesting!r}, but the program uses "
                f"{nesting} batch dimension(s); pass an int >= {nesting} (or None to infer it)."
            )
        nesting = max_plate_nesting
    sites = {n: Site(torch.Size(trace.nodes[n]["value"].shape), trace.nodes[n]["fn"].support) for n in rest}
    event_dims = {n: len(trace.nodes[n]["fn"].event_shape) for n in latent}
    enum_sites = {
        n: Site(torch.Size(trace.nodes[n]["value"].shape), trace.nodes[n]["fn"].support) for n in chosen
    }
    observed = {
        n: s["value"].detach()
        for n, s in trace.nodes.items()
        if _is_sample(s) and s["is_observed"] and not _is_deterministic(s)
    }
    for n in rest:
        if len(sites[n].shape) - event_dims[n] > nesting:
            raise ModelError(
                f"Pyro model {name!r}: site {n!r} has batch shape "
                f"{tuple(sites[n].shape)[: len(sites[n].shape) - event_dims[n]]}, deeper than "
                f"max_plate_nesting={nesting}."
            )

    def call_args(data):
        return [_rebuild(s, data) for s in arg_spec], {k: _rebuild(s, data) for k, s in kw_spec.items()}

    runner = _Runner(fn, call_args, chosen, sites, event_dims, nesting, name)
    runner.enum_shapes = {n: enum_sites[n].shape for n in chosen}
    runner.enum_event_ranks = {n: event_dims[n] for n in chosen}
    runner.enum_batch_shapes = {
        n: enum_sites[n].shape[: len(enum_sites[n].shape) - event_dims[n]] for n in chosen
    }
    state = {"mode": "plate" if vectorize == "auto" else vectorize, "checked": set()}

    def check(latents, data, S):
        state["checked"].add(S)
        what = runner.verify(latents, data, S, state["mode"])
        if what is None:
            return
        # No vmap rung here: Pyro's log-space einsum (``safe_log``) is an autograd.Function that
        # torch.func cannot transform.
        state["mode"] = "loop"
        how = "one particle at a time (correct, but slow)"
        warnings.warn(
            f"Pyro model {name!r} cannot be enumerated for {S} particles at once under vipkg's particle "
            f"plate (dim={runner.particle_dim}, enumeration dims left of it): {what}. vipkg evaluates it "
            f"{how} instead. Likely cause: indexing with an enumerated or latent value along a leading "
            "dimension (`locs[z]`); `pyro.ops.indexing.Vindex(locs)[..., z]` runs vectorized.",
            PyroVectorizationWarning,
            stacklevel=5,
        )

    def log_joint(latents, data):
        if set(latents) != set(sites):
            raise ModelError(
                f"Pyro model {name!r} (enumerated {chosen}) takes values for its latent sites "
                f"{sorted(sites)}; got {sorted(latents)}."
            )
        S = next(iter(latents.values())).shape[0]
        if vectorize == "auto" and state["mode"] != "loop" and S not in state["checked"]:
            if not torch.compiler.is_compiling():
                check(latents, data, S)
        fast = S in state["checked"] or (state["mode"] == "loop" and bool(state["checked"]))
        return runner.log_joint(latents, data, state["mode"], fast=fast)

    runner.mode = lambda: state["mode"]
    model = cls(
        sites,
        log_joint,
        data=data,
        name=name,
        pyro_model=(user_fn, args, kwargs),
        observed=observed,
        params=dict(param_state["params"]),
        param_transforms={
            k: transform_to(param_state["constraints"].get(k, constraints.real))
            for k in param_state["params"]
        },
    )
    model._vectorization = state
    model.enumeration = Enumeration(runner, enum_sites, nesting)

    if vectorize == "auto":
        # Two particle counts that coincide with no size in the program, which could hide a program
        # that mistakes the particle dimension for one of its own.
        sizes = _sizes_in(trace, data)
        for S in [c for c in _CHECK_COUNTS if c not in sizes][:2] or [1]:
            if state["mode"] == "loop":
                break
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(_CHECK_SEED + S)
                draws = [poutine.trace(fn).get_trace(*args, **kwargs) for _ in range(S)]
            prior = {k: torch.stack([d.nodes[k]["value"] for d in draws]) for k in sites}
            check(prior, model.data, S)
    return model


def _dim_to_size(tr, log_factors):
    """Sizes of every packed dim, plates included: a plate of size 1 (one particle) is packed away in
    the factors, yet the contraction broadcasts its result back to the target plates."""
    sizes = {}
    for site in tr.nodes.values():
        for frame in site.get("cond_indep_stack", ()):
            if frame.vectorized and frame.name in tr.plate_to_symbol:
                sizes[tr.plate_to_symbol[frame.name]] = frame.size
    for terms in log_factors.values():
        for term in terms:
            sizes.update(zip(term._pyro_dims, term.shape))
    return sizes


class _Runner:
    """Runs the enumerated program for a batch of particles and contracts its factors."""

    def __init__(self, fn, call_args, chosen, sites, event_dims, nesting, name):
        self.fn = fn
        self.call_args = call_args
        self.chosen = chosen
        self.sites = sites
        self.event_dims = event_dims
        self.nesting = nesting
        self.name = name
        self.particle_dim = -(nesting + 1)
        self.mode = lambda: "plate"

    # --------------------------------------------------------------------- traces
    def _program(self, S):
        import pyro

        config = _messenger_classes()(self.chosen)
        fn, particle_dim = self.fn, self.particle_dim

        def program(*a, **kw):
            with config:
                if S is None:
                    return fn(*a, **kw)
                with pyro.plate(_PARTICLE_PLATE, S, dim=particle_dim):
                    return fn(*a, **kw)

        return program

    def _cond(self, latents, S):
        if S is None:
            return dict(latents)
        cond = {}
        for k, v in latents.items():
            batch = len(self.sites[k].shape) - self.event_dims[k]
            cond[k] = v.reshape((S,) + (1,) * (self.nesting - batch) + tuple(self.sites[k].shape))
        return cond

    def _first_dim(self, S):
        # With particles the enumeration dims go left of the particle plate, as TraceEnum_ELBO's
        # vectorized particles do; one particle alone leaves that dim to enumeration.
        return self.particle_dim - 1 if S is not None else self.particle_dim

    def _trace(self, latents, data, S):
        import pyro.poutine as poutine
        from pyro.poutine.util import prune_subsample_sites

        a, kw = self.call_args(data)
        program = poutine.condition(self._program(S), data=self._cond(latents, S))
        tr = poutine.trace(poutine.enum(program, first_available_dim=self._first_dim(S))).get_trace(*a, **kw)
        fresh = [
            n
            for n, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and n not in self.chosen
        ]
        tr = prune_subsample_sites(tr)
        fresh = [n for n in fresh if n in tr.nodes]
        if fresh:
            raise ModelError(
                f"Pyro model {self.name!r} drew site(s) {fresh} that its first trace did not have; vipkg "
                "needs a fixed set of latent sites."
            )
        tr.compute_log_prob()
        tr.pack_tensors()
        return tr

    def _factors(self, tr):
        import pyro.poutine as poutine
        from pyro.infer.traceenum_elbo import _compute_model_factors

        # An empty guide trace: every non-enumerated latent is conditioned (observed) in the model
        # trace, so Pyro's TraceEnum bookkeeping treats it as a cost site.
        try:
            return _compute_model_factors(tr, poutine.Trace())
        except ValueError as exc:
            raise ModelError(
                f"Pyro model {self.name!r} cannot be enumerated as Pyro's TraceEnum_ELBO would: {exc} "
                f"(enumerated sites {self.chosen}; sites that depend on an enumerated site must share its "
                "subsampling scale)."
            ) from exc

    # ------------------------------------------------------------------ log joint
    def _per_particle(self, term, p, S):
        dims = term._pyro_dims
        if p is not None and p in dims:
            i = dims.index(p)
            other = [j for j in range(term.dim()) if j != i]
            return term.sum(other) if other else term
        total = term.sum()
        return total.expand(S) if S is not None else total

    def _marginal(self, latents, data, S):
        from opt_einsum import shared_intermediates
        from pyro.ops import packed
        from pyro.ops.contract import contract_to_tensor
        from pyro.ops.rings import LogRing

        tr = self._trace(latents, data, S)
        marginal_costs, log_factors, _, sum_dims, scale = self._factors(tr)
        p = tr.plate_to_symbol.get(_PARTICLE_PLATE) if S is not None else None
        total = 0.0
        for terms in marginal_costs.values():
            for term in terms:
                total = total + self._per_particle(term, p, S)
        if log_factors:
            dim_to_size = _dim_to_size(tr, log_factors)
            target = frozenset({p}) if p is not None else frozenset()
            with shared_intermediates() as cache:
                ring = LogRing(cache=cache, dim_to_size=dim_to_size)
                term = contract_to_tensor(log_factors, sum_dims, target_ordinal=target, ring=ring)
            term = packed.scale_and_mask(term, scale=scale)
            total = total + self._per_particle(term, p, S)
        if not isinstance(total, torch.Tensor):
            raise ModelError(f"Pyro model {self.name!r} has no scored sites.")
        return total

    def _loop(self, latents, data, fn):
        S = next(iter(latents.values())).shape[0]
        return [fn({k: v[i] for k, v in latents.items()}) for i in range(S)]

    def log_joint(self, latents, data, mode, fast=False):
        if fast:
            # Verified at this particle count with the user's validation setting: the values are the
            # guide's, in the support by construction, and Pyro's and torch's argument checks read
            # tensors on the host (a sync per site and step).
            import pyro
            from torch.distributions import Distribution

            default = Distribution._validate_args
            Distribution.set_default_validate_args(False)
            try:
                with pyro.validation_enabled(False):
                    return self.log_joint(latents, data, mode)
            finally:
                Distribution.set_default_validate_args(default)
        if mode == "plate":
            S = next(iter(latents.values())).shape[0]
            return self._marginal(latents, data, S)
        return torch.stack(self._loop(latents, data, lambda v: self._marginal(v, data, None)))

    def verify(self, latents, data, S, mode):
        """``None`` when ``mode`` agrees with Pyro's per-particle enumeration, else what went wrong."""
        latents = {k: v.detach() for k, v in latents.items()}
        which = sorted({0, S // 2, S - 1})
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(_CHECK_SEED)
            try:
                got = self.log_joint(latents, data, mode)
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the batched run means: fall back
                first = (str(exc).splitlines() or ["(no message)"])[0]
                return f"{type(exc).__name__}: {first}"
            ref = []
            for i in which:
                torch.manual_seed(_CHECK_SEED)
                ref.append(self._marginal({k: v[i] for k, v in latents.items()}, data, None))
            ref = torch.stack(ref)
        got = got[which].to(ref.dtype)
        scale = float(ref[torch.isfinite(ref)].abs().max()) if bool(torch.isfinite(ref).any()) else 1.0
        close = torch.isclose(got, ref, rtol=1e-4, atol=1e-4 * max(1.0, scale), equal_nan=True)
        if not bool(close.all()):
            j = int((~close).nonzero()[0])
            return (
                f"the batched log marginal of particle {which[j]} of {S} is {float(got[j]):.6g}, Pyro's "
                f"enumeration of that particle alone gives {float(ref[j]):.6g}"
            )
        return None

    # ------------------------------------------------------------------ marginals
    def _to_site(self, v, n, S, trailing=0):
        """A tensor laid out as the program's (particle dim at ``particle_dim``, then plates, then
        ``trailing`` event-like dims) as ``[S, *shape]`` (or ``shape`` without particles)."""
        shape = self.enum_shapes[n] if trailing == 0 else self.enum_batch_shapes[n]
        rank = len(shape) - (self.enum_event_ranks[n] if trailing == 0 else 0)
        tail = tuple(shape[rank:]) if trailing == 0 else tuple(v.shape[v.dim() - trailing :])
        full = self.nesting + len(tail) + (1 if S is not None else 0)
        v = v.reshape((1,) * max(0, full - v.dim()) + tuple(v.shape))
        v = v.reshape(v.shape[v.dim() - full :])
        if S is None:
            v = v.reshape(v.shape[self.nesting - rank :])
            return v.expand(tuple(shape[:rank]) + tail)
        v = v.reshape(v.shape[:1] + v.shape[1 + self.nesting - rank :])
        return v.expand((S,) + tuple(shape[:rank]) + tail)

    def _site_marginals(self, latents, data, S):
        from opt_einsum import shared_intermediates
        from pyro.infer.traceenum_elbo import _find_ordinal
        from pyro.ops import packed
        from pyro.ops.contract import contract_to_tensor
        from pyro.ops.rings import LogRing

        tr = self._trace(latents, data, S)
        _, log_factors, _, sum_dims, _ = self._factors(tr)
        out = {}
        with shared_intermediates() as cache:
            ring = LogRing(cache=cache, dim_to_size=_dim_to_size(tr, log_factors))
            for n in self.chosen:
                site = tr.nodes[n]
                enum_dim = site["infer"]["_enumerate_dim"]
                symbol = site["infer"]["_enumerate_symbol"]
                # As Pyro's TraceEnum_ELBO.compute_marginals: contract to the site's plates, keep its dim.
                logits = contract_to_tensor(
                    log_factors,
                    sum_dims,
                    target_ordinal=_find_ordinal(tr, site),
                    target_dims={symbol},
                    ring=ring,
                )
                logits = packed.unpack(logits, tr.symbol_to_dim)
                logits = logits.unsqueeze(-1).transpose(-1, enum_dim - 1)
                out[n] = self._to_site(torch.softmax(logits, -1), n, S, trailing=1)
        return out

    def marginals(self, latents, data):
        latents = {k: v.detach() for k, v in latents.items()}
        with torch.no_grad():
            if self.mode() == "plate":
                S = next(iter(latents.values())).shape[0]
                return self._site_marginals(latents, data, S)
            outs = self._loop(latents, data, lambda v: self._site_marginals(v, data, None))
        return {n: torch.stack([o[n] for o in outs]) for n in self.chosen}

    def _draw(self, latents, data, S):
        import pyro.poutine as poutine
        from pyro.infer import infer_discrete

        a, kw = self.call_args(data)
        program = poutine.condition(self._program(S), data=self._cond(latents, S))
        sampler = infer_discrete(program, first_available_dim=self._first_dim(S), temperature=1)
        tr = poutine.trace(sampler).get_trace(*a, **kw)
        return {n: self._to_site(tr.nodes[n]["value"], n, S) for n in self.chosen}

    def sample(self, latents, data):
        latents = {k: v.detach() for k, v in latents.items()}
        with torch.no_grad():
            if self.mode() == "plate":
                S = next(iter(latents.values())).shape[0]
                return self._draw(latents, data, S)
            outs = self._loop(latents, data, lambda v: self._draw(v, data, None))
        return {n: torch.stack([o[n] for o in outs]) for n in self.chosen}
