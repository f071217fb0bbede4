"""``fedpipe-generate RUN_DIR [INPUT ...] [--file FILE]``: what a finished run's model writes for your inputs.

Each input is what the run's task puts into its prompt template, the same template as in training:
an E2E meaning representation (``name[The Eagle], food[French]``) or an Alpaca instruction. The
model is the run's base + global ΔW (``--base``: the base alone, to compare), decoding is greedy.
Prints one ``input -> output`` pair per input, then one JSON list on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpipe_core.config import ConfigError
from fedpipe_core.results import WHICH, load_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-generate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (<output-dir>/<run-id>)")
    parser.add_argument("inputs", nargs="*", help="inputs: E2E meaning representations or Alpaca instructions")
    parser.add_argument("--file", type=Path, help="more inputs, one per line")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per input (default 64)")
    parser.add_argument("--base", action="store_true", help="the base model alone, without the run's ΔW")
    parser.add_argument("--which", choices=WHICH, default="last", help="the last round's model (default) or the best round's")
    args = parser.parse_intermixed_args(argv)  # inputs may come after the flags: RUN --base "input"
    inputs = list(args.inputs)
    if args.file is not None:
        try:
            inputs += [line.strip() for line in args.file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            parser.error(f"--file {str(args.file)!r}: {exc}")
    if not inputs:
        parser.error("give at least one input (arguments or --file)")
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    from fedpipe_core.data import task_prompt  # the model stack (torch) once the arguments are good
    from fedpipe_core.evaluate import generate, global_model
    from fedpipe_core.task import load_task

    try:
        config, delta = load_run(args.run_dir, args.which)
        task = load_task(config)
    except ConfigError as exc:
        print(f"fedpipe-generate: {exc}", file=sys.stderr)
        return 2
    model = global_model(task, {} if args.base else delta)
    prompts = [task_prompt(config.task, text) for text in inputs]
    outputs = generate(model, task.tokenizer, prompts, args.max_new_tokens, one_line=config.task == "e2e")
    for text, output in zip(inputs, outputs):
        print(f"{text} -> {output}")
    print(json.dumps([{"input": text, "output": output} for text, output in zip(inputs, outputs)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
