"""FedPipe ServerApp: run the chosen strategy, evaluate the global model each round, write results."""

from __future__ import annotations

import json
import time
from logging import ERROR, INFO
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedpipe_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.model import default_cache_dir
from fedpipe_core.results import RunWriter
from fedpipe_core.state import remove_run_states
from fedpipe_core.task import evaluate_validation, load_task, score_test
from server_app.peers import STRATEGIES
from server_app.records import from_record, to_record
from server_app.strategy import LoRAStrategy

app = ServerApp()


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f} MB"


def trainable_params(strategy: LoRAStrategy) -> float:
    """Mean parameters a client trained in the last round (adapters: Σ r · (out + in))."""
    if not strategy.stats:
        return 0.0
    last = list(strategy.stats[max(strategy.stats)].ranks.values())
    if not last:
        return 0.0
    return sum(strategy.trainable_params(plan) for plan in last) / len(last)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, federate, and leave ``runs/<run-id>/`` behind."""
    try:
        config = RunConfig.from_mapping(context.run_config)
        task = load_task(config)
    except ConfigError as exc:
        log(ERROR, "FedPipe: %s", exc)
        raise SystemExit(f"FedPipe: {exc}") from None
    out_root = Path(config.output_dir).expanduser().resolve()
    writer = RunWriter(out_root, str(context.run_id))
    strategy = STRATEGIES[config.strategy](task, plan_log=writer.dir / "plans.jsonl")
    writer.write_config(config, **{"run-id": context.run_id, "checkpoint": str(task.checkpoint), "target-modules": list(task.targets)})
    log(INFO, "FedPipe: run %s, strategy %s, model %s, task %s -> %s", context.run_id, config.strategy, config.model, config.task, writer.dir)
    started = time.time()
    totals = {"bytes_up": 0, "bytes_down": 0, "sim_time_s": 0.0}
    initial, resumed = strategy.initial_arrays(), None
    if config.resume_from:
        try:
            initial, resumed = _resume(strategy, Path(config.resume_from).expanduser(), writer, totals)
        except ConfigError as exc:
            log(ERROR, "FedPipe: %s", exc)
            raise SystemExit(f"FedPipe: {exc}") from None

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        if server_round == 0 and resumed is not None:  # the checkpoint's round: evaluated and recorded already
            return MetricRecord({"eval-loss": resumed["eval_loss"], "ppl": resumed["ppl"]})
        server_round += strategy.round_offset
        result = _evaluate_round(strategy, server_round, arrays, writer, totals, started)
        _checkpoint(strategy, server_round, arrays, writer, totals)
        return MetricRecord({"eval-loss": result["eval_loss"], "ppl": result["ppl"]})

    result = strategy.start(
        grid,
        initial,
        num_rounds=config.num_server_rounds - strategy.round_offset,
        timeout=config.round_timeout_s,
        evaluate_fn=evaluate_fn,
    )
    final_delta = strategy.global_delta(result.arrays if len(result.arrays) else initial)
    writer.save_delta(final_delta)
    removed = remove_run_states(default_cache_dir(config.cache_dir), context.run_id)
    if removed:
        log(INFO, "FedPipe: removed the node state of this run on this machine (%s)", removed)
    log(INFO, "FedPipe: scoring the final model on the test split")
    summary: dict[str, object] = dict(score_test(task, final_delta))
    if config.eval_base_generation:
        log(INFO, "FedPipe: scoring the base model on the test split")
        summary["base"] = score_test(task, {})
    summary.update(
        trainable_params=trainable_params(strategy),
        total_bytes_up=totals["bytes_up"],
        total_bytes_down=totals["bytes_down"],
        total_bytes=totals["bytes_up"] + totals["bytes_down"],
        sim_time_s=totals["sim_time_s"],
        rounds=config.num_server_rounds,
        wall_s=time.time() - started,
    )
    writer.write_summary(summary)
    log(INFO, "FedPipe: summary %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k != "base"})


def _resume(strategy: LoRAStrategy, previous: Path, writer: RunWriter, totals: dict[str, float]) -> tuple[ArrayRecord, dict | None]:
    """Continue a stopped run from its last checkpoint: strategy state, totals and history.

    Returns the global arrays and the metrics row of the checkpoint's round (None if the
    previous run's metrics.jsonl lacks it; that round is then evaluated again).
    """
    checkpoint = load_checkpoint(previous, strategy.task.config)
    strategy.load_state_dict(checkpoint.state, checkpoint.tensors)
    strategy.round_offset = checkpoint.round
    totals.update(checkpoint.totals)
    last = None
    for name in ("metrics.jsonl", "plans.jsonl"):
        if (previous / name).is_file():
            rows = [json.loads(line) for line in (previous / name).read_text().splitlines() if line.strip()]
            kept = [r for r in rows if r["round"] <= checkpoint.round]
            (writer.dir / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
            if name == "metrics.jsonl":
                last = next((r for r in kept if r["round"] == checkpoint.round), None)
    log(INFO, "FedPipe: resuming %s after round %d", previous, checkpoint.round)
    return to_record(checkpoint.arrays), last


def _checkpoint(strategy: LoRAStrategy, server_round: int, arrays: ArrayRecord, writer: RunWriter, totals: dict[str, float]) -> None:
    state, tensors = strategy.state_dict()
    config = strategy.task.config.to_mapping()
    save_checkpoint(writer.dir, Checkpoint(server_round, from_record(arrays), tensors, state, dict(totals), config))


def _evaluate_round(
    strategy: LoRAStrategy, server_round: int, arrays: ArrayRecord, writer: RunWriter, totals: dict[str, int], started: float
) -> dict[str, float]:
    """Evaluate base + global ΔW on the validation split, log one line, append to metrics.jsonl."""
    loss = evaluate_validation(strategy.task, strategy.global_delta(arrays))
    stats = strategy.stats.get(server_round)
    row = {
        "round": server_round,
        "eval_loss": loss.loss,
        "ppl": loss.ppl,
        "train_loss": stats.train_loss if stats else None,
        "clients": stats.clients if stats else 0,
        "rejected": stats.rejected if stats else 0,
        "bytes_up": stats.bytes_up if stats else 0,
        "bytes_down": stats.bytes_down if stats else 0,
        "left_out": stats.left_out if stats else 0,
        "round_sim_s": stats.sim_time_s if stats else 0.0,
        "sim_time_s": totals["sim_time_s"] + (stats.sim_time_s if stats else 0.0),
        "wall_s": time.time() - started,
        **(stats.node_overhead() if stats else {}),
    }
    totals["bytes_up"] += row["bytes_up"]
    totals["bytes_down"] += row["bytes_down"]
    totals["sim_time_s"] = row["sim_time_s"]
    writer.append_metrics(row)
    log(
        INFO,
        "FedPipe round %d/%d | eval loss %.4f (ppl %.2f) | clients %d | up %s down %s | sim %.1f s | %.1f s",
        server_round, strategy.task.config.num_server_rounds, loss.loss, loss.ppl, row["clients"],
        _mb(row["bytes_up"]), _mb(row["bytes_down"]), row["sim_time_s"], row["wall_s"],
    )
    return row
