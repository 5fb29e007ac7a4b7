"""Plots a reader would rather look at than read: loss traces and gradient variance.

Every line plot of several fits draws one colour per estimator family and one line style per guide
(:func:`line_styles`), with the legend outside the axes, so seventeen configurations stay apart
(a 10-colour cycle gave two configurations each colour; issue 22).
"""

from __future__ import annotations

import itertools

import numpy as np

__all__ = ["plot_losses", "plot_gradient_variance", "plot_khat", "plot_posteriors", "line_styles"]

#: guide tokens of the catalogue's labels (``family[-variant]-guide-objective``)
_GUIDES = (
    "meanfield",
    "fullrank",
    "lowrank2",
    "realnvp4",
    "gamma",
    "beta",
    "dirichlet",
    "particles",
    "categorical",
    "bernoulli",
    "composite",
    "amortized",
    "simplex",
)
# Solid, dashed, dotted, dash-dot, then patterns chosen to look unlike those four at 1.2 pt.
_STYLES = ["-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (12, 2, 2, 2)), (0, (1, 1)), (0, (10, 4))]


def _family_and_guide(label: str) -> tuple[str, str]:
    parts = label.split("-")
    for i, part in enumerate(parts):
        if part in _GUIDES or part.startswith(("lowrank", "realnvp", "maf", "flow")):
            return "-".join(parts[:i]) or part, "-".join(parts[i:])
    # No guide token: everything before the objective is the family.
    return ("-".join(parts[:-1]) or label), parts[-1]


def line_styles(labels) -> dict:
    """``label -> (colour, linestyle)``: a colour per estimator family (the label up to its guide
    token, e.g. ``score-loo``), a style per guide-and-objective, every pair distinct.

    Parameters
    ----------
    labels : iterable of str
        Configuration labels such as ``reparam-fullrank-elbo`` (:mod:`vipkg.estimators.catalog`).

    References
    ----------
    .. [1] Tufte, E. R. "The Visual Display of Quantitative Information", 2nd ed. (2001).
    """
    import matplotlib as mpl

    colours = list(mpl.colormaps["tab20"].colors[::2]) + list(mpl.colormaps["tab20"].colors[1::2])
    families, styles, used, out = {}, {}, set(), {}
    for label in labels:
        family, guide = _family_and_guide(label)
        colour = families.setdefault(family, colours[len(families) % len(colours)])
        style = styles.setdefault(guide, _STYLES[len(styles) % len(_STYLES)])
        if (colour, str(style)) in used:  # a family with more guides than styles: take a free one
            style = next(s for s in itertools.cycle(_STYLES) if (colour, str(s)) not in used)
        used.add((colour, str(style)))
        out[label] = (colour, style)
    return out


def _legend_outside(ax, **kwargs):
    """The legend right of the axes, clear of the data (the figure needs constrained layout)."""
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize=8, **kwargs)


def plot_losses(results: dict, ax=None, smooth: int = 25, log_offset: bool = True):
    """Loss traces of several fits on one axis.

    Parameters
    ----------
    results : dict of str to FitResult
        Label to result.
    smooth : int
        Width of a moving average drawn over each trace.
    log_offset : bool
        Plot ``loss - min(loss) + 1`` on a log scale so converged runs stay apart.
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    floor = min(float(r.losses.min()) for r in results.values())
    styles = line_styles(results)
    for label, r in results.items():
        y = r.losses.double().numpy()
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        x = np.arange(len(y)) + (smooth - 1 if smooth > 1 and len(r.losses) > smooth else 0)
        colour, style = styles[label]
        if getattr(r.guide, "is_empirical", False):
            # Particles have no density: their "loss" is minus the mean log joint, not minus a
            # bound, and the table has no bound for them. Say so where the line is.
            label = f"{label} (−mean log p; no bound)"
        ax.plot(x, y - floor + 1 if log_offset else y, label=label, lw=1.2, color=colour, ls=style)
    if log_offset:
        ax.set_yscale("log")
        ax.set_ylabel("loss − best loss + 1 (nats)")
    else:
        ax.set_ylabel("loss (nats)")
    ax.set_xlabel("step")
    _legend_outside(ax)
    return ax


def plot_gradient_variance(results: dict, ax=None):
    """Trace of the gradient covariance over steps, one line per fit, log scale.

    Parameters
    ----------
    results : dict of str to FitResult
        Fits run with ``diagnostics=GradientVariance(...)``; others are skipped.

    References
    ----------
    .. [1] Kim, K. et al. "Practical and Matching Gradient Variance Bounds for
       Black-Box Variational Bayesian Inference". ICML (2023).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    styles = line_styles(results)
    for label, r in results.items():
        diag = r.diagnostics or {}
        if not diag.get("gradient_variance"):
            continue
        y = np.array([g.total_trace for g in diag["gradient_variance"]])
        if not (y > 0).any():  # e.g. SVGD, which writes no gradient of a bound: nothing on a log axis
            continue
        colour, style = styles[label]
        ax.plot(
            diag["steps"],
            np.where(y > 0, y, np.nan),
            marker="o",
            ms=3,
            lw=1.2,
            label=label,
            color=colour,
            ls=style,
        )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("trace of gradient covariance")
    _legend_outside(ax)
    return ax


def plot_khat(khats: dict, ax=None):
    """Pareto k-hat per fit as bars, with the 0.5 and 0.7 thresholds of Yao et al. (2018).

    References
    ----------
    .. [1] Yao, Y., Vehtari, A., Simpson, D., Gelman, A. "Yes, but Did It Work?:
       Evaluating Variational Inference". ICML (2018).
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(9, 0.3 * len(khats) + 1.5), layout="constrained")
    labels = list(khats)
    values = [khats[k] for k in labels]
    shown = [v if np.isfinite(v) else 0.0 for v in values]
    colors = ["tab:green" if v < 0.5 else "tab:orange" if v < 0.7 else "tab:red" for v in values]
    ax.barh(labels, shown, color=colors)
    for i, v in enumerate(values):
        if not np.isfinite(v):  # particles (no density) or no full-data log joint: no bar, a word
            ax.text(0.01, i, "n/a (no density)" if np.isnan(v) else "inf", va="center", fontsize=8)
    ax.axvline(0.5, color="k", lw=0.8, ls="--", label="0.5: good below")
    ax.axvline(0.7, color="k", lw=0.8, ls=":", label="0.7: unreliable above")
    ax.set_xlabel("Pareto k-hat (lower is better)")
    ax.invert_yaxis()
    _legend_outside(ax)
    return ax


#: most panels of :func:`plot_posteriors` (the first scalars of the sites, in order)
MAX_PANELS = 12


def plot_posteriors(
    results: dict, reference: dict | None = None, var_names=None, n: int = 1000, seed: int = 0
):
    """Marginal posterior densities of several fits, and a reference, through ArviZ's ``plot_density``.

    At most :data:`MAX_PANELS` panels (the first scalar coordinates, in site order), about
    3 x 2.4 inches each and at most 12 x 12 inches in all: 31 coefficients gave a 22 x 22 inch
    figure with overlapping titles (issue 22).

    Parameters
    ----------
    results : dict of str to FitResult
    reference : dict of str to Tensor, optional
        Reference draws by site (:func:`vipkg.diagnostics.reference_draws`).
    var_names : list of str, optional
    n : int
        Draws per fit.
    """
    import arviz as az

    from vipkg.diagnostics.arviz_adapter import from_dict

    def scalars(draws: dict) -> dict:
        """The first MAX_PANELS scalar coordinates of the sites, each its own variable: ArviZ's own
        cap (rcParams plot.max_subplots) fails inside plot_density for several data sets."""
        out = {}
        for site, v in draws.items():
            if var_names is not None and site not in var_names:
                continue
            v = np.asarray(v, dtype=float)
            flat = v.reshape(v.shape[0], v.shape[1], -1)
            for j in range(flat.shape[-1]):
                if len(out) == MAX_PANELS:
                    return out
                out[site if flat.shape[-1] == 1 and v.ndim == 2 else f"{site}[{j}]"] = flat[..., j]
        return out

    data, labels = [], []
    for label, r in results.items():
        post = r.to_arviz(n, seed=seed).posterior
        data.append(from_dict({"posterior": scalars({k: post[k].values for k in post.data_vars})}))
        labels.append(label)
    if reference is not None:
        ref = {k: v.detach().double().cpu().numpy()[None] for k, v in reference.items()}
        data.append(from_dict({"posterior": scalars(ref)}))
        labels.append("reference")
    shown = len(scalars({k: post[k].values for k in post.data_vars}))
    cols = min(4, shown)
    rows = -(-shown // cols)
    figsize = (min(3.0 * cols, 12.0), min(2.4 * rows + 0.8, 12.0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = az.plot_density(
            data, data_labels=labels, shade=0.1, figsize=figsize, grid=(rows, cols), textsize=9
        )
    first = np.asarray(axes).flat[0]
    fig = first.figure
    fig.set_layout_engine("constrained")
    if first.get_legend() is not None:
        # ArviZ draws the legend inside the first panel, over its curves: one figure legend above.
        handles, names = first.get_legend_handles_labels()
        first.get_legend().remove()
        fig.legend(handles, names, loc="outside upper center", ncols=min(len(names), 4), fontsize=9)
    return axes
