"""Plots a reader would rather look at than read: loss traces and gradient variance."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_losses"]


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
