"""Checkpoints: atomic, checksummed, safe to load, never overwritten by a fresh fit, and a resumed
fit follows the uninterrupted trajectory."""

import hashlib
import os
import pickle
import random
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import vipkg
from vipkg._io import stale_temporaries
from vipkg.checkpoint import (
    MAGIC,
    CheckpointError,
    load_checkpoint,
    previous_path,
    remove_stale_temporaries,
    save_checkpoint,
)
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


def _damaged(data: bytes, offset: int, size: int, rng: random.Random) -> bytes:
    """``data`` with ``size`` bytes from ``offset`` replaced by random bytes that all differ."""
    end = min(offset + size, len(data))
    noise = bytes(b ^ rng.randrange(1, 256) for b in data[offset:end])
    return data[:offset] + noise + data[end:]


def test_any_corruption_is_refused_naming_the_file(tmp_path):
    """The corruption matrix: random bytes written at >= 20 offsets (the header, inside tensor data,
    the end) in several sizes, truncations and appended bytes. Every one is a CheckpointError that
    names the file; none loads, and a fit asked to resume from one refuses before any step."""
    model = vipkg.models.eight_schools()
    guide = FullRankNormal(model)
    path = tmp_path / "fit.ckpt"
    _fit(model, guide, steps=40, checkpoint=path, checkpoint_every=40)
    data = path.read_bytes()
    assert load_checkpoint(path)["step"] == 40
    tensors = {
        "guide loc": guide.loc.detach().numpy().tobytes(),
        "losses": load_checkpoint(path)["losses"].numpy().tobytes(),
    }
    inside = {name: data.find(raw) for name, raw in tensors.items()}
    assert all(i > 0 for i in inside.values()), inside  # the tensors' bytes are stored as they are
    header_end = data.index(b"\n", len(MAGIC)) + 1
    rng = random.Random(22)
    offsets = {0, 3, len(MAGIC) - 1, len(MAGIC) + 2, header_end - 10, header_end - 1, header_end}
    offsets |= {i + d for i in inside.values() for d in (0, 5, 17)}
    offsets |= {len(data) - 64, len(data) - 1}
    offsets |= {rng.randrange(len(data)) for _ in range(12)}
    assert len(offsets) >= 20
    bad = tmp_path / "damaged" / "bad.ckpt"
    bad.parent.mkdir()
    cases = [
        (f"{size} bytes at {o}", _damaged(data, o, size, rng)) for o in sorted(offsets) for size in (1, 8, 64)
    ]
    cases += [
        (f"truncated to {n}", data[:n]) for n in (0, 1, len(MAGIC), header_end, len(data) // 2, len(data) - 1)
    ]
    cases += [("one byte appended", data + b"\0"), ("64 bytes appended", data + rng.randbytes(64))]
    for what, content in cases:
        assert content != data, what
        bad.write_bytes(content)
        with pytest.raises(CheckpointError, match=re.escape(str(bad))) as info:
            load_checkpoint(bad)
        assert "no previous checkpoint" in str(info.value), what
    # Through fit: refused before the guide is touched.
    for o in inside.values():
        bad.write_bytes(_damaged(data, o, 64, rng))
        fresh = FullRankNormal(model)
        loc = fresh.loc.detach().clone()
        with pytest.raises(CheckpointError, match="checksum does not match"):
            _fit(model, fresh, steps=80, checkpoint=bad, checkpoint_every=40, resume=True)
        assert torch.equal(fresh.loc.detach(), loc)


def test_previous_checkpoint_is_kept_and_named_when_the_latest_is_damaged(tmp_path):
    model = vipkg.models.gaussian(dim=3)
    path = tmp_path / "c.pt"
    straight = _fit(model, MeanFieldNormal(model), steps=90, diagnostics=None)
    _fit(model, MeanFieldNormal(model), steps=60, checkpoint=path, checkpoint_every=20, diagnostics=None)
    prev = previous_path(path)
    assert prev.name == "c.pt.prev"
    assert load_checkpoint(path)["step"] == 60 and load_checkpoint(prev)["step"] == 40
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    pattern = r"c\.pt'.*checksum does not match.*previous checkpoint '.*c\.pt\.prev' \(step 40\) is intact"
    with pytest.raises(CheckpointError, match=pattern):
        _fit(model, MeanFieldNormal(model), steps=90, checkpoint=path, checkpoint_every=20, resume=True)
    # Doing what the message says resumes exactly.
    os.replace(prev, path)
    resumed = _fit(
        model,
        MeanFieldNormal(model),
        steps=90,
        checkpoint=path,
        checkpoint_every=20,
        resume=True,
        diagnostics=None,
    )
    assert torch.allclose(resumed.losses, straight.losses, rtol=0, atol=1e-6)
    assert load_checkpoint(prev)["step"] == 80  # each write keeps the one it replaces
    for p in (path, prev):
        p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match="damaged too"):
        load_checkpoint(path)


def test_a_fresh_fit_never_overwrites_a_checkpoint(tmp_path):
    model = vipkg.models.gaussian(dim=3)
    path = tmp_path / "c.pt"
    prev = previous_path(path)

    def run(**kw):
        return _fit(model, MeanFieldNormal(model), **{"steps": 40, "diagnostics": None, **kw})

    run(checkpoint=path, checkpoint_every=20)
    saved = path.read_bytes(), prev.read_bytes()
    # The user's mistake: the same call again, without resume=True.
    with pytest.raises(CheckpointError, match=r"c\.pt' already exists.*resume=True.*overwrite=True"):
        run(checkpoint=path, checkpoint_every=20, seed=4)
    assert (path.read_bytes(), prev.read_bytes()) == saved
    # overwrite=True starts afresh, but the old files stay until the new one is written.
    with pytest.raises(_Stop):
        run(
            checkpoint=path, checkpoint_every=20, seed=4, overwrite=True, check_every=5, callback=_stop_at(10)
        )
    assert (path.read_bytes(), prev.read_bytes()) == saved
    fresh = run(steps=30, checkpoint=path, seed=4, overwrite=True)
    assert torch.equal(fresh.losses, run(steps=30, seed=4).losses)
    assert load_checkpoint(path)["step"] == 30 and load_checkpoint(path)["seed"] == 4
    assert not prev.exists()  # it belonged to the fit that was replaced
    with pytest.raises(ValueError, match="pass one"):
        run(checkpoint=path, resume=True, overwrite=True)
    with pytest.raises(ValueError, match="overwrite=True needs checkpoint"):
        run(overwrite=True)
    # Only the previous checkpoint left (the main one removed by hand): not a fresh start either,
    # since the fresh fit's first write would delete it.
    run(checkpoint=path, checkpoint_every=20, overwrite=True)
    path.unlink()
    for resume in (False, True):
        with pytest.raises(CheckpointError, match=r"c\.pt' is missing but its previous checkpoint"):
            run(checkpoint=path, resume=resume)
    assert load_checkpoint(prev)["step"] == 20


def _stop_at(limit):
    def callback(step, loss):
        if step >= limit:
            raise _Stop

    return callback


def test_checkpoint_directory_is_checked_before_fitting(tmp_path):
    model = vipkg.models.gaussian(dim=3)
    blocker = tmp_path / "file"
    blocker.write_text("")
    calls = []
    with pytest.raises(OSError, match=r"cannot write to the checkpoint's directory '.*file'"):
        _fit(model, MeanFieldNormal(model), checkpoint=blocker / "c.pt", callback=lambda *a: calls.append(a))
    assert not calls


def test_a_checksummed_pickle_still_runs_no_code(tmp_path, monkeypatch):
    """The checksum proves the file is as written, not that vipkg wrote it: weights_only still guards."""
    monkeypatch.chdir(tmp_path)
    payload = pickle.dumps({"format": "vipkg-checkpoint", "version": 2, "step": _Evil()}, protocol=2)
    digest = hashlib.sha256(payload).hexdigest()
    path = tmp_path / "evil.pt"
    path.write_bytes(MAGIC + f"version=2 size={len(payload)} sha256={digest}\n".encode() + payload)
    with pytest.raises(CheckpointError, match="cannot read checkpoint .*posix.*its checksum matches"):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_kill_during_writes_leaves_a_good_checkpoint(tmp_path):
    """SIGKILL a process that does nothing but write checkpoints, until >= 10 kills have landed in
    the middle of a write (a temporary file left behind). After each, the checkpoint and the
    previous one load, and each is one whole write (its step and its content agree)."""
    path = tmp_path / "w.ckpt"
    big = torch.zeros(1 << 21)  # 8 MiB, so that a good part of each loop is spent writing
    save_checkpoint(path, {"step": 0, "big": big, "tag": torch.tensor(0)})
    rng = random.Random(9)
    torn = 0
    for attempt in range(1, 301):
        pid = os.fork()
        if pid == 0:  # the writer: no test code may run past here
            try:
                step = attempt * 1_000_000
                while True:
                    step += 1
                    save_checkpoint(path, {"step": step, "big": big, "tag": torch.tensor(step)})
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.06))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        torn += bool(stale_temporaries(path))
        now = load_checkpoint(path)
        assert int(now["tag"]) == now["step"]
        if previous_path(path).exists():  # not before the first child's first write
            before = load_checkpoint(previous_path(path))
            assert int(before["tag"]) == before["step"] <= now["step"]
        remove_stale_temporaries(path)
        if torn >= 10:
            break
    assert torn >= 10, f"only {torn} of {attempt} kills landed inside a write"
