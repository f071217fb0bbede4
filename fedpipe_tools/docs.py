"""Write the docs' generated blocks from their sources: ``python -m fedpipe_tools.docs`` (``--check``: only say which
are out of date, exit 1 if any).

A block in a markdown file is

    <!-- generated: KIND [SOURCE] -->
    ...
    <!-- end generated -->

and its body is what KIND makes of SOURCE (a path from the repository's root): ``run-config`` the run-config table of
:mod:`fedpipe_core.config`, ``run-summary RUN`` a committed run's final scores beside the base model's and its cost,
``run-rounds RUN`` its per-round losses and bytes, ``model-sizes MODEL`` what the default run config's adapters, ΔW and
frozen base of that model weigh (computed from its shapes), ``suite-targets SUITE`` the targets a benchmark suite fixed
before its runs (``fedpipe_tools/suites.yaml``). No figure in a block is typed by hand; ``tests/test_docs.py`` fails
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


def model_sizes(model: str) -> str:
    """For ``model`` with the default run config's targets and rank: the bytes a node's adapters send a round, the dense
    ΔW of the adapted weights, and the frozen base (block linears; whole model) at each precision (cost model's
    storage rates, :func:`fedpipe_core.quantize.bytes_per_param`)."""
    from dataclasses import replace

    from fedpipe_core.config import RunConfig
    from fedpipe_core.cost import FP32, lora_params
    from fedpipe_core.quantize import bytes_per_param
    from fedpipe_core.task import load_task

    task = load_task(replace(RunConfig(), model=model))
    spec, ranks = task.spec, task.config.rank_candidates()
    adapters = {r: lora_params(spec, dict.fromkeys(task.targets, r)) * FP32 for r in ranks}
    dense = sum(out * inp for out, inp in task.shapes.values()) * FP32
    lines = [
        f"`{model}`, `lora.target-modules = {task.config.lora_target_modules!r}` ({len(task.targets)} weights):",
        "",
        "| what | MB |",
        "|---|---|",
        *(
            f"| a node's adapters at rank {r} on every weight, B and A in FP32 (a TRAIN reply; a dispatch of ΔW at rank {r}) "
            f"| {adapters[r] / 1e6:.2f} |"
            for r in ranks
        ),
        f"| the dense FP32 ΔW of those weights ({dense / adapters[max(ranks)]:.1f} × the rank-{max(ranks)} adapters) "
        f"| {dense / 1e6:.1f} |",
    ]
    for precision in ("fp32", "fp16", "nf8", "nf4"):
        linears = spec.linear_params * bytes_per_param(precision)
        lines.append(
            f"| frozen base at {precision.upper()}: block linears; with embeddings, norms and head in FP32 | "
            f"{linears / 1e6:.0f}; {(linears + spec.other_params * FP32) / 1e6:.0f} |"
        )
    return "\n".join(lines) + "\n"


def suite_targets(suite: str) -> str:
    """The targets ``suite`` fixes in the packaged ``suites.yaml``, one line each, and its fixed target eval loss."""
    from fedpipe_tools.bench import load_suites

    suites = load_suites()
    if suite not in suites:
        raise ValueError(f"suite-targets: no suite {suite!r} in suites.yaml (it has: {', '.join(suites)})")
    spec = suites[suite]
    lines = [f"- {target}" for target in spec.targets]
    if spec.target_eval_loss is not None:
        lines.append(f"- the target eval loss that time and bytes to target are read at: {spec.target_eval_loss:g}")
    return "\n".join(lines) + "\n"


KINDS: dict[str, Callable[[Path, str | None], str]] = {
    "run-config": lambda root, source: markdown_table(),
    "run-summary": lambda root, source: (
        "\n".join(summary_table(json.loads((_run_dir(root, source) / "summary.json").read_text()))).rstrip("\n") + "\n"
    ),
    "run-rounds": lambda root, source: run_rounds(_run_dir(root, source)),
    "model-sizes": lambda root, source: model_sizes(str(source)),
    "suite-targets": lambda root, source: suite_targets(str(source)),
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
