"""``fedpipe-eval RUN_DIR --data FILE.csv [--limit N]``: score a saved run on any E2E-format file.

Loads the run's base model and global ΔW, scores every example of the file for perplexity and
greedy generations for N meaning representations evenly spaced over the file (all by default) with BLEU, NIST,
METEOR, ROUGE-L and CIDEr, and prints the result as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpipe_core.config import ConfigError
from fedpipe_core.data import load_examples
from fedpipe_core.evaluate import score_test
from fedpipe_core.results import load_run
from fedpipe_core.task import load_task


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (runs/<run-id>)")
    parser.add_argument("--data", required=True, help="E2E-format file: CSV with columns mr,ref (or the JSONL form)")
    parser.add_argument("--limit", type=int, default=None, help="score generations for N MRs, evenly spaced (default: all)")
    parser.add_argument("--base", action="store_true", help="score the base model instead of base + ΔW")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    try:
        config, delta = load_run(args.run_dir)
        if config.task != "e2e":
            raise ConfigError(f"run {str(args.run_dir)!r} is a {config.task!r} run; fedpipe-eval scores E2E runs")
        examples = load_examples("e2e", args.data)
        task = load_task(config)
        scores = score_test(task, {} if args.base else delta, examples=examples, max_examples=0, max_groups=args.limit or 0)
    except ConfigError as exc:
        print(f"fedpipe-eval: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"run": str(args.run_dir), "data": args.data, **scores}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
