"""``fedpipe-eval RUN_DIR --data FILE.csv [--limit N] [--seed S] [--outputs OUT.csv]``: score a saved run on any E2E-format file.

Loads the run's base model and global ΔW and scores the file's meaning representations: perplexity
over their references and greedy generations (batched) scored with BLEU, NIST, METEOR, ROUGE-L and
CIDEr. ``--limit N`` caps both at a seeded random sample of N meaning representations (``--seed``),
not the alphabetically first. A progress bar follows each stage; the result is one JSON object on
the last line, with the scorer that computed it (``scorer``: the official script's figures, see
:mod:`fedpipe_core.metrics`). ``--outputs OUT.csv`` also writes what was scored, one row per meaning
representation (columns ``mr``, ``output``, in the order scored), for re-scoring with the official script.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedpipe_core.config import ConfigError
from fedpipe_core.metrics import scorer
from fedpipe_core.results import WHICH, load_run

if TYPE_CHECKING:
    from fedpipe_core.data import Example


def sample_groups(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """The examples of ``limit`` meaning representations drawn at random with ``seed`` (all when None)."""
    groups = sorted({e.group for e in examples})
    if limit is None or limit >= len(groups):
        return examples
    chosen = set(random.Random(seed).sample(groups, limit))
    return [e for e in examples if e.group in chosen]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (<output-dir>/<run-id>)")
    parser.add_argument("--data", required=True, help="E2E-format file: CSV with columns mr,ref (or the JSONL form)")
    parser.add_argument("--limit", type=int, default=None, help="score N meaning representations drawn at random (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed (default 0)")
    parser.add_argument("--base", action="store_true", help="score the base model instead of base + ΔW")
    parser.add_argument("--outputs", type=Path, help="also write the scored outputs: a CSV with columns mr,output")
    parser.add_argument("--which", choices=WHICH, default="last", help="the last round's model (default) or the best round's")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    from fedpipe_core.data import load_examples  # the model stack (torch) once the arguments are good
    from fedpipe_core.evaluate import score_test
    from fedpipe_core.task import load_task

    try:
        config, delta = load_run(args.run_dir, args.which)
        if config.task != "e2e":
            raise ConfigError(f"run {str(args.run_dir)!r} is a {config.task!r} run; fedpipe-eval scores E2E runs")
        examples = sample_groups(load_examples("e2e", args.data), args.limit, args.seed)
        task = load_task(config)
    except ConfigError as exc:
        print(f"fedpipe-eval: {exc}", file=sys.stderr)
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        stages: dict[str, int] = {}

        def progress(stage: str, done: int, total: int) -> None:
            if stage not in stages:
                stages[stage] = bar.add_task(stage, total=total)
            bar.update(stages[stage], completed=done)

        outputs: list[tuple[str, str]] = []
        scores = score_test(
            task, {} if args.base else delta, examples=examples, max_examples=0, max_groups=0, progress=progress, outputs=outputs
        )
    if args.outputs is not None:
        with open(args.outputs, "w", newline="", encoding="utf-8") as handle:
            csv.writer(handle).writerows([("mr", "output"), *outputs])
    print(json.dumps({"run": str(args.run_dir), "data": args.data, "seed": args.seed, "scorer": scorer(), **scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
