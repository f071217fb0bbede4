"""FedPipe (arXiv 2404.06448): per-node search of weights and ranks, ΔW aggregation (eqs 9-12)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from fedpipe_core.aggregate import (
    ClientUpdate,
    aggregate_lowrank,
    module_weights,
    truncate_with_feedback,
)
from fedpipe_core.codec import decode_factors, encode_delta, encode_dense, encode_factors
from fedpipe_core.lowrank import LowRank, concat, factor_svd
from fedpipe_core.plan import Plan
from fedpipe_core.protocol import TrainReply, UpdateError
from fedpipe_core.round_start import change, shared_a
from fedpipe_core.search import SearchSpace, batch_sizes, plan_client
from fedpipe_core.strategies.base import Arrays, Strategy, Updates, under
from fedpipe_core.task import Task


class FedPipe(Strategy):
    """FedPipe aggregation (eqs 9-12): heterogeneous ranks and module subsets, ΔW averaged.

    The global state is the list of per-round ΔW increments, kept factored; the global ΔW is
    their sum. Each node is sent, in factored form when smaller, the rounds it has not merged
    yet; it merges them into its base and continues its own adapters (their product left out of
    its base) or, with ``round-start = restart``, trains fresh ones (B = 0); either way the ranks it
    is given may change from round to round (:mod:`fedpipe_core.round_start`). With ``dispatch = svd`` a round's ΔW is cut to the
    largest candidate rank and the remainder carried into the next round (error feedback); with
    ``exact`` it travels whole (rank Σ r_k).
    """

    name = "fedpipe"
    mode = "fedpipe"

    def __init__(self, task: Task) -> None:
        super().__init__(task)
        self.increments: dict[int, dict[str, LowRank]] = {}
        self.synced: dict[int, int] = {}
        self.importance: dict[str, float] = {}
        self.residual: dict[str, LowRank] = {}  # what dispatch = svd has cut and not yet sent
        self._total: dict[str, torch.Tensor] | None = {}  # Σ of the increments, dense; derived, rebuilt when None
        self._frozen_a: dict[str, torch.Tensor] | None = None

    # --- plan -----------------------------------------------------------------------------------
    def current_importance(self, server_round: int = 0) -> dict[str, float]:
        """Latest score per weight; a never-trained weight gets the mean known score, a neutral prior:
        neither pulled to the front (which would drag the backward pass down to block 0) nor left out.

        With ``weight-selection = random`` (the ablation) scores are drawn afresh each round.
        """
        if self.task.config.weight_selection == "random":
            rng = random.Random(f"{self.task.config.seed}:{server_round}")
            return {m: rng.random() for m in self.task.targets}
        known = list(self.importance.values())
        prior = sum(known) / len(known) if known else 1.0
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
        max_params = self.upload_params()
        return {
            node: replace(
                plan_client(
                    spec,
                    self.profiles[node],
                    importance,
                    batch,
                    round_time,
                    space,
                    method=cfg.search,
                    precision=cfg.base_precision,
                    max_params=max_params,
                ),
                scores=importance,
            )
            for node, batch in zip(node_ids, batches)
        }

    def trainable_params(self, ranks: dict[str, int]) -> int:
        """Parameters a node trains under a plan with these ranks: A and B, or B alone (out · r) with a frozen A."""
        if self.task.config.trains_frozen_a:
            return sum(r * self.task.spec.modules[m][1] for m, r in ranks.items())
        return super().trainable_params(ranks)

    def upload_params(self) -> float:
        """Adapter parameters ``fedpipe.upload-budget-mb`` allows a node per round: FP32 (A, B), twice over for a
        continued node (it sends the adapters it started from beside them)."""
        cfg = self.task.config
        if cfg.upload_budget_mb <= 0:
            return float("inf")
        per_param = 4 * (2 if cfg.round_start == "continue" else 1)
        return cfg.upload_budget_mb * 1e6 / per_param

    # --- payload --------------------------------------------------------------------------------
    def sync_window(self, node_id: int, server_round: int) -> tuple[int, int]:
        return self.synced.get(node_id, 0), server_round - 1

    def node_payload(self, node_id: int, server_round: int, state: None, plan: Plan) -> Arrays:
        """The ΔW rounds this node has not merged yet, one factor pair per module (or dense when smaller)."""
        start, end = self.sync_window(node_id, server_round)
        pending: dict[str, list[LowRank]] = {}
        for rnd in range(start + 1, end + 1):
            for module, lowrank in self.increments.get(rnd, {}).items():
                pending.setdefault(module, []).append(lowrank)
        return encode_delta({m: concat(parts) for m, parts in pending.items()})

    # --- read and combine -----------------------------------------------------------------------
    @property
    def frozen_a(self) -> dict[str, torch.Tensor]:
        """``privacy.frozen-a``: the A every node trains against (drawn once from the run seed, as the nodes draw it)."""
        if self._frozen_a is None:
            cfg = self.task.config
            self._frozen_a = shared_a(self.task.shapes, self.task.targets, max(cfg.rank_candidates()), cfg.seed)
        return self._frozen_a

    def decode_update(self, arrays: Arrays, assigned: dict[str, int], num_examples: int) -> ClientUpdate:
        """With a frozen A a node sends B alone, zero-padded to the largest candidate rank; else (A, B) as usual."""
        if not self.task.config.trains_frozen_a:
            return self._decode_change(arrays, assigned, num_examples)
        rank, factors = max(self.task.config.rank_candidates()), {}
        for key, value in arrays.items():
            module, _, part = key.rpartition("::")
            if part != "B" or module not in assigned:
                raise UpdateError(f"array {key!r}: a frozen-A node sends '<assigned module>::B' only")
            if value.shape != (self.task.shapes[module][0], rank) or not np.isfinite(value).all():
                raise UpdateError(f"array {key!r}: B must be finite with shape {(self.task.shapes[module][0], rank)}")
            factors[module] = LowRank(self.frozen_a[module], torch.from_numpy(value.astype(np.float32)), self.scaling())
        if not factors:
            raise UpdateError("reply carries no adapter")
        return ClientUpdate(factors, num_examples)

    def _decode_change(self, arrays: Arrays, assigned: dict[str, int], num_examples: int) -> ClientUpdate:
        """A continued node sends its adapters after the round at the assigned rank (``<module>::A|B``, checked as
        every update is) and, for the modules it continued, the adapters it started from (``<module>::A0|B0``, of
        at most that rank); its update is the change [B, −B′]·[A; A′] (:mod:`fedpipe_core.round_start`)."""
        start = {k[:-1]: v for k, v in arrays.items() if k.endswith(("::A0", "::B0"))}
        update = super().decode_update(
            {k: v for k, v in arrays.items() if not k.endswith(("::A0", "::B0"))}, assigned, num_examples
        )
        before = decode_factors(start, self.task.shapes, self.scaling()) if start else {}
        for module, lowrank in before.items():
            if module not in update.factors or lowrank.rank > assigned[module]:
                raise UpdateError(f"module {module!r}: starting adapters of rank {lowrank.rank} do not fit its assigned rank")
        return replace(update, factors=change(before, update.factors))

    def read_update(self, arrays: Arrays, reply: TrainReply, assigned: dict[str, int] | None) -> ClientUpdate:
        update = super().read_update(arrays, reply, assigned)
        if reply.state_version is None:
            raise UpdateError("reply metrics lack 'state-version'")
        return update

    def combine(self, server_round: int, updates: Updates) -> None:
        """Eq 10's average of ΔW_k = s_k B_k A_k (eq 9), cut for dispatch under ``svd``; importance averaged."""
        increment = (
            average_b([u for u, _ in updates.values()], self.frozen_a)
            if self.task.config.trains_frozen_a
            else aggregate_lowrank([u for u, _ in updates.values()])
        )
        self._commit(server_round, increment, {n: int(reply.state_version) for n, (_, reply) in updates.items()})
        self.importance.update(importance_of(updates))

    def combine_sum(
        self, server_round: int, sums: dict[str, np.ndarray], weights: dict[str, float], versions: dict[int, int]
    ) -> None:
        """Eq 10 from secure aggregation's sums (``privacy.mode = secure``): per module Σ n_k B_k over the sites that
        trained it and Σ n_k, so ΔW = s (Σ n_k B_k / Σ n_k) A exactly, as :func:`average_b` computes it per site. No site
        sent importance: each module's is the mean singular value of this increment (eq 3's factor the server can see)."""
        a, scale = self.frozen_a, self.scaling()
        increment = {m: LowRank(a[m], torch.from_numpy(scale * sums[m] / weights[m]).float()) for m in sorted(sums)}
        self._commit(server_round, increment, versions)
        self.importance.update({m: mean_singular_value(lowrank) for m, lowrank in increment.items()})

    def _commit(self, server_round: int, increment: dict[str, LowRank], versions: dict[int, int]) -> None:
        """The round's ΔW becomes an increment (cut for dispatch under ``svd``); the nodes that sent are in sync."""
        if self.task.config.dispatch == "svd":
            increment, self.residual = truncate_with_feedback(increment, self.residual, max(self.task.config.rank_candidates()))
        self.increments[server_round] = increment
        if self._total is not None:
            self._total = _accumulate(self._total, increment)
        self.synced.update(versions)

    def on_failure(self, node_id: int) -> None:
        self.synced.pop(node_id, None)  # resend the whole ΔW history next time

    # --- global ΔW ------------------------------------------------------------------------------
    def global_delta(self) -> dict[str, torch.Tensor]:
        """Σ over rounds of each round's ΔW (what every node has merged once it is in sync).

        Kept as a running sum that :meth:`combine` extends by one round, so evaluating a round does
        not densify every earlier round again; rebuilt from the increments after a checkpoint load.
        """
        if self._total is None:
            self._total = {}
            for rnd in sorted(self.increments):
                self._total = _accumulate(self._total, self.increments[rnd])
        return dict(self._total)

    def final_delta(self) -> dict[str, torch.Tensor]:
        """Σ ΔW plus what ``dispatch = svd`` cut and has not sent yet: nothing the nodes trained is dropped."""
        return _accumulate(self.global_delta(), self.residual)

    def global_arrays(self) -> Arrays:
        """The global ΔW, dense: its size stays that of the weights however many rounds have passed."""
        return encode_dense(self.global_delta())

    def state_dict(self) -> tuple[dict[str, object], Arrays]:
        """Profiles, importance, every round's ΔW increment and the dispatch residual (node sync is per run: not kept)."""
        state, tensors = super().state_dict()
        for rnd, increment in self.increments.items():
            tensors |= {f"{rnd}/{key}": value for key, value in encode_factors(increment).items()}
        tensors |= {f"residual/{key}": value for key, value in encode_factors(self.residual).items()}
        return {**state, "importance": self.importance, "increment-rounds": sorted(self.increments)}, tensors

    def load_state_dict(self, state: dict[str, object], tensors: Arrays) -> None:
        super().load_state_dict(state, tensors)
        self.importance = {str(m): float(v) for m, v in dict(state["importance"]).items()}
        for rnd in state["increment-rounds"]:
            self.increments[int(rnd)] = decode_factors(under(tensors, f"{rnd}/"), self.task.shapes, scale=1.0)
        self.residual = decode_factors(under(tensors, "residual/"), self.task.shapes, scale=1.0)
        self._total = None


def _accumulate(total: dict[str, torch.Tensor], increment: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """``total`` plus one round's ΔW, module by module (a new dict; the tensors of ``total`` are not changed)."""
    out = dict(total)
    for module, lowrank in increment.items():
        dense = lowrank.dense()
        out[module] = out[module] + dense if module in out else dense
    return out


def mean_singular_value(lowrank: LowRank) -> float:
    """Eq 3's first factor: the mean of ΔW's singular values over its rank."""
    return float(factor_svd(lowrank)[1].mean())


def average_b(updates: list[ClientUpdate], a: dict[str, torch.Tensor]) -> dict[str, LowRank]:
    """Eq 10 with a frozen A: Σ_k w_k s B_k A = (Σ_k w_k s B_k) A exactly, one rank-r_max pair per module (a plain
    weighted sum of the B's, which secure aggregation can compute)."""
    out: dict[str, LowRank] = {}
    for module in sorted({m for u in updates for m in u.factors}):
        pairs = module_weights(updates, module)
        b = sum(w * u.factors[module].scale * u.factors[module].B.double() for u, w in pairs)
        out[module] = LowRank(a[module], b.float())
    return out


def importance_of(updates: Updates) -> dict[str, float]:
    """Example-weighted mean of the importance each client reported for the weights it trained."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for update, reply in updates.values():
        for module in update.factors:
            if module in reply.importance:
                sums[module] = sums.get(module, 0.0) + update.num_examples * reply.importance[module]
                weights[module] = weights.get(module, 0.0) + update.num_examples
    return {m: sums[m] / weights[m] for m in sums}
