import math

import pytest
import torch

import vipkg
from vipkg.diagnostics.psis import importance_ess, psis_khat
from vipkg.guides import FullRankNormal, MeanFieldNormal


def test_importance_ess_limits():
    assert float(importance_ess(torch.zeros(50))) == pytest.approx(50.0)
    lw = torch.full((50,), -1e3)
    lw[3] = 0.0
    assert float(importance_ess(lw)) == pytest.approx(1.0)
    assert float(importance_ess(lw, normalized=True)) == pytest.approx(1 / 50)
    # invariant to the (unknown) normalizer and batched over leading dims
    lw = torch.randn(3, 50, dtype=torch.float64)
    assert torch.allclose(importance_ess(lw), importance_ess(lw + 7.0))
    assert importance_ess(lw).shape == (3,)


def _target(d=5):
    return vipkg.models.gaussian(torch.zeros(d), torch.eye(d), dtype=torch.float64)


def test_exact_guide_is_perfect_proposal():
    model = _target()
    guide = FullRankNormal(model, scale_tril=torch.eye(5, dtype=torch.float64), dtype=torch.float64)
    r = psis_khat(model, guide, 2000, seed=0)
    assert r.ess == pytest.approx(2000, rel=1e-6)
    assert r.log_evidence == pytest.approx(0.0, abs=1e-9)
    assert r.khat == -math.inf and r.verdict == "good"


def test_khat_separates_wide_from_narrow_guides_and_psis_corrects_the_mean():
    model = _target()
    wide = MeanFieldNormal(model, loc=0.3, scale=1.3, dtype=torch.float64)
    narrow = MeanFieldNormal(model, loc=0.3, scale=0.4, dtype=torch.float64)
    rw = psis_khat(model, wide, 4000, seed=1)
    rn = psis_khat(model, narrow, 4000, seed=1)
    assert rw.khat < 0.5 and rw.verdict == "good"
    assert rn.khat > 0.7 and rn.verdict == "unreliable"
    # The wide guide's mean is 0.3 per coordinate; PSIS moves it most of the way to the truth (0).
    assert abs(rw.mean["x"]).max() < 0.1
    assert rw.ess > 0.3 * 4000 > rn.ess
    assert math.isfinite(rw.log_evidence) and abs(rw.log_evidence) < 0.05


def test_psis_khat_errors():
    model = _target()
    with pytest.raises(ValueError, match="num_samples >= 100"):
        psis_khat(model, MeanFieldNormal(model, dtype=torch.float64), 10)
