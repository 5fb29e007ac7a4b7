"""Assemble benchmarks/RESULTS.md from the per-benchmark reports in benchmarks/results/.

Each ``bench_*.py`` writes ``results/<name>.md`` (and its PNGs); this script puts
them in one file, in a fixed order, after a short summary written by hand in
``results/SUMMARY.md``. Image links are rewritten to stay valid from RESULTS.md.

    python benchmarks/collect_results.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
ORDER = [
    "step",
    "step_cuda",
    "path",
    "rsvi",
    "score",
    "svgd",
    "bures",
    "gp",
    "accuracy",
    "pyro_programs",
    "enum",
    "vae",
    "distributed",
    "diagnostics",
    "soak",
]


def main() -> int:
    sys.path.insert(0, str(HERE.parent))
    from vipkg._io import atomic_write_bytes

    results = HERE / "results"
    parts = ["# vipkg benchmark results", ""]
    summary = results / "SUMMARY.md"
    if summary.exists():
        parts += [summary.read_text().strip(), ""]
    names = [n for n in ORDER if (results / f"{n}.md").exists()]
    names += sorted(p.stem for p in results.glob("*.md") if p.stem not in ORDER and p.stem != "SUMMARY")
    for name in names:
        text = (results / f"{name}.md").read_text().strip()
        # Demote headings one level and point relative image links into results/.
        text = re.sub(r"^(#+) ", r"#\1 ", text, flags=re.M)
        text = re.sub(r"\]\((?!https?:|results/)([^)]+\.png)\)", r"](results/\1)", text)
        script = name.removesuffix("_cuda")  # bench_step.py --device cuda writes step_cuda.md
        parts += [f"<!-- from results/{name}.md (benchmarks/bench_{script}.py) -->", text, ""]
    atomic_write_bytes(HERE / "RESULTS.md", "\n".join(parts).encode())
    print(f"wrote {HERE / 'RESULTS.md'} from {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
