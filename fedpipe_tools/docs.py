"""Write the docs' generated blocks from their sources: ``python -m fedpipe_tools.docs`` (``--check``: only say which
are out of date, exit 1 if any).

A block in a markdown file is

    <!-- generated: KIND [SOURCE] -->
    ...
    <!-- end generated -->

and its body is what KIND makes of SOURCE (a path from the repository's root): ``run-config`` the run-config table of
:mod:`fedpipe_core.config`, ``run-summary RUN`` a committed run's final scores beside the base model's and its cost,
``run-rounds RUN`` its per-round losses and bytes. No figure in a block is typed by hand; ``tests/test_docs.py`` fails
when one is out of date with its source.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from fedpipe_core.config import markdown_table
from fedpipe_tools.run_report import read_jsonl, summary_table

ROOT = Path(__file__).parents[1]
BLOCK = re.compile(r"(<!-- generated: (?P<kind>[a-z-]+)(?: (?P<source>\S+))? -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _run_dir(root: Path, source: str) -> Path:
    """A run directory named by its path from the root: the directory itself, or the one run inside it."""
    path = root / source
    if (path / "summary.json").is_file():
        return path
    inside = sorted(p.parent for p in path.glob("*/summary.json"))
    if len(inside) != 1:
        raise ValueError(f"{source!r} is not a run directory (nor a directory holding exactly one run)")
    return inside[0]


def run_rounds(run: Path) -> str:
    """Per round: eval loss at the server and at the sites, clients, MB up and down."""
    rows = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["round"])
    lines = ["| round | eval loss (server) | federated eval loss | clients | MB up | MB down |", "|---|---|---|---|---|---|"]
    for r in rows:
        federated = r.get("federated_eval_loss")
        lines.append(
            f"| {r['round'] or '0 (base model)'} | {r['eval_loss']:.6f} | {'—' if federated is None else f'{federated:.6f}'} "
            f"| {r.get('clients', 0)} | {r.get('bytes_up', 0) / 1e6:.3f} | {r.get('bytes_down', 0) / 1e6:.3f} |"
        )
    return "\n".join(lines) + "\n"


KINDS: dict[str, Callable[[Path, str | None], str]] = {
    "run-config": lambda root, source: markdown_table(),
    "run-summary": lambda root, source: (
        "\n".join(summary_table(json.loads((_run_dir(root, source) / "summary.json").read_text()))).rstrip("\n") + "\n"
    ),
    "run-rounds": lambda root, source: run_rounds(_run_dir(root, source)),
}


def render(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated block's body made again from its source."""

    def body(match: re.Match) -> str:
        kind, source = match["kind"], match["source"]
        if kind not in KINDS:
            raise ValueError(f"unknown generated block {kind!r} (known: {', '.join(KINDS)})")
        if kind != "run-config" and source is None:
            raise ValueError(f"a {kind!r} block names its source: <!-- generated: {kind} PATH -->")
        return match.group(1) + KINDS[kind](root, source) + match.group(5)

    return BLOCK.sub(body, text)


def documents(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def stale(root: Path = ROOT) -> list[Path]:
    """The documents whose generated blocks differ from what their sources make now."""
    return [p for p in documents(root) if render(p.read_text(encoding="utf-8"), root) != p.read_text(encoding="utf-8")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedpipe_tools.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list the documents whose blocks are out of date")
    args = parser.parse_args(argv)
    try:
        out_of_date = stale()
    except (OSError, ValueError) as exc:
        print(f"fedpipe_tools.docs: {exc}", file=sys.stderr)
        return 2
    for path in out_of_date:
        if args.check:
            print(f"out of date: {path.relative_to(ROOT)}")
        else:
            path.write_text(render(path.read_text(encoding="utf-8")), encoding="utf-8")
            print(f"written: {path.relative_to(ROOT)}")
    return 1 if args.check and out_of_date else 0


if __name__ == "__main__":
    sys.exit(main())
