"""Throughput benchmark: tokens/s of a FedPipe client round against a plain peft + bitsandbytes LoRA training loop.

On the same model, the same batches (the same examples, batch size and sequence cap, collated by the same function)
and the same adapters (every block target at one rank), each run in a fresh process:

- ``fedpipe-nf4``, ``fedpipe-fp16``, ``fedpipe-nf8``: :func:`~fedpipe_core.local.run_client_round` on the node's base
  (:func:`~fedpipe_core.node.state.node_base`) at that precision, importance scoring included; its ``train_s``;
- ``peft-nf4``: the QLoRA recipe, ``from_pretrained`` with bitsandbytes' 4-bit NF4 (compute BF16 on a GPU),
  ``get_peft_model``, AdamW, autocast; ``peft-bf16``: the same model loaded in BF16 (FP32 on the CPU, which has no
  fast BF16 matmul).

The tokens counted are the batches' non-padding tokens; each loop is timed from its optimizer's creation to its last
step, the first (warm-up) steps included in both. Targets, fixed before the runs: tokens/s of ``fedpipe-nf4`` ≥ 0.95 ×
``peft-nf4``'s and of ``fedpipe-fp16`` ≥ 0.95 × ``peft-bf16``'s; the NF8 layer's step time is reported against NF4's
(no target). Prints a table, the ratios, and as its last line one JSON object ``{run: {"tokens_per_s", "step_s",
"tokens", "peak_bytes"}}``.

    python benchmarks/throughput.py [--model tinyllama-1.1b] [--device cuda] [--batch 8] [--seq 512] [--steps 8]
        [--rank 8] [--runs fedpipe-nf4,peft-nf4,...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used: --help stays fast
    import torch

    from fedpipe_core.data import Example
    from fedpipe_core.task import Task

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

RUNS = ("fedpipe-nf4", "peft-nf4", "fedpipe-fp16", "peft-bf16", "fedpipe-nf8")
TARGETS = {"nf4": 0.95, "16-bit": 0.95}
PAIRS = {"nf4": ("fedpipe-nf4", "peft-nf4"), "16-bit": ("fedpipe-fp16", "peft-bf16")}


def load(model: str, batch: int, seq: int, steps: int, rank: int) -> tuple[Task, list[Example]]:
    """The task (its tokenizer, targets and config) and the ``batch × steps`` longest training examples."""
    from fedpipe_core.config import RunConfig
    from fedpipe_core.data import encode
    from fedpipe_core.task import load_task

    task = load_task(RunConfig(model=model, max_seq_len=seq, batch_size=batch, local_steps=steps, lora_rank=rank))
    train = task.splits["train"]
    longest = sorted(train, key=lambda e: len(encode(task.tokenizer, e, seq)[0]), reverse=True)
    return task, longest[: batch * steps]


def tokens_of(task: Task, examples: list[Example], batch: int, steps: int, seed: int) -> int:
    """The non-padding tokens of the batches :func:`~fedpipe_core.train.train_local` draws (the same for every run)."""
    from fedpipe_core.data import collate
    from fedpipe_core.train import batches

    chosen = batches(examples, batch, steps, seed)
    return sum(int(collate(task.tokenizer, b, task.config.max_seq_len)["attention_mask"].sum()) for b in chosen)


def fedpipe_round(task: Task, examples: list[Example], precision: str, device: torch.device) -> tuple[float, int]:
    """Seconds of a FedPipe client round's training and its measured peak bytes."""
    from fedpipe_core.local import run_client_round
    from fedpipe_core.node.state import node_base

    with tempfile.TemporaryDirectory() as state:
        model, _ = node_base(task, Path(state), {}, 0, 0, precision, device=device)
        out = run_client_round(
            task, model=model, examples=examples, ranks=task.uniform_ranks(), initial_factors=None,
            seed=task.config.seed, device=device,
        )  # fmt: skip
    return out.train_s, out.peak_bytes


def peft_loop(task: Task, examples: list[Example], precision: str, device: torch.device) -> tuple[float, int]:
    """Seconds of a plain peft (+ bitsandbytes at NF4) LoRA loop over the same batches, and its peak bytes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from fedpipe_core.data import collate
    from fedpipe_core.device import PeakMemory, autocast, compute_dtype
    from fedpipe_core.local import lora_alphas
    from fedpipe_core.train import batches

    cfg = task.config
    dtype = compute_dtype(device) if device.type == "cuda" else torch.float32
    quantization = None
    if precision == "nf4":
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(
        task.checkpoint, dtype=dtype, quantization_config=quantization, device_map={"": str(device)}, local_files_only=True
    )
    alpha = lora_alphas(cfg, {"all": cfg.lora_rank})["all"]
    lora = LoraConfig(r=cfg.lora_rank, lora_alpha=alpha, target_modules=list(task.targets), lora_dropout=0.0)
    model = get_peft_model(model, lora)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # FP32 adapters, as FedPipe's
    model_bytes = model.get_memory_footprint()
    with PeakMemory(device) as peak:
        started = time.perf_counter()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
        model.train()
        for batch in batches(examples, cfg.batch_size, cfg.local_steps, cfg.seed):
            inputs = {k: v.to(device) for k, v in collate(task.tokenizer, batch, cfg.max_seq_len).items()}
            with autocast(device):
                loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            float(loss.detach())
        train_s = time.perf_counter() - started
    return train_s, peak.peak_bytes(model_bytes)


def measure_one(run: str, model: str, device_name: str, batch: int, seq: int, steps: int, rank: int) -> dict[str, float]:
    """One run in this process (called in a fresh process per run)."""
    from fedpipe_core.device import resolve_device

    device = resolve_device(device_name)
    task, examples = load(model, batch, seq, steps, rank)
    kind, precision = run.split("-")
    if kind == "fedpipe":
        train_s, peak = fedpipe_round(task, examples, precision, device)
    else:
        train_s, peak = peft_loop(task, examples, precision, device)
    tokens = tokens_of(task, examples, batch, steps, task.config.seed)
    return {"tokens_per_s": tokens / train_s, "step_s": train_s / steps, "tokens": tokens, "peak_bytes": peak}


def ratio_lines(results: dict[str, dict[str, float]]) -> list[str]:
    """FedPipe's tokens/s over the plain loop's at NF4 and 16 bits, and the NF8 step over NF4's."""
    lines = []
    for name, (ours, theirs) in PAIRS.items():
        if ours in results and theirs in results:
            ratio = results[ours]["tokens_per_s"] / results[theirs]["tokens_per_s"]
            met = "met" if ratio >= TARGETS[name] else "not met"
            lines.append(f"{name}: {ours} tokens/s ÷ {theirs} = {ratio:.3f} (target ≥ {TARGETS[name]}: {met})")
    if "fedpipe-nf8" in results and "fedpipe-nf4" in results:
        ratio = results["fedpipe-nf8"]["step_s"] / results["fedpipe-nf4"]["step_s"]
        lines.append(f"NF8 step s ÷ NF4 step s = {ratio:.2f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tinyllama-1.1b", help="tinyllama-1.1b or llama2-7b (random, written once), tiny, or a checkpoint"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512, help="sequence cap")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank on every target")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated, of {', '.join(RUNS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = (args.device, args.batch, args.seq, args.steps, args.rank)
    if args.one:
        print(json.dumps(measure_one(args.one, args.model, *shape)))
        return 0
    runs = [r for r in args.runs.split(",") if r]
    if not runs or set(runs) - set(RUNS):
        parser.error(f"--runs {args.runs!r}: comma-separated, of {', '.join(RUNS)}")
    from scale import checkpoint  # the benchmarks' random checkpoints

    model = checkpoint(args.model) if not Path(args.model).is_dir() else args.model
    results: dict[str, dict[str, float]] = {}
    print(f"{'run':<14}{'tokens/s':>10}{'step s':>9}{'tokens':>8}{'peak MB':>9}")
    for run in runs:
        command = [sys.executable, __file__, "--one", run, "--model", model, "--device", args.device, "--batch",
                   str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--rank", str(args.rank)]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{run} failed:\n{done.stderr[-3000:]}")
        row = results[run] = json.loads(done.stdout.strip().splitlines()[-1])
        figures = f"{row['tokens_per_s']:>10.0f}{row['step_s']:>9.3f}{row['tokens']:>8d}{row['peak_bytes'] / 1e6:>9.0f}"
        print(f"{run:<14}{figures}", flush=True)
    for line in ratio_lines(results):
        print(line)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
