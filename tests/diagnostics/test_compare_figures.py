"""The figures of ``vipkg compare`` (issue 22): one colour per estimator family and one line style per
guide, every line distinct, legends outside the data area, a bounded posterior grid, labelled k-hat
thresholds, and a particle fit's loss line that says it is no bound."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import vipkg  # noqa: E402
from vipkg.diagnostics import plots  # noqa: E402
from vipkg.estimators import catalog  # noqa: E402
from vipkg.guides import FullRankNormal, Particles  # noqa: E402
from vipkg.models import eight_schools  # noqa: E402

LABELS = [cfg.label for cfg in catalog.configs()]


@pytest.fixture(scope="module")
def fits():
    model = eight_schools()
    gv = vipkg.GradientVariance(every=10, repeats=4)
    density = vipkg.fit(
        model, FullRankNormal(model), vipkg.Reparam(), steps=30, progress=False, diagnostics=gv
    )
    particles = vipkg.fit(model, Particles(model, n=16), vipkg.SVGD(), steps=30, progress=False)
    # Every catalogue label on the two fits: the styling depends on the labels only.
    results = {label: density for label in LABELS}
    results["svgd-particles-elbo"] = particles
    return results


def _lines_distinct(ax):
    lines = [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]
    # get_linestyle() says "--" for every custom dash pattern: compare the patterns themselves.
    keys = {(matplotlib.colors.to_hex(ln.get_color()), repr(ln._dash_pattern)) for ln in lines}
    assert len(keys) == len(lines), "two lines share a colour and a line style"
    return lines


def _legend_outside_data(fig, ax):
    fig.canvas.draw()
    legend = ax.get_legend()
    assert legend is not None
    lb, ab = legend.get_window_extent(), ax.get_window_extent()
    assert not lb.overlaps(ab), (lb, ab)


def test_line_styles_colour_per_family_style_per_guide():
    styles = plots.line_styles(LABELS)
    assert len(set(map(str, styles.values()))) == len(LABELS) >= 17
    # one colour per family, one style per guide
    assert styles["reparam-meanfield-elbo"][0] == styles["reparam-fullrank-elbo"][0]
    assert styles["reparam-fullrank-elbo"][0] != styles["stl-fullrank-elbo"][0]
    assert styles["reparam-fullrank-elbo"][1] == styles["stl-fullrank-elbo"][1]
    assert styles["reparam-meanfield-elbo"][1] != styles["reparam-fullrank-elbo"][1]


@pytest.mark.parametrize("which", ["losses", "variance"])
def test_line_figures_distinct_lines_legend_outside(fits, which):
    fig = plt.figure(figsize=(10, 4.5), layout="constrained")
    try:
        ax = fig.add_subplot()
        if which == "losses":
            plots.plot_losses(fits, ax=ax)
        else:
            plots.plot_gradient_variance(fits, ax=ax)
        lines = _lines_distinct(ax)
        assert len(lines) == (len(fits) if which == "losses" else len(fits) - 1)  # particles: no variance
        _legend_outside_data(fig, ax)
        if which == "losses":
            texts = [t.get_text() for t in ax.get_legend().get_texts()]
            assert "svgd-particles-elbo (−mean log p; no bound)" in texts
    finally:
        plt.close(fig)


def test_khat_bars_have_labelled_thresholds(fits):
    khats = {label: 0.1 * i for i, label in enumerate(LABELS)}
    khats["svgd-particles-elbo"] = float("nan")
    fig = plt.figure(figsize=(10, 7), layout="constrained")
    try:
        ax = plots.plot_khat(khats, ax=fig.add_subplot())
        texts = [t.get_text() for t in ax.get_legend().get_texts()]
        assert texts == ["0.5: good below", "0.7: unreliable above"]
        assert any(t.get_text() == "n/a (no density)" for t in ax.texts)
        _legend_outside_data(fig, ax)
    finally:
        plt.close(fig)


def test_posterior_grid_is_bounded_and_titles_do_not_overlap(fits):
    from vipkg.models import logistic_regression

    model = logistic_regression()  # 31 coefficients: 22 x 22 inches before
    fit = vipkg.fit(model, FullRankNormal(model), vipkg.Reparam(), steps=5, progress=False)
    reference = {k: v.detach() for k, v in fit.sample(200).items()}
    axes = plots.plot_posteriors({"reparam-fullrank-elbo": fit}, reference=reference, n=200)
    fig = np.asarray(axes).flat[0].figure
    try:
        w, h = fig.get_size_inches()
        assert w <= 12 and h <= 12
        shown = [ax for ax in np.asarray(axes).flat if ax.get_visible() and ax.has_data()]
        assert 1 <= len(shown) <= plots.MAX_PANELS
        fig.canvas.draw()
        # The legend is the figure's, above the panels (ArviZ puts it inside the first, over its curves).
        assert all(ax.get_legend() is None for ax in shown) and len(fig.legends) == 1
        legend_box = fig.legends[0].get_window_extent()
        assert not any(legend_box.overlaps(ax.get_window_extent()) for ax in shown)
        boxes = [ax.title.get_window_extent() for ax in shown]
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                assert not boxes[i].overlaps(boxes[j])
    finally:
        plt.close(fig)


def test_write_compare_figures(tmp_path, fits):
    from vipkg.diagnostics.report import write_compare

    few = {k: fits[k] for k in ("reparam-meanfield-elbo", "stl-fullrank-elbo", "svgd-particles-elbo")}
    rows = [
        {"estimator": k, "loss": 1.0, "loss_se": 0.1, "ms_per_step": 1.0, "grad_trace_var": 1.0, "khat": 0.4}
        for k in few
    ]
    _, written = write_compare(tmp_path, "eight_schools", rows, few, steps=30, num_particles=16, draws=100)
    for path in written:
        assert path.exists() and path.stat().st_size > 0
    torch.manual_seed(0)
