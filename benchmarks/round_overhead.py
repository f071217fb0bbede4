"""Where a simulated round's wall time goes, from a finished run's metrics.jsonl.

    python benchmarks/round_overhead.py RUN_DIR [--workers 2]

Per round: wall seconds (between round ends), the server's planning, the message exchange (TRAIN messages out
to replies back), the server's evaluation, and the rest (recording, checkpoint, Flower's own work between
rounds). The nodes' work as Ray schedules it is the makespan of their handler seconds (training + setup +
start-up) over ``--workers`` actors, longest first. The ratio wall ÷ (makespan + planning + evaluation) says how
much a round costs beyond that work; its last line is one JSON object with the per-round ratios and their mean.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import statistics
from pathlib import Path

from fedpipe_tools.run_report import read_jsonl


def makespan(seconds: list[float], workers: int) -> float:
    """Longest-first list scheduling of jobs of these durations on ``workers`` identical workers (Ray's actors)."""
    loads = [0.0] * max(1, workers)
    for job in sorted(seconds, reverse=True):
        heapq.heapreplace(loads, loads[0] + job)
    return max(loads)


def rounds(run: Path, workers: int) -> list[dict[str, float]]:
    """Per round ≥ 1: wall, planning, exchange, evaluation, node makespan, the rest and the ratio."""
    rows = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["round"])
    out = []
    for before, row in zip(rows, rows[1:]):
        if "client_handler_s" not in row:
            raise SystemExit(f"{run}: round {row['round']} has no client_handler_s (a run from before this script)")
        wall = row["wall_s"] - before["wall_s"]
        plan, exchange, evaluation = (row.get(k, 0.0) for k in ("server_plan_s", "exchange_s", "server_eval_s"))
        nodes = makespan(list(row["client_handler_s"].values()), workers)
        work = nodes + plan + evaluation
        out.append(
            {
                "round": row["round"],
                "wall_s": wall,
                "plan_s": plan,
                "exchange_s": exchange,
                "node_makespan_s": nodes,
                "eval_s": evaluation,
                "rest_s": wall - plan - exchange - evaluation,
                "ratio": wall / work if work else float("nan"),
            }
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, (os.cpu_count() or 1) // 2),
        help="Ray actors: CPUs ÷ client-resources-num-cpus (default: CPUs ÷ 2, Flower's default num-cpus)",
    )
    args = parser.parse_args()
    table = rounds(args.run, args.workers)
    print("round | wall s | plan s | exchange s | node makespan s | eval s | rest s | wall ÷ work")
    for r in table:
        print(
            f"{r['round']:5d} | {r['wall_s']:6.1f} | {r['plan_s']:6.2f} | {r['exchange_s']:10.1f} | "
            f"{r['node_makespan_s']:15.1f} | {r['eval_s']:6.1f} | {r['rest_s']:6.1f} | {r['ratio']:.2f}"
        )
    ratios = [r["ratio"] for r in table]
    print(json.dumps({"ratios": ratios, "mean_ratio": statistics.fmean(ratios) if ratios else None, "workers": args.workers}))


if __name__ == "__main__":
    main()
