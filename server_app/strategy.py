"""Flower strategies over heterogeneous LoRA adapters.

:class:`LoRAStrategy` holds what every strategy shares: one message per node with its own
adapter plan, validation of each reply (a bad update is logged and left out, never aggregated),
and byte accounting from the arrays actually sent. Subclasses decide what travels and how
updates combine.
"""

from __future__ import annotations

import json
import math
import random
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpipe_core.aggregate import (
    ClientUpdate,
    aggregate_lowrank,
    concat_lowrank,
    lowrank_norm,
    to_dense,
    truncate_with_feedback,
)
from fedpipe_core.codec import (
    UpdateError,
    decode_delta,
    decode_factors,
    encode_delta,
    encode_factors,
)
from fedpipe_core.cost import lora_params, peak_memory, step_flops
from fedpipe_core.peers import capability_rank, deadline_steps
from fedpipe_core.profile import ClientProfile
from fedpipe_core.search import (
    Plan,
    SearchSpace,
    batch_sizes,
    choose_precision,
    plan_client,
)
from fedpipe_core.task import Task, weight_norms
from server_app.records import from_record, to_record


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
    sim_time_s: float = 0.0
    ranks: dict[int, dict[str, int]] = field(default_factory=dict)
    timing: dict[int, dict[str, float]] = field(default_factory=dict)
    """Per node: seconds of local training and of the node's own overhead around it (setup, process start)."""

    def node_overhead(self) -> dict[str, float]:
        """Mean seconds per node of training, setup and process start, and the largest (setup + start) / train."""
        if not self.timing:
            return {}
        keys = ("train-s", "setup-s", "startup-s")
        out = {f"client_{k.replace('-', '_')}": sum(t[k] for t in self.timing.values()) / len(self.timing) for k in keys}
        out["client_overhead_ratio"] = max((t["setup-s"] + t["startup-s"]) / t["train-s"] for t in self.timing.values())
        return out


class LoRAStrategy(Strategy):
    """Base: per-node train messages, validated replies, byte counts; server-side evaluation only."""

    name = "base"
    mode = "factors"
    """How a node trains: ``factors`` (start from the sent A, B), ``fedpipe`` (merge ΔW, fresh adapters), ``ft``."""

    def __init__(self, task: Task, plan_log: Path | None = None) -> None:
        self.task = task
        self.stats: dict[int, RoundStats] = {}
        self.profiles: dict[int, ClientProfile] = {}
        self.plan_log = plan_log
        self._current = ArrayRecord()  # the global state configure_train was last given
        self.round_offset = 0  # rounds done before this process (a resumed run)

    # --- what subclasses define -------------------------------------------------------------
    @abstractmethod
    def initial_arrays(self) -> ArrayRecord:
        """The global state before round 1."""

    def dispatch_state(self, arrays: ArrayRecord) -> Any:
        """What :meth:`node_payload` reads, derived from the global arrays once per round (not per node)."""
        return arrays

    @abstractmethod
    def node_payload(self, node_id: int, server_round: int, state: Any, plan: Plan) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        """Arrays and extra config for one node's train message (``state`` from :meth:`dispatch_state`)."""

    @abstractmethod
    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        """The next global state from this round's valid updates (keyed by node id)."""

    @abstractmethod
    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global ΔW per module that ``arrays`` stands for."""

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        """Each (profiled, at least one) node's configuration this round; by default the run config's, the same for all."""
        ranks = self.task.uniform_ranks()
        return {node: self.fit_plan(node, ranks, self.task.config.batch_size) for node in node_ids}

    def fit_plan(self, node_id: int, ranks: dict[str, int], batch: int) -> Plan:
        """A plan with these adapters and batch, its base held at the highest precision that fits the node."""
        cfg, spec, profile = self.task.config, self.task.spec, self.profiles[node_id]
        precision = choose_precision(spec, profile, ranks, batch, cfg.max_seq_len)
        if precision is None:
            need = peak_memory(spec, ranks, batch, cfg.max_seq_len, "nf4")
            return Plan(batch, "none", {}, math.inf, reason=f"memory {profile.memory_bytes / 2**30:.2f} GiB cannot hold "
                        f"this configuration even on an NF4 base ({need / 2**30:.2f} GiB)")
        return Plan(batch, precision, dict(ranks), math.inf, step_flops=step_flops(spec, ranks, batch, cfg.max_seq_len),
                    memory_bytes=peak_memory(spec, ranks, batch, cfg.max_seq_len, precision))

    def capability_plans(self, node_ids: list[int]) -> dict[int, Plan]:
        """HetLoRA / FlexLoRA: every target module at the node's capability rank, the run config's batch."""
        top = max(self.profiles[n].flops for n in node_ids)
        candidates = self.task.config.rank_candidates()
        return {
            node: self.fit_plan(node, {m: capability_rank(self.profiles[node].flops, top, candidates) for m in self.task.targets},
                                self.task.config.batch_size)
            for node in node_ids
        }

    def round_time_s(self, node_ids: list[int]) -> float:
        """The round's time budget: the fastest node's time for the uniform plan at the largest batch."""
        cfg = self.task.config
        uniform = step_flops(self.task.spec, self.task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len)
        return cfg.local_steps * uniform / max(self.profiles[n].flops for n in node_ids)

    def scaling(self) -> float:
        """The adapter scaling every node uses, whatever the rank: alpha / lora-rank (see task.lora_alphas)."""
        return self.task.config.lora_alpha / self.task.config.lora_rank

    def trainable_params(self, ranks: dict[str, int]) -> int:
        """Parameters a node trains under a plan with these ranks."""
        return lora_params(self.task.spec, ranks)

    def state_dict(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """What a checkpoint keeps of the strategy: JSON-able state and named arrays."""
        return {"profiles": {str(n): p.to_dict() for n, p in self.profiles.items()}}, {}

    def load_state_dict(self, state: dict[str, object], tensors: dict[str, np.ndarray]) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        self.profiles = {int(n): ClientProfile(**p) for n, p in dict(state["profiles"]).items()}

    def discover(self, grid: Grid, node_ids: list[int]) -> None:
        """Ask nodes never profiled for their profile (a QUERY message); failures are logged."""
        unseen = [n for n in node_ids if n not in self.profiles]
        if not unseen:
            return
        queries = [
            Message(RecordDict({"config": ConfigRecord({"want": "profile"})}), dst_node_id=n, message_type=MessageType.QUERY)
            for n in unseen
        ]
        for reply in grid.send_and_receive(queries, timeout=self.task.config.round_timeout_s):
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %d could not be profiled: %s", node_id, reply.error.reason)
                continue
            try:
                self.profiles[node_id] = profile_from_record(reply.content.config_records["profile"])
            except (KeyError, TypeError, ValueError) as exc:
                log(WARNING, "node %d sent an unusable profile: %s", node_id, exc)

    # --- Flower's Strategy interface --------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        server_round += self.round_offset
        self._current = arrays
        cfg = self.task.config
        available = len(list(grid.get_node_ids()))
        wanted = max(cfg.min_train_nodes, math.ceil(available * cfg.fraction_train))
        node_ids, _ = sample_nodes(grid, cfg.min_train_nodes, min(wanted, max(available, cfg.min_train_nodes)))
        self.discover(grid, sorted(node_ids))
        stats = self.stats.setdefault(server_round, RoundStats())
        profiled = sorted(n for n in node_ids if n in self.profiles)
        plans = self.make_plans(server_round, profiled) if profiled else {}
        for node_id, plan in plans.items():
            self._apply_deadline(node_id, plan)
        self._log_plans(server_round, plans)
        state = self.dispatch_state(arrays) if any(p.feasible for p in plans.values()) else None
        messages = []
        for node_id, plan in sorted(plans.items()):
            if not plan.feasible:
                log(WARNING, "round %d: node %d left out: %s", server_round, node_id, plan.reason)
                stats.left_out += 1
                continue
            stats.ranks[node_id] = plan.ranks
            stats.sim_time_s = max(stats.sim_time_s, plan.local_steps * plan.step_flops / self.profiles[node_id].flops)
            payload, extra = self.node_payload(node_id, server_round, state, plan)
            record = to_record(payload)
            stats.bytes_down += record.count_bytes()
            node_config = ConfigRecord(
                {
                    **dict(config),
                    **extra,
                    "server-round": server_round,
                    "mode": self.mode,
                    "local-steps": plan.local_steps,
                    "ranks": json.dumps(plan.ranks),
                    "batch-size": plan.batch_size,
                    "precision": plan.precision,
                }
            )
            content = RecordDict({"arrays": record, "config": node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def _apply_deadline(self, node_id: int, plan: Plan) -> None:
        """Local steps the node finishes within ``round-deadline-s``; none at all leaves it out."""
        cfg = self.task.config
        if not plan.feasible:
            return
        step_s = plan.step_flops / self.profiles[node_id].flops
        plan.local_steps = deadline_steps(step_s, cfg.local_steps, cfg.round_deadline_s)
        if plan.local_steps < 1:
            plan.ranks = {}
            plan.reason = f"one local step takes {step_s:.3g} s, past the round deadline of {cfg.round_deadline_s:g} s"

    def _log_plans(self, server_round: int, plans: dict[int, Plan]) -> None:
        """Append each node's plan to plans.jsonl (round, node, profile, precision, batch, ranks, predictions)."""
        if self.plan_log is None:
            return
        with open(self.plan_log, "a") as handle:
            for node_id, plan in sorted(plans.items()):
                profile = self.profiles[node_id]
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
                }
                handle.write(json.dumps(row) + "\n")

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        server_round += self.round_offset
        stats = self.stats.setdefault(server_round, RoundStats())
        updates: dict[int, tuple[ClientUpdate, MetricRecord]] = {}
        for reply in replies:
            node_id = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "round %d: node %d failed: %s", server_round, node_id, reply.error.reason)
                self.on_failure(node_id)
                stats.rejected += 1
                continue
            try:
                update, metrics, size = self._validate(reply, stats.ranks.get(node_id))
            except UpdateError as exc:
                log(WARNING, "round %d: update of node %d rejected: %s", server_round, node_id, exc)
                self.on_failure(node_id)
                stats.rejected += 1
                continue
            if node_id in updates:
                log(WARNING, "round %d: second reply of node %d rejected: one update per node and round", server_round, node_id)
                stats.rejected += 1
                continue
            stats.bytes_up += size
            updates[node_id] = (update, metrics)
            timing = {k: float(metrics[k]) for k in ("train-s", "setup-s", "startup-s") if k in metrics}
            if len(timing) == 3 and timing["train-s"] > 0 and all(math.isfinite(v) and v >= 0 for v in timing.values()):
                stats.timing[node_id] = timing
            self._refresh_profile(node_id, metrics)
        if not updates:
            log(WARNING, "round %d: no valid update; the global state is unchanged", server_round)
            return None, None
        stats.clients = len(updates)
        stats.num_examples = sum(u.num_examples for u, _ in updates.values())
        stats.train_loss = sum(float(m["train-loss"]) * u.num_examples for u, m in updates.values()) / stats.num_examples
        arrays = self.combine(server_round, self._current, updates)
        metrics = MetricRecord({"train-loss": stats.train_loss, "clients": stats.clients, "num-examples": stats.num_examples})
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return []  # the server evaluates the global model itself (evaluate_fn)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    def summary(self) -> None:
        cfg = self.task.config
        log(INFO, "%s: %d target modules, default rank %d, alpha %g", self.name, len(self.task.targets), cfg.lora_rank, cfg.lora_alpha)

    # --- shared helpers -----------------------------------------------------------------------
    def on_failure(self, node_id: int) -> None:
        """Hook: a node's reply was an error or was rejected."""

    def _refresh_profile(self, node_id: int, metrics: MetricRecord) -> None:
        """A node reports its profile with every update; a changed one replaces the old."""
        if "profile-memory-bytes" in metrics and "profile-flops" in metrics:
            old = self.profiles.get(node_id)
            try:
                new = checked_profile(metrics["profile-memory-bytes"], metrics["profile-flops"], old.source if old else "reported")
            except ValueError as exc:
                log(WARNING, "node %d reported an unusable profile: %s", node_id, exc)
                return
            if new != old:
                self.profiles[node_id] = new

    def _validate(self, reply: Message, assigned: dict[str, int] | None) -> tuple[ClientUpdate, MetricRecord, int]:
        content = reply.content
        if "arrays" not in content.array_records or "metrics" not in content.metric_records:
            raise UpdateError("reply lacks its 'arrays' or 'metrics' record")
        metrics = content.metric_records["metrics"]
        for key in ("num-examples", "train-loss"):
            if key not in metrics:
                raise UpdateError(f"reply metrics lack {key!r}")
        num_examples = metrics["num-examples"]
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise UpdateError(f"num-examples must be a positive integer, got {num_examples!r}")
        if not math.isfinite(float(metrics["train-loss"])):
            raise UpdateError(f"train-loss is not finite: {metrics['train-loss']!r}")
        if assigned is None:
            raise UpdateError("reply from a node that was not sent a plan this round")
        record = content.array_records["arrays"]
        update = self.decode_update(from_record(record), assigned, num_examples)
        self._check_norms(update)
        return update, metrics, record.count_bytes()

    def _check_norms(self, update: ClientUpdate) -> None:
        """Reject an update whose ΔW on a module exceeds ``max-update-ratio`` × that weight's norm."""
        norms, ratio = weight_norms(self.task), self.task.config.max_update_ratio
        sizes = {m: lowrank_norm(A, B, update.scaling[m]) for m, (A, B) in update.factors.items()}
        sizes |= {m: float(d.norm()) for m, d in update.dense.items()}
        for module, norm in sizes.items():
            if norm > ratio * norms[module]:
                raise UpdateError(f"module {module!r}: ‖ΔW‖ = {norm:.3g} exceeds {ratio:g} × ‖W‖ = {norms[module]:.3g}")

    def decode_update(self, arrays: dict[str, np.ndarray], assigned: dict[str, int], num_examples: int) -> ClientUpdate:
        """A node's adapter factors, checked against the modules and ranks it was assigned."""
        factors = decode_factors(arrays, self.task.shapes)
        for module, (A, _) in factors.items():
            if module not in assigned:
                raise UpdateError(f"module {module!r} was not assigned to this node")
            if A.shape[0] != assigned[module]:
                raise UpdateError(f"module {module!r} has rank {A.shape[0]}, assigned {assigned[module]}")
        if not factors:
            raise UpdateError("reply carries no adapter")
        return ClientUpdate(factors, {m: self.scaling() for m in factors}, num_examples)


class FedPipeStrategy(LoRAStrategy):
    """FedPipe aggregation (eqs 9-12): heterogeneous ranks and module subsets, ΔW averaged.

    The global state is the cumulative ΔW the nodes merge. Each node is sent, in factored form
    when smaller, the ΔW rounds it has not merged yet; it merges them into its base and trains
    fresh adapters (B = 0), so the ranks it is given may change from round to round. With
    ``dispatch = svd`` a round's ΔW is cut to the largest candidate rank and the remainder
    carried into the next round (error feedback); with ``exact`` it travels whole (rank Σ r_k).
    """

    name = "fedpipe"
    mode = "fedpipe"

    def __init__(self, task: Task, plan_log: Path | None = None) -> None:
        super().__init__(task, plan_log)
        self.increments: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.synced: dict[int, int] = {}
        self.importance: dict[str, float] = {}
        self.residual: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # what dispatch = svd has cut and not yet sent

    def current_importance(self, server_round: int = 0) -> dict[str, float]:
        """Latest score per weight; never-trained weights get the highest known score (explore them).

        With ``weight-selection = random`` (the ablation) scores are drawn afresh each round.
        """
        if self.task.config.weight_selection == "random":
            rng = random.Random(f"{self.task.config.seed}:{server_round}")
            return {m: rng.random() for m in self.task.targets}
        prior = max(self.importance.values(), default=1.0)
        return {m: self.importance.get(m, prior) for m in self.task.targets}

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        """Stage 1 batch sizes by FLOPS share, stage 2 weights/ranks under each FLOPS budget.

        The round's time budget is what the fastest node needs for the run config's uniform
        adapters at the largest batch size; every node gets FLOPS_k × that time.
        """
        cfg, spec = self.task.config, self.task.spec
        batches = batch_sizes([self.profiles[n].flops for n in node_ids], cfg.batch_min, cfg.batch_size)
        round_time = self.round_time_s(node_ids)
        space = SearchSpace(cfg.rank_candidates(), cfg.max_seq_len, cfg.local_steps)
        importance = self.current_importance(server_round)
        return {
            node: plan_client(spec, self.profiles[node], importance, batch, round_time, space, method=cfg.search, precision=cfg.base_precision)
            for node, batch in zip(node_ids, batches)
        }

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def node_payload(self, node_id: int, server_round: int, state: Any, plan: Plan) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        start = self.synced.get(node_id, 0)
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for rnd in range(start + 1, server_round):
            for module, lowrank in self.increments.get(rnd, {}).items():
                pending.setdefault(module, []).append(lowrank)
        payload = encode_delta({m: concat_lowrank(parts) for m, parts in pending.items()})
        return payload, {"state-from": start, "state-to": server_round - 1}

    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        increment = aggregate_lowrank([u for u, _ in updates.values()])
        if self.task.config.dispatch == "svd":
            increment, self.residual = truncate_with_feedback(increment, self.residual, max(self.task.config.rank_candidates()))
        self.increments[server_round] = increment
        total = self.global_delta(arrays)
        for module, lowrank in increment.items():
            dense = to_dense(lowrank)
            total[module] = total[module] + dense if module in total else dense
        for node_id, (_, metrics) in updates.items():
            self.synced[node_id] = int(metrics["state-version"])
        self.importance.update(importance_of(updates))
        return to_record({f"{m}::dW": d.numpy() for m, d in total.items()})

    def on_failure(self, node_id: int) -> None:
        self.synced.pop(node_id, None)  # resend the whole ΔW history next time

    def state_dict(self) -> tuple[dict[str, object], dict[str, np.ndarray]]:
        """Profiles, importance, every round's ΔW increment and the dispatch residual (node sync is per run: not kept)."""
        state, tensors = super().state_dict()
        for rnd, increment in self.increments.items():
            tensors |= {f"{rnd}/{key}": value for key, value in encode_factors(increment).items()}
        tensors |= {f"residual/{key}": value for key, value in encode_factors(self.residual).items()}
        return {**state, "importance": self.importance, "increment-rounds": sorted(self.increments)}, tensors

    def load_state_dict(self, state: dict[str, object], tensors: dict[str, np.ndarray]) -> None:
        super().load_state_dict(state, tensors)
        self.importance = {str(m): float(v) for m, v in dict(state["importance"]).items()}
        def under(prefix: str) -> dict[str, np.ndarray]:
            return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}

        for rnd in state["increment-rounds"]:
            self.increments[int(rnd)] = decode_factors(under(f"{rnd}/"), self.task.shapes)
        self.residual = decode_factors(under("residual/"), self.task.shapes)

    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        return decode_delta(from_record(arrays), self.task.shapes)

    def _validate(self, reply: Message, assigned: dict[str, int] | None) -> tuple[ClientUpdate, MetricRecord, int]:
        update, metrics, size = super()._validate(reply, assigned)
        if "state-version" not in metrics:
            raise UpdateError("reply metrics lack 'state-version'")
        return update, metrics, size


def importance_of(updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> dict[str, float]:
    """Example-weighted mean of the importance each client reported for the weights it trained."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for update, metrics in updates.values():
        for module in update.factors:
            key = f"importance::{module}"
            if key in metrics and math.isfinite(float(metrics[key])):
                sums[module] = sums.get(module, 0.0) + update.num_examples * float(metrics[key])
                weights[module] = weights.get(module, 0.0) + update.num_examples
    return {m: sums[m] / weights[m] for m in sums}


def checked_profile(memory_bytes: object, flops: object, source: str) -> ClientProfile:
    """A ClientProfile from reported numbers, which must be positive."""
    profile = ClientProfile(float(memory_bytes), float(flops), source)
    if not (profile.memory_bytes > 0 and profile.flops > 0):
        raise ValueError(f"memory {profile.memory_bytes} and flops {profile.flops} must be > 0")
    return profile


def profile_from_record(record: ConfigRecord) -> ClientProfile:
    """A ClientProfile from a node's QUERY reply."""
    return checked_profile(record["memory-bytes"], record["flops"], str(record["source"]))
