"""Reports: the comparison table, its figures and its netCDF file (what ``vipkg compare`` writes).

:func:`write_compare` takes the rows and fit results that :func:`vipkg.cli.compare.compare`
computed and writes them; nothing here fits or evaluates anything.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from vipkg._io import atomic_save, atomic_write_bytes
from vipkg.diagnostics.plots import plot_gradient_variance, plot_khat, plot_losses, plot_posteriors

__all__ = ["compare_table", "save_figure", "write_compare"]


def compare_table(
    name: str, rows: Sequence[Mapping], steps: int, num_particles: int, skipped=(), notes=()
) -> str:
    """The Markdown table of a comparison: one line per row, then the configurations not run.

    Parameters
    ----------
    name : str
        The model's name, for the title.
    rows : sequence of dict
        With keys ``estimator``, ``loss``, ``loss_se``, ``ms_per_step``, ``grad_trace_var``, ``khat``;
        optional ``ksd`` (kernel Stein discrepancy) and ``particles`` (true for a particle fit, whose
        bound and k-hat cells then say why they are absent).
    steps, num_particles : int
        The fit's settings, for the caption.
    skipped : sequence of (label, reason)
    notes : sequence of str
        Lines after the caption (e.g. what the loss column is for a subsampled model).
    """
    lines = [
        f"# vipkg compare: {name}",
        "",
        f"{steps} steps, {num_particles} particles per step, Adam. Loss = minus the bound on fresh draws "
        "(± standard error); gradient variance = trace of the covariance of the loss gradient at the end; "
        "PSIS k-hat of the fitted guide (< 0.5 good, > 0.7 unreliable; Yao et al. 2018); KSD = kernel Stein "
        "discrepancy (IMQ kernel, Gorham & Mackey 2017) of 100 guide draws or the particles, in the "
        "unconstrained space: the one column that also scores particle fits (lower is better).",
        "",
        *[line for note in notes for line in (note, "")],
        "| estimator | final loss | ± se | ms/step | grad trace-variance | PSIS k-hat | KSD |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        # A bound that does not exist is said in words, not left as a bare nan.
        loss = "no bound (particles)" if r.get("particles") else f"{r['loss']:.3f}"
        se = "–" if r.get("particles") else f"{r['loss_se']:.3f}"
        khat = "– (no density)" if r.get("particles") else f"{r['khat']:.2f}"
        ksd = f"{r['ksd']:.3g}" if r.get("ksd") is not None else "–"
        lines.append(
            f"| {r['estimator']} | {loss} | {se} | {r['ms_per_step']:.3f} "
            f"| {r['grad_trace_var']:.4g} | {khat} | {ksd} |"
        )
    if skipped:
        lines += ["", "Not run, or diverged, on this model:", ""]
        lines += [f"- {label}: {reason}" for label, reason in skipped]
    return "\n".join(lines) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(path: str | os.PathLike, draw: Callable, *, figsize=(10, 4.5), dpi: int = 120) -> None:
    """Draw ``draw(figure)`` on a new figure and write it to ``path`` as PNG, atomically."""
    plt = _pyplot()
    # Constrained layout, not tight_layout: it makes room for the legends outside the axes.
    fig = plt.figure(figsize=figsize, layout="constrained")
    try:
        draw(fig)
        atomic_save(Path(path), lambda p: fig.savefig(p, dpi=dpi, format="png"))
    finally:
        plt.close(fig)


def write_compare(
    out: str | os.PathLike,
    model_name: str,
    rows: Sequence[Mapping],
    results: Mapping,
    *,
    steps: int,
    num_particles: int,
    skipped=(),
    reference=None,
    seed: int = 0,
    draws: int = 1000,
    notes=(),
) -> tuple[str, list[Path]]:
    """Write a comparison's report into ``out``; return the table and the paths written.

    Writes ``compare.md`` (:func:`compare_table`), ``loss_traces.png`` (loss per step),
    ``grad_variance.png`` (gradient variance over the fit, from each result's
    ``diagnostics``), ``khat.png`` (PSIS k-hat per configuration), ``compare.nc`` (ArviZ
    netCDF of the first result's fit, ``draws`` guide draws, with every configuration's loss
    trace in its ``compare`` group) and, when ``reference`` draws are given,
    ``posterior.png`` (marginals of every fit against them).

    Parameters
    ----------
    out : path
    model_name : str
    rows : sequence of dict
        The table rows (see :func:`compare_table`); ``khat`` feeds ``khat.png``.
    results : mapping of label to FitResult
        In table order, non-empty.
    steps, num_particles : int
    skipped : sequence of (label, reason)
    reference : dict of Tensor, optional
        Reference posterior draws by site (:func:`vipkg.diagnostics.reference_draws`).
    seed, draws : int
        For the guide draws of ``posterior.png`` and ``compare.nc``.
    notes : sequence of str
        Lines under the table's caption (see :func:`compare_table`).
    """
    out = Path(out)
    table = compare_table(model_name, rows, steps, num_particles, skipped, notes)
    atomic_write_bytes(out / "compare.md", table.encode())

    def losses_fig(fig):
        ax = plot_losses(results, ax=fig.add_subplot())
        ax.set_title(f"{model_name}: loss per step")

    def variance_fig(fig):
        ax = plot_gradient_variance(results, ax=fig.add_subplot())
        ax.set_title(f"{model_name}: gradient variance over the fit")

    def khat_fig(fig):
        ax = plot_khat({r["estimator"]: r["khat"] for r in rows}, ax=fig.add_subplot())
        ax.set_title(f"{model_name}: PSIS k-hat of each fitted guide")

    save_figure(out / "loss_traces.png", losses_fig)
    save_figure(out / "grad_variance.png", variance_fig)
    save_figure(out / "khat.png", khat_fig, figsize=(10, min(0.3 * len(rows) + 1.6, 12.0)))
    written = ["compare.md", "compare.nc", "loss_traces.png", "grad_variance.png", "khat.png"]
    if reference is not None:
        plt = _pyplot()
        axes = plot_posteriors(results, reference=reference, n=draws, seed=seed)
        fig = axes.flat[0].figure
        try:
            atomic_save(out / "posterior.png", lambda p: fig.savefig(p, dpi=100, format="png"))
        finally:
            plt.close(fig)
        written.append("posterior.png")

    import xarray as xr

    first = next(iter(results.values()))
    idata = first.to_arviz(draws, seed=seed)
    traces = xr.Dataset(
        {
            f"loss__{label}": xr.DataArray(r.losses.double().numpy(), dims=["step"])
            for label, r in results.items()
        }
    )
    idata.add_groups({"compare": traces})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # netCDF / xarray chatter about encodings
        atomic_save(out / "compare.nc", lambda p: idata.to_netcdf(p))
    return table, [out / w for w in written]
