"""Strategies whose global state is a dense ΔW per module (empty before round 1).

- ``flexlora`` (Bai et al. 2024): ΔW = Σ_k p_k s_k B_k A_k over full products, redistributed to
  each client's rank by truncated SVD.
- ``ft``: full fine-tuning of the target weights with FedAvg; nodes whose memory cannot hold an
  FP32 base with the optimizer state of those weights cannot take part.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import torch

from fedpipe_core.aggregate import ClientUpdate, aggregate_delta, aggregate_dense
from fedpipe_core.codec import decode_delta, encode_dense
from fedpipe_core.cost import full_params, full_peak_memory, full_step_flops
from fedpipe_core.lowrank import Factors, LowRank, best_rank
from fedpipe_core.plan import Plan
from fedpipe_core.protocol import UpdateError
from fedpipe_core.strategies.base import Arrays, ArrayState, Updates
from fedpipe_core.strategies.factors import truncated_payload
from fedpipe_core.task import Task


class DenseStrategy(ArrayState):
    """Global state: a dense ΔW per module."""

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.delta: dict[str, torch.Tensor] = {}

    def global_arrays(self) -> Arrays:
        return encode_dense(self.delta)

    def load_global_arrays(self, arrays: Arrays) -> None:
        self.delta = decode_delta(arrays, self.task.shapes)

    def combine(self, server_round: int, updates: Updates) -> None:
        self.delta = {**self.delta, **self.next_delta([u for u, _ in updates.values()])}

    @abstractmethod
    def next_delta(self, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        """The new global ΔW of the modules this round's updates touched."""

    def global_delta(self) -> dict[str, torch.Tensor]:
        return dict(self.delta)


class FlexLoRA(DenseStrategy):
    """FlexLoRA: average the full products ΔW_k = s_k B_k A_k, give each node the best rank-r_k factors."""

    name = "flexlora"

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        return self.capability_plans(node_ids)

    def dispatch_state(self) -> Factors:
        """One SVD per module per round at the largest rank; its first r components are the best rank-r factors."""
        top = max(self.task.config.rank_candidates())
        factors = {}
        for module, delta in self.delta.items():
            best = best_rank(delta, top)
            factors[module] = LowRank(best.A, best.B / self.scaling(), self.scaling())  # the node's adapters apply s
        return factors

    def node_payload(self, node_id: int, server_round: int, state: Factors, plan: Plan) -> Arrays:
        return truncated_payload(state, plan)

    def next_delta(self, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        return aggregate_delta(updates)


class FullFT(DenseStrategy):
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
                plans[node] = Plan(
                    cfg.batch_size,
                    "fp32",
                    {},
                    math.inf,
                    reason=f"memory {have / 2**30:.2f} GiB cannot hold full fine-tuning ({memory / 2**30:.2f} GiB)",
                )
            else:
                plans[node] = Plan(cfg.batch_size, "fp32", dict(full), math.inf, step_flops=flops, memory_bytes=memory)
        return plans

    def dispatch_state(self) -> Arrays:
        return self.global_arrays()

    def node_payload(self, node_id: int, server_round: int, state: Arrays, plan: Plan) -> Arrays:
        return state  # the whole fine-tuned state, as FedAvg sends the model

    def next_delta(self, updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
        return {m: self.delta.get(m, 0) + d for m, d in aggregate_dense(updates).items()}

    def decode_update(self, arrays: Arrays, assigned: dict[str, int], num_examples: int) -> ClientUpdate:
        if any(not key.endswith("::dW") for key in arrays):
            raise UpdateError("full fine-tuning replies carry dense '<module>::dW' arrays only")
        dense = decode_delta(arrays, self.task.shapes)
        unassigned = sorted(set(dense) - set(assigned))
        if unassigned:
            raise UpdateError(f"module {unassigned[0]!r} was not assigned to this node")
        if not dense:
            raise UpdateError("reply carries no weight update")
        return ClientUpdate({}, num_examples, dense=dense)

    def trainable_params(self, ranks: dict[str, int]) -> int:
        return full_params(self.task.spec, list(ranks))
