"""Memory benchmark: what each base precision holds and what one client round really takes.

For the default model and a ~1.1B-parameter LLaMA (TinyLlama-1.1B's architecture, random weights,
written once into the cache: no download), at FP32, FP16, NF8 and NF4, one client round at batch 1
and the run config's sequence length, each in a fresh process:

- ``base_bytes``: the frozen block linear weights as stored (codes + block scales);
- ``model_bytes``: every parameter and buffer as held;
- ``peak_bytes``: the round's measured peak (the train reply's figure), beside the cost model's
  ``predicted_bytes``;
- ``step_s``: seconds per optimizer step, beside ``step_flops``, the cost model's FLOPs of one step at the
  sequence cap (so ``step_flops / step_s`` is an upper bound of the FLOPS the step achieved);
- ``eval_loss``: validation loss after the round (default model).

``--device cuda`` runs the rounds on the GPU (bitsandbytes' CUDA kernels, activations in BF16/FP16,
the peak from CUDA's allocator and the prediction at 2 bytes per activation); ``--no-evaluate`` skips
the eval loss (for a checkpoint whose weights are not the pretrained ones).

Targets, fixed before the runs: NF4 base_bytes ≤ 0.16 × FP32's; NF4 peak on the 1.1B model ≤ 0.35 ×
FP32's; NF4 eval loss within 3% of FP32's after the same steps. Prints a table, then the ratios
against those targets, and as its last line one JSON object
``{model: {precision: {base_bytes, model_bytes, peak_bytes, predicted_bytes, step_s, step_flops, eval_loss}}}``.

    python benchmarks/memory.py [--models default,tinyllama-1.1b] [--steps 3] [--device cpu|cuda] [--no-evaluate]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "nf8", "nf4")
TARGETS = {"base_nf4_over_fp32": 0.16, "peak_nf4_over_fp32_1b": 0.35, "eval_loss_nf4_vs_fp32": 0.03}


def _checkpoint(model: str) -> str:
    """The run config's model.name for a benchmark model (the random 1.1B is written on first use)."""
    if model == "default":
        return "smollm2-135m"
    from transformers import LlamaConfig

    from fedpipe_core.model import default_cache_dir
    from fedpipe_tools.checkpoints import TINYLLAMA_1B, builtin_vocab_size, write_random_checkpoint

    target = default_cache_dir() / "models" / f"{model}-random"
    config = LlamaConfig(vocab_size=builtin_vocab_size(), **TINYLLAMA_1B)
    return str(write_random_checkpoint(target, config))


def measure_one(model_name: str, precision: str, steps: int, evaluate: bool, device: str = "cpu") -> dict[str, float]:
    """One client round in this process (called in a fresh process per measurement)."""
    import time

    from fedpipe_core.codec import decode_factors
    from fedpipe_core.config import RunConfig
    from fedpipe_core.cost import peak_memory, step_flops
    from fedpipe_core.device import compute_dtype, resolve_device
    from fedpipe_core.local import adapter_scaling, lora_alphas, run_client_round
    from fedpipe_core.lora import attach_lora, set_lora_factors
    from fedpipe_core.node.state import node_base
    from fedpipe_core.qlinear import place, stored_bytes
    from fedpipe_core.structure import block_linears
    from fedpipe_core.task import client_examples, load_task

    task = load_task(RunConfig(model=model_name, eval_examples=48))
    cfg, ranks = task.config, task.uniform_ranks()
    where = resolve_device(device)
    with tempfile.TemporaryDirectory() as state:
        model, _ = node_base(task, Path(state), {}, 0, 0, precision, device=where)
        base_bytes = sum(stored_bytes(module) for _, module in block_linears(model))
        started = time.perf_counter()
        out = run_client_round(
            task,
            model=model,
            examples=client_examples(task, 0, 2),
            ranks=ranks,
            initial_factors=None,
            seed=cfg.seed,
            batch_size=1,
            local_steps=steps,
            device=where,
        )
        del model
        result = {
            "base_bytes": base_bytes,
            "model_bytes": out.model_bytes,
            "peak_bytes": out.peak_bytes,
            "predicted_bytes": peak_memory(task.spec, ranks, 1, cfg.max_seq_len, precision, compute_dtype(where).itemsize),
            "step_s": out.train_s / steps,
            "step_flops": step_flops(task.spec, ranks, 1, cfg.max_seq_len),
            "round_s": time.perf_counter() - started,
        }
        if evaluate:
            from fedpipe_core.evaluate import evaluate_loss  # the metrics' packages only where there is evaluation

            model, _ = node_base(task, Path(state), {}, 0, 0, precision, device=where)
            peft_model = attach_lora(place(model, where), ranks, lora_alphas(cfg, ranks), cfg.seed)
            set_lora_factors(peft_model, decode_factors(out.arrays, task.shapes, adapter_scaling(cfg)))
            result["eval_loss"] = evaluate_loss(peft_model, task.tokenizer, task.splits["validation"][:48], cfg.max_seq_len).loss
    return result


def _run_fresh(model: str, checkpoint: str, precision: str, steps: int, device: str, evaluate: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--one", checkpoint, precision, "--steps", str(steps), "--device", device]
    if model == "default" and evaluate:
        command.append("--evaluate")
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{model} at {precision} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio_lines(results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = []
    for model, rows in results.items():
        fp32, nf4 = rows.get("fp32"), rows.get("nf4")
        if not (fp32 and nf4):
            continue
        base = nf4["base_bytes"] / fp32["base_bytes"]
        lines.append(f"{model}: NF4 base_bytes / FP32 = {base:.3f} (target ≤ {TARGETS['base_nf4_over_fp32']})")
        peak = nf4["peak_bytes"] / fp32["peak_bytes"]
        target = f" (target ≤ {TARGETS['peak_nf4_over_fp32_1b']})" if model != "default" else ""
        lines.append(f"{model}: NF4 peak_bytes / FP32 = {peak:.3f}{target}")
        lines.append(f"{model}: NF4 step_s / FP32 = {nf4['step_s'] / fp32['step_s']:.2f} (the cost of dequantizing)")
        if "eval_loss" in nf4:
            gap = nf4["eval_loss"] / fp32["eval_loss"] - 1
            lines.append(f"{model}: NF4 eval loss vs FP32 = {gap:+.2%} (target within ±{TARGETS['eval_loss_nf4_vs_fp32']:.0%})")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="default,tinyllama-1.1b", help="comma-separated: default, tinyllama-1.1b")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the measured round")
    parser.add_argument("--device", default="cpu", help="where the rounds run: cpu, cuda or cuda:N")
    parser.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the eval loss")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", dest="one_evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args.one[0], args.one[1], args.steps, args.one_evaluate, args.device)))
        return
    results: dict[str, dict[str, dict[str, float]]] = {}
    columns = f"{'model':<16}{'precision':<10}{'base MB':>9}{'model MB':>10}{'peak MB':>9}{'predicted MB':>14}"
    print(columns + f"{'step s':>8}{'eval loss':>11}")
    for model in args.models.split(","):
        checkpoint = _checkpoint(model)
        for precision in args.precisions.split(","):
            row = results.setdefault(model, {})[precision] = _run_fresh(
                model, checkpoint, precision, args.steps, args.device, args.evaluate
            )
            loss = f"{row['eval_loss']:.4f}" if "eval_loss" in row else "-"
            print(
                f"{model:<16}{precision:<10}{row['base_bytes'] / 1e6:>9.0f}{row['model_bytes'] / 1e6:>10.0f}"
                f"{row['peak_bytes'] / 1e6:>9.0f}{row['predicted_bytes'] / 1e6:>14.0f}{row['step_s']:>8.2f}{loss:>11}",
                flush=True,
            )
    for line in _ratio_lines(results):
        print(line)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
