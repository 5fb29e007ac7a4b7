"""Splitting a model's data (or a particle guide) by rank: ``prior + world * local likelihood``."""

from __future__ import annotations

from vipkg.model import Model, ModelError

__all__ = ["ShardingError", "shard", "shard_particles"]


class ShardingError(ModelError):
    """A model cannot be split by data points across ranks."""


def _per_datum_keys(model) -> tuple[str, ...] | None:
    keys = getattr(model, "per_datum", None)
    if keys:
        return tuple(keys)
    if model.pyro_model is not None and not model.data:
        return None  # a Pyro front-end keeps its data in the program's arguments
    return None


def shard(model: Model, rank: int, world: int) -> Model:
    """The model of rank ``rank`` out of ``world``: ``prior + world * likelihood of its rows``.

    Rows are split into ``world`` contiguous blocks whose sizes differ by at most one.
    Averaged over the ranks, the sharded log joints equal the full log joint exactly,
    whatever the block sizes; each rank's log joint alone is the full-data log joint's
    estimate from its block (the minibatch convention, with scale ``world``).

    Parameters
    ----------
    model : Model
        Implements ``shard(rank, world)`` or names ``per_datum`` data (see the module
        docstring).
    rank, world : int

    Returns
    -------
    Model
        Data sliced to the rank's rows; ``pointwise_log_likelihood`` and ``observed`` are
        those of its rows; it has no Pyro twin.

    Raises
    ------
    ShardingError
        When the model does not say how to split its data, or has fewer rows than ranks.
    """
    if not (isinstance(world, int) and world >= 1 and isinstance(rank, int) and 0 <= rank < world):
        raise ValueError(f"need 0 <= rank < world, got rank={rank!r}, world={world!r}.")
    method = getattr(model, "shard", None)
    if callable(method):
        return method(rank, world)
    keys = _per_datum_keys(model)
    if keys is None:
        raise ShardingError(
            f"model {model.name!r} does not say how to split its data across ranks. Set "
            "`model.per_datum = (<data keys whose first dimension indexes data points>)` when its "
            "log joint is prior + a sum over those rows, or give it a `shard(rank, world)` method; "
            "or fit it without data sharding (vipkg.distributed.fit(..., shard_data=False))."
        )
    missing = [k for k in keys if k not in model.data]
    if missing:
        raise ShardingError(
            f"model {model.name!r}: per_datum names {missing}, which are not in model.data "
            f"(it has {sorted(model.data)})."
        )
    sizes = {k: model.data[k].shape[0] if model.data[k].dim() else None for k in keys}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise ShardingError(
            f"model {model.name!r}: the per-datum entries must share their leading dimension, got {sizes}."
        )
    n = next(iter(sizes.values()))
    if n < world:
        raise ShardingError(f"model {model.name!r} has {n} data points, fewer than the {world} ranks.")
    if world == 1:
        return model
    lo, hi = rank * n // world, (rank + 1) * n // world
    local = {k: (v[lo:hi] if k in keys else v) for k, v in model.data.items()}
    fn, w = model._fn, float(world)

    def log_joint(latents, data):
        # The prior is the log joint of zero rows (the protocol's requirement), so
        # w * local - (w - 1) * prior = prior + w * local likelihood.
        empty = {k: (v[:0] if k in keys else v) for k, v in data.items()}
        return w * fn(latents, data) - (w - 1.0) * fn(latents, empty)

    terms = {}
    terms_fn = getattr(model, "_terms_fn", None)
    if terms_fn is not None:

        def log_joint_terms(latents, data):
            # The same identity per term; a per-datum term of zero rows is empty and sums to 0.
            empty = {k: (v[:0] if k in keys else v) for k, v in data.items()}
            full, none = terms_fn(latents, data), terms_fn(latents, empty)
            return {
                t: w * v - (w - 1.0) * none[t] if none[t].shape == v.shape else w * v for t, v in full.items()
            }

        terms = {"log_joint_terms": log_joint_terms, "term_sites": model.term_sites}
    observed = {k: (v[lo:hi] if k in keys else v) for k, v in model.observed.items()}
    new = Model(
        model.sites,
        log_joint,
        data=local,
        name=f"{model.name}[shard {rank}/{world}]",
        reference=model.reference,
        pointwise_log_likelihood=model.pointwise_log_likelihood_fn,
        observed=observed,
        deterministic=model._deterministic_fn,
        params=dict(model.named_parameters()),
        param_transforms=model._param_transforms,
        **terms,
    )
    new.per_datum = keys
    return new


def shard_particles(model, guide, rank: int, world: int):
    """Rank ``rank``'s block of a :class:`~vipkg.guides.particles.Particles` guide (contiguous rows).

    Every rank must get the same number of particles (the all-gather of
    :class:`ShardedSVGD` needs equal blocks): ``n`` must be a multiple of ``world``.
    """
    from vipkg.guides.particles import Particles

    if not isinstance(guide, Particles) or guide.mirror is not None:
        raise ValueError(
            f"shard_particles needs a Particles guide without a mirror map, got {type(guide).__name__}."
        )
    x = guide.particles.detach()
    n = x.shape[0]
    if n % world:
        raise ValueError(f"{n} particles do not split evenly over {world} ranks; use a multiple of {world}.")
    return Particles(model, particles=x[rank * n // world : (rank + 1) * n // world], dtype=x.dtype)
