"""Pyro front-end: any Pyro program as a :class:`vipkg.Model` (:meth:`vipkg.Model.from_pyro`).

A Pyro program is traced once to learn its sites. Every later call runs it
conditioned on the latent values under one extra ``pyro.plate`` placed left of
all the program's own plates, so ``S`` particles cost one vectorized pass.
"""

from __future__ import annotations

import torch

from vipkg.model import ModelError, Site, _check_data

__all__ = ["pyro_model"]

_PARTICLE_PLATE = "_vipkg_particles"


def _split_tensor_args(args, kwargs):
    """Move tensor arguments into a data dict so that ``Model.to`` can move them."""
    data, arg_spec, kw_spec = {}, [], {}
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            data[f"arg{i}"] = a
            arg_spec.append(("data", f"arg{i}"))
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


def _is_sample(site) -> bool:
    from pyro.poutine.subsample_messenger import _Subsample

    # pyro.plate records its subsample indices as a pseudo "sample" site.
    return site["type"] == "sample" and not isinstance(site["fn"], _Subsample)


def _dependencies(fn, args, kwargs, latent_names):
    """For every sample site, the latent sites its log density depends on (Pyro's provenance tracking)."""
    from pyro.infer.inspect import get_dependencies

    with torch.random.fork_rng(devices=[]):
        deps = get_dependencies(fn, args, kwargs)["prior_dependencies"]
    return {site: set(up) & latent_names for site, up in deps.items()}


def pyro_model(cls, fn, args, kwargs, *, name):
    """What :meth:`vipkg.Model.from_pyro` returns: ``cls`` (``Model`` or a subclass) built from ``fn``."""
    import pyro
    import pyro.poutine as poutine

    data, arg_spec, kw_spec = _split_tensor_args(args, kwargs)
    data = _check_data(data)

    # Tracing draws from the prior; keep the user's RNG stream untouched.
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        trace = poutine.trace(fn).get_trace(*args, **kwargs)

    sites: dict[str, Site] = {}
    event_dims: dict[str, int] = {}
    observed: dict[str, torch.Tensor] = {}
    nesting = 0
    for site_name, site in trace.nodes.items():
        if not _is_sample(site):
            continue
        dist = site["fn"]
        nesting = max(nesting, len(dist.batch_shape))
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                nesting = max(nesting, -frame.dim)
        if site["is_observed"]:
            observed[site_name] = site["value"]
            continue
        for frame in site["cond_indep_stack"]:
            full = getattr(frame, "full_size", None)
            if full is not None and full != frame.size:
                raise ModelError(
                    f"Pyro model {name!r}: latent site {site_name!r} lies in the subsampled plate "
                    f"{frame.name!r} ({frame.size} of {full}); local latent variables in a "
                    "subsampled plate are not supported. Subsample only plates of observed sites."
                )
        shape = torch.Size(site["value"].shape)
        sites[site_name] = Site(shape, dist.support)
        event_dims[site_name] = len(dist.event_shape)
    if not sites:
        raise ModelError(f"Pyro model {name!r} has no latent sample sites; there is nothing to infer.")

    latent_names = set(sites)
    particle_dim = -(nesting + 1)

    def run(latents, data):
        first = next(iter(latents.values()))
        S = first.shape[0]
        cond = {}
        for k, v in latents.items():
            batch = len(sites[k].shape) - event_dims[k]
            cond[k] = v.reshape((S,) + (1,) * (nesting - batch) + tuple(sites[k].shape))
        a = [_rebuild(s, data) for s in arg_spec]
        kw = {k: _rebuild(s, data) for k, s in kw_spec.items()}

        def plated(*a, **kw):
            with pyro.plate(_PARTICLE_PLATE, S, dim=particle_dim):
                return fn(*a, **kw)

        tr = poutine.trace(poutine.condition(plated, data=cond)).get_trace(*a, **kw)
        # Conditioned latents show up as observed; an unobserved site is one the
        # first trace did not have, and would silently be drawn from its prior.
        names = {n for n, s in tr.nodes.items() if _is_sample(s)}
        fresh = {n for n, s in tr.nodes.items() if _is_sample(s) and not s["is_observed"]}
        if fresh or not latent_names <= names:
            now = sorted((names & latent_names) | fresh)
            raise ModelError(
                f"Pyro model {name!r} changed its latent sites between calls: traced "
                f"{sorted(latent_names)}, now {now}. vipkg needs a fixed set of sites "
                "(use pyro.poutine.mask instead of data-dependent sample statements)."
            )
        tr.compute_log_prob(lambda _, site: _is_sample(site))
        return tr, S

    def _reduce(lp, S, site_name):
        if lp.dim() > nesting + 1:
            raise ModelError(
                f"Pyro model {name!r}: site {site_name!r} has log-prob shape {tuple(lp.shape)}, with "
                f"more batch dimensions than its plates ({nesting}); declare them with pyro.plate "
                "or .to_event()."
            )
        lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))
        return lp.reshape(lp.shape[0], -1).sum(-1).expand(S)

    def log_joint(latents, data):
        tr, S = run(latents, data)
        total = 0.0
        for site_name, site in tr.nodes.items():
            if _is_sample(site):
                total = total + _reduce(site["log_prob"], S, site_name)
        return total

    def pointwise(latents, data):
        tr, S = run(latents, data)
        out = {}
        for site_name, site in tr.nodes.items():
            if site_name in observed:
                lp = site["unscaled_log_prob"]
                lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))
                out[site_name] = lp.reshape(lp.shape[0], -1).expand(S, -1)
        return out

    def terms(latents, data):
        tr, S = run(latents, data)
        out = {}
        for site_name, site in tr.nodes.items():
            if _is_sample(site):
                lp = site["log_prob"]
                lp = lp.reshape((1,) * (nesting + 1 - lp.dim()) + tuple(lp.shape))
                rest = list(lp.shape[1:])
                # Plates the site is not in show up as leading size-1 dims: drop them so
                # the term's local shape lines up with the sites that share its plates.
                while rest and rest[0] == 1:
                    rest.pop(0)
                out[site_name] = lp.reshape(lp.shape[0], *rest).expand(S, *rest)
        return out

    term_sites = None
    if any(s.is_discrete for s in sites.values()):
        # Only programs with discrete sites pay for the dependency trace: they are the
        # ones score-function estimators must Rao-Blackwellize to be usable.
        term_sites = _dependencies(fn, args, kwargs, latent_names)

    model = cls(
        sites,
        log_joint,
        log_joint_terms=None if term_sites is None else terms,
        term_sites=term_sites,
        data=data,
        name=name,
        pointwise_log_likelihood=pointwise,
        pyro_model=(fn, args, kwargs),
        observed={k: v.detach() for k, v in observed.items()},
    )
    return model
