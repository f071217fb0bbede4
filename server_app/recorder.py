"""What a run leaves behind as it goes: per-round metrics, running totals, checkpoints, and resuming."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

from flwr.common import log

from fedpipe_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpipe_core.evaluate import evaluate_validation
from fedpipe_core.results import RunWriter
from server_app.strategy import FlowerAdapter


@dataclass
class Totals:
    """Running totals over the rounds done so far (a resumed run starts from the checkpoint's)."""

    bytes_up: int = 0
    bytes_down: int = 0
    sim_time_s: float = 0.0


@dataclass
class RunRecorder:
    """Owns ``<output-dir>/<run-id>/`` for one run: evaluates and records every round, checkpoints it."""

    writer: RunWriter
    adapter: FlowerAdapter
    totals: Totals = field(default_factory=Totals)
    started: float = field(default_factory=time.time)
    resumed_row: dict | None = None
    """The checkpoint round's metrics row of a resumed run (its round 0 is not evaluated again)."""

    def resume(self, previous: Path) -> None:
        """Continue a stopped run from its last checkpoint: strategy state, totals, history and round offset."""
        strategy = self.adapter.strategy
        checkpoint = load_checkpoint(previous, strategy.task.config)
        strategy.load_state_dict(checkpoint.state, checkpoint.tensors)
        self.adapter.round_offset = checkpoint.round
        self.totals = Totals(**checkpoint.totals)
        for name in ("metrics.jsonl", "plans.jsonl"):
            if (previous / name).is_file():
                rows = [json.loads(line) for line in (previous / name).read_text().splitlines() if line.strip()]
                kept = [r for r in rows if r["round"] <= checkpoint.round]
                (self.writer.dir / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
                if name == "metrics.jsonl":
                    self.resumed_row = next((r for r in kept if r["round"] == checkpoint.round), None)
        log(INFO, "FedPipe: resuming %s after round %d", previous, checkpoint.round)

    def round_done(self, flower_round: int) -> dict[str, float]:
        """Flower's round ``flower_round`` is over: evaluate, record, checkpoint; the metrics row."""
        if flower_round == 0 and self.resumed_row is not None:  # the checkpoint's round: evaluated and recorded already
            return self.resumed_row
        server_round = self.adapter.run_round(flower_round)
        row = self._evaluate(server_round)
        strategy = self.adapter.strategy
        state, tensors = strategy.state_dict()
        save_checkpoint(
            self.writer.dir, Checkpoint(server_round, tensors, state, vars(self.totals).copy(), strategy.task.config.to_mapping())
        )
        return row

    def _evaluate(self, server_round: int) -> dict[str, float]:
        """Evaluate base + global ΔW on the validation split, log one line, append to metrics.jsonl."""
        strategy = self.adapter.strategy
        loss = evaluate_validation(strategy.task, strategy.global_delta())
        stats = self.adapter.stats.get(server_round)
        row = {
            "round": server_round,
            "eval_loss": loss.loss,
            "ppl": loss.ppl,
            "train_loss": stats.train_loss if stats else None,
            "clients": stats.clients if stats else 0,
            "client_steps": stats.client_steps if stats else 0,
            "rejected": stats.rejected if stats else 0,
            "bytes_up": stats.bytes_up if stats else 0,
            "bytes_down": stats.bytes_down if stats else 0,
            "left_out": stats.left_out if stats else 0,
            "round_sim_s": stats.sim_time_s if stats else 0.0,
            "sim_time_s": self.totals.sim_time_s + (stats.sim_time_s if stats else 0.0),
            "wall_s": time.time() - self.started,
            **(stats.node_overhead() if stats else {}),
            "node_memory": stats.node_memory() if stats else {},
        }
        self.totals.bytes_up += row["bytes_up"]
        self.totals.bytes_down += row["bytes_down"]
        self.totals.sim_time_s = row["sim_time_s"]
        self.writer.append_metrics(row)
        log(
            INFO,
            "FedPipe round %d/%d | eval loss %.4f (ppl %.2f) | clients %d | up %s down %s | sim %.1f s | %.1f s",
            server_round,
            strategy.task.config.num_server_rounds,
            loss.loss,
            loss.ppl,
            row["clients"],
            _mb(row["bytes_up"]),
            _mb(row["bytes_down"]),
            row["sim_time_s"],
            row["wall_s"],
        )
        return row

    def summary(self) -> dict[str, object]:
        """Totals of the whole run for summary.json."""
        return {
            "trainable_params": self.adapter.trainable_params(),
            "total_bytes_up": self.totals.bytes_up,
            "total_bytes_down": self.totals.bytes_down,
            "total_bytes": self.totals.bytes_up + self.totals.bytes_down,
            "sim_time_s": self.totals.sim_time_s,
            "rounds": self.adapter.config.num_server_rounds,
            "wall_s": time.time() - self.started,
        }


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f} MB"
