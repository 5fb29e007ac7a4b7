import io
import math
import subprocess
import sys

import arviz as az
import torch

import vipkg
from vipkg.cli import compare, main


def test_compare_writes_table_netcdf_and_plot(tmp_path):
    stream = io.StringIO()
    rows = compare(
        "eight_schools",
        steps=40,
        num_particles=4,
        repeats=4,
        eval_draws=200,
        out=tmp_path,
        progress=False,
        stream=stream,
    )
    assert [r["estimator"] for r in rows][:2] == ["reparam-meanfield-elbo", "reparam-fullrank-elbo"]
    for r in rows:
        assert r["ms_per_step"] > 0
        if r["estimator"].startswith("svgd"):
            # Full-data SVGD is deterministic given the particles, and particles have no bound.
            assert r["grad_trace_var"] == 0 and math.isnan(r["loss"])
        else:
            assert r["grad_trace_var"] > 0 and r["loss_se"] > 0
    table = (tmp_path / "compare.md").read_text()
    assert "| reparam-fullrank-iwae8 |" in table
    idata = az.from_netcdf(str(tmp_path / "compare.nc"))
    assert "posterior" in idata.groups() and "compare" in idata.groups()
    for png in ("loss_traces.png", "grad_variance.png", "khat.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "posterior.png").exists()  # eight schools has no closed-form reference
    assert all(math.isfinite(r["khat"]) != r["estimator"].startswith("svgd") for r in rows)
    assert "| PSIS k-hat |" in table
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_compare_skips_what_does_not_fit_and_plots_against_reference(tmp_path):
    from vipkg.cli import Config
    from vipkg.guides import FullRankNormal, MeanFieldNormal

    class NoRsample(MeanFieldNormal):
        def forward(self):
            return torch.distributions.Categorical(logits=torch.zeros(3))

    configs = [
        Config("fr", FullRankNormal, vipkg.Reparam, vipkg.ELBO),
        Config("bad", NoRsample, vipkg.Reparam, vipkg.ELBO),
        Config("mf", MeanFieldNormal, vipkg.Reparam, vipkg.ELBO, lr=0.05),
    ]
    rows = compare(
        "gaussian",
        steps=30,
        num_particles=2,
        repeats=3,
        eval_draws=200,
        out=tmp_path,
        progress=False,
        configs=configs,
        only=["fr", "bad"],
        stream=io.StringIO(),
    )
    assert [r["estimator"] for r in rows] == ["fr"]
    table = (tmp_path / "compare.md").read_text()
    assert "- bad: Reparam needs reparameterized draws" in table
    assert (tmp_path / "posterior.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_models_lists_zoo(capsys):
    assert main(["models"]) == 0
    assert "eight_schools" in capsys.readouterr().out


def test_cli_entry_point_runs_as_module(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vipkg",
            "compare",
            "--model",
            "gaussian",
            "--steps",
            "20",
            "--num-particles",
            "2",
            "--repeats",
            "2",
            "--out",
            str(tmp_path),
            "--no-progress",
            "--only",
            "reparam-meanfield,svgd",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "reparam-meanfield-elbo" in out.stdout


def test_cli_rejects_bad_arguments():
    out = subprocess.run(
        [sys.executable, "-m", "vipkg", "compare", "--steps", "0"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "--steps" in out.stderr
