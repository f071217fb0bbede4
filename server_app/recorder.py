"""What a run leaves behind as it goes: per-round metrics, running totals, checkpoints, and resuming."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.common import log

from fedpipe_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpipe_core.device import host_facts
from fedpipe_core.evaluate import evaluate_validation
from fedpipe_core.protocol import MODELS, FinalReply
from fedpipe_core.results import RESULTS_VERSION, RunWriter
from server_app.strategy import FlowerAdapter, site_mean


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
    pending: dict | None = None
    """The last round's row, waiting for the sites' evaluation of its model (``eval.where`` = sites or both)."""
    pending_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """That round's final ΔW, kept in case its model turns out the best."""
    last_round: int = 0
    """The last round finished (fewer than ``num-server-rounds`` when the time budget stopped the run)."""
    best: tuple[float, int] | None = None
    """(loss, round) of the best model so far: federated eval loss when the sites evaluate, else the server's."""

    def resume(self, previous: Path) -> None:
        """Continue a stopped run from its last checkpoint: strategy state, totals, history and round offset."""
        strategy = self.adapter.strategy
        checkpoint = load_checkpoint(previous, strategy.task.config)
        strategy.load_state_dict(checkpoint.state, checkpoint.tensors)
        self.adapter.round_offset = checkpoint.round
        self.totals = Totals(**checkpoint.totals)
        self.adapter.sim_time_s = self.totals.sim_time_s
        for name in ("metrics.jsonl", "plans.jsonl"):
            if (previous / name).is_file():
                rows = [json.loads(line) for line in (previous / name).read_text().splitlines() if line.strip()]
                kept = [r for r in rows if r["round"] <= checkpoint.round]
                (self.writer.dir / name).write_text("".join(json.dumps(r) + "\n" for r in kept))
                if name == "metrics.jsonl":
                    self.resumed_row = next((r for r in kept if r["round"] == checkpoint.round), None)
        log(INFO, "FedPipe: resuming %s after round %d", previous, checkpoint.round)

    def round_done(self, flower_round: int) -> dict[str, float]:
        """Flower's round ``flower_round`` is over: evaluate, record, checkpoint; the metrics row.

        With the sites evaluating, this round's replies carry their evaluation of the previous round's model,
        which completes that round's row; this round's row waits for the next round's (or the final) replies.
        """
        if flower_round == 0 and self.resumed_row is not None:  # the checkpoint's round: evaluated and recorded already
            self.last_round = self.resumed_row["round"]
            return self.resumed_row
        server_round = self.adapter.run_round(flower_round)
        self.last_round = server_round
        stats = self.adapter.stats.get(server_round)
        if self.pending is not None:
            self._complete(stats.site_eval if stats else {}, stats.secure_eval if stats else None)
        delta = self.adapter.strategy.final_delta()  # the model the run would save at this round: evaluated and kept
        row = self._evaluate(server_round, delta)
        cfg = self.adapter.config
        if cfg.sites_evaluate and cfg.evaluated(server_round):
            self.pending = row
            self.pending_delta = {k: v.clone() for k, v in delta.items()} if server_round else {}
        else:
            self._write(row, delta if server_round else {})
        strategy = self.adapter.strategy
        state, tensors = strategy.state_dict()
        save_checkpoint(
            self.writer.dir, Checkpoint(server_round, tensors, state, vars(self.totals).copy(), strategy.task.config.to_mapping())
        )
        return row

    def finish(self, final: dict[int, FinalReply]) -> None:
        """The sites' final replies complete the last round's row (their evaluation of the final model)."""
        if self.pending is not None:
            self._complete({n: (r.eval_loss, r.eval_examples) for n, r in final.items() if r.eval_loss is not None})

    def _complete(self, site_eval: dict[int, tuple[float, int]], aggregate: tuple[float, int] | None = None) -> None:
        """Add the sites' evaluation to the waiting row, log it, and write the row. ``aggregate``: a secure round's
        (loss, examples), known only summed over the sites (the row then has no per-site losses)."""
        row, delta = self.pending, self.pending_delta
        self.pending, self.pending_delta = None, {}
        mean, per_site = (aggregate[0], {}) if aggregate else site_mean(site_eval)
        row["federated_eval_loss"], row["site_eval"] = mean, per_site
        if mean is None:
            log(WARNING, "FedPipe round %d: no site returned an evaluation of its model", row["round"])
        else:
            log(
                INFO,
                "FedPipe round %d/%d | federated eval loss %.4f over %s, %d examples%s",
                row["round"],
                self.adapter.config.num_server_rounds,
                mean,
                f"{len(per_site)} site(s)" if per_site else "the sites (a secure sum)",
                aggregate[1] if aggregate else sum(int(v["examples"]) for v in per_site.values()),
                "".join(f" | {n}: {v['loss']:.4f}" for n, v in per_site.items()),
            )
        self._write(row, delta)

    def _write(self, row: dict, delta: dict[str, torch.Tensor]) -> None:
        """Append the row to metrics.jsonl; keep its model as the best one when its loss is the lowest yet."""
        self.writer.append_metrics(row)
        loss = row.get("federated_eval_loss") if self.adapter.config.sites_evaluate else row.get("eval_loss")
        if row["round"] >= 1 and loss is not None and (self.best is None or loss < self.best[0]):
            self.best = (loss, row["round"])
            self.writer.save_delta(delta, best=True)
            self.writer.note_best(row["round"], loss)

    def _evaluate(self, server_round: int, delta: dict[str, torch.Tensor]) -> dict[str, float]:
        """The round's metrics row; the server evaluates base + ``delta`` on its validation split when it holds data."""
        strategy = self.adapter.strategy
        cfg = strategy.task.config
        started = time.perf_counter()
        loss = evaluate_validation(strategy.task, delta) if cfg.server_evaluates and cfg.evaluated(server_round) else None
        eval_s = time.perf_counter() - started
        stats = self.adapter.stats.get(server_round)
        row = {
            "round": server_round,
            "eval_loss": loss.loss if loss else None,
            "ppl": loss.ppl if loss else None,
            "train_loss": stats.train_loss if stats else None,
            "clients": stats.clients if stats else 0,
            "client_steps": stats.client_steps if stats else 0,
            "examples": stats.num_examples if stats else 0,
            "rejected": stats.rejected if stats else 0,
            "bytes_up": stats.bytes_up if stats else 0,
            "bytes_down": stats.bytes_down if stats else 0,
            "left_out": stats.left_out if stats else 0,
            "round_sim_s": stats.sim_time_s if stats else 0.0,
            "sim_time_s": self.totals.sim_time_s + (stats.sim_time_s if stats else 0.0),
            "wall_s": time.time() - self.started,
            "server_eval_s": eval_s,
            **(stats.node_overhead() if stats else {}),
            "node_memory": stats.node_memory() if stats else {},
            **strategy.round_record(server_round),
            **(
                {"site_epsilon": {str(n): e for n, e in sorted(stats.site_epsilon.items())}}
                if stats and stats.site_epsilon
                else {}
            ),
        }
        self.totals.bytes_up += row["bytes_up"]
        self.totals.bytes_down += row["bytes_down"]
        self.totals.sim_time_s = row["sim_time_s"]
        self.adapter.sim_time_s = self.totals.sim_time_s
        log(
            INFO,
            "FedPipe round %d/%d | eval loss %s | clients %d | up %s down %s | sim %.1f s | %.1f s",
            server_round,
            cfg.num_server_rounds,
            f"{loss.loss:.4f} (ppl {loss.ppl:.2f})" if loss else "at the sites",
            row["clients"],
            _mb(row["bytes_up"]),
            _mb(row["bytes_down"]),
            row["sim_time_s"],
            row["wall_s"],
        )
        if row.get("site_epsilon"):
            log(INFO, "FedPipe round %d | ε spent per site: %s", server_round, row["site_epsilon"])
        return row

    def summary(self) -> dict[str, object]:
        """Totals of the whole run for summary.json."""
        return {
            "trainable_params": self.adapter.trainable_params(),
            "total_bytes_up": self.totals.bytes_up,
            "total_bytes_down": self.totals.bytes_down,
            "total_bytes": self.totals.bytes_up + self.totals.bytes_down,
            "sim_time_s": self.totals.sim_time_s,
            "rounds": self.last_round,
            "wall_s": time.time() - self.started,
            "results_version": RESULTS_VERSION,
            "server_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
            "host": host_facts(),
            **({"best_round": self.best[1], "best_loss": self.best[0]} if self.best else {}),
        }


def _mb(num_bytes: int) -> str:
    return f"{num_bytes / 1e6:.2f} MB"


def site_summary(final: dict[int, FinalReply]) -> dict[str, object]:
    """summary.json's ``sites`` (per node: the final model's scores, its ``base`` and ``local_only`` scores, counts and
    the data hash it reported) and ``federated`` (per model, the test-example-weighted mean of each score)."""
    sites: dict[str, dict[str, object]] = {}
    for node, reply in final.items():
        site: dict[str, object] = {**reply.scores.get("federated", {}), "examples": reply.test_examples}
        site |= {model: scores for model, scores in reply.scores.items() if model != "federated"}
        site |= {"eval_loss": reply.eval_loss, "eval_examples": reply.eval_examples, "data_hash": reply.data_hash}
        if reply.note:
            site["note"] = reply.note
        sites[str(node)] = site
    scored = {n: r for n, r in final.items() if r.scores and r.test_examples}
    total = sum(r.test_examples for r in scored.values())
    federated: dict[str, object] = {"sites": len(scored), "examples": total}
    for model in MODELS:
        metrics = sorted(set.intersection(*(set(r.scores.get(model, {})) for r in scored.values()))) if scored else []
        means = {
            m: sum(r.scores[model][m] for r in scored.values())  # counts add up
            if m.startswith("scored_")
            else sum(r.scores[model][m] * r.test_examples for r in scored.values()) / total
            for m in metrics
        }
        if means:
            federated |= means if model == "federated" else {model: means}
    return {"sites": sites, "federated": federated}
