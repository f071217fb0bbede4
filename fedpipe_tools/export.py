"""``fedpipe-export RUN_DIR --format peft|merged --out DIR``: a finished run's model for peft and transformers.

``peft`` writes a LoRA adapter directory of the global ΔW (``PeftModel.from_pretrained(base, DIR)``): each
module's ΔW as its truncated SVD, at ``--rank`` or at the smallest rank whose relative Frobenius error
is at most ``--max-error``; the rank and error per module are printed and kept in
``fedpipe_export.json``. ``merged`` writes base + ΔW with the tokenizer
(``AutoModelForCausalLM.from_pretrained(DIR)``). ``--which best`` exports the round with the lowest eval
loss instead of the last. Both write a model card (``README.md``: base model and source, prompt template,
strategy, rounds, sites, per-site and federated scores, run config, site data hashes). Everything is read
from local files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fedpipe_core.config import ConfigError
from fedpipe_core.results import DEFAULT_MAX_ERROR, WHICH, load_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory (<output-dir>/<run-id>)")
    parser.add_argument("--format", choices=("peft", "merged"), required=True, help="a peft LoRA adapter or a merged model")
    parser.add_argument("--out", type=Path, required=True, help="the directory to write (must not exist or be empty)")
    parser.add_argument("--rank", type=int, help="peft: the rank of every module (default: chosen by --max-error)")
    parser.add_argument(
        "--max-error",
        type=float,
        default=DEFAULT_MAX_ERROR,
        help=f"peft: largest relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F when the rank is chosen (default {DEFAULT_MAX_ERROR})",
    )
    parser.add_argument("--which", choices=WHICH, default="last", help="the last round's model (default) or the best round's")
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {str(args.out)!r} exists and is not an empty directory")
    from fedpipe_core.export import export_merged, export_peft  # the model stack (torch) once the arguments are good
    from fedpipe_core.model_card import adapter_section, model_card
    from fedpipe_core.task import load_task

    try:
        config, delta = load_run(args.run_dir, args.which)
        task = load_task(config)
        args.out.mkdir(parents=True, exist_ok=True)
        if args.format == "merged":
            export_merged(task, delta, args.out)
            (args.out / "README.md").write_text(model_card(args.run_dir, config, args.which, args.format))
            print(f"merged model ({len(delta)} modules with ΔW) in {args.out}")
            print(json.dumps({"format": "merged", "out": str(args.out), "modules": len(delta)}))
            return 0
        report = export_peft(task, delta, args.out, args.rank, args.max_error)
        adapter = adapter_section(report, config, args.max_error, args.rank)
        (args.out / "README.md").write_text(model_card(args.run_dir, config, args.which, args.format, adapter))
    except (ConfigError, ValueError) as exc:
        print(f"fedpipe-export: {exc}", file=sys.stderr)
        return 2
    for module in report:
        print(f"{module.module}: rank {module.rank} of {module.delta_rank}, relative error {module.rel_error:.2e}")
    worst = max(m.rel_error for m in report)
    print(f"peft adapter ({len(report)} modules, largest relative error {worst:.2e}) in {args.out}")
    print(json.dumps({"format": "peft", "out": str(args.out), "modules": len(report), "max_rel_error": worst}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
