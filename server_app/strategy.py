"""Flower strategies over heterogeneous LoRA adapters.

:class:`LoRAStrategy` holds what every strategy shares: one message per node with its own
adapter plan, validation of each reply (a bad update is logged and left out, never aggregated),
and byte accounting from the arrays actually sent. Subclasses decide what travels and how
updates combine.
"""

from __future__ import annotations

import json
import math
from abc import abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from fedpipe_core.aggregate import ClientUpdate, aggregate_lowrank, concat_lowrank, fedavg_factors, to_dense
from fedpipe_core.codec import UpdateError, decode_delta, decode_factors, encode_delta, encode_factors
from fedpipe_core.lora import attach_lora, lora_factors
from fedpipe_core.task import Task
from server_app.records import from_record, to_record


@dataclass
class RoundStats:
    """What one round moved and who took part."""

    bytes_down: int = 0
    bytes_up: int = 0
    clients: int = 0
    rejected: int = 0
    train_loss: float = math.nan
    num_examples: int = 0
    ranks: dict[int, dict[str, int]] = field(default_factory=dict)


class LoRAStrategy(Strategy):
    """Base: per-node train messages, validated replies, byte counts; server-side evaluation only."""

    name = "base"

    def __init__(self, task: Task) -> None:
        self.task = task
        self.stats: dict[int, RoundStats] = {}
        self._current = ArrayRecord()  # the global state configure_train was last given

    # --- what subclasses define -------------------------------------------------------------
    @abstractmethod
    def initial_arrays(self) -> ArrayRecord:
        """The global state before round 1."""

    @abstractmethod
    def node_payload(self, node_id: int, server_round: int, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        """Arrays and extra config for one node's train message."""

    @abstractmethod
    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        """The next global state from this round's valid updates (keyed by node id)."""

    @abstractmethod
    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        """The global ΔW per module that ``arrays`` stands for."""

    def plan(self, node_id: int, server_round: int) -> dict[str, int]:
        """The rank of each module this node adapts this round (uniform by default)."""
        return self.task.uniform_ranks()

    # --- Flower's Strategy interface --------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._current = arrays
        cfg = self.task.config
        available = len(list(grid.get_node_ids()))
        wanted = max(cfg.min_train_nodes, math.ceil(available * cfg.fraction_train))
        node_ids, _ = sample_nodes(grid, cfg.min_train_nodes, min(wanted, max(available, cfg.min_train_nodes)))
        stats = self.stats.setdefault(server_round, RoundStats())
        messages = []
        for node_id in sorted(node_ids):
            payload, extra = self.node_payload(node_id, server_round, arrays)
            ranks = self.plan(node_id, server_round)
            stats.ranks[node_id] = ranks
            record = to_record(payload)
            stats.bytes_down += record.count_bytes()
            node_config = ConfigRecord({**dict(config), **extra, "server-round": server_round, "ranks": json.dumps(ranks)})
            content = RecordDict({"arrays": record, "config": node_config})
            messages.append(Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(server_round)))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
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
            stats.bytes_up += size
            updates[node_id] = (update, metrics)
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
        record = content.array_records["arrays"]
        factors = decode_factors(from_record(record), self.task.shapes)
        if assigned is None:
            raise UpdateError("reply from a node that was not sent a plan this round")
        for module, (A, _) in factors.items():
            if module not in assigned:
                raise UpdateError(f"module {module!r} was not assigned to this node")
            if A.shape[0] != assigned[module]:
                raise UpdateError(f"module {module!r} has rank {A.shape[0]}, assigned {assigned[module]}")
        if not factors:
            raise UpdateError("reply carries no adapter")
        alpha = self.task.config.lora_alpha
        scaling = {m: alpha / A.shape[0] for m, (A, _) in factors.items()}
        return ClientUpdate(factors, scaling, num_examples), metrics, record.count_bytes()


class FedPipeStrategy(LoRAStrategy):
    """FedPipe aggregation (eqs 9-12): heterogeneous ranks and module subsets, ΔW averaged.

    The global state is the cumulative ΔW. Each node is sent, exactly and in factored form
    when smaller, the ΔW rounds it has not merged yet; it merges them into its base and trains
    fresh adapters (B = 0), so the ranks it is given may change from round to round.
    """

    name = "fedpipe"

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.increments: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.synced: dict[int, int] = {}

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def node_payload(self, node_id: int, server_round: int, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        start = self.synced.get(node_id, 0)
        pending: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for rnd in range(start + 1, server_round):
            for module, lowrank in self.increments.get(rnd, {}).items():
                pending.setdefault(module, []).append(lowrank)
        payload = encode_delta({m: concat_lowrank(parts) for m, parts in pending.items()})
        return payload, {"mode": "fedpipe", "state-from": start, "state-to": server_round - 1}

    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        increment = aggregate_lowrank([u for u, _ in updates.values()])
        self.increments[server_round] = increment
        total = self.global_delta(arrays)
        for module, lowrank in increment.items():
            dense = to_dense(lowrank)
            total[module] = total[module] + dense if module in total else dense
        for node_id, (_, metrics) in updates.items():
            self.synced[node_id] = int(metrics["state-version"])
        return to_record({f"{m}::dW": d.numpy() for m, d in total.items()})

    def on_failure(self, node_id: int) -> None:
        self.synced.pop(node_id, None)  # resend the whole ΔW history next time

    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        return decode_delta(from_record(arrays), self.task.shapes)

    def _validate(self, reply: Message, assigned: dict[str, int] | None) -> tuple[ClientUpdate, MetricRecord, int]:
        update, metrics, size = super()._validate(reply, assigned)
        if "state-version" not in metrics:
            raise UpdateError("reply metrics lack 'state-version'")
        return update, metrics, size


class LoRAFedAvgStrategy(LoRAStrategy):
    """LoRA with FedAvg: one rank for all, A and B averaged separately (the usual baseline).

    The global state is the pair (A, B) per module; every node starts from it each round.
    """

    name = "lora-fedavg"

    def initial_arrays(self) -> ArrayRecord:
        cfg = self.task.config
        peft_model = attach_lora(self.task.base_model(), self.task.uniform_ranks(), cfg.lora_alpha, cfg.seed)
        return to_record(encode_factors(lora_factors(peft_model)))

    def node_payload(self, node_id: int, server_round: int, arrays: ArrayRecord) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        return from_record(arrays), {"mode": "lora-fedavg"}

    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        averaged = fedavg_factors([u for u, _ in updates.values()])
        previous = decode_factors(from_record(arrays), self.task.shapes)
        return to_record(encode_factors({**previous, **averaged}))

    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        alpha = self.task.config.lora_alpha
        factors = decode_factors(from_record(arrays), self.task.shapes)
        return {m: (alpha / A.shape[0]) * to_dense((A, B)) for m, (A, B) in factors.items()}


STRATEGIES: dict[str, type[LoRAStrategy]] = {
    FedPipeStrategy.name: FedPipeStrategy,
    LoRAFedAvgStrategy.name: LoRAFedAvgStrategy,
}
