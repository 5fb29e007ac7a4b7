import io
import math
import re
import subprocess
import sys
from pathlib import Path

import arviz as az
import pytest
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


@pytest.mark.parametrize(
    "model_name, labels, guide",
    [
        ("vae_digits", ["reparam-meanfield-elbo", "stl-meanfield-elbo"], "vae_digits_guide"),
        (
            "categorical_vae_digits",
            ["gumbel-categorical-elbo", "persite-reparam+score-loo-elbo"],
            "categorical_vae_digits_guide",
        ),
    ],
)
def test_compare_runs_a_subsampled_vae_scored_on_held_out_images(tmp_path, model_name, labels, guide):
    from vipkg.estimators import catalog

    # Two configurations that fit, an update estimator and a family that couples the data points.
    configs = [catalog.get(label) for label in labels]
    configs += [catalog.get("fbgvi-elbo"), catalog.get("reparam-fullrank-elbo")]
    stream = io.StringIO()
    rows = compare(
        model_name,
        steps=3,
        num_particles=2,
        repeats=2,
        eval_draws=10,
        out=tmp_path,
        progress=False,
        configs=configs,
        stream=stream,
    )
    assert [r["estimator"] for r in rows] == labels
    for r in rows:
        # Minus the test ELBO per image of 64 binary pixels, near its start (64 log 2 = 44 nats).
        assert 5 < r["loss"] < 100 and r["loss_se"] > 0
        assert r["grad_trace_var"] > 0 and math.isnan(r["khat"])
    table = (tmp_path / "compare.md").read_text()
    assert table in stream.getvalue()
    assert "Final loss: minus the held-out ELBO per test image" in table
    assert f"Guide: the model's default guide ({guide})" in table
    for label in labels:
        assert f"| {label} |" in table
    assert "- fbgvi-elbo: " in table and "- reparam-fullrank-elbo: " in table
    if model_name == "vae_digits":  # (FullRankNormal does not represent the categorical VAE's codes)
        assert "owns a whole-data step" in table
        assert "- reparam-fullrank-elbo: FullRankNormal cannot guide the local sites ['z']" in table


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


def _fails_on_one_line(argv, capsys):
    """Run ``vipkg argv`` in-process; the one-line message it ends with (and its exit status)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    code = info.value.code
    # A string code is printed by the interpreter on stderr (exit status 1); an int one after
    # the parser wrote its message there.
    text = code if isinstance(code, str) else capsys.readouterr().err.strip()
    status = 1 if isinstance(code, str) else code
    assert status != 0 and text and "\n" not in text and "Traceback" not in text, (status, text)
    return text, status


def _no_fitting(monkeypatch):
    """Make any fit fail loudly: the errors below must come before fitting starts."""

    def refuse(*args, **kwargs):
        raise AssertionError("a fit started before the error")

    # vipkg.cli.compare is also the name of the compare function, so look the modules up.
    monkeypatch.setattr(sys.modules["vipkg.cli.compare"], "fit", refuse)
    monkeypatch.setattr(sys.modules["vipkg.cli.fit"], "fit_one", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["fit", "--model", "eight_schools", "--estimator", "rsvi"],
            r"^vipkg fit: error: RSVI needs a guide built from Gamma draws .* Use Reparam for Gaussian",
        ),
        (
            ["fit", "--model", "eight_school"],
            r"^vipkg fit: error: --model 'eight_school' is neither a zoo model",
        ),
        (
            ["fit", "--model", "gaussian", "--estimator", "reparm"],
            r"--estimator 'reparm': choose one of .*'reparam'",
        ),
        (
            ["fit", "--model", "gaussian", "--guide", "fullrnk"],
            r"--guide 'fullrnk': choose one of .*'fullrank'",
        ),
        (
            ["compare", "--model", "eight_school"],
            r"^vipkg compare: error: unknown model 'eight_school'; choose one of \[.*'eight_schools'",
        ),
        (
            ["compare", "--model", "gaussian", "--only", "reparm"],
            r"--only 'reparm' matches no configuration label.*the labels are: reparam-meanfield-elbo, ",
        ),
        (
            ["compare", "--model", "gaussian", "--only", "stl,reparm"],
            r"--only 'reparm' matches no configuration label",
        ),
        (["fit", "--model", "gaussian", "--overwrite"], r"--overwrite needs --checkpoint"),
    ],
)
def test_cli_errors_are_one_line_before_any_fitting(argv, message, capsys, monkeypatch):
    if "rsvi" not in argv:  # RSVI's mismatch is found by fit itself, before its first step
        _no_fitting(monkeypatch)
    text, _ = _fails_on_one_line([*argv, "--steps", "2", "--no-progress"], capsys)
    assert re.search(message, text), text


@pytest.mark.parametrize("command", ["fit", "compare"])
def test_unwritable_out_fails_before_any_fitting(command, tmp_path, capsys, monkeypatch):
    _no_fitting(monkeypatch)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    targets = [blocker / "out"] + ([Path("/proc/x")] if Path("/proc/self").exists() else [])
    for out in targets:
        argv = [command, "--model", "gaussian", "--steps", "2", "--no-progress", "--out", str(out)]
        text, status = _fails_on_one_line(argv, capsys)
        assert status == 1 and re.search(rf"cannot write to .*directory '{re.escape(str(out))}'", text), text


def test_cli_refuses_to_overwrite_a_checkpoint(tmp_path, capsys):
    ck = tmp_path / "c.pt"
    argv = ["fit", "--model", "gaussian", "--steps", "4", "--no-progress", "--checkpoint", str(ck)]
    assert main(argv) == 0
    saved = ck.read_bytes()
    text, _ = _fails_on_one_line(argv, capsys)
    assert re.search(r"c\.pt' already exists.*--resume.*--overwrite", text), text
    assert ck.read_bytes() == saved
    assert main([*argv, "--overwrite", "--seed", "1"]) == 0
    assert ck.read_bytes() != saved
    text, status = _fails_on_one_line([*argv, "--overwrite", "--resume"], capsys)
    assert status == 2 and "pass one" in text


def test_cli_errors_in_a_real_process_print_one_line_and_no_traceback(tmp_path):
    for argv in (
        ["fit", "--model", "eight_schools", "--estimator", "rsvi", "--steps", "2"],
        [
            "compare",
            "--model",
            "gaussian",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "x" / "y"),
            "--only",
            "reparm",
        ],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "vipkg", *argv, "--no-progress"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 1 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
        assert lines[0].startswith(f"vipkg {argv[0]}: error: "), lines
    assert not (tmp_path / "x").exists()  # the filter is checked before the output directory is made


@pytest.mark.parametrize("command", ["compare", "fit"])
def test_help_describes_every_option_with_its_default(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    options = text[text.index("options:") :]
    # One block per option: its line and the indented lines that continue its help.
    blocks = re.split(r"\n  (?=-)", options)[1:]
    names = [b.split()[0].rstrip(",") for b in blocks]
    assert "--steps" in names and "--out" in names and len(names) >= 10
    for block in blocks:
        name = block.split()[0]
        if name in ("-h,", "--model") and command == "fit":
            continue  # --help, and fit's required --model, have no default
        if name == "-h,":
            continue
        assert "default" in block, block


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("elbo", vipkg.ELBO()),
        ("iwae", vipkg.IWAE(8)),
        ("iwae:3", vipkg.IWAE(3)),
        ("IWAE:16", vipkg.IWAE(16)),
        ("renyi", vipkg.Renyi(0.5, 8)),
        ("renyi:0.3", vipkg.Renyi(0.3, 8)),
        ("renyi:0.3:4", vipkg.Renyi(0.3, 4)),
    ],
)
def test_objective_spec_gives_k_and_help_says_the_default(spec, expected, capsys):
    from vipkg.cli.fit import _objective

    assert repr(_objective(spec)) == repr(expected)
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "plain 'iwae' is iwae:8" in help_text and "iwae:K" in help_text


@pytest.mark.parametrize(
    "spec, message",
    [
        ("iwae:x", r"--objective 'iwae:x': K must be a positive integer, got 'x'"),
        ("iwae:0", r"--objective 'iwae:0': K must be a positive integer, got 0"),
        ("iwae:2:3", r"--objective 'iwae:2:3': use 'elbo', 'iwae:K'"),
        ("elbo:3", r"--objective 'elbo:3': use 'elbo'"),
    ],
)
def test_bad_objective_specs_fail_on_one_line_before_fitting(spec, message, capsys, monkeypatch):
    _no_fitting(monkeypatch)
    argv = ["fit", "--model", "gaussian", "--objective", spec, "--steps", "2", "--no-progress"]
    text, _ = _fails_on_one_line(argv, capsys)
    assert re.search(message, text), text


def test_fit_summary_names_the_iwae_k(tmp_path):
    from vipkg.cli.fit import fit_command

    summary = fit_command(model="gaussian", objective="iwae:3", steps=2, progress=False)
    assert summary["objective"] == "IWAE(k=3)"


def test_compare_progress_bars_name_the_configuration(tmp_path, capsys):
    compare(
        "gaussian",
        steps=4,
        num_particles=2,
        repeats=2,
        eval_draws=50,
        out=tmp_path,
        only=["reparam-meanfield-elbo", "reparam-fullrank-iwae8"],
        reference="none",
        progress=True,
        stream=io.StringIO(),
    )
    err = capsys.readouterr().err
    # The bar's description is the configuration's label (two Reparam lines would otherwise both read
    # "Reparam").
    assert re.search(r"(^|\r)reparam-meanfield-elbo: ", err) and re.search(
        r"(^|\r)reparam-fullrank-iwae8: ", err
    ), err
