"""Benchmark of FedPipe's automation on the embedded model; prints tables and ratios.

    fedpipe-automation [--clients 8] [--instances 10]

1. the plan of each simulated client (profile -> precision, batch size, ranks) in round 1;
2. greedy vs exact MILP objective and search time on random importance instances;
3. NF8/NF4 reconstruction error and base-weight bytes vs FP32;
4. cost model vs measurement (FLOPs vs torch's counter; step time on this CPU);
5. simulated round time: FedPipe plans vs LoRA-FedAvg's uniform plan on the same profiles.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from rich.console import Console
from rich.table import Table

from fedpipe_core.config import RunConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="fedpipe-automation", description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="simulated clients whose round-1 plans are shown (default 8)")
    parser.add_argument(
        "--instances", type=int, default=10, help="random importance instances greedy and the exact MILP solve (default 10)"
    )
    args = parser.parse_args(argv)
    # the model stack (torch, transformers, pulp) once the arguments are good
    from torch.utils.flop_counter import FlopCounterMode

    from fedpipe_core.cost import step_flops
    from fedpipe_core.data import collate
    from fedpipe_core.device import measure
    from fedpipe_core.lora import attach_lora
    from fedpipe_core.quantize import PRECISIONS, quantize
    from fedpipe_core.search import Budget, SearchSpace, batch_sizes, exact, greedy, plan_client, round_budget_s
    from fedpipe_core.strategies.base import deadline_steps
    from fedpipe_core.structure import block_linears
    from fedpipe_core.task import load_task, node_profile

    console = Console()
    cfg = RunConfig()
    task = load_task(cfg)
    spec = task.spec
    space = SearchSpace(cfg.rank_candidates(), cfg.max_seq_len, cfg.local_steps)

    # 1. plans for simulated heterogeneous clients (round 1: no importance yet)
    profiles = [node_profile(task, {}, k) for k in range(args.clients)]
    flops = [p.flops for p in profiles]
    batches = batch_sizes(flops, cfg.batch_min, cfg.batch_size)
    round_time = round_budget_s(spec, space, cfg.batch_size, max(flops))
    importance = {m: 1.0 for m in task.targets}
    table = Table(title="1. round-1 plans, simulated profiles")
    for col in ("client", "memory GiB", "TFLOPS", "precision", "batch", "weights", "ranks", "pred. round s", "mem GiB"):
        table.add_column(col)
    fedpipe_times, fedavg_times = [], []
    for k, (profile, batch) in enumerate(zip(profiles, batches)):
        plan = plan_client(spec, profile, importance, batch, round_time, space)
        t = (plan.local_steps or cfg.local_steps) * plan.step_flops / profile.flops if plan.feasible else float("nan")
        fedpipe_times.append(t)
        fedavg_times.append(
            cfg.local_steps * step_flops(spec, task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len) / profile.flops
        )
        ranks = ",".join(f"{r}x{list(plan.ranks.values()).count(r)}" for r in sorted(set(plan.ranks.values()))) or plan.reason
        table.add_row(
            str(k),
            f"{profile.memory_bytes / 2**30:.2f}",
            f"{profile.flops / 1e12:.1f}",
            plan.precision,
            str(batch),
            str(len(plan.ranks)),
            ranks,
            f"{t:.4f}",
            f"{plan.memory_bytes / 2**30:.2f}",
        )
    console.print(table)

    # 2. greedy vs MILP
    rng = random.Random(0)
    pool = list(task.targets)[-20:]
    sub = type(spec)(**{**spec.__dict__, "modules": {m: spec.modules[m] for m in pool}})
    full = cfg.local_steps * step_flops(sub, {m: max(space.ranks) for m in pool}, cfg.batch_size, cfg.max_seq_len)
    ratios, t_greedy, t_exact = [], [], []
    for _ in range(args.instances):
        imp = {m: rng.random() for m in pool}
        budget = full * rng.uniform(0.9, 0.99)
        start = time.perf_counter()
        g = greedy(sub, imp, cfg.batch_size, space, Budget(budget))
        t_greedy.append(time.perf_counter() - start)
        start = time.perf_counter()
        e = exact(sub, imp, cfg.batch_size, space, Budget(budget))
        t_exact.append(time.perf_counter() - start)
        og, oe = (sum(imp[m] * r for m, r in p.items()) for p in (g, e))
        ratios.append(og / oe if oe else float("nan"))
    console.print(
        f"2. greedy/MILP objective over {args.instances} instances (20 weights, ranks {space.ranks}): "
        f"mean {statistics.mean(ratios):.3f}, min {min(ratios):.3f}; search time per client greedy "
        f"{statistics.mean(t_greedy) * 1e3:.1f} ms, MILP {statistics.mean(t_exact) * 1e3:.0f} ms"
    )

    # 3. quantization of the default model's block linears
    model = task.base_model()
    weights = [m.weight for _, m in block_linears(model)]
    fp32_bytes = sum(w.numel() * 4 for w in weights)
    for precision in PRECISIONS:
        err, size, mag = 0.0, 0, 0.0
        for w in weights:
            q = quantize(w, precision)
            err += float((q.dequantize() - w).abs().sum())
            mag += float(w.abs().sum())
            size += q.nbytes()
        console.print(
            f"3. {precision}: mean abs error {err / sum(w.numel() for w in weights):.2e} "
            f"(relative {err / mag:.4f}), bytes {size / 1e6:.1f} MB = {size / fp32_bytes:.3f} x FP32"
        )

    # 4. cost model vs measurement
    ranks = task.uniform_ranks()
    peft_model = attach_lora(task.base_model(), ranks, cfg.lora_alpha, 0)
    batch = collate(task.tokenizer, task.splits["train"][: cfg.batch_size], cfg.max_seq_len)
    seq = batch["input_ids"].shape[1]
    counter = FlopCounterMode(display=False)
    with counter:
        peft_model(**batch).loss.backward()
    predicted = step_flops(spec, ranks, cfg.batch_size, seq)
    console.print(
        f"4. step FLOPs: predicted {predicted / 1e9:.1f} G, torch counter {counter.get_total_flops() / 1e9:.1f} G, "
        f"ratio {predicted / counter.get_total_flops():.3f}"
    )
    cpu = measure("cpu")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        peft_model(**batch).loss.backward()
        times.append(time.perf_counter() - start)
    console.print(
        f"   step time on this CPU: measured {min(times):.2f} s, predicted {predicted / cpu.flops:.2f} s "
        f"(cost / {cpu.flops / 1e9:.0f} GFLOPS matmul), ratio {predicted / cpu.flops / min(times):.2f}"
    )

    # 5. simulated round time on the same profiles (synchronous: the slowest client)
    fp = max(t for t in fedpipe_times if math.isfinite(t))
    fa = max(fedavg_times)
    console.print(f"5. simulated round time: fedpipe {fp:.4f} s, lora-fedavg {fa:.4f} s, lora-fedavg / fedpipe = {fa / fp:.2f}x")

    # 6. a round deadline instead: lora-fedavg clients do only the steps that fit in fedpipe's round time
    uniform = step_flops(spec, task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len)
    steps = [deadline_steps(uniform / f, cfg.local_steps, fp) for f in flops]
    console.print(
        f"6. round-deadline-s={fp:.4f} (fedpipe's round): lora-fedavg local steps per client {steps} of {cfg.local_steps} "
        f"({sum(steps)} of {cfg.local_steps * len(steps)} steps, {sum(s == 0 for s in steps)} clients left out)"
    )


if __name__ == "__main__":
    main()
