"""Pyro front-end: any Pyro program as a :class:`vipkg.Model` (:meth:`vipkg.Model.from_pyro`).

A Pyro program is traced once to learn its sites. Every later call runs it
conditioned on the latent values under one extra ``pyro.plate`` placed left of
all the program's own plates and batch dimensions, so ``S`` particles cost one
vectorized pass.

That only works for programs written batch-agnostically. Ordinary Pyro code
often is not (``locs[z]``, ``torch.mm``, ``x.size(0)`` on a latent), and a
program that is not can fail loudly or, worse, run and return wrong numbers.
So the vectorized pass is *checked*: when the model is built (on prior draws, at
particle counts that coincide with no size in the program) and again the first
time each particle count is evaluated (on the guide's first draws), its log
density per site is compared with Pyro's own trace of the program run one
particle at a time. On an exception or a mismatch the model falls back to that
per-particle evaluation, with one :class:`PyroVectorizationWarning` naming the
site and the likely pattern.
"""

from __future__ import annotations

import inspect
import math
import warnings

import torch
from torch.distributions import Distribution, constraints, transform_to

from vipkg.model import SUBSAMPLE_KEY, ModelError, Plate, Site, _check_data

__all__ = ["pyro_model", "PyroVectorizationWarning", "PyroProgramWarning"]

_PARTICLE_PLATE = "_vipkg_particles"
# Primes: a particle count equal to some size in the program could hide a
# program that confuses the particle dimension with that size.
_CHECK_COUNTS = (3, 7, 5, 11, 13, 17, 19, 23, 29, 31, 37)
_CHECK_SEED = 20261201


class PyroVectorizationWarning(UserWarning):
    """A Pyro program could not be evaluated for all particles at once; vipkg loops over them."""


class PyroProgramWarning(UserWarning):
    """Part of a Pyro program that vipkg ignores (enumerate annotations when enumeration is off)."""


# ------------------------------------------------------------------ arguments
def _argument_names(fn, args, kwargs) -> list[str]:
    """The names the function gives its positional arguments (``arg{i}`` where it gives none)."""
    names = [f"arg{i}" for i in range(len(args))]
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return names
    i = 0
    for pname, value in bound.arguments.items():
        param = bound.signature.parameters[pname]
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            if i < len(args):
                names[i] = pname
                i += 1
        elif param.kind == param.VAR_POSITIONAL:
            for j in range(len(value)):
                names[i] = f"{pname}[{j}]"
                i += 1
    return names


def _split_tensor_args(fn, args, kwargs):
    """Move tensor arguments into a data dict (keyed by argument name) so that ``Model.to`` moves them."""
    names = _argument_names(fn, args, kwargs)
    data, arg_spec, kw_spec = {}, [], {}
    for name, a in zip(names, args):
        if isinstance(a, torch.Tensor):
            data[name] = a
            arg_spec.append(("data", name))
        else:
            arg_spec.append(("const", a))
    for k, a in kwargs.items():
        if isinstance(a, torch.Tensor):
            data[k] = a
            kw_spec[k] = ("data", k)
        else:
            kw_spec[k] = ("const", a)
    return data, arg_spec, kw_spec


def _rebuild(spec, data):
    kind, v = spec
    return data[v] if kind == "data" else v


# ---------------------------------------------------------------------- sites
def _is_sample(site) -> bool:
    from pyro.poutine.subsample_messenger import _Subsample

    # pyro.plate records its subsample indices as a pseudo "sample" site.
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


def _is_deterministic(site) -> bool:
    return bool(site["infer"].get("_deterministic", False))


def _is_scored(site) -> bool:
    return _is_sample(site) and not _is_deterministic(site)


def _dependencies(fn, args, kwargs, latent_names):
    """For every sample site, the latent sites its log density depends on (Pyro's provenance tracking)."""
    from pyro.infer.inspect import get_dependencies

    with torch.random.fork_rng(devices=[]):
        deps = get_dependencies(fn, args, kwargs)["prior_dependencies"]
    return {site: set(up) & latent_names for site, up in deps.items()}


def _changed_sites(name, traced, now) -> ModelError:
    return ModelError(
        f"Pyro model {name!r} changed its latent sites between calls: traced {sorted(traced)}, now "
        f"{sorted(now)}. vipkg needs a fixed set of sites (use pyro.poutine.mask instead of "
        "data-dependent sample statements)."
    )


def _shape_error(name, exc) -> ModelError:
    return ModelError(f"Pyro model {name!r}: {exc}")


def _site_recorder():
    from pyro.poutine.messenger import Messenger

    class _SiteRecorder(Messenger):
        """Remembers the sample site a run was at, to say where an error arose."""

        def __init__(self):
            super().__init__()
            self.current = self.last = None

        def _process_message(self, msg):
            if _is_sample(msg):
                self.current = msg["name"]

        def _postprocess_message(self, msg):
            if _is_sample(msg):
                self.last = msg["name"]

        def where(self) -> str:
            if self.current is not None and self.current != self.last:
                return f"at site {self.current!r}"
            return f"after site {self.last!r}" if self.last else "before its first site"

    return _SiteRecorder()


def _sizes_in(trace, data) -> set[int]:
    sizes = set()
    for site in trace.nodes.values():
        v = site.get("value")
        if isinstance(v, torch.Tensor):
            sizes.update(v.shape)
        for frame in site.get("cond_indep_stack", ()):
            sizes.add(frame.size)
            if getattr(frame, "full_size", None) is not None:
                sizes.add(frame.full_size)
    for v in data.values():
        sizes.update(v.shape)
    return sizes


_PATTERNS = (
    (
        ("AssertionError",),
        "an assertion on a latent's shape (e.g. `assert a.shape == ()`); particles add leading dims, "
        "so assert on trailing dims (`a.shape[-1:]`)",
    ),
    (
        ("index", "indices", "gather"),
        "indexing a tensor with a latent value (e.g. `locs[z]`); use "
        "`pyro.ops.indexing.Vindex(locs)[..., z]` or index with `...` so batch dims pass through",
    ),
    (
        ("expand", "the number of sizes provided"),
        "`.expand(n)` on a latent-dependent tensor; expand to "
        "`batch_shape + (n,)`, or let a `pyro.plate` broadcast it",
    ),
    (
        ("t() expects", "mm", "matrix", "2D", "2-D", "diag"),
        "a matrix operation that accepts only 2-D "
        "tensors (`torch.mm`, `.t()`, `torch.diag`, `nn.Linear` weights as latents); use `@`/`torch.matmul`, "
        "`.transpose(-1, -2)`, `torch.diag_embed`, which broadcast over leading dims",
    ),
    (
        ("broadcast", "size of tensor", "must match", "shape"),
        "a tensor op that assumes the latent has its "
        "traced shape (e.g. `(coefs * data).sum(-1)` outside a plate, `.view(n)`, `.size(0)` on a latent); "
        "reduce over named trailing dims and use `pyro.plate` for data dimensions",
    ),
)


def _likely_pattern(message: str) -> str:
    low = message.lower()
    for keys, advice in _PATTERNS:
        if any(k.lower() in low for k in keys):
            return advice
    return (
        "code that treats a latent's leading dimension as its own (e.g. `z.size(0)`, `z.shape[0]`, "
        "`len(z)`, `z[0]`); index and reduce from the right (`z[..., 0]`, `z.shape[-1]`)"
    )


def pyro_model(
    cls, fn, args, kwargs, *, name, vectorize: str = "auto", enumerate="auto", max_plate_nesting=None
):
    """What :meth:`vipkg.Model.from_pyro` returns: ``cls`` (``Model`` or a subclass) built from ``fn``.

    ``vectorize`` is ``"auto"`` (the checked particle plate, falling back to
    ``torch.func.vmap`` over particles and then to a loop), ``"plate"`` (the
    particle plate, unchecked), ``"vmap"`` or ``"loop"``. ``enumerate`` (``"auto"``: the sites
    marked for parallel enumeration; a list of site names; ``False``/``None``: none) and
    ``max_plate_nesting`` go to :mod:`vipkg.frontends.pyro_enum`.
    """
    import pyro
    import pyro.poutine as poutine
    from pyro.util import check_site_shape

    if vectorize not in ("auto", "plate", "vmap", "loop"):
        raise ValueError(
            f"from_pyro: vectorize must be 'auto', 'plate', 'vmap' or 'loop', got {vectorize!r}."
        )
    data, arg_spec, kw_spec = _split_tensor_args(fn, args, kwargs)
    data = _check_data(data)
    user_fn = fn
    # The program's pyro.param / PyroModule parameters live in a parameter store of the
    # model's own (Pyro's ``ParamStoreDict.scope``), not the global one: two models never
    # share a parameter by name, and the user's global store is left as it was.
    param_state = {"params": {}, "constraints": {}}

    def fn(*a, **kw):
        with pyro.get_param_store().scope(param_state):
            return user_fn(*a, **kw)

    # Tracing draws from the prior; keep the user's RNG stream untouched. One trace serves both paths: a
    # program whose sites change between runs must meet the check with its first trace.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        trace = poutine.trace(fn).get_trace(*args, **kwargs)
        try:
            trace.compute_log_prob(lambda _, site: _is_scored(site))
        except ValueError as exc:
            raise _shape_error(name, exc) from exc

    if enumerate is not None and enumerate is not False:
        from vipkg.frontends.pyro_enum import enumerated_model

        model = enumerated_model(
            cls,
            fn,
            user_fn,
            args,
            kwargs,
            param_state,
            name=name,
            vectorize=vectorize,
            enumerate=enumerate,
            max_plate_nesting=max_plate_nesting,
            trace=trace,
        )
        if model is not None:
            return model

    sites: dict[str, Site] = {}
    event_dims: dict[str, int] = {}
    observed: dict[str, torch.Tensor] = {}
    deterministic: dict[str, torch.Size] = {}
    enumerated = []
    plates: dict[str, Plate] = {}
    local_sites: dict[str, tuple[str, int]] = {}
    nesting = 0
    for site_name, site in trace.nodes.items():
        if not _is_sample(site):
            continue
        if _is_deterministic(site):
            deterministic[site_name] = torch.Size(site["value"].shape)
            continue
        dist = site["fn"]
        in_plate = any(f.vectorized and f.dim is not None for f in site["cond_indep_stack"])
        if in_plate:
            # Pyro's own check, at its strictest (as its ELBOs run it on their first trace): a
            # log-prob dimension that no plate declares, inside a plate, is a shape mistake.
            try:
                check_site_shape(site, max_plate_nesting=math.inf)
            except ValueError as exc:
                raise _shape_error(name, exc) from exc
        # The particle dim goes left of every dimension the site's log density has: its
        # plates, its distribution's batch shape and its observed value's batch shape.
        nesting = max(nesting, site["log_prob"].dim(), len(dist.batch_shape))
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if site["infer"].get("enumerate") is not None:
            enumerated.append(site_name)
        if site["is_observed"]:
            observed[site_name] = site["value"]
            continue
        sites[site_name] = Site(torch.Size(site["value"].shape), dist.support)
        event_dims[site_name] = len(dist.event_shape)
        for frame in site["cond_indep_stack"]:
            full = getattr(frame, "full_size", None)
            if full is None or full == frame.size:
                continue
            if not frame.vectorized or frame.dim is None:
                raise ModelError(
                    f"Pyro model {name!r}: latent site {site_name!r} lies in the subsampled sequential "
                    f"plate {frame.name!r}; local latents need a vectorized pyro.plate(..., subsample_size=)."
                )
            # A local latent: the model's site has the plate's full size, each step a minibatch.
            axis = len(site["value"].shape) - event_dims[site_name] + frame.dim
            if axis < 0:
                raise ModelError(
                    f"Pyro model {name!r}: local site {site_name!r} has no dimension for its plate "
                    f"{frame.name!r} (dim={frame.dim}); its value has shape {tuple(site['value'].shape)}."
                )
            plates[frame.name] = Plate(full, frame.size)
            local_sites[site_name] = (frame.name, axis)
    if not sites:
        raise ModelError(f"Pyro model {name!r} has no latent sample sites; there is nothing to infer.")
    if enumerated:
        warnings.warn(
            f"Pyro model {name!r}: sites {enumerated} are marked for enumeration "
            "(infer={'enumerate': ...}), but enumeration is off (from_pyro(..., enumerate=False)): vipkg "
            "guides them like any other discrete site (a score-function estimator).",
            PyroProgramWarning,
            stacklevel=4,
        )

    latent_names = set(sites)
    particle_dim = -(nesting + 1)
    scored = [n for n, s in trace.nodes.items() if _is_scored(s)]

    def call_args(data):
        return [_rebuild(s, data) for s in arg_spec], {k: _rebuild(s, data) for k, s in kw_spec.items()}

    def subsample(data):
        # A minibatch view carries its plates' indices in its data; conditioning a plate's
        # subsample site on them makes pyro.plate use (and scale by) that minibatch.
        return {k[len(SUBSAMPLE_KEY) :]: v for k, v in data.items() if k.startswith(SUBSAMPLE_KEY)}

    def check_fresh(tr):
        # Conditioned latents show up as observed; an unobserved site is one the
        # first trace did not have, and would silently be drawn from its prior.
        names = {n for n, s in tr.nodes.items() if _is_sample(s)}
        fresh = {n for n, s in tr.nodes.items() if _is_scored(s) and not s["is_observed"]}
        if fresh or not latent_names <= names:
            raise _changed_sites(name, latent_names, (names & latent_names) | fresh)

    def check_names(latents):
        if set(latents) != latent_names:
            raise ModelError(
                f"Pyro model {name!r} takes values for its latent sites {sorted(latent_names)}; got "
                f"{sorted(latents)}."
            )

    def plated_trace(latents, data):
        first = next(iter(latents.values()))
        S = first.shape[0]
        cond = {}
        for k, v in latents.items():
            batch = len(sites[k].shape) - event_dims[k]
            cond[k] = v.reshape((S,) + (1,) * (nesting - batch) + tuple(sites[k].shape))
        a, kw = call_args(data)

        def plated(*a, **kw):
            with pyro.plate(_PARTICLE_PLATE, S, dim=particle_dim):
                return fn(*a, **kw)

        cond.update(subsample(data))
        if S in state["checked"]:
            # Verified at this particle count (with the user's validation setting): the values are
            # the guide's, in the support by construction, and Pyro's and torch's argument checks
            # read tensors on the host; a bad argument still ends the fit as a non-finite loss.
            # Measured 3.5 -> 3.0 ms per log joint of the zoo's Pyro VAE.
            default = Distribution._validate_args
            Distribution.set_default_validate_args(False)
            try:
                with pyro.validation_enabled(False):
                    tr = poutine.trace(poutine.condition(plated, data=cond)).get_trace(*a, **kw)
            finally:
                Distribution.set_default_validate_args(default)
        else:
            tr = poutine.trace(poutine.condition(plated, data=cond)).get_trace(*a, **kw)
        check_fresh(tr)
        tr.compute_log_prob(lambda _, site: _is_scored(site))
        return tr, S

    def one_particle(values, data):
        """Pyro's own trace of the program at one particle's values: what every output needs."""
        a, kw = call_args(data)
        tr = poutine.trace(poutine.condition(fn, data={**values, **subsample(data)})).get_trace(*a, **kw)
        check_fresh(tr)
        tr.compute_log_prob(lambda _, site: _is_scored(site))
        return {
            "lp": {n: tr.nodes[n]["log_prob"] for n in scored},
            "ulp": {n: tr.nodes[n]["unscaled_log_prob"].reshape(-1) for n in observed},
            "det": {n: tr.nodes[n]["value"].reshape(shape) for n, shape in deterministic.items()},
        }

    def particle_loop(latents, data, which=None):
        S = next(iter(latents.values())).shape[0]
        outs = [one_particle({k: v[i] for k, v in latents.items()}, data) for i in (which or range(S))]
        return {g: {n: torch.stack([o[g][n] for o in outs]) for n in outs[0][g]} for g in outs[0]}

    def particle_vmap(latents, data):

        # Argument and support validation branch on tensor values, which vmap cannot do;
        # the values it would check are the guide's, in the support by construction.
        default = Distribution._validate_args
        Distribution.set_default_validate_args(False)
        try:
            with pyro.validation_enabled(False):
                return torch.func.vmap(lambda v: one_particle(v, data), randomness="same")(latents)
        finally:
            Distribution.set_default_validate_args(default)

    def per_particle(latents, data):
        return particle_vmap(latents, data) if state["mode"] == "vmap" else particle_loop(latents, data)

    def _lead(lp, site_name):
        # ``lp`` from the plated run: move its particle dim first, padding missing dims.
        if lp.dim() > nesting + 1:
            raise ModelError(
                f"Pyro model {name!r}: site {site_name!r} has log-prob shape {tuple(lp.shape)}, with "
                f"more batch dimensions than its plates ({nesting}); declare them with pyro.plate "
                "or .to_event()."
            )
        return lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))

    def _local(lp_batched, S):
        rest = list(lp_batched.shape[1:])
        # Plates the site is not in show up as leading size-1 dims: drop them so
        # the term's local shape lines up with the sites that share its plates.
        while rest and rest[0] == 1:
            rest.pop(0)
        return lp_batched.reshape(lp_batched.shape[0], *rest).expand(S, *rest)

    # The evaluation mode: "plate" or "loop"; checked counts are particle counts verified once.
    state = {"mode": "plate" if vectorize == "auto" else vectorize, "checked": set()}

    def site_sums(latents, data, mode=None):
        """``{site: Tensor[S]}``: each scored site's log density summed over its own dims, by
        ``mode`` (default the model's current one)."""
        mode = mode or state["mode"]
        if mode == "plate":
            tr, S = plated_trace(latents, data)
            out = {}
            for n, s in tr.nodes.items():
                if _is_scored(s):
                    lp = _lead(s["log_prob"], n)
                    out[n] = lp.reshape(lp.shape[0], -1).sum(-1).expand(S)
            return out
        lp = (particle_vmap if mode == "vmap" else particle_loop)(latents, data)["lp"]
        return {n: v.reshape(v.shape[0], -1).sum(-1) for n, v in lp.items()}

    def verify(latents, data, S, mode):
        """A batched evaluation against Pyro's per-particle traces: ``(None, None)`` or ``(what, where)``."""
        latents = {k: v.detach() for k, v in latents.items()}
        which = sorted({0, S // 2, S - 1})
        recorder = _site_recorder()
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(_CHECK_SEED)
            try:
                with recorder:
                    batched = site_sums(latents, data, mode)
            except ModelError as exc:
                if "changed its latent sites" in str(exc):
                    raise
                return str(exc), recorder.where()
            except Exception as exc:  # noqa: BLE001 - any failure of the batched run means: fall back
                # ... unless the program fails one particle at a time too: then the error is the
                # program's own (a dtype mix, a bad value), not the batching's, and it is the user's.
                torch.manual_seed(_CHECK_SEED)
                particle_loop(latents, data, which=which[:1])
                first = (str(exc).splitlines() or ["(no message)"])[0]
                return f"{type(exc).__name__}: {first}", recorder.where()
            refs = []
            for i in which:
                torch.manual_seed(_CHECK_SEED)
                refs.append(particle_loop(latents, data, which=[i])["lp"])
        for n in scored:
            ref = torch.stack([r[n].sum() for r in refs])
            got = batched[n][which]
            close = torch.isclose(
                got.to(ref.dtype), ref, rtol=1e-4, atol=1e-4 * max(1.0, _scale(ref)), equal_nan=True
            )
            if not bool(close.all()):
                j = int((~close).nonzero()[0])
                return (
                    f"the batched log density of particle {which[j]} of {S} is {float(got[j]):.6g}, "
                    f"Pyro's trace of that particle alone gives {float(ref[j]):.6g}"
                ), f"at site {n!r}"
        return None, None

    def check(latents, data, S):
        """Verify the current mode at ``S`` particles; on failure move down plate -> vmap -> loop, once."""
        what, where = verify(latents, data, S, state["mode"])
        # Only now: verification runs with the user's validation setting (see plated_trace).
        state["checked"].add(S)
        if what is None:
            return
        failed = state["mode"]
        state["mode"] = "loop"
        if failed == "plate" and verify(latents, data, S, "vmap") == (None, None):
            state["mode"] = "vmap"
        how = (
            "with torch.func.vmap over particles (distribution argument validation off there)"
            if state["mode"] == "vmap"
            else "one particle at a time (correct, but slow)"
        )
        if failed == "plate":
            what = (
                f"cannot be evaluated for {S} particles at once under vipkg's particle plate "
                f"(pyro.plate({_PARTICLE_PLATE!r}, {S}, dim={particle_dim}), left of the program's own "
                f"dims): {what} ({where}). vipkg evaluates it {how} instead. Likely cause: "
                f"{_likely_pattern(what)}; written that way the program runs vectorized"
            )
        else:
            what = f"cannot be evaluated with torch.func.vmap at {S} particles: {what} ({where}); vipkg loops"
        warnings.warn(f"Pyro model {name!r} {what}.", PyroVectorizationWarning, stacklevel=5)

    def ensure_checked(latents, data):
        check_names(latents)
        if state["mode"] == "loop" or vectorize != "auto":
            return
        S = next(iter(latents.values())).shape[0]
        if S in state["checked"] or torch.compiler.is_compiling():
            return
        check(latents, data, S)

    def log_joint(latents, data):
        ensure_checked(latents, data)
        total = 0.0
        for lp in site_sums(latents, data).values():
            total = total + lp
        return total

    def pointwise(latents, data):
        ensure_checked(latents, data)
        if state["mode"] == "plate":
            tr, S = plated_trace(latents, data)
            out = {}
            for n in observed:
                lp = _lead(tr.nodes[n]["unscaled_log_prob"], n)
                out[n] = lp.reshape(lp.shape[0], -1).expand(S, -1)
            return out
        return per_particle(latents, data)["ulp"]

    def terms(latents, data):
        ensure_checked(latents, data)
        if state["mode"] == "plate":
            tr, S = plated_trace(latents, data)
            return {n: _local(_lead(s["log_prob"], n), S) for n, s in tr.nodes.items() if _is_scored(s)}
        S = next(iter(latents.values())).shape[0]
        return {n: _local(lp, S) for n, lp in per_particle(latents, data)["lp"].items()}

    def deterministic_values(latents, data):
        ensure_checked(latents, data)
        if state["mode"] == "plate":
            tr, S = plated_trace(latents, data)
            out = {}
            for n, shape in deterministic.items():
                v = tr.nodes[n]["value"]
                lead = v.numel() // max(math.prod(shape), 1)
                out[n] = v.reshape(lead, *shape).expand(S, *shape) if lead in (1, S) else None
            if all(v is not None for v in out.values()):
                return out
        return per_particle(latents, data)["det"]

    term_sites = term_plates = None
    if local_sites or any(s.is_discrete for s in sites.values()):
        # Only programs with discrete or local sites pay for the dependency trace: score-function
        # estimators must Rao-Blackwellize the first to be usable, and per-datum bounds need to
        # know that the second factorize over their plate.
        term_sites = _dependencies(fn, args, kwargs, latent_names)
        term_sites = {n: term_sites.get(n, latent_names) for n in scored}
        term_plates = {
            n: {
                f.name: f.dim
                for f in trace.nodes[n]["cond_indep_stack"]
                if f.vectorized and f.dim is not None
            }
            for n in scored
        }

    full_sites = dict(sites)
    for k, (plate, axis) in local_sites.items():
        shape = list(sites[k].shape)
        shape[axis] = plates[plate].size
        full_sites[k] = Site(torch.Size(shape), sites[k].support)
    model = cls(
        full_sites,
        log_joint,
        log_joint_terms=None if term_sites is None else terms,
        term_sites=term_sites,
        term_plates=term_plates,
        data=data,
        name=name,
        pointwise_log_likelihood=pointwise,
        pyro_model=(user_fn, args, kwargs),
        observed={k: v.detach() for k, v in observed.items()},
        deterministic=deterministic_values if deterministic else None,
        params=dict(param_state["params"]),
        plates=plates,
        local_sites=local_sites,
        param_transforms={
            k: transform_to(param_state["constraints"].get(k, constraints.real))
            for k in param_state["params"]
        },
    )
    model._vectorization = state

    if vectorize == "auto":
        # Check now, on prior draws at two particle counts that match no size in the program.
        sizes = _sizes_in(trace, data)
        counts = [c for c in _CHECK_COUNTS if c not in sizes][:2] or [1]
        for S in counts:
            if state["mode"] == "loop":
                break
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(_CHECK_SEED + S)
                draws = [poutine.trace(fn).get_trace(*args, **kwargs) for _ in range(S)]
            for d in draws:
                drawn = {n for n, s in d.nodes.items() if _is_scored(s) and not s["is_observed"]}
                if drawn != latent_names:
                    raise _changed_sites(name, latent_names, drawn)
            latents = {k: torch.stack([d.nodes[k]["value"] for d in draws]) for k in sites}
            check(latents, model.data, S)
    return model


def _scale(ref: torch.Tensor) -> float:
    finite = ref[torch.isfinite(ref)]
    return float(finite.abs().max()) if finite.numel() else 1.0
