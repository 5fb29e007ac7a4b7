"""Checkpoints: atomic, safe to load, and a resumed fit follows the uninterrupted trajectory."""

import os
import pickle
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import vipkg
from vipkg.checkpoint import CheckpointError, load_checkpoint
from vipkg.guides import FullRankNormal, MeanFieldNormal


class _Stop(Exception):
    pass


def _fit(model, guide, **kw):
    base = dict(
        steps=240,
        num_particles=4,
        lr=0.05,
        seed=3,
        progress=False,
        check_every=25,
        scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 100, 0.5),
        diagnostics=vipkg.GradientVariance(every=80, repeats=4),
    )
    base.update(kw)
    return vipkg.fit(model, guide, vipkg.Reparam(), **base)


def test_resume_matches_uninterrupted_run(tmp_path):
    model = vipkg.models.eight_schools()
    full = _fit(model, FullRankNormal(model))
    path = tmp_path / "fit.ckpt"

    def interrupt(step, loss):
        if step >= 130:
            raise _Stop

    with pytest.raises(_Stop):
        _fit(model, FullRankNormal(model), checkpoint=path, checkpoint_every=60, callback=interrupt)
    assert load_checkpoint(path)["step"] == 120
    guide = FullRankNormal(model)
    resumed = _fit(model, guide, checkpoint=path, checkpoint_every=60, resume=True)
    assert torch.allclose(resumed.losses, full.losses, rtol=0, atol=1e-6)
    assert torch.allclose(guide.loc, full.guide.loc, atol=1e-6)
    assert resumed.diagnostics["steps"] == full.diagnostics["steps"] == [0, 80, 160, 240]
    for a, b in zip(resumed.diagnostics["gradient_variance"], full.diagnostics["gradient_variance"]):
        assert a.total_trace == pytest.approx(b.total_trace, rel=1e-6)
    # A finished checkpoint resumes to the same result without stepping again.
    again = _fit(model, FullRankNormal(model), checkpoint=path, checkpoint_every=60, resume=True)
    assert torch.equal(again.losses, resumed.losses)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_without_file_starts_fresh_and_can_extend(tmp_path):
    model = vipkg.models.gaussian(dim=3)
    path = tmp_path / "sub" / "c.pt"
    a = _fit(model, MeanFieldNormal(model), steps=100, checkpoint=path, resume=True, diagnostics=None)
    assert load_checkpoint(path)["step"] == 100
    longer = _fit(model, MeanFieldNormal(model), steps=150, checkpoint=path, resume=True, diagnostics=None)
    straight = _fit(model, MeanFieldNormal(model), steps=150, diagnostics=None)
    assert torch.equal(longer.losses[:100], a.losses)
    assert torch.allclose(longer.losses, straight.losses, atol=1e-6)


def test_checkpoint_from_another_fit_is_refused(tmp_path):
    model = vipkg.models.gaussian(dim=3)
    path = tmp_path / "c.pt"
    _fit(model, MeanFieldNormal(model), steps=50, checkpoint=path, diagnostics=None)
    with pytest.raises(CheckpointError, match="seed=3.*seed=4"):
        _fit(model, MeanFieldNormal(model), steps=50, checkpoint=path, resume=True, seed=4, diagnostics=None)
    with pytest.raises(CheckpointError, match="past steps=20"):
        _fit(model, MeanFieldNormal(model), steps=20, checkpoint=path, resume=True, diagnostics=None)
    with pytest.raises(ValueError, match="resume=True needs checkpoint"):
        _fit(model, MeanFieldNormal(model), resume=True)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_loading_never_runs_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"format": "vipkg-checkpoint", "payload": _Evil()}, f)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "torn.pt").write_bytes(b"\x80\x02garbage")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "torn.pt")
    torch.save({"step": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a vipkg checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


_CHILD = textwrap.dedent(
    """
    import sys, torch, vipkg
    from vipkg.guides import MeanFieldNormal
    torch.set_num_threads(1)
    model = vipkg.models.gaussian(torch.tensor([1.0, -1.0, 0.5]))
    guide = MeanFieldNormal(model)
    r = vipkg.fit(model, guide, vipkg.Reparam(), steps=int(sys.argv[2]), num_particles=2, lr=0.01, seed=5,
                  progress=False, check_every=10, checkpoint=sys.argv[1], checkpoint_every=int(sys.argv[3]),
                  resume=True, callback=lambda step, loss: print(step, flush=True))
    torch.save({"losses": r.losses, "loc": guide.loc.detach()}, sys.argv[1] + ".result")
    print("done", flush=True)
    """
)


def test_survives_sigkill_at_random_moments(tmp_path):
    """Kill a fitting process with SIGKILL again and again; each restart resumes. The checkpoint
    always loads, at most ``checkpoint_every`` steps are lost per kill, and the result equals the
    uninterrupted run's."""
    steps, every = 8000, 200
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rng = random.Random(0)
    path = str(tmp_path / "run.ckpt")
    kills = 0
    while True:
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, path, str(steps), str(every)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        if kills < 10:
            # Wait for the first progress line so the kill lands inside the fit, then a random delay.
            first = proc.stdout.readline()
            assert first, "the child fit printed nothing: it failed before fitting"
            time.sleep(rng.uniform(0.0, 0.08))
            proc.kill()
            out, _ = proc.communicate()
            done = [int(x) for x in (first + out).split() if x.isdigit()]
            if "done" in out:
                break
            kills += 1
            if os.path.exists(path):
                saved = load_checkpoint(path)["step"]  # always loads
                assert max(done, default=0) - saved <= every
        else:
            out, _ = proc.communicate(timeout=600)
            assert proc.returncode == 0 and "done" in out
            break
    assert kills == 10
    assert load_checkpoint(path)["step"] == steps
    result = torch.load(path + ".result", weights_only=True)
    model = vipkg.models.gaussian(torch.tensor([1.0, -1.0, 0.5]))
    guide = MeanFieldNormal(model)
    straight = vipkg.fit(
        model, guide, vipkg.Reparam(), steps=steps, num_particles=2, lr=0.01, seed=5, progress=False
    )
    assert torch.allclose(result["losses"], straight.losses, atol=1e-5)
    assert torch.allclose(result["loc"], guide.loc.detach(), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
