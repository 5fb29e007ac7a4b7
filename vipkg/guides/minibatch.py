"""Minibatch views of guides over local latent sites (sites in subsampled plates).

A model with local sites (:attr:`vipkg.Model.local_sites`) is fitted one minibatch
at a time: :meth:`vipkg.Model.minibatch` gives the model on the minibatch's rows,
and :func:`minibatch_guide` the guide on the same rows. A view shares the guide's
parameters (``view.parameters()`` are the guide's own tensors) and reads the
minibatch's rows of each local parameter by indexing, inside the autograd graph,
so an estimate on the view fills the guide's ``.grad`` (zero for rows outside the
minibatch), like Pyro's ``AutoNormal`` under subsampling.

A view over local sites reports ``log_q_scale = size / subsample_size``: the
surrogate builder multiplies the part's ``log q`` by it, the counterpart of the
model's minibatch scaling, so that the bound and every estimator that goes through
it stay unbiased for the full data.
"""

from __future__ import annotations

import copy

import torch

from vipkg.model import Model, ModelError

__all__ = ["minibatch_guide", "draw_minibatch", "datum_log_q"]


def _take_flat(flat, shapes, axes, indices):
    """Rows ``indices[site]`` along ``axes[site]`` of every site in a flat ``[..., numel]`` layout."""
    batch = flat.shape[:-1]
    sizes = [max(1, int(torch.Size(s).numel())) for s in shapes.values()]
    parts = flat.split(sizes, dim=-1) if len(sizes) > 1 else (flat,)
    out = []
    for (k, shape), part in zip(shapes.items(), parts):
        v = part.reshape(*batch, *shape)
        if k in axes:
            v = v.index_select(len(batch) + axes[k], indices[k])
        out.append(v.reshape(*batch, -1))
    return torch.cat(out, -1) if len(out) > 1 else out[0]


def _rules():
    from vipkg.guides.discrete import Bernoulli, Categorical, OneHotCategorical
    from vipkg.guides.gaussian import MeanFieldNormal
    from vipkg.guides.positive import Beta, Dirichlet, Gamma

    return (
        # (families, attributes, layout): "unconstrained" = flat over the sub-model's unconstrained
        # vector, "sites" = flat over the named sites, "per_site" = a dict {site: [*shape, ...]}.
        ((MeanFieldNormal,), ("loc", "raw_scale"), "unconstrained"),
        ((Bernoulli,), ("logits",), "sites"),
        ((Gamma, Dirichlet), ("raw_concentration", "raw_rate"), "sites"),
        ((Beta,), ("raw_concentration1", "raw_concentration0"), "sites"),
        ((Categorical, OneHotCategorical), ("raw_logits",), "per_site"),
    )


def family_view(guide, sub: Model, sub_b: Model, indices: dict[str, torch.Tensor], data=None):
    """``guide`` (one family over the sites of ``sub``) on a minibatch (``sub_b``'s rows).

    A family with a ``minibatch_view(index, data)`` method (the amortized families of
    :mod:`vipkg.guides.amortized`) makes its own view from the plate's indices and the
    minibatch model's ``data`` (default ``sub_b.data``); the others index their parameters.
    """
    local = [k for k in sub.sites if k in sub.local_sites]
    if not local:
        return guide
    plates = {sub.local_sites[k][0] for k in local}
    if len(local) != len(sub.sites) or len(plates) != 1:
        raise ModelError(
            f"{type(guide).__name__} covers sites {list(sub.sites)}, mixing local sites {local} (in "
            f"subsampled plates {sorted(plates)}) with others: a family over local sites must cover "
            "only the local sites of one plate. Use Composite(model, {global sites: family, local "
            "sites: MeanFieldNormal or a discrete family})."
        )
    (plate,) = plates
    p = sub.plates[plate]
    hook = getattr(guide, "minibatch_view", None)
    if callable(hook):
        view = hook(indices[plate], sub_b.data if data is None else data)
        view.log_q_scale = p.size / p.subsample_size
        view.__dict__["minibatch_of"] = guide
        return view
    axes = {k: sub.local_sites[k][1] for k in local}
    rows = {k: indices[plate] for k in local}
    rule = next(((a, lay) for fams, a, lay in _rules() if isinstance(guide, fams)), None)
    if rule is None:
        raise ModelError(
            f"{type(guide).__name__} cannot guide the local sites {local} of subsampled plate {plate!r}: "
            "its parameters couple the plate's data points. Use a family that factorizes over them "
            "(MeanFieldNormal, Gamma, Beta, Dirichlet, Categorical, OneHotCategorical, Bernoulli) or an "
            "amortized family (vipkg.guides.AmortizedNormal, AmortizedCategorical, ...)."
        )
    attrs, layout = rule
    view = copy.copy(guide)  # shares _parameters / _modules: the view's parameters are the guide's
    for attr in attrs:
        if not hasattr(guide, attr):
            continue
        value = getattr(guide, attr)
        if layout == "per_site":
            view.__dict__[attr] = {k: value[k].index_select(axes[k], rows[k]) for k in guide.site_names}
        elif layout == "sites":
            view.__dict__[attr] = _take_flat(value, guide.site_shapes, axes, rows)
        else:
            view.__dict__[attr] = _take_flat(value, sub._ushapes, axes, rows)
    if layout == "unconstrained":
        view.dim = sub_b.dim
    else:
        view.site_shapes = {k: torch.Size(sub_b.sites[k].shape) for k in guide.site_names}
        view._numels = [max(1, int(s.numel())) for s in view.site_shapes.values()]
        view.numel = sum(view._numels)
    view.log_q_scale = p.size / p.subsample_size
    # Not setattr: a Module value would be registered in the _modules the view shares with ``guide``.
    view.__dict__["minibatch_of"] = guide
    return view


def minibatch_guide(guide, model: Model, model_b: Model, indices: dict[str, torch.Tensor]):
    """The guide of ``model`` on the minibatch ``model_b = model.minibatch(indices)``.

    A :class:`~vipkg.guides.Composite` gets a view of each part over local sites; a
    single family must cover only local sites of one plate.
    """
    from vipkg.guides.composite import Composite

    if isinstance(guide, Composite):
        view = copy.copy(guide)
        subs, parts = [], []
        for g, sub, sites in zip(guide.parts, guide.sub_models, guide.part_sites):
            if any(s in model.local_sites for s in sites):
                # The part's sub-model knows its plates (Composite.sub_model keeps them).
                sub_b = Composite.sub_model(model_b, sites)
                parts.append(family_view(g, sub, sub_b, indices, data=model_b.data))
                subs.append(sub_b)
            else:
                parts.append(g)
                subs.append(sub)
        # Plain lists shadow the ModuleList in the view only; the guide keeps its parts.
        view.__dict__["parts"] = parts
        view.sub_models = subs
        view.__dict__["minibatch_of"] = guide
        return view
    return family_view(guide, model, model_b, indices)


def draw_minibatch(model: Model, guide, generator: torch.Generator | None = None):
    """``(model_b, guide_b)``: a fresh minibatch of ``model`` (torch's generator) and ``guide`` on it;
    ``(model, guide)`` itself for a model without local sites."""
    if not model.is_subsampled:
        return model, guide
    indices = model.subsample_indices(generator)
    model_b = model.minibatch(indices)
    return model_b, minibatch_guide(guide, model, model_b, indices)


def datum_log_q(family, part_model: Model, model: Model, latents, stopped: bool = False) -> torch.Tensor:
    """``log q(z_i)`` of each data point of a minibatch, ``[n, B]``: one local family's factor per datum.

    Parameters
    ----------
    family
        A minibatch view of a family over local sites (:func:`family_view`): an amortized family
        (its own ``datum_log_prob``) or a :class:`~vipkg.guides.MeanFieldNormal`.
    part_model : vipkg.Model
        The family's (minibatch) sub-model, whose unconstrained layout the family's vector follows.
    model : vipkg.Model
        The minibatch model (``model.minibatch_of`` says which axis of each site is the plate's).
    latents : mapping of str to Tensor
        Named constrained draws ``[n, *shape]`` (they may carry a gradient path).
    stopped : bool
        Evaluate at the family's parameters detached (path-gradient estimators).
    """
    hook = getattr(family, "datum_log_prob", None)
    if callable(hook):
        return hook(latents, stopped=stopped)
    from vipkg.guides.gaussian import MeanFieldNormal

    axes = {k: a for k, (_, a) in (model.minibatch_of or model).local_sites.items()}
    if not isinstance(family, MeanFieldNormal) or not all(k in axes for k in part_model.sites):
        raise ModelError(
            f"{type(family).__name__} does not give its log density per data point, which a bound that "
            "weights each datum's draws (IWAE, Renyi on a minibatch) needs. Use an amortized family "
            "(vipkg.guides.AmortizedNormal, ...) or MeanFieldNormal over the local sites."
        )
    loc, scale = family.loc, family.scale
    if stopped:
        loc, scale = loc.detach(), scale.detach()
    out, start = None, 0
    for k, ushape in part_model._ushapes.items():
        numel = max(1, ushape.numel())
        z = latents[k]
        n = z.shape[0]
        t = part_model._transforms[k]
        u = z if part_model._real[k] else t.inv(z)
        m, s = loc[start : start + numel].reshape(ushape), scale[start : start + numel].reshape(ushape)
        start += numel
        lq = torch.distributions.Normal(m, s, validate_args=False).log_prob(u.reshape(n, *ushape))
        a = axes[k] + 1
        lq = lq.movedim(a, 1).reshape(n, ushape[a - 1], -1).sum(-1)
        if not part_model._real[k]:
            ladj = t.log_abs_det_jacobian(u, z)
            lq = lq - ladj.movedim(a, 1).reshape(n, ushape[a - 1], -1).sum(-1)
        out = lq if out is None else out + lq
    return out
