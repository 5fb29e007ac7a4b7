"""The import graph of the package: no module circles, and the layering of DESIGN.md holds.

Every module of ``vipkg`` (found with ``pkgutil.walk_packages``) is parsed with ``ast``
and its import statements collected, at module level and inside functions. Then:

- no module under ``vipkg/guides`` imports ``vipkg.estimators`` (at any level);
- module-level imports form no cycle (importing ``a.b.c`` counts as importing the
  packages ``a.b`` and ``a`` too, since their ``__init__`` runs first, except the
  packages the importer itself lives in, which are already being imported);
- module-level imports between the package's parts follow the arrows of DESIGN.md
  (:data:`ARROWS`, read transitively). Imports inside functions are how an optional
  piece may point against an arrow without creating a circle; each one must be
  listed in :data:`DEFERRED` with its reason.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import tomllib
from pathlib import Path

import pytest

import vipkg

ROOT = "vipkg"

#: The parts of the package, as module-name prefixes (``vipkg`` itself is the public API).
PARTS = (
    "vipkg.model",
    "vipkg.frontends",
    "vipkg.guides",
    "vipkg.estimators",
    "vipkg.objectives",
    "vipkg.diagnostics",
    "vipkg.fit",
    "vipkg._compiled",
    "vipkg.checkpoint",
    "vipkg.distributed",
    "vipkg.models",
    "vipkg.cli",
    "vipkg.gp",
    "vipkg.__main__",
    "vipkg._io",
    "vipkg._rng",
    "vipkg._adam",
)

#: Leaf utilities (atomic writes, seeded RNG, the eager Adam update): they import nothing of vipkg
#: and anyone may import them.
UTILITIES = {"vipkg._io", "vipkg._rng", "vipkg._adam"}

_EVERYTHING = set(PARTS) - {"vipkg.__main__"}

#: Allowed module-level arrows between the parts (DESIGN.md, "Layout"), read transitively.
ARROWS = {
    "vipkg.model": set(),
    "vipkg.objectives": set(),
    # frontends -> model. The GPyTorch front-end also returns a guide (SVGPGuide) and shares the
    # zoo's minibatch helpers (vipkg.models._common): two arrows beyond DESIGN.md.
    "vipkg.frontends": {"vipkg.model", "vipkg.guides", "vipkg.models"},
    "vipkg.guides": {"vipkg.model"},
    "vipkg.estimators": {"vipkg.guides", "vipkg.model", "vipkg.objectives"},
    "vipkg.diagnostics": {"vipkg.estimators"},
    "vipkg.checkpoint": set(),
    "vipkg.fit": {"vipkg.estimators", "vipkg.diagnostics", "vipkg.checkpoint", "vipkg._compiled"},
    # fit(compile=True)'s functional step: torch only; it calls the estimator it is handed.
    "vipkg._compiled": set(),
    "vipkg.distributed": {"vipkg.fit"},
    # The model zoo: functions returning a Model (their Pyro forms go through Model.from_pyro).
    "vipkg.models": {"vipkg.model"},
    "vipkg.cli": _EVERYTHING - {"vipkg.cli"},
    "vipkg.gp": {"vipkg.frontends"},  # the old import path of the GPyTorch front-end
    "vipkg.__main__": {"vipkg.cli"},
    ROOT: _EVERYTHING,  # the public API re-exports from everywhere
}

#: Imports inside functions that point against :data:`ARROWS`: (importer, imported) -> why.
DEFERRED = {
    ("vipkg.model", "vipkg.frontends.log_density"): "Model.from_log_density delegates to its front-end",
    ("vipkg.model", "vipkg.frontends.pyro"): "Model.from_pyro delegates to its front-end (and loads Pyro)",
    ("vipkg.checkpoint", "vipkg.diagnostics.variance"): "restoring a GradientVariance hook's results",
    ("vipkg.distributed", "vipkg.cli.fit"): "old vipkg.distributed.fit_command / estimator_classes / "
    "guide_classes, re-exported lazily (the CLI imports vipkg.distributed)",
    ("vipkg.models.gp_classification", "vipkg.gp"): "Gauss-Hermite nodes and the stable log Phi of "
    "the GPyTorch front-end, for the hand-written GP log density",
    ("vipkg.models.vae", "vipkg.guides.amortized"): "the VAEs' default amortized guides (an MLP encoder), "
    "built by vae_digits_guide / categorical_vae_digits_guide",
}


def _closure(arrows):
    out = {}
    for part in arrows:
        seen, todo = set(), list(arrows[part])
        while todo:
            p = todo.pop()
            if p not in seen:
                seen.add(p)
                todo.extend(arrows.get(p, ()))
        out[part] = seen | UTILITIES
    return out


ALLOWED = _closure(ARROWS)


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _part(module: str) -> str:
    if module == ROOT:
        return ROOT
    matches = [p for p in PARTS if _within(module, p)]
    assert matches, f"{module} belongs to no part of the package; add its prefix to PARTS and ARROWS"
    return max(matches, key=len)


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of vipkg: name -> (source file, is a package)."""

    def fail(name):
        raise ImportError(f"pkgutil could not import {name}")

    found = {ROOT: (Path(vipkg.__file__), True)}
    for info in pkgutil.walk_packages(vipkg.__path__, ROOT + ".", onerror=fail):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin, info.name
        found[info.name] = (Path(spec.origin), info.ispkg)
    return found


MODULES = _modules()


class _Collector(ast.NodeVisitor):
    """Import statements of one module as (imported module, line, inside a function)."""

    def __init__(self, module: str, is_pkg: bool):
        self.package = module if is_pkg else module.rpartition(".")[0]
        self.depth = 0
        self.found: list[tuple[str, int, bool]] = []

    def _add(self, target: str, node) -> None:
        if target == ROOT or target.startswith(ROOT + "."):
            self.found.append((target, node.lineno, self.depth > 0))

    def visit_FunctionDef(self, node):
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_If(self, node):
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            return  # annotations only: never imported at run time
        self.generic_visit(node)

    def visit_Import(self, node):
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node):
        if node.level:
            base = self.package.split(".")
            base = ".".join(base[: len(base) - node.level + 1])
            base = f"{base}.{node.module}" if node.module else base
        else:
            base = node.module
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            self._add(sub if sub in MODULES else base, node)


def _imports() -> dict[str, list[tuple[str, int, bool]]]:
    out = {}
    for name, (path, is_pkg) in MODULES.items():
        collector = _Collector(name, is_pkg)
        collector.visit(ast.parse(path.read_text(), filename=str(path)))
        out[name] = collector.found
    return out


IMPORTS = _imports()


def _module_level_graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, found in IMPORTS.items():
        for target, _, deferred in found:
            if deferred:
                continue
            graph[m].add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):  # enclosing packages run first, unless m is inside them
                package = ".".join(parts[:i])
                if not _within(m, package):
                    graph[m].add(package)
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), or a self-import."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _path(graph, start, goal):
    """One import chain start -> ... -> goal, for the error message."""
    todo, seen = [[start]], {start}
    while todo:
        chain = todo.pop(0)
        for w in sorted(graph.get(chain[-1], ())):
            if w == goal:
                return chain + [w]
            if w not in seen and w in graph:
                seen.add(w)
                todo.append(chain + [w])
    return []


def test_every_module_is_found_and_parsed():
    for name in ("vipkg.cli", "vipkg.cli.compare", "vipkg.cli.fit", "vipkg.cli.models", "vipkg.distributed"):
        assert name in MODULES
    for name in ("vipkg.frontends.pyro", "vipkg.frontends.log_density", "vipkg.frontends.gpytorch"):
        assert name in MODULES
    assert "vipkg.estimators.catalog" in MODULES and "vipkg.diagnostics.report" in MODULES
    assert any(deferred for found in IMPORTS.values() for _, _, deferred in found)  # both kinds seen
    assert any(not deferred for found in IMPORTS.values() for _, _, deferred in found)


def test_guides_do_not_import_estimators():
    bad = [
        f"{m}:{line} imports {target}" + (" (inside a function)" if deferred else "")
        for m, found in IMPORTS.items()
        if _part(m) == "vipkg.guides"
        for target, line, deferred in found
        if _part(target) == "vipkg.estimators"
    ]
    assert not bad, "guides are variational families only and never import estimators:\n" + "\n".join(bad)


def test_no_import_cycles_at_module_level():
    graph = _module_level_graph()
    cycles = _cycles(graph)
    chains = [" -> ".join(_path(graph, c[0], c[0])) for c in cycles]
    assert not cycles, "module-level import cycles (defer one import into the function that needs it):\n" + (
        "\n".join(chains)
    )


def _against_arrows(deferred: bool):
    out = []
    for m, found in IMPORTS.items():
        src = _part(m)
        for target, line, is_deferred in found:
            dst = _part(target)
            if is_deferred != deferred or dst == src or dst in ALLOWED[src]:
                continue
            if (src, dst) == ("vipkg.guides", "vipkg.estimators"):
                continue  # test_guides_do_not_import_estimators
            out.append((m, target, line))
    return out


def test_the_cycle_finder_sees_circles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert _cycles(graph) == [["a", "b", "c"], ["e"]]
    assert _path(graph, "a", "a") == ["a", "b", "c", "a"]


def test_module_level_imports_follow_the_design_arrows():
    bad = [f"{m}:{line} imports {target}" for m, target, line in _against_arrows(deferred=False)]
    assert not bad, "module-level imports against the arrows of DESIGN.md (see ARROWS):\n" + "\n".join(bad)


def test_deferred_imports_against_the_arrows_are_declared():
    undeclared = [
        f"{m}:{line} imports {target}"
        for m, target, line in _against_arrows(deferred=True)
        if not any(_within(m, a) and _within(target, b) for a, b in DEFERRED)
    ]
    assert not undeclared, (
        "imports inside functions against the arrows of DESIGN.md; list each in DEFERRED with its reason:\n"
        + "\n".join(undeclared)
    )


def test_arrow_examples():
    """The rules of DESIGN.md the layout exists for, spelled out."""
    assert "vipkg.estimators" not in ALLOWED["vipkg.model"]
    assert "vipkg.frontends" not in ALLOWED["vipkg.model"]  # Model.from_* import inside the method
    for later in ("vipkg.fit", "vipkg.cli", "vipkg.distributed"):
        assert later not in ALLOWED["vipkg.estimators"]
    assert "vipkg.fit" not in ALLOWED["vipkg.guides"] and "vipkg.estimators" not in ALLOWED["vipkg.guides"]
    assert "vipkg.cli" not in ALLOWED["vipkg.distributed"]
    for utility in UTILITIES:
        assert not [t for t, _, _ in IMPORTS[utility]], f"{utility} must import nothing of vipkg"


def test_old_import_paths_still_work():
    import vipkg.cli
    import vipkg.diagnostics
    import vipkg.diagnostics.psis
    import vipkg.distributed
    import vipkg.frontends.gpytorch
    import vipkg.gp
    from vipkg.cli import fit as cli_fit
    from vipkg.estimators import catalog

    for name in vipkg.gp.__all__:
        assert getattr(vipkg.gp, name) is getattr(vipkg.frontends.gpytorch, name)
    assert vipkg.diagnostics.importance_ess is vipkg.objectives.importance_ess
    assert vipkg.diagnostics.psis.importance_ess is vipkg.objectives.importance_ess
    for name in ("fit_command", "estimator_classes", "guide_classes"):
        assert getattr(vipkg.distributed, name) is getattr(cli_fit, name)
    with pytest.raises(AttributeError):
        vipkg.distributed.no_such_name  # noqa: B018
    assert vipkg.cli.Config is catalog.Config and callable(vipkg.cli.compare) and callable(vipkg.cli.main)
    for name in vipkg.distributed.__all__:
        assert getattr(vipkg.distributed, name) is not None


def test_console_script_resolves():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    module, _, attr = pyproject["project"]["scripts"]["vipkg"].partition(":")
    assert getattr(importlib.import_module(module), attr) is vipkg.cli.main


def test_no_tqdm_warning_in_a_notebook_without_ipywidgets():
    """In a Jupyter kernel without ipywidgets, ``tqdm.auto`` prints ``TqdmWarning: IProgress not found``
    (at the first fit with a bar, which users see as importing vipkg): the text bar is used instead."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys, types
        # (not warnings.simplefilter("error"): tqdm.autonotebook would catch the error and stay quiet)
        sys.modules["ipywidgets"] = None  # not installed
        sys.modules["ipykernel.zmqshell"] = types.ModuleType("ipykernel.zmqshell")  # what tqdm reads
        import IPython  # noqa: F401  (a kernel has it loaded)
        import vipkg

        m = vipkg.models.eight_schools()
        vipkg.fit(m, vipkg.guides.MeanFieldNormal(m), vipkg.Reparam(), steps=3, progress=True)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert "IProgress" not in out.stderr and "TqdmWarning" not in out.stderr, out.stderr[-2000:]
