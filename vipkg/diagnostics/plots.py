"""Plots a reader would rather look at than read: loss traces and gradient variance."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_losses", "plot_gradient_variance", "plot_khat", "plot_posteriors"]


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
        _, ax = plt.subplots(figsize=(7, 4))
    floor = min(float(r.losses.min()) for r in results.values())
    for label, r in results.items():
        y = r.losses.double().numpy()
        if smooth > 1 and len(y) > smooth:
            y = np.convolve(y, np.ones(smooth) / smooth, mode="valid")
        x = np.arange(len(y)) + (smooth - 1 if smooth > 1 and len(r.losses) > smooth else 0)
        ax.plot(x, y - floor + 1 if log_offset else y, label=label, lw=1.2)
    if log_offset:
        ax.set_yscale("log")
        ax.set_ylabel("loss − best loss + 1 (nats)")
    else:
        ax.set_ylabel("loss (nats)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
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
        _, ax = plt.subplots(figsize=(7, 4))
    for label, r in results.items():
        diag = r.diagnostics or {}
        if not diag.get("gradient_variance"):
            continue
        y = np.array([g.total_trace for g in diag["gradient_variance"]])
        ax.plot(diag["steps"], np.where(y > 0, y, np.nan), marker="o", ms=3, lw=1.2, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("trace of gradient covariance")
    ax.legend(fontsize=8)
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
        _, ax = plt.subplots(figsize=(7, 3.5))
    labels = list(khats)
    values = [khats[k] for k in labels]
    shown = [v if np.isfinite(v) else 0.0 for v in values]
    colors = ["tab:green" if v < 0.5 else "tab:orange" if v < 0.7 else "tab:red" for v in values]
    ax.barh(labels, shown, color=colors)
    for y in (0.5, 0.7):
        ax.axvline(y, color="k", lw=0.8, ls="--")
    ax.set_xlabel("Pareto k-hat (lower is better)")
    ax.invert_yaxis()
    return ax


def plot_posteriors(
    results: dict, reference: dict | None = None, var_names=None, n: int = 1000, seed: int = 0
):
    """Marginal posterior densities of several fits, and a reference, through ArviZ's ``plot_density``.

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

    data, labels = [], []
    for label, r in results.items():
        data.append(r.to_arviz(n, seed=seed))
        labels.append(label)
    if reference is not None:
        data.append(
            from_dict(
                {"posterior": {k: v.detach().double().cpu().numpy()[None] for k, v in reference.items()}}
            )
        )
        labels.append("reference")
    return az.plot_density(data, data_labels=labels, var_names=var_names, shade=0.1)
