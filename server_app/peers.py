"""The peer strategies FedPipe is benchmarked against, on the same :class:`LoRAStrategy` base.

Every strategy scales adapters by alpha / lora-rank whatever their rank. Factor strategies keep global LoRA factors (A, B) per module at a global rank, send each node
its plan's modules truncated to its rank, and average A and B after zero-padding:

- ``lora-fedavg``: one rank for all, FedAvg of A and B (McMahan et al. 2017 on LoRA).
- ``hetlora`` (Cho et al. 2024): ranks by device capability, truncation on dispatch, zero-padding
  aggregation weighted by each update's Frobenius norm (sparsity-weighted aggregation).
- ``legend``: per device LoRA on the last L layers with ranks rising towards the output (LCD
  greedy under the device's capacity); per-layer aggregation over the devices that trained it.
- ``fedadapter`` (Cai et al. 2022): one adapter configuration for all, upgraded progressively.

Dense strategies keep a global ΔW per module:

- ``flexlora`` (Bai et al. 2024): ΔW = Σ_k p_k s_k B_k A_k over full products, redistributed to
  each client's rank by truncated SVD.
- ``ft``: full fine-tuning of the target weights with FedAvg; nodes whose memory cannot hold an
  FP32 base with the optimizer state of those weights cannot take part.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
import torch
from flwr.app import ArrayRecord, MetricRecord

from fedpipe_core.aggregate import (
    ClientUpdate,
    Weighting,
    aggregate_delta,
    aggregate_dense,
    aggregate_padded,
    module_weights,
    norm_weights,
    svd_truncate,
    to_dense,
    truncate_factors,
)
from fedpipe_core.codec import (
    UpdateError,
    decode_delta,
    decode_factors,
    encode_dense,
    encode_factors,
)
from fedpipe_core.lora import Factors, attach_lora, lora_factors
from fedpipe_core.peers import (
    fedadapter_config,
    full_params,
    full_peak_memory,
    full_step_flops,
    layers_top_down,
    legend_ranks,
)
from fedpipe_core.search import Plan
from server_app.records import from_record, to_record
from server_app.strategy import FedPipeStrategy, LoRAStrategy


def truncated_payload(factors: Factors, plan: Plan) -> dict[str, np.ndarray]:
    """The plan's modules that have global factors, cut to the node's rank: A[:r], B[:, :r]."""
    return encode_factors({m: truncate_factors(factors[m], r) for m, r in plan.ranks.items() if m in factors})


class FactorStrategy(LoRAStrategy):
    """Global (A, B) per module; nodes get them truncated to their rank, updates are zero-padded and averaged."""

    weighting: Weighting = staticmethod(module_weights)

    def global_rank(self) -> int:
        """Rank of the global factors (the largest any node may be given)."""
        return max(self.task.config.rank_candidates())

    def initial_arrays(self) -> ArrayRecord:
        """Fresh adapters on every target module (random A, zero B), the same for every node."""
        cfg = self.task.config
        ranks = {m: self.global_rank() for m in self.task.targets}
        return to_record(encode_factors(lora_factors(attach_lora(self.task.base_model(), ranks, cfg.lora_alpha, cfg.seed))))

    def dispatch_state(self, arrays: ArrayRecord) -> Factors:
        return decode_factors(from_record(arrays), self.task.shapes)

    def node_payload(self, node_id: int, server_round: int, state: Factors, plan: Plan) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        return truncated_payload(state, plan), {}

    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        previous = decode_factors(from_record(arrays), self.task.shapes)
        ranks = {m: A.shape[0] for m, (A, _) in previous.items()}
        averaged = aggregate_padded([u for u, _ in updates.values()], ranks, type(self).weighting)
        return to_record(encode_factors({**previous, **averaged}))

    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        scale = self.scaling()
        return {m: scale * to_dense(lowrank) for m, lowrank in decode_factors(from_record(arrays), self.task.shapes).items()}


class LoRAFedAvgStrategy(FactorStrategy):
    """LoRA with FedAvg: the run config's rank on every target module for every node, A and B averaged."""

    name = "lora-fedavg"

    def global_rank(self) -> int:
        return self.task.config.lora_rank


class HetLoRAStrategy(FactorStrategy):
    """HetLoRA: rank by device capability, truncated dispatch, sparsity-weighted zero-padding aggregation."""

    name = "hetlora"
    weighting = staticmethod(norm_weights)

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        return self.capability_plans(node_ids)


class LegendStrategy(FactorStrategy):
    """LEGEND: per-device LoRA depth and rising rank distribution (LCD greedy), per-layer aggregation.

    A device's capacity is its FLOPS × the round's time budget (the fastest device's time for the
    uniform configuration). Each layer's adapters are averaged over the devices that trained that
    layer only, weighted by their examples; layers nobody trained keep their previous value.
    """

    name = "legend"

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        cfg = self.task.config
        round_time = self.round_time_s(node_ids)
        plans = {}
        for node in node_ids:
            budget = self.profiles[node].flops * round_time
            ranks = legend_ranks(self.task.spec, list(self.task.targets), budget, cfg.batch_size, cfg.max_seq_len,
                                 cfg.local_steps, cfg.rank_candidates())
            plans[node] = self.fit_plan(node, ranks, cfg.batch_size)
        return plans


class FedAdapterStrategy(FactorStrategy):
    """FedAdapter: one adapter configuration (depth = top layers, width = rank) for all nodes.

    Training starts shallow and narrow and is upgraded every ``adapter-upgrade-every`` rounds,
    alternately deeper and wider (:func:`fedpipe_core.peers.fedadapter_config`); FedAvg of A and B.
    """

    name = "fedadapter"

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        cfg = self.task.config
        layers = layers_top_down(self.task.spec, list(self.task.targets))
        depth, width = fedadapter_config(server_round, len(layers), cfg.rank_candidates(), cfg.adapter_upgrade_every)
        ranks = {m: width for _, names in layers[:depth] for m in names}
        return {node: self.fit_plan(node, ranks, cfg.batch_size) for node in node_ids}


class DenseStrategy(LoRAStrategy):
    """Global state: a dense ΔW per module (empty before round 1)."""

    def initial_arrays(self) -> ArrayRecord:
        return ArrayRecord()

    def global_delta(self, arrays: ArrayRecord) -> dict[str, torch.Tensor]:
        return decode_delta(from_record(arrays), self.task.shapes)

    def combine(self, server_round: int, arrays: ArrayRecord, updates: dict[int, tuple[ClientUpdate, MetricRecord]]) -> ArrayRecord:
        return to_record(encode_dense({**self.global_delta(arrays), **self.next_delta(arrays, [u for u, _ in updates.values()])}))

    @abstractmethod
    def next_delta(self, arrays: ArrayRecord, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """The new global ΔW of the modules this round's updates touched."""


class FlexLoRAStrategy(DenseStrategy):
    """FlexLoRA: average the full products ΔW_k = s_k B_k A_k, give each node the best rank-r_k factors."""

    name = "flexlora"

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        return self.capability_plans(node_ids)

    def dispatch_state(self, arrays: ArrayRecord) -> Factors:
        """One SVD per module per round at the largest rank; its first r components are the best rank-r factors."""
        top = max(self.task.config.rank_candidates())
        factors = {}
        for module, delta in self.global_delta(arrays).items():
            A, B = svd_truncate(delta, top)
            factors[module] = (A, B / self.scaling())  # the node computes s · B · A
        return factors

    def node_payload(self, node_id: int, server_round: int, state: Factors, plan: Plan) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        return truncated_payload(state, plan), {}

    def next_delta(self, arrays: ArrayRecord, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        return aggregate_delta(updates)


class FullFTStrategy(DenseStrategy):
    """Full fine-tuning of the target weights, FedAvg of the weight changes (ΔW accumulates)."""

    name = "ft"
    mode = "ft"

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        cfg, spec = self.task.config, self.task.spec
        modules = list(self.task.targets)
        full = {m: min(self.task.shapes[m]) for m in modules}  # a full-rank update
        memory = full_peak_memory(spec, modules, cfg.batch_size, cfg.max_seq_len)
        flops = full_step_flops(spec, modules, cfg.batch_size, cfg.max_seq_len)
        plans = {}
        for node in node_ids:
            have = self.profiles[node].memory_bytes
            if memory > have:
                plans[node] = Plan(cfg.batch_size, "fp32", {}, math.inf, reason=f"memory {have / 2**30:.2f} GiB cannot hold "
                                   f"full fine-tuning ({memory / 2**30:.2f} GiB)")
            else:
                plans[node] = Plan(cfg.batch_size, "fp32", dict(full), math.inf, step_flops=flops, memory_bytes=memory)
        return plans

    def dispatch_state(self, arrays: ArrayRecord) -> dict[str, np.ndarray]:
        return from_record(arrays)

    def node_payload(self, node_id: int, server_round: int, state: dict[str, np.ndarray], plan: Plan) -> tuple[dict[str, np.ndarray], dict[str, int | str]]:
        return state, {}  # the whole fine-tuned state, as FedAvg sends the model

    def next_delta(self, arrays: ArrayRecord, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        previous = self.global_delta(arrays)
        return {m: previous.get(m, 0) + d for m, d in aggregate_dense(updates).items()}

    def decode_update(self, arrays: dict[str, np.ndarray], assigned: dict[str, int], num_examples: int) -> ClientUpdate:
        if any(not key.endswith("::dW") for key in arrays):
            raise UpdateError("full fine-tuning replies carry dense '<module>::dW' arrays only")
        dense = decode_delta(arrays, self.task.shapes)
        unassigned = sorted(set(dense) - set(assigned))
        if unassigned:
            raise UpdateError(f"module {unassigned[0]!r} was not assigned to this node")
        if not dense:
            raise UpdateError("reply carries no weight update")
        return ClientUpdate({}, {}, num_examples, dense=dense)

    def trainable_params(self, ranks: dict[str, int]) -> int:
        return full_params(self.task.spec, list(ranks))


STRATEGIES: dict[str, type[LoRAStrategy]] = {
    cls.name: cls
    for cls in (FedPipeStrategy, LoRAFedAvgStrategy, HetLoRAStrategy, FlexLoRAStrategy, LegendStrategy, FedAdapterStrategy, FullFTStrategy)
}
