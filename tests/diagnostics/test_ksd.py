"""Kernel Stein discrepancy (the particle fits' column of vipkg compare): the closed-form Stein kernel
against autograd, zero-ish for posterior draws, growing with the distance, and the table's words."""

import pytest
import torch

import vipkg
from vipkg.diagnostics import guide_ksd, kernel_stein_discrepancy
from vipkg.guides import FullRankNormal, Particles

F64 = torch.float64


def _gaussian(d=2):
    prec = torch.arange(1.0, d + 1, dtype=F64)
    return vipkg.Model.from_log_density(lambda x: -0.5 * (x**2 * prec).sum(-1), d), prec


def _stein_kernel_autograd(score, x, y, c=1.0, beta=-0.5):
    """k_p(x, y) from its definition, with every derivative of k taken by autograd."""
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    k = (c**2 + ((x - y) ** 2).sum()) ** beta
    gx, gy = torch.autograd.grad(k, (x, y), create_graph=True)
    trace = sum(torch.autograd.grad(gx[i], y, retain_graph=True)[0][i] for i in range(x.shape[0]))
    sx, sy = score(x.detach()), score(y.detach())
    return (sx @ sy) * k + sx @ gy + sy @ gx + trace


def test_stein_kernel_matches_autograd():
    model, prec = _gaussian(3)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1), dtype=F64)
    brute = torch.stack(
        [_stein_kernel_autograd(lambda z: -prec * z, x[i], x[j]) for i in range(5) for j in range(5)]
    ).mean()
    assert kernel_stein_discrepancy(model, x) == pytest.approx(float(brute.sqrt()), rel=1e-10)


def test_ksd_grows_with_the_distance_from_the_posterior():
    model, prec = _gaussian(2)
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(400, 2, generator=g, dtype=F64) / prec.sqrt()
    values = [kernel_stein_discrepancy(model, exact + shift) for shift in (0.0, 0.5, 1.0, 2.0)]
    assert values == sorted(values)
    assert values[0] < 0.15 < 0.4 < values[1]  # V-statistic bias at n=400 is ~0.1; a half-sd shift ~0.5


def test_guide_ksd_for_draws_and_particles_and_the_table_says_why():
    from vipkg.diagnostics.report import compare_table

    model, _ = _gaussian(2)
    fit = vipkg.fit(model, FullRankNormal(model, dtype=F64), vipkg.Reparam(), steps=300, progress=False)
    svgd = vipkg.fit(model, Particles(model, n=50), vipkg.SVGD(), steps=5, progress=False)
    assert guide_ksd(model, fit.guide, seed=0) == guide_ksd(model, fit.guide, seed=0)
    assert guide_ksd(model, fit.guide, seed=0) < 0.3
    assert guide_ksd(model, svgd.guide) > 0  # particles: the particles themselves, no density needed
    row = {
        "estimator": "svgd-particles100",
        "loss": float("nan"),
        "loss_se": float("nan"),
        "ms_per_step": 1.0,
        "grad_trace_var": 0.0,
        "khat": float("nan"),
        "ksd": 0.37,
        "particles": True,
    }
    table = compare_table("m", [row], 10, 16)
    line = next(line for line in table.splitlines() if line.startswith("| svgd"))
    assert "no bound (particles)" in line and "– (no density)" in line and "0.37" in line
    assert "nan" not in line
