"""The one Flower Strategy: sampling, discovery, messages, reply validation and byte counts.

Everything a strategy *decides* (plans, payloads, how updates combine, the global ΔW) is the
Flower-free :class:`fedpipe_core.strategies.base.Strategy` it wraps; this adapter only moves it
over Flower's Grid and keeps the round's accounting (:class:`RoundStats`, ``plans.jsonl``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy as FlowerStrategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpipe_core.codec import encode_dense
from fedpipe_core.config import RunConfig
from fedpipe_core.plan import Plan
from fedpipe_core.protocol import FinalInstruction, FinalReply, TrainReply, UpdateError
from fedpipe_core.secagg import SecAggError
from fedpipe_core.secure_round import Layout, ServerRound, fixed_point
from fedpipe_core.strategies.base import Strategy, Updates
from fedpipe_flower.messages import (
    final_message,
    profile_query,
    read_final_reply,
    read_profile,
    read_query_timing,
    read_train_reply,
    to_record,
    train_message,
)
from fedpipe_flower.secure import MASKED
from server_app.secure_rounds import close_round, open_round


class RunEnds(Exception):
    """The run stops before its last round; the message says why (its rounds done so far are kept and scored)."""


class TimeBudgetSpent(RunEnds):
    """The next round would end past ``strategy.time-budget-s``: the run stops before it."""


class PrivacySpent(RunEnds):
    """Every node of the round refused it for want of privacy budget: no site can train any more."""


PRIVACY_REFUSAL = "privacy budget"
"""How a node's refusal of a round that would take it past its ε begins (:class:`fedpipe_core.privacy.PrivacyBudgetSpent`)."""


@dataclass
class RoundStats:
    """What one round moved and who took part."""

    bytes_down: int = 0
    bytes_up: int = 0
    clients: int = 0
    rejected: int = 0
    left_out: int = 0
    train_loss: float = math.nan
    num_examples: int = 0
    client_steps: int = 0
    """Σ over the nodes that replied of the local steps they did."""
    sim_time_s: float = 0.0
    ranks: dict[int, dict[str, int]] = field(default_factory=dict)
    timing: dict[int, dict[str, float]] = field(default_factory=dict)
    phases: dict[int, dict[str, float]] = field(default_factory=dict)
    """Each node's reported handler phases (:attr:`~fedpipe_core.protocol.TrainReply.phases`)."""
    """Per node: seconds of local training and of the node's own overhead around it (setup, process start)."""
    memory: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per node: the cost model's predicted peak and, once it replied, the measured peak and the model's bytes."""
    query_s: dict[int, float] = field(default_factory=dict)
    """Per node profiled this round: seconds its QUERY reply cost it (process start-up + handler)."""
    site_eval: dict[int, tuple[float, int]] = field(default_factory=dict)
    """Per node asked to: (loss, examples) of the model the round started from on its validation share."""
    site_epsilon: dict[int, float] = field(default_factory=dict)
    """Per node training with DP-SGD: the ε it reports spent in this run so far."""
    privacy_refused: int = 0
    secure_eval: tuple[float, int] | None = None
    """In a secure round: (loss, examples) of the sites' evaluation, known only as a sum over the sites."""
    started_s: float = 0.0
    """``time.perf_counter()`` when the round's plans began (:meth:`FlowerAdapter.configure_train`)."""
    sent_s: float = 0.0
    """... when its TRAIN messages were handed to Flower."""
    replied_s: float = 0.0
    """... when Flower handed back the replies (:meth:`FlowerAdapter.aggregate_train`)."""

    def node_memory(self) -> dict[str, dict[str, float]]:
        """Per node that replied: precision, predicted and measured peak, model bytes, and measured ÷ predicted."""
        return {
            str(node): {**m, "measured_vs_predicted": m["measured_peak_bytes"] / m["predicted_peak_bytes"]}
            for node, m in sorted(self.memory.items())
            if "measured_peak_bytes" in m and m["predicted_peak_bytes"] > 0
        }

    def node_overhead(self) -> dict[str, float]:
        """Mean seconds per node of training, setup and process start, and the largest (setup + start) / train; the
        server's planning and message exchange; each node's handler seconds (``client_handler_s``)."""
        out = {"client_query_s": sum(self.query_s.values()) / len(self.query_s)} if self.query_s else {}
        if self.replied_s:
            out |= {"server_plan_s": self.sent_s - self.started_s, "exchange_s": self.replied_s - self.sent_s}
        if self.phases:  # per node: its reported phases and timing
            out["client_phases"] = {str(n): {**self.timing.get(n, {}), **p} for n, p in sorted(self.phases.items())}
        if not self.timing:
            return out
        keys = ("train-s", "setup-s", "startup-s")
        out["client_handler_s"] = {str(n): sum(t[k] for k in keys) for n, t in sorted(self.timing.items())}
        out |= {f"client_{k.replace('-', '_')}": sum(t[k] for t in self.timing.values()) / len(self.timing) for k in keys}
        out["client_overhead_ratio"] = max((t["setup-s"] + t["startup-s"]) / t["train-s"] for t in self.timing.values())
        return out


class FlowerAdapter(FlowerStrategy):
    """Runs a :class:`~fedpipe_core.strategies.base.Strategy` over Flower.

    Evaluation (``eval.where``): the server evaluates the global model on data it holds (the recorder's
    ``evaluate_fn``), and/or each site evaluates it on its own validation share. A site's evaluation of the
    global model after round r rides on its TRAIN reply of round r+1 (it has built that model to train on it,
    so no second base is built), and that of the last round on the final EVALUATE reply."""

    def __init__(self, strategy: Strategy, plan_log: Path | None = None, round_offset: int = 0) -> None:
        self.strategy = strategy
        self.plan_log = plan_log
        self.round_offset = round_offset
        """Rounds done before this process (a resumed run): see :meth:`run_round`."""
        self.stats: dict[int, RoundStats] = {}
        self.sim_time_s = 0.0
        """Simulated seconds of the rounds finished so far (the recorder keeps it), against ``time-budget-s``."""
        self.secure_round: tuple[ServerRound, Layout, Grid] | None = None
        """The secure round whose TRAIN replies are awaited (``privacy.mode = secure``)."""

    def run_round(self, flower_round: int) -> int:
        """The run's round number of Flower's round ``flower_round`` (they differ in a resumed run)."""
        return flower_round + self.round_offset

    @property
    def config(self) -> RunConfig:
        return self.strategy.task.config

    def discover(self, grid: Grid, node_ids: list[int], stats: RoundStats) -> None:
        """Ask nodes never profiled for their profile (a QUERY message); failures are logged, costs kept in ``stats``."""
        unseen = [n for n in node_ids if n not in self.strategy.profiles]
        if not unseen:
            return
        for reply in grid.send_and_receive([profile_query(n) for n in unseen], timeout=self.config.round_timeout_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d could not be profiled: %s", node_id, reply.error.reason)
                continue
            try:
                profile, place = read_profile(reply)
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "node %d sent an unusable profile: %s", node_id, exc)
                continue
            self.strategy.profiles[node_id] = profile
            if place is not None:
                self.strategy.places[node_id] = place
            cost = read_query_timing(reply)
            if cost is not None:
                stats.query_s[node_id] = cost

    def draw(self, server_round: int, connected: list[int]) -> list[int]:
        """The round's nodes: every profiled one, or with ``fraction-train`` < 1 that fraction of the connected nodes
        (at least ``min-train-nodes``) drawn from the profiled ones in :meth:`Strategy.ordered` order by a generator
        seeded with the run seed and the round, so two runs of one seed, or a run resumed from its checkpoint, train
        the same nodes each round (Flower's ``sample_nodes`` draws from its global, unseeded generator)."""
        cfg = self.config
        profiled = self.strategy.ordered(n for n in connected if n in self.strategy.profiles)
        wanted = max(cfg.min_train_nodes, math.ceil(len(connected) * cfg.fraction_train))
        if wanted >= len(profiled):
            return profiled
        return random.Random(f"draw:{cfg.seed}:{server_round}").sample(profiled, wanted)

    # --- Flower's Strategy interface ------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round = self.run_round(server_round)
        cfg = self.config
        _, connected = sample_nodes(grid, cfg.min_train_nodes, 0)  # waits until `min-train-nodes` are connected
        stats = RoundStats(started_s=time.perf_counter())
        self.discover(grid, sorted(connected), stats)
        plans = self.strategy.plan_round(server_round, self.draw(server_round, connected))
        self._check_budget(server_round, plans)  # a round that does not run keeps no stats: the run's figures end before it
        self.stats[server_round] = stats
        self._log_plans(server_round, plans)
        for node_id, plan in sorted(plans.items()):
            if not plan.feasible:
                log(WARNING, "round %d: node %d left out: %s", server_round, node_id, plan.reason)
                stats.left_out += 1
                continue
            stats.ranks[node_id] = plan.ranks
            stats.memory[node_id] = {"precision": plan.precision, "predicted_peak_bytes": plan.memory_bytes}
            stats.sim_time_s = max(stats.sim_time_s, plan.local_steps * plan.step_flops / self.strategy.profiles[node_id].flops)
        messages, sizes = [], {}
        evaluate = cfg.sites_evaluate and cfg.evaluated(server_round - 1)  # the model this round starts from
        for node_id, (payload, instruction) in self.strategy.payloads(server_round, plans).items():
            instruction = replace(instruction, evaluate=evaluate, dp_clip=cfg.privacy_clip_norm)
            record = to_record(payload)
            sizes[node_id] = record.count_bytes()
            messages.append(train_message(node_id, record, instruction, config))
        if cfg.secure and messages:
            messages = self._open_secure(grid, server_round, messages, stats)
        stats.bytes_down += sum(sizes[m.metadata.dst_node_id] for m in messages)  # what is sent: not a node dropped before
        stats.sent_s = time.perf_counter()
        return messages

    def _open_secure(self, grid: Grid, server_round: int, messages: list[Message], stats: RoundStats) -> list[Message]:
        """The keys and shares stages; the TRAIN messages of the nodes that dealt their shares."""
        cfg = self.config
        modules = sorted({m for ranks in stats.ranks.values() for m in ranks})
        layout = Layout(tuple((m, self.strategy.task.shapes[m][0]) for m in modules), max(cfg.rank_candidates()))
        rnd, messages = open_round(
            grid, server_round, messages, layout, cfg.privacy_secagg_threshold, cfg.privacy_secagg_range, cfg.round_timeout_s
        )
        self.secure_round = (rnd, layout, grid) if rnd is not None else None
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round = self.run_round(server_round)
        stats = self.stats.setdefault(server_round, RoundStats())
        stats.replied_s = time.perf_counter()
        updates: Updates = {}
        parsed = []
        replies = list(replies)
        if self.secure_round is not None:
            return self._aggregate_secure(server_round, replies, stats)
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if self._failed(server_round, reply, stats):
                continue
            try:
                parsed.append((node_id, *read_train_reply(reply)))
            except UpdateError as exc:
                self._reject(server_round, node_id, exc, stats)
        self.strategy.observe_weight_norms([report.weight_norms for _, _, report, _ in parsed])
        for node_id, arrays, report, size in parsed:
            try:
                update = self.strategy.read_update(arrays, report, stats.ranks.get(node_id))
            except UpdateError as exc:
                self._reject(server_round, node_id, exc, stats)
                continue
            if node_id in updates:
                log(WARNING, "round %d: second reply of node %d rejected: one update per node and round", server_round, node_id)
                stats.rejected += 1
                continue
            stats.bytes_up += size
            updates[node_id] = (update, report)
            self._note_site_eval(server_round, node_id, report.eval_loss, report.eval_examples, stats)
            self._note_report(node_id, report, stats)
        self._check_privacy_spent(server_round, bool(updates), len(replies), stats)
        if not updates:
            log(WARNING, "round %d: no valid update; the global state is unchanged", server_round)
            return None, None
        updates = {n: updates[n] for n in self.strategy.ordered(updates)}  # not arrival order: float sums depend on it
        stats.clients = len(updates)
        stats.num_examples = sum(r.num_examples for _, r in updates.values())  # processed, whatever the updates weigh
        stats.client_steps = sum(r.steps for _, r in updates.values())
        stats.train_loss = sum(r.train_loss * r.num_examples for _, r in updates.values()) / stats.num_examples
        self.strategy.combine(server_round, updates)
        return self._round_result(stats)

    def _reject(self, server_round: int, node_id: int, exc: Exception, stats: RoundStats) -> None:
        """Log and count an update left out of the round; the node gets the whole ΔW history next time."""
        log(WARNING, "round %d: update of node %d rejected: %s", server_round, node_id, exc)
        self.strategy.on_failure(node_id)
        stats.rejected += 1

    def _round_result(self, stats: RoundStats) -> tuple[ArrayRecord, MetricRecord]:
        """What Flower gets back once the strategy has combined the round: the global ΔW and the round's metrics."""
        metrics = MetricRecord({"train-loss": stats.train_loss, "clients": stats.clients, "num-examples": stats.num_examples})
        return to_record(self.strategy.global_arrays()), metrics

    def _failed(self, server_round: int, reply: Message, stats: RoundStats) -> bool:
        """Log and count a reply that is an error (a failure, or a refusal such as a spent privacy budget)."""
        if not reply.has_error():
            return False
        node_id = reply.metadata.src_node_id
        log(WARNING, "round %d: node %d failed: %s", server_round, node_id, reply.error.reason)
        self.strategy.on_failure(node_id)
        stats.rejected += 1
        stats.privacy_refused += str(reply.error.reason).startswith(PRIVACY_REFUSAL)
        return True

    def _note_report(self, node_id: int, report: TrainReply, stats: RoundStats) -> None:
        """What a reply says besides its update: ε spent, timing, phases, measured memory, profile."""
        if report.epsilon_spent is not None:
            stats.site_epsilon[node_id] = report.epsilon_spent
        timing = report.timing()
        if timing is not None:
            stats.timing[node_id] = timing
        if report.phases:
            stats.phases[node_id] = report.phases
        if report.peak_bytes is not None and report.model_bytes is not None:
            stats.memory[node_id] |= {"measured_peak_bytes": report.peak_bytes, "model_bytes": report.model_bytes}
        self.strategy.observe_profile(node_id, report.profile)

    @staticmethod
    def _check_privacy_spent(server_round: int, updated: bool, replied: int, stats: RoundStats) -> None:
        if not updated and replied and stats.privacy_refused == replied:
            raise PrivacySpent(f"round {server_round}: every node refused it, no site has privacy budget left")

    def _aggregate_secure(
        self, server_round: int, replies: list[Message], stats: RoundStats
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """A secure round: the masked uploads summed and unmasked (:func:`close_round`); the strategy gets the sums."""
        rnd, layout, grid = self.secure_round
        self.secure_round = None
        reports: dict[int, TrainReply] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if self._failed(server_round, reply, stats):
                continue
            try:
                arrays, report, size = read_train_reply(reply, masked=True)
                if set(arrays) != {MASKED} or report.state_version is None:
                    raise UpdateError(f"a secure reply carries {MASKED!r} alone and its state version")
                rnd.admit_upload(node_id, arrays[MASKED], layout.size)
            except (UpdateError, SecAggError) as exc:
                self._reject(server_round, node_id, exc, stats)
                continue
            stats.bytes_up += size
            reports[node_id] = report
            self._note_report(node_id, report, stats)
        self._check_privacy_spent(server_round, bool(reports), len(replies), stats)
        words = close_round(grid, rnd, self.config.round_timeout_s) if reports else None
        if words is None:
            for node_id in reports:
                self.strategy.on_failure(node_id)
            log(WARNING, "round %d: no unmasked sum; the global state is unchanged", server_round)
            return None, None
        sent, _ = rnd.survivors()
        sums, weights, tail = layout.unflatten(fixed_point(self.config.privacy_secagg_range, len(rnd.roster)).decode(words))
        stats.clients, stats.num_examples = len(sent), round(tail["examples"])
        stats.client_steps = sum(reports[n].steps for n in sent)
        stats.train_loss = tail["loss-sum"] / tail["examples"]
        if tail["eval-examples"] >= 1:
            stats.secure_eval = (tail["eval-loss-sum"] / tail["eval-examples"], round(tail["eval-examples"]))
        self.strategy.combine_sum(server_round, sums, weights, {n: int(reports[n].state_version) for n in sent})
        return self._round_result(stats)

    def _check_budget(self, server_round: int, plans: dict[int, Plan]) -> None:
        """Raise :class:`TimeBudgetSpent` when this round's slowest planned node would end past the time budget."""
        budget = self.config.time_budget_s
        if budget <= 0:
            return
        round_s = max(
            (p.local_steps * p.step_flops / self.strategy.profiles[n].flops for n, p in plans.items() if p.feasible), default=0.0
        )
        if self.sim_time_s + round_s > budget * (1 + 1e-9):
            raise TimeBudgetSpent(
                f"round {server_round} would end at {self.sim_time_s + round_s:.4g} simulated s, past the time budget of "
                f"{budget:g} s; the run ends after round {server_round - 1}"
            )

    def _note_site_eval(self, server_round: int, node_id: int, loss: float | None, examples: int, stats: RoundStats) -> None:
        """Keep a node's evaluation of the round's start model; a node asked to evaluate that returned none is logged."""
        if loss is not None:
            stats.site_eval[node_id] = (loss, examples)
        elif self.config.sites_evaluate and self.config.evaluated(server_round - 1):
            log(
                WARNING,
                "round %d: node %d returned no evaluation (it holds no validation share); left out of the mean",
                server_round,
                node_id,
            )

    def final_scores(self, grid: Grid, delta: dict, rounds_done: int) -> dict[int, FinalReply]:
        """After the last round: every profiled node still connected scores the final model on its own test share
        (one EVALUATE message each, with the final ΔW); a failed or unusable reply is logged and left out."""
        cfg = self.config
        connected = set(grid.get_node_ids())
        nodes = sorted(n for n in self.strategy.profiles if n in connected)
        instruction = FinalInstruction(
            rounds_done,
            base=cfg.eval_base_generation,
            local_baseline=cfg.eval_local_baseline,
            local_steps=max(1, rounds_done) * cfg.local_steps,  # the local-only model trains as many steps as the run
        )
        record = to_record(encode_dense(delta))
        messages = [final_message(n, record, instruction) for n in nodes]
        out: dict[int, FinalReply] = {}
        for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "final scoring: node %d failed or refused: %s", node_id, reply.error.reason)
                continue
            try:
                out[node_id] = read_final_reply(reply)
            except UpdateError as exc:
                log(WARNING, "final scoring: the scores of node %d are unusable: %s", node_id, exc)
                continue
            if out[node_id].note:
                log(WARNING, "final scoring: node %d: %s", node_id, out[node_id].note)
        return dict(sorted(out.items()))

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the sites' evaluation rides on the next TRAIN reply, the server's is evaluate_fn

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        cfg = self.config
        log(
            INFO,
            "%s: %d target modules, default rank %d, alpha %g",
            self.strategy.name,
            len(self.strategy.task.targets),
            cfg.lora_rank,
            cfg.lora_alpha,
        )

    def trainable_params(self) -> float:
        """Mean parameters a client trained in the last round (adapters: Σ r · (out + in))."""
        last = list(self.stats[max(self.stats)].ranks.values()) if self.stats else []
        return sum(self.strategy.trainable_params(plan) for plan in last) / len(last) if last else 0.0

    def _log_plans(self, server_round: int, plans: dict[int, Plan]) -> None:
        """Append each node's plan to plans.jsonl (round, node, profile, precision, batch, ranks, predictions, fallback)."""
        if self.plan_log is None:
            return
        with open(self.plan_log, "a") as handle:
            for node_id, plan in sorted(plans.items()):
                profile = self.strategy.profiles[node_id]
                row = {
                    "round": server_round,
                    "node_id": node_id,
                    "profile": profile.to_dict(),
                    "precision": plan.precision,
                    "batch_size": plan.batch_size,
                    "ranks": plan.ranks,
                    "local_steps": plan.local_steps,
                    "predicted_step_s": plan.step_flops / profile.flops,
                    "predicted_round_s": plan.local_steps * plan.step_flops / profile.flops,
                    "predicted_memory_bytes": plan.memory_bytes,
                    "search_s": plan.search_s,
                    "left_out": plan.reason or None,
                    "over_budget": plan.over_budget,
                }
                if plan.scores is not None:
                    row["scores"] = plan.scores
                handle.write(json.dumps(row) + "\n")


def site_mean(evaluations: dict[int, tuple[float, int]]) -> tuple[float | None, dict[str, dict[str, float]]]:
    """The example-weighted mean of the sites' losses, and each site's {loss, examples} by node id."""
    per_site = {str(n): {"loss": loss, "examples": count} for n, (loss, count) in sorted(evaluations.items())}
    total = sum(count for _, count in evaluations.values())
    mean = sum(loss * count for loss, count in evaluations.values()) / total if total else None
    return mean, per_site
