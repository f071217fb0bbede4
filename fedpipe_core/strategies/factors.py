"""Strategies whose global state is LoRA factors (A, B) per module at a global rank.

Each node is sent its plan's modules truncated to its rank (A[:r], B[:, :r]); updates are
zero-padded to the global rank and A and B averaged separately:

- ``lora-fedavg``: one rank for all, FedAvg of A and B (McMahan et al. 2017 on LoRA).
- ``hetlora`` (Cho et al. 2024): ranks by device capability, truncation on dispatch, zero-padding
  aggregation weighted by each update's Frobenius norm (sparsity-weighted aggregation).
- ``legend``: per device LoRA on the last L layers with ranks rising towards the output (LCD
  greedy under the device's capacity); per-layer aggregation over the devices that trained it.
- ``fedadapter`` (Cai et al. 2022): one adapter configuration for all, upgraded by trial groups of nodes.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, ClassVar

import torch

from fedpipe_core.aggregate import (
    Weighting,
    aggregate_padded,
    module_weights,
    norm_weights,
)
from fedpipe_core.codec import decode_factors, encode_factors
from fedpipe_core.config import ConfigError, key_of
from fedpipe_core.evaluate import evaluate_validation
from fedpipe_core.lora import fresh_factors
from fedpipe_core.lowrank import Factors
from fedpipe_core.plan import Plan
from fedpipe_core.strategies.base import Arrays, ArrayState, Updates
from fedpipe_core.strategies.peer_rules import (
    AdapterConfig,
    fedadapter_start,
    fedadapter_trials,
    layers_top_down,
    legend_ranks,
)
from fedpipe_core.task import Task


def truncated_payload(factors: Factors, plan: Plan) -> Arrays:
    """The plan's modules that have global factors, cut to the node's rank: A[:r], B[:, :r]."""
    return encode_factors({m: factors[m].truncated(r) for m, r in plan.ranks.items() if m in factors})


class FactorStrategy(ArrayState):
    """Global (A, B) per module; nodes get them truncated to their rank, updates are zero-padded and averaged."""

    weighting: ClassVar[Weighting] = staticmethod(module_weights)

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self._factors: Factors | None = None

    def global_rank(self) -> int:
        """Rank of the global factors (the largest any node may be given)."""
        return max(self.task.config.rank_candidates())

    @property
    def factors(self) -> Factors:
        """The global factors; before round 1 fresh adapters on every target (random A, zero B), the same for all."""
        if self._factors is None:
            cfg = self.task.config
            ranks = {m: self.global_rank() for m in self.task.targets}  # the model's order, as peft draws them
            self._factors = fresh_factors(self.task.shapes, ranks, cfg.seed, self.scaling())
        return self._factors

    def dispatch_state(self) -> Factors:
        return self.factors

    def node_payload(self, node_id: int, server_round: int, state: Factors, plan: Plan) -> Arrays:
        return truncated_payload(state, plan)

    def combine(self, server_round: int, updates: Updates) -> None:
        self._factors = self.averaged(updates)

    def averaged(self, updates: Updates) -> Factors:
        """The global factors with these updates' zero-padded average; rank components that no node trained keep their
        value (the fresh LoRA initialisation, random A row and zero B column, until a node first trains them):
        averaging them as zeros would leave a component with a zero A row and B column, which gets no
        gradient ever again (FedAdapter widening, HetLoRA and LEGEND ranks no node reached)."""
        previous = self.factors
        ranks = {m: lowrank.rank for m, lowrank in previous.items()}
        averaged = aggregate_padded([u for u, _ in updates.values()], ranks, type(self).weighting)
        for module, lowrank in averaged.items():
            trained = max(u.factors[module].rank for u, _ in updates.values() if module in u.factors)
            lowrank.A[trained:], lowrank.B[:, trained:] = previous[module].A[trained:], previous[module].B[:, trained:]
        return {**previous, **averaged}

    def delta_of(self, factors: Factors) -> dict[str, torch.Tensor]:
        """ΔW = s · B A of every module of ``factors``."""
        return {m: lowrank.dense() for m, lowrank in factors.items()}

    def global_delta(self) -> dict[str, torch.Tensor]:
        return self.delta_of(self.factors)

    def global_arrays(self) -> Arrays:
        return encode_factors(self.factors)

    def load_global_arrays(self, arrays: Arrays) -> None:
        self._factors = decode_factors(arrays, self.task.shapes, self.scaling())


class LoRAFedAvg(FactorStrategy):
    """LoRA with FedAvg: the run config's rank on every target module for every node, A and B averaged."""

    name = "lora-fedavg"

    def global_rank(self) -> int:
        return self.task.config.lora_rank


class HetLoRA(FactorStrategy):
    """HetLoRA: rank by device capability, truncated dispatch, sparsity-weighted zero-padding aggregation."""

    name = "hetlora"
    missing = (
        "local rank self-pruning (a client shrinking its own rank during training with a regulariser on the highest "
        "components); ranks change only with capability"
    )
    weighting = staticmethod(norm_weights)

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        return self.capability_plans(node_ids)


class Legend(FactorStrategy):
    """LEGEND: per-device LoRA depth and rising rank distribution (LCD greedy), per-layer aggregation.

    A device's capacity is its FLOPS × the round's time budget
    (:func:`~fedpipe_core.search.round_budget_s`). Each layer's adapters are averaged over the devices that trained that
    layer only, weighted by their examples; layers nobody trained keep their previous value.
    """

    name = "legend"

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        cfg = self.task.config
        round_time = self.round_time_s(node_ids)
        plans = {}
        for node in node_ids:
            budget = self.profiles[node].flops * round_time
            ranks = legend_ranks(
                self.task.spec,
                list(self.task.targets),
                budget,
                cfg.batch_size,
                cfg.max_seq_len,
                cfg.local_steps,
                cfg.rank_candidates(),
            )
            plans[node] = self.fit_plan(node, ranks, cfg.batch_size)
        return plans


class FedAdapter(FactorStrategy):
    """FedAdapter: one adapter configuration (depth = top layers, width = rank), chosen by trial groups.

    It starts shallow and narrow (:func:`~fedpipe_core.strategies.peer_rules.fedadapter_start`). Every
    ``fedadapter.upgrade-every`` rounds is a decision round: the nodes split, in turn in the federation's order
    (:meth:`~fedpipe_core.strategies.base.Strategy.ordered`), into trial groups training the current, a deeper and a
    wider configuration (:func:`~fedpipe_core.strategies.peer_rules.fedadapter_trials`)
    from the same global factors; each group's updates are averaged (FedAvg of A and B) and scored on the server's
    validation split, and the group with the lowest loss gives the next global factors and configuration. The other
    groups' work is dropped, the price the paper pays for searching while training. Other rounds every node trains
    the current configuration.
    """

    name = "fedadapter"
    missing = "bottleneck adapters (LoRA components at the configuration's width stand in for them)"

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        if not task.config.server_evaluates:
            raise ConfigError(
                f"run config {key_of('eval_where')!r}: fedadapter picks its configuration by the validation loss of its "
                "trial groups' models on the server's validation split; set it to 'server' or 'both'"
            )
        self.layers = layers_top_down(task.spec, list(task.targets))
        self.current = fedadapter_start(len(self.layers), task.config.rank_candidates())
        self.groups: dict[int, AdapterConfig] = {}
        """This round's trial configuration of each node."""
        self.trials: dict[int, list[dict[str, Any]]] = {}
        """Each decision round's trials: configuration, nodes, validation loss, whether it was chosen."""

    def ranks_of(self, config: AdapterConfig) -> dict[str, int]:
        """The configuration's adapters: every target of the top ``depth`` layers at ``width``."""
        return {m: config.width for _, names in self.layers[: config.depth] for m in names}

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        every = self.task.config.adapter_upgrade_every
        trials = [self.current]
        if (server_round - 1) % every == every - 1:
            trials = fedadapter_trials(self.current, len(self.layers), self.task.config.rank_candidates())
        trials = trials[: len(node_ids)]
        self.groups = {node: trials[i % len(trials)] for i, node in enumerate(node_ids)}  # plan_round's order
        return {
            node: self.fit_plan(node, self.ranks_of(config), self.task.config.batch_size) for node, config in self.groups.items()
        }

    def combine(self, server_round: int, updates: Updates) -> None:
        by_config: dict[AdapterConfig, Updates] = {}
        for node in self.ordered(updates):
            by_config.setdefault(self.groups[node], {})[node] = updates[node]
        candidates = {config: self.averaged(group) for config, group in by_config.items()}
        if len(candidates) == 1:
            ((self.current, self._factors),) = candidates.items()
            return
        losses = {config: evaluate_validation(self.task, self.delta_of(f)).loss for config, f in candidates.items()}
        chosen = min(losses, key=lambda c: (losses[c], c != self.current))  # a tie keeps the current configuration
        self.trials[server_round] = [
            {**asdict(c), "nodes": sorted(by_config[c]), "eval_loss": losses[c], "chosen": c == chosen} for c in candidates
        ]
        self.current, self._factors = chosen, candidates[chosen]

    def round_record(self, server_round: int) -> dict[str, Any]:
        return {"fedadapter_trials": self.trials[server_round]} if server_round in self.trials else {}

    def state_dict(self) -> tuple[dict[str, object], Arrays]:
        state, tensors = super().state_dict()
        return {**state, "fedadapter": asdict(self.current)}, tensors

    def load_state_dict(self, state: dict[str, object], tensors: Arrays) -> None:
        super().load_state_dict(state, tensors)
        self.current = AdapterConfig(**dict(state["fedadapter"]))
