"""Every notebook in tutorials/ runs top to bottom (fast mode) and is committed without outputs.

A notebook that the tests do not execute must not exist: the list is a glob, so adding a
notebook adds a test. Each notebook ends with assertions of its own claims (a "Checks"
section), so a failing claim fails here.
"""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

TUTORIALS = pathlib.Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
# Notebooks that cannot execute in under ~45 s in fast mode on a 2-core VM.
SLOW: set[str] = set()
CELL_TIMEOUT = 300


def _params():
    return [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p.name in SLOW else []) for p in NOTEBOOKS]


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"
    assert not (SLOW - {p.name for p in NOTEBOOKS}), "SLOW names a notebook that does not exist"


@pytest.mark.parametrize("path", _params())
def test_notebook_executes(path, monkeypatch):
    monkeypatch.setenv("VIPKG_TUTORIAL_FAST", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(TUTORIALS)}},
    )
    # An error in any cell (the "Checks" assertions included) raises CellExecutionError.
    client.execute()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_committed_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name} cell {i} has stored outputs; strip them before committing"
        assert cell.execution_count is None, f"{path.name} cell {i} has an execution count; strip it"
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{path.name} kernelspec is {kernel!r}, not python3"


def test_every_notebook_has_checks():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "assert " in code, f"{path.name} asserts none of its claims"
        markdown = [(i, c.source) for i, c in enumerate(nb.cells) if c.cell_type == "markdown"]
        headings = [i for i, text in markdown if "## Checks" in text]
        assert headings, f"{path.name} has no '## Checks' section"
        after = [c for c in nb.cells[headings[-1] :] if c.cell_type == "code"]
        assert any("assert " in c.source for c in after), f"{path.name}: its Checks section asserts nothing"
        assert "VIPKG_TUTORIAL_FAST" in code, f"{path.name} ignores fast mode"
        assert "set_num_threads(1)" in code, f"{path.name} does not pin torch to one thread"
