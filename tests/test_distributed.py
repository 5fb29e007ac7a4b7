"""Data-parallel fitting: 2 gloo processes on localhost against one process on the full data.

One module-scoped launch of 2 processes (``vipkg.distributed.launch``, spawn) computes
everything the tests compare, because starting processes costs seconds on a shared CPU.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

import vipkg
from vipkg.checkpoint import CheckpointError
from vipkg.distributed import (
    DataParallel,
    ShardedSVGD,
    ShardingError,
    broadcast_guide,
    fit,
    init_process_group,
    launch,
    shard,
    shard_particles,
)
from vipkg.estimators import FBGVI, IncompatibleEstimatorError, ScoreFunction
from vipkg.estimators.stein import SVGD
from vipkg.guides import FullRankNormal, MeanFieldNormal
from vipkg.guides.particles import Particles
from vipkg.models import ZOO, linear_regression_conjugate, logistic_regression

WORLD = 2
ATOL = 1e-6


def _model():
    return logistic_regression(dtype=torch.float64)


def _full_rank_guide(model):
    # Away from the zero initialisation, so that every gradient entry is non-trivial.
    g = torch.Generator().manual_seed(11)
    loc = 0.3 * torch.randn(model.dim, generator=g, dtype=torch.float64)
    return FullRankNormal(model, loc=loc, init_scale=0.2, dtype=torch.float64)


def _grads(guide):
    return {n: p.grad.detach().clone() for n, p in guide.named_parameters()}


def _estimate(estimator, model, guide, seed=7, n=8):
    torch.manual_seed(seed)
    info = estimator.estimate(model, guide, vipkg.ELBO(), n)
    return _grads(guide), info.loss


def _fit(fit_fn, model, guide, steps=25, **kwargs):
    r = fit_fn(
        model, guide, vipkg.Reparam(), steps=steps, num_particles=4, lr=0.05, seed=5, progress=False, **kwargs
    )
    return {n: p.detach().clone() for n, p in r.guide.named_parameters()}, r.losses


def _cli_args(out, extra=()):
    return [
        "fit",
        "--model",
        "logistic_regression",
        "--guide",
        "meanfield",
        "--steps",
        "20",
        "--num-particles",
        "4",
        "--lr",
        "0.05",
        "--out",
        str(out),
        "--draws",
        "50",
        "--no-progress",
        *extra,
    ]


def _worker(rank, world, out_dir):
    from vipkg.cli import main

    torch.set_default_dtype(torch.float64)
    model = _model()
    local = shard(model, rank, world)
    res = {}

    guide = _full_rank_guide(model)
    if rank != 0:  # broadcast_guide must overwrite this with rank 0's values
        with torch.no_grad():
            for p in guide.parameters():
                p.add_(1.0)
    broadcast_guide(guide)
    res["reparam"] = _estimate(DataParallel(vipkg.Reparam()), local, guide)
    res["score"] = _estimate(DataParallel(ScoreFunction()), local, guide, n=16)

    particles = Particles(model, n=8, seed=3, dtype=torch.float64)
    res["svgd"] = _estimate(DataParallel(SVGD()), local, particles)
    mine = shard_particles(model, particles, rank, world)
    est = ShardedSVGD()
    est.check(model, mine, vipkg.ELBO())
    res["sharded_svgd"] = _estimate(est, model, mine)
    res["sharded_svgd_needs_full_data"] = None
    try:
        fit(model, mine, ShardedSVGD(), steps=2)
    except ValueError as err:
        res["sharded_svgd_needs_full_data"] = str(err)
    r = fit(model, mine, ShardedSVGD(), shard_data=False, steps=5, lr=0.05, progress=False)
    res["sharded_svgd_fit"] = (r.guide.particles.detach().clone(), r.losses)

    res["fit"] = _fit(fit, model, MeanFieldNormal(model, dtype=torch.float64))
    ck = f"{out_dir}/ck.pt"
    _fit(fit, model, MeanFieldNormal(model, dtype=torch.float64), steps=10, checkpoint=ck, checkpoint_every=5)
    res["resumed"] = _fit(fit, model, MeanFieldNormal(model, dtype=torch.float64), checkpoint=ck, resume=True)
    if rank == 1:  # as if rank 1 died before its first write (which would have left no .prev either)
        os.remove(f"{out_dir}/ck.rank1.pt")
        os.remove(f"{out_dir}/ck.rank1.pt.prev")
    try:
        _fit(fit, model, MeanFieldNormal(model, dtype=torch.float64), checkpoint=ck, resume=True)
        res["mismatch"] = None
    except CheckpointError as err:
        res["mismatch"] = str(err)
    try:  # a fresh fit: rank 0's file exists, rank 1's does not; both must refuse, not wait for the other
        _fit(fit, model, MeanFieldNormal(model, dtype=torch.float64), checkpoint=ck)
        res["fresh_refused"] = None
    except CheckpointError as err:
        res["fresh_refused"] = str(err)
    res["fit_per_rank"] = _fit(fit, model, MeanFieldNormal(model, dtype=torch.float64), particles="per_rank")

    torch.set_default_dtype(torch.float32)  # as in the single-process CLI run it is compared with
    main(_cli_args(f"{out_dir}/dist", ["--distributed"]))
    return res


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return launch(_worker, WORLD, str(out), timeout=240), out


def _assert_grads_close(got, want, atol=ATOL):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(
            got[name], want[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}"
        )


# ------------------------------------------------------------------ sharding
def test_sharded_log_joints_average_to_the_full_log_joint():
    torch.manual_seed(0)
    for model in (_model(), linear_regression_conjugate(n=53, dtype=torch.float64)):
        u = torch.randn(5, model.dim, dtype=torch.float64)
        full = model.log_joint_unconstrained(u)
        for world in (2, 3):
            shards = [shard(model, r, world) for r in range(world)]
            assert sum(s.data["X"].shape[0] for s in shards) == model.data["X"].shape[0]
            mean = sum(s.log_joint_unconstrained(u) for s in shards) / world
            torch.testing.assert_close(mean, full, rtol=1e-12, atol=1e-9)
            # Each shard alone is a different (noisy) estimate: the test can fail.
            assert (shards[0].log_joint_unconstrained(u) - full).abs().max() > 1.0


def test_sharded_log_joint_terms_sum_to_the_full_ones():
    from torch.distributions import constraints

    from vipkg.model import Model, Site

    g = torch.Generator().manual_seed(0)
    X, y = (
        torch.randn(9, 2, generator=g, dtype=torch.float64),
        torch.randn(9, generator=g, dtype=torch.float64),
    )

    def terms(latents, data):
        w = latents["w"]
        resid = data["y"] - w @ data["X"].T  # [S, n]
        return {"w": -0.5 * w.square().sum(-1), "y": -0.5 * resid.square()}

    def log_joint(latents, data):
        t = terms(latents, data)
        return t["w"] + t["y"].sum(-1)

    model = Model(
        {"w": Site(torch.Size([2]), constraints.real)},
        log_joint,
        data={"X": X, "y": y},
        log_joint_terms=terms,
        term_sites={"w": {"w"}, "y": {"w"}},
    )
    model.per_datum = ("X", "y")
    w = {"w": torch.randn(4, 2, dtype=torch.float64)}
    full = model.log_joint_terms(w)
    shards = [shard(model, r, 2) for r in range(2)]
    parts = [s.log_joint_terms(w) for s in shards]
    torch.testing.assert_close(sum(p["w"] for p in parts) / 2, full["w"])
    torch.testing.assert_close(torch.cat([p["y"] for p in parts], -1) / 2, full["y"])
    torch.testing.assert_close(shards[1].log_joint(w), parts[1]["w"] + parts[1]["y"].sum(-1))


def test_models_that_cannot_be_sharded_say_how_to_fix_it():
    for model in (ZOO["eight_schools"](), ZOO["gaussian"](), logistic_regression(form="pyro")):
        with pytest.raises(ShardingError, match="per_datum"):
            shard(model, 0, 2)
    tiny = logistic_regression("synthetic", n=3, d=2)
    with pytest.raises(ShardingError, match="3 data points, fewer than the 4 ranks"):
        shard(tiny, 0, 4)
    with pytest.raises(ValueError, match="0 <= rank < world"):
        shard(tiny, 2, 2)
    # The protocol: a model is sharded when it names its per-datum data, and only then.
    model = linear_regression_conjugate(n=10)
    model.per_datum = ()
    with pytest.raises(ShardingError):
        shard(model, 0, 2)
    model.per_datum = ("X", "y")
    assert shard(model, 1, 2).data["X"].shape[0] == 5


def test_single_process_errors_are_clear(monkeypatch):
    model = _model()
    with pytest.raises(RuntimeError, match="initialized process group.*torchrun"):
        fit(model, MeanFieldNormal(model), vipkg.Reparam(), steps=2)
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="RANK.*not set.*torchrun"):
        init_process_group("cpu")
    with pytest.raises(IncompatibleEstimatorError, match="owns its update"):
        DataParallel(FBGVI(0.01)).check(model, FullRankNormal(model), vipkg.ELBO())
    with pytest.raises(ValueError, match="do not split evenly"):
        shard_particles(model, Particles(model, n=5), 0, 2)


# ------------------------------------------------------- against one process
def test_two_processes_give_the_full_data_reparam_and_score_gradients(two_ranks):
    results, _ = two_ranks
    model = _model()
    for key, est, n in (("reparam", vipkg.Reparam(), 8), ("score", ScoreFunction(), 16)):
        want_grads, want_loss = _estimate(est, model, _full_rank_guide(model), n=n)
        for rank in range(WORLD):
            grads, loss = results[rank][key]
            _assert_grads_close(grads, want_grads)
            torch.testing.assert_close(loss, want_loss, rtol=0, atol=ATOL)
    # Power check: one rank's own (unreduced) gradient is far from the full-data one.
    local, _ = _estimate(vipkg.Reparam(), shard(model, 0, WORLD), _full_rank_guide(model))
    full, _ = _estimate(vipkg.Reparam(), model, _full_rank_guide(model))
    assert (local["loc"] - full["loc"]).abs().max() > 1e-2


def test_two_processes_give_the_full_data_svgd_direction(two_ranks):
    results, _ = two_ranks
    model = _model()
    want, want_loss = _estimate(SVGD(), model, Particles(model, n=8, seed=3, dtype=torch.float64))
    for rank in range(WORLD):
        grads, loss = results[rank]["svgd"]
        _assert_grads_close(grads, want)
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=ATOL)
    # Particles split over the ranks: each rank holds its block of the same direction.
    got = torch.cat([results[r]["sharded_svgd"][0]["particles"] for r in range(WORLD)])
    torch.testing.assert_close(got, want["particles"], rtol=0, atol=ATOL)
    torch.testing.assert_close(results[0]["sharded_svgd"][1], want_loss, rtol=0, atol=ATOL)
    # ... and a fit moves each block as single-process SVGD moves those rows.
    single = vipkg.fit(model, Particles(model, n=8, seed=3, dtype=torch.float64), SVGD(), steps=5, lr=0.05)
    got = torch.cat([results[r]["sharded_svgd_fit"][0] for r in range(WORLD)])
    torch.testing.assert_close(got, single.guide.particles.detach(), rtol=0, atol=ATOL)
    torch.testing.assert_close(results[1]["sharded_svgd_fit"][1], single.losses, rtol=0, atol=ATOL)
    assert "shard_data=False" in results[0]["sharded_svgd_needs_full_data"]


def test_two_processes_fit_the_same_guide_as_one(two_ranks):
    results, out = two_ranks
    model = _model()
    want_params, want_losses = _fit(vipkg.fit, model, MeanFieldNormal(model, dtype=torch.float64))
    for rank in range(WORLD):
        params, losses = results[rank]["fit"]
        _assert_grads_close(params, want_params)
        torch.testing.assert_close(losses, want_losses, rtol=0, atol=ATOL)
    # Interrupted at step 10 and resumed (each rank from its own checkpoint file): same path.
    for rank in range(WORLD):
        params, losses = results[rank]["resumed"]
        _assert_grads_close(params, results[rank]["fit"][0], atol=0)
        torch.testing.assert_close(losses, results[rank]["fit"][1], rtol=0, atol=0)
    assert (out / "ck.pt").exists()
    for rank in range(WORLD):  # both ranks refuse to resume from different steps
        assert "different steps [25, -1]" in results[rank]["mismatch"]
        assert re.search(
            r"rank 0: CheckpointError: checkpoint .*ck\.pt' already exists", results[rank]["fresh_refused"]
        )
    # per_rank draws: the ranks stay in step with each other but leave the 1-process path.
    p0, l0 = results[0]["fit_per_rank"]
    p1, l1 = results[1]["fit_per_rank"]
    _assert_grads_close(p1, p0, atol=0)
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert (l0 - want_losses).abs().max() > 1e-3


def test_fit_command_under_two_processes_matches_one(two_ranks, tmp_path):
    from vipkg.cli import main

    _, out = two_ranks
    assert main(_cli_args(tmp_path / "one")) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((out / "dist" / "summary.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["particles"] == "shared"
    # float32 (the CLI's default dtype): the all-reduce changes the rounding only
    assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)
    for site in one["posterior"]:
        torch.testing.assert_close(
            torch.tensor(two["posterior"][site]["mean"]),
            torch.tensor(one["posterior"][site]["mean"]),
            atol=1e-4,
            rtol=0,
        )
    assert (out / "dist" / "posterior.nc").stat().st_size > 0


@pytest.mark.slow
def test_torchrun_launches_the_fit_command(tmp_path):
    import shutil
    import subprocess

    from vipkg.cli import main

    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not on PATH")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--standalone", f"--nproc_per_node={WORLD}", "-m", "vipkg", *_cli_args(tmp_path / "tr")]
    proc = subprocess.run(cmd + ["--distributed"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("20 steps on 2 process(es)") == 1, proc.stdout  # rank 0 reports, once
    assert main(_cli_args(tmp_path / "one")) == 0
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert two["world_size"] == WORLD and two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)


def test_fit_command_finds_models_guides_and_estimators_by_name(tmp_path, capsys):
    import vipkg.estimators as est
    from vipkg.cli import main
    from vipkg.cli.fit import estimator_classes, guide_classes

    # Every concrete estimator exported by vipkg.estimators is a choice, new ones included.
    for name in est.__all__:
        obj = getattr(est, name)
        if isinstance(obj, type) and issubclass(obj, est.Estimator) and obj is not est.Estimator:
            assert estimator_classes()[name.lower()] is obj
    assert estimator_classes()["score"] is ScoreFunction
    assert guide_classes()["fullrank"] is FullRankNormal
    args = ["fit", "--model", "vipkg.models:gaussian", "--model-kwargs", '{"dim": 2}', "--guide", "LowRank"]
    args += ["--guide-kwargs", '{"rank": 1}', "--estimator", "SCORE", "--objective", "iwae:4"]
    args += ["--steps", "5", "--num-particles", "2", "--out", str(tmp_path), "--draws", "20", "--no-progress"]
    assert main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["guide"] == "LowRankNormal" and summary["estimator"] == "ScoreFunction()"
    assert summary["objective"].startswith("IWAE") and len(summary["posterior"]["x"]["mean"]) == 2
    assert "5 steps on 1 process(es)" in capsys.readouterr().out
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes left no temporaries


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "nope"], "neither a zoo model"),
        (["--model", "vipkg.models:nope"], "cannot load 'nope'"),
        (["--model", "vipkg.models:ZOO"], "'vipkg.models:ZOO' is not callable"),
        (["--model", "gaussian", "--estimator", "magic"], "choose one of .*'reparam'"),
        (["--model", "gaussian", "--guide", "magic"], "choose one of .*'meanfield'"),
        # FBGVI() needs no step size now (issue 22); the default mean-field guide is what does not fit.
        (["--model", "gaussian", "--estimator", "fbgvi"], r"MeanFieldNormal guide\. Use FullRank"),
        (["--model", "gaussian", "--objective", "kl"], "use 'elbo', 'iwae:K'"),
        (["--model", "gaussian", "--model-kwargs", "[1]"], "must be a JSON object"),
        (["--model", "gaussian", "--resume"], "--resume needs --checkpoint"),
        (["--model", "gaussian", "--steps", "0"], "must be positive"),
    ],
)
def test_fit_command_rejects_bad_input_clearly(extra, message, capsys):
    from vipkg.cli import main

    steps = [] if "--steps" in extra else ["--steps", "2"]
    with pytest.raises(SystemExit) as info:
        main(["fit", "--no-progress", *steps, *extra])
    text = str(info.value) + capsys.readouterr().err
    assert info.value.code != 0 and re.search(message, text), text


def _compile_worker(rank, world, backend):
    import warnings

    if backend is not None:  # dynamo + AOT autograd without C++ code generation (fast on CPU)
        real = torch.compile
        torch.compile = lambda fn, **kwargs: real(fn, backend=backend)
    model = _model()
    out = {}
    for compiled in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no silent fallback to eager
            out[compiled] = _fit(
                fit,
                model,
                MeanFieldNormal(model, dtype=torch.float64),
                steps=8,
                optimizer="sgd",
                compile=compiled,
            )
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", None])
def test_compiled_data_parallel_steps_give_the_eager_losses(backend):
    for result in launch(_compile_worker, WORLD, backend, timeout=600):
        _assert_grads_close(result[True][0], result[False][0], atol=1e-12)
        torch.testing.assert_close(result[True][1], result[False][1], rtol=1e-12, atol=1e-12)


def _failing_worker(rank, world):
    if rank == 1:
        raise ValueError("rank one is broken")
    dist = torch.distributed
    dist.barrier()  # would wait forever for rank 1: launch must not
    return rank


@pytest.mark.slow
def test_launch_reports_a_failing_rank_instead_of_hanging():
    with pytest.raises(RuntimeError, match="rank 1: ValueError: rank one is broken"):
        launch(_failing_worker, WORLD, timeout=120)
