"""Strategies whose global state is LoRA factors (A, B) per module at a global rank.

Each node is sent its plan's modules truncated to its rank (A[:r], B[:, :r]); updates are
zero-padded to the global rank and A and B averaged separately:

- ``lora-fedavg``: one rank for all, FedAvg of A and B (McMahan et al. 2017 on LoRA).
- ``hetlora`` (Cho et al. 2024): ranks by device capability, truncation on dispatch, zero-padding
  aggregation weighted by each update's Frobenius norm (sparsity-weighted aggregation).
- ``legend``: per device LoRA on the last L layers with ranks rising towards the output (LCD
  greedy under the device's capacity); per-layer aggregation over the devices that trained it.
- ``fedadapter`` (Cai et al. 2022): one adapter configuration for all, upgraded progressively.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from fedpipe_core.aggregate import (
    Weighting,
    aggregate_padded,
    module_weights,
    norm_weights,
    to_dense,
    truncate_factors,
)
from fedpipe_core.codec import decode_factors, encode_factors
from fedpipe_core.lora import Factors, fresh_factors
from fedpipe_core.plan import Plan
from fedpipe_core.strategies.base import Arrays, ArrayState, Updates
from fedpipe_core.strategies.peer_rules import fedadapter_config, layers_top_down, legend_ranks


def truncated_payload(factors: Factors, plan: Plan) -> Arrays:
    """The plan's modules that have global factors, cut to the node's rank: A[:r], B[:, :r]."""
    return encode_factors({m: truncate_factors(factors[m], r) for m, r in plan.ranks.items() if m in factors})


class FactorStrategy(ArrayState):
    """Global (A, B) per module; nodes get them truncated to their rank, updates are zero-padded and averaged."""

    weighting: ClassVar[Weighting] = staticmethod(module_weights)

    def __init__(self, task) -> None:
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
            self._factors = fresh_factors(self.task.shapes, ranks, cfg.seed)
        return self._factors

    def dispatch_state(self) -> Factors:
        return self.factors

    def node_payload(self, node_id: int, server_round: int, state: Factors, plan: Plan) -> Arrays:
        return truncated_payload(state, plan)

    def combine(self, server_round: int, updates: Updates) -> None:
        """Zero-padded average of the factors; rank components that no node trained keep their value
        (the fresh LoRA initialisation, random A row and zero B column, until a node first trains them):
        averaging them as zeros would leave a component with a zero A row and B column, which gets no
        gradient ever again (FedAdapter widening, HetLoRA and LEGEND ranks no node reached)."""
        previous = self.factors
        ranks = {m: A.shape[0] for m, (A, _) in previous.items()}
        averaged = aggregate_padded([u for u, _ in updates.values()], ranks, type(self).weighting)
        for module, (A, B) in averaged.items():
            trained = max(u.factors[module][0].shape[0] for u, _ in updates.values() if module in u.factors)
            A[trained:], B[:, trained:] = previous[module][0][trained:], previous[module][1][:, trained:]
        self._factors = {**previous, **averaged}

    def global_delta(self) -> dict[str, torch.Tensor]:
        scale = self.scaling()
        return {m: scale * to_dense(lowrank) for m, lowrank in self.factors.items()}

    def global_arrays(self) -> Arrays:
        return encode_factors(self.factors)

    def load_global_arrays(self, arrays: Arrays) -> None:
        self._factors = decode_factors(arrays, self.task.shapes)


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
    """FedAdapter: one adapter configuration (depth = top layers, width = rank) for all nodes.

    Training starts shallow and narrow and is upgraded every ``fedadapter.upgrade-every`` rounds,
    alternately deeper and wider (:func:`~fedpipe_core.strategies.peer_rules.fedadapter_config`);
    FedAvg of A and B.
    """

    name = "fedadapter"
    missing = (
        "bottleneck adapters (LoRA components of growing rank stand in for them) and the search for the configuration "
        "on trial groups of clients (a fixed shallow-to-deep, narrow-to-wide schedule instead)"
    )

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        cfg = self.task.config
        layers = layers_top_down(self.task.spec, list(self.task.targets))
        depth, width = fedadapter_config(server_round, len(layers), cfg.rank_candidates(), cfg.adapter_upgrade_every)
        ranks = {m: width for _, names in layers[:depth] for m in names}
        return {node: self.fit_plan(node, ranks, cfg.batch_size) for node in node_ids}
