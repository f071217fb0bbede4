"""The strategy base every federated LoRA strategy shares, free of any Flower type.

A round reads top to bottom: **plan** (each node's adapters, batch, precision, local steps under
the round deadline) → **payload** (what each node is sent: arrays and a
:class:`~fedpipe_core.protocol.TrainInstruction`) → **read** each reply (checked against the
node's plan; a bad one raises :class:`~fedpipe_core.codec.UpdateError`) → **combine** the valid
updates into the next global state → **global ΔW** (what base + ΔW evaluates). A strategy owns its
global state; :meth:`Strategy.state_dict` is all a checkpoint needs.
"""

from __future__ import annotations

import functools
import math
import statistics
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import replace
from typing import Any, ClassVar

import numpy as np
import torch

from fedpipe_core.aggregate import ClientUpdate
from fedpipe_core.codec import decode_factors
from fedpipe_core.cost import lora_params, peak_memory, step_flops
from fedpipe_core.local import adapter_scaling
from fedpipe_core.plan import Plan, choose_precision
from fedpipe_core.profile import ClientProfile
from fedpipe_core.protocol import TrainInstruction, TrainReply, UpdateError
from fedpipe_core.search import SearchSpace, round_budget_s
from fedpipe_core.strategies.peer_rules import capability_rank
from fedpipe_core.task import Task

Arrays = dict[str, np.ndarray]
Updates = dict[int, tuple[ClientUpdate, TrainReply]]
"""This round's valid updates by node id, each with the reply it came with."""


def deadline_steps(step_s: float, local_steps: int, deadline_s: float) -> int:
    """Local steps a node finishes before the round deadline (all of them when there is none)."""
    if deadline_s <= 0:
        return local_steps
    return min(local_steps, math.floor(deadline_s / step_s + 1e-9))


@functools.lru_cache(maxsize=4)
def weight_norms(task: Task) -> dict[str, float]:
    """‖W‖_F of every target weight of the base model (the scale an update is judged against)."""
    model = task.base_model()
    return {m: float(model.get_submodule(m).weight.detach().norm()) for m in task.targets}


class Strategy(ABC):
    """Plan → payload → read → combine → global ΔW; subclasses decide what travels and how updates combine."""

    name: ClassVar[str] = "base"
    mode: ClassVar[str] = "factors"
    """How a node trains (:data:`fedpipe_core.protocol.MODES`)."""
    missing: ClassVar[str] = ""
    """What of the method's paper this implementation leaves out (the benchmark report lists it beside the row)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.profiles: dict[int, ClientProfile] = {}
        self.places: dict[int, int] = {}
        """Each node's place in the federation's order, as it reported it (:meth:`ordered`)."""
        self.reported_norms: dict[str, float] = {}
        """‖W‖ per module as the sites reported it (median over a round's replies): the scale of
        ``max-update-ratio`` on a server that reads no weight (``eval.where = sites``)."""

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """The nodes in the federation's order: by the place each reported (its ``partition-id``), then by node id.

        Wherever the order decides something (which trial group a node joins, the order of a sum of floats), a seed
        then decides it too: Flower draws a simulation's node ids afresh every run, so an order by node id alone
        differs between two runs of one seed."""
        return sorted(node_ids, key=lambda n: (n not in self.places, self.places.get(n, 0), n))

    # --- 1. plan --------------------------------------------------------------------------------
    def plan_round(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        """Every profiled node's plan this round (in :meth:`ordered` order), its local steps cut to ``round-deadline-s``."""
        profiled = self.ordered(n for n in node_ids if n in self.profiles)
        plans = self.make_plans(server_round, profiled) if profiled else {}
        for node_id, plan in plans.items():
            self._apply_deadline(node_id, plan)
        return plans

    def make_plans(self, server_round: int, node_ids: list[int]) -> dict[int, Plan]:
        """Each (profiled, at least one) node's configuration, ``node_ids`` in :meth:`ordered` order; by default the run
        config's, the same for all."""
        ranks = self.task.uniform_ranks()
        return {node: self.fit_plan(node, ranks, self.task.config.batch_size) for node in node_ids}

    def fit_plan(self, node_id: int, ranks: dict[str, int], batch: int) -> Plan:
        """A plan with these adapters and batch, its base held at the highest precision that fits the node."""
        cfg, spec, profile = self.task.config, self.task.spec, self.profiles[node_id]
        precision = choose_precision(spec, profile, ranks, batch, cfg.max_seq_len)
        if precision is None:
            need = peak_memory(spec, ranks, batch, cfg.max_seq_len, "nf4", profile.compute_bytes)
            return Plan(
                batch,
                "none",
                {},
                math.inf,
                reason=f"memory {profile.memory_bytes / 2**30:.2f} GiB cannot hold "
                f"this configuration even on an NF4 base ({need / 2**30:.2f} GiB)",
            )
        return Plan(
            batch,
            precision,
            dict(ranks),
            math.inf,
            step_flops=step_flops(spec, ranks, batch, cfg.max_seq_len),
            memory_bytes=peak_memory(spec, ranks, batch, cfg.max_seq_len, precision, profile.compute_bytes),
        )

    def capability_plans(self, node_ids: list[int]) -> dict[int, Plan]:
        """HetLoRA / FlexLoRA: every target module at the node's capability rank, the run config's batch."""
        top = max(self.profiles[n].flops for n in node_ids)
        candidates = self.task.config.rank_candidates()
        return {
            node: self.fit_plan(
                node,
                {m: capability_rank(self.profiles[node].flops, top, candidates) for m in self.task.targets},
                self.task.config.batch_size,
            )
            for node in node_ids
        }

    def round_time_s(self, node_ids: list[int]) -> float:
        """The round's time budget (:func:`~fedpipe_core.search.round_budget_s`) for these nodes."""
        cfg = self.task.config
        space = SearchSpace(cfg.rank_candidates(), cfg.max_seq_len, cfg.local_steps)
        return round_budget_s(self.task.spec, space, cfg.batch_size, max(self.profiles[n].flops for n in node_ids))

    def _apply_deadline(self, node_id: int, plan: Plan) -> None:
        """Local steps the node finishes within ``round-deadline-s``; none at all leaves it out."""
        cfg = self.task.config
        if not plan.feasible:
            return
        step_s = plan.step_flops / self.profiles[node_id].flops
        plan.local_steps = deadline_steps(step_s, plan.local_steps or cfg.local_steps, cfg.round_deadline_s)
        if plan.local_steps < 1:
            plan.ranks = {}
            plan.reason = f"one local step takes {step_s:.3g} s, past the round deadline of {cfg.round_deadline_s:g} s"

    # --- 2. payload -----------------------------------------------------------------------------
    def payloads(self, server_round: int, plans: dict[int, Plan]) -> dict[int, tuple[Arrays, TrainInstruction]]:
        """What each feasible node is sent: its arrays and its instruction (the dispatch state is derived once)."""
        feasible = {n: p for n, p in sorted(plans.items()) if p.feasible}
        if not feasible:
            return {}
        state = self.dispatch_state()
        out = {}
        for node_id, plan in feasible.items():
            state_from, state_to = self.sync_window(node_id, server_round)
            instruction = TrainInstruction(
                server_round, self.mode, dict(plan.ranks), plan.batch_size, plan.local_steps, plan.precision, state_from, state_to
            )
            out[node_id] = (self.node_payload(node_id, server_round, state, plan), instruction)
        return out

    def dispatch_state(self) -> Any:
        """What :meth:`node_payload` reads, derived from the global state once per round (not per node)."""
        return None

    @abstractmethod
    def node_payload(self, node_id: int, server_round: int, state: Any, plan: Plan) -> Arrays:
        """The arrays of one node's train message (``state`` from :meth:`dispatch_state`)."""

    def sync_window(self, node_id: int, server_round: int) -> tuple[int, int]:
        """FedPipe: the ΔW rounds (from, to] this node is sent; (0, 0) for strategies that send the state itself."""
        return 0, 0

    # --- 3. read and combine --------------------------------------------------------------------
    def read_update(self, arrays: Arrays, reply: TrainReply, assigned: dict[str, int] | None) -> ClientUpdate:
        """A reply's update, checked against the node's plan and the base weights' norms."""
        if assigned is None:
            raise UpdateError("reply from a node that was not sent a plan this round")
        update = self.decode_update(arrays, assigned, self.update_weight(reply))
        self._check_norms(update)
        return update

    def update_weight(self, reply: TrainReply) -> int:
        """What the update weighs in the average (``strategy.weight-by``): the examples the node processed in the round,
        or the size of its training share."""
        if self.task.config.weight_by == "examples":
            return reply.num_examples
        if reply.data_examples <= 0:
            raise UpdateError("strategy.weight-by = 'data': the reply does not say the size of the node's training share")
        return reply.data_examples

    def decode_update(self, arrays: Arrays, assigned: dict[str, int], num_examples: int) -> ClientUpdate:
        """A node's adapter factors, checked against the modules and ranks it was assigned."""
        factors = decode_factors(arrays, self.task.shapes, self.scaling())
        for module, lowrank in factors.items():
            if module not in assigned:
                raise UpdateError(f"module {module!r} was not assigned to this node")
            if lowrank.rank != assigned[module]:
                raise UpdateError(f"module {module!r} has rank {lowrank.rank}, assigned {assigned[module]}")
        if not factors:
            raise UpdateError("reply carries no adapter")
        return ClientUpdate(factors, num_examples)

    def observe_weight_norms(self, reports: list[dict[str, float]]) -> None:
        """A round's reported ‖W‖ per module: their median replaces the module's previous value."""
        for module in {m for report in reports for m in report}:
            self.reported_norms[module] = statistics.median(r[module] for r in reports if module in r)

    def reference_norms(self) -> dict[str, float]:
        """‖W‖ per module that updates are judged against: the base's own when the server reads weights, else the
        sites' reported ones (a server with ``eval.where = sites`` never reads a weight tensor)."""
        return weight_norms(self.task) if self.task.config.server_evaluates else self.reported_norms

    def _check_norms(self, update: ClientUpdate) -> None:
        """Reject an update whose ΔW on a module exceeds ``max-update-ratio`` × that weight's norm."""
        norms, ratio = self.reference_norms(), self.task.config.max_update_ratio
        sizes = {m: lowrank.norm() for m, lowrank in update.factors.items()}
        sizes |= {m: float(d.norm()) for m, d in update.dense.items()}
        for module, norm in sizes.items():
            if module not in norms:
                raise UpdateError(f"module {module!r}: no site reported ‖W‖, so the update cannot be judged")
            if norm > ratio * norms[module]:
                raise UpdateError(f"module {module!r}: ‖ΔW‖ = {norm:.3g} exceeds {ratio:g} × ‖W‖ = {norms[module]:.3g}")

    def observe_profile(self, node_id: int, profile: ClientProfile | None) -> None:
        """A node reports its profile with every update; a changed one replaces the old (keeping its source)."""
        if profile is None:
            return
        old = self.profiles.get(node_id)
        new = replace(profile, source=old.source) if old else profile
        if new != old:
            self.profiles[node_id] = new

    @abstractmethod
    def combine(self, server_round: int, updates: Updates) -> None:
        """Fold this round's valid updates into the global state."""

    def on_failure(self, node_id: int) -> None:  # noqa: B027 (an optional hook, not abstract)
        """Hook: a node's reply was an error or was rejected."""

    def round_record(self, server_round: int) -> dict[str, Any]:
        """What the strategy decided in ``server_round`` beyond the plans, for the round's metrics row (none by default)."""
        return {}

    # --- 4. global ΔW ---------------------------------------------------------------------------
    @abstractmethod
    def global_delta(self) -> dict[str, torch.Tensor]:
        """The global ΔW per module (base + ΔW is the fine-tuned model)."""

    def final_delta(self) -> dict[str, torch.Tensor]:
        """The ΔW of the final model (saved and scored at the end of the run): the global ΔW."""
        return self.global_delta()

    @abstractmethod
    def global_arrays(self) -> Arrays:
        """The global state as flat arrays (what the transport shows as the model)."""

    # --- shared ---------------------------------------------------------------------------------
    def scaling(self) -> float:
        """The adapter scaling every node uses, whatever the rank: alpha / lora-rank (see local.lora_alphas)."""
        return adapter_scaling(self.task.config)

    def trainable_params(self, ranks: dict[str, int]) -> int:
        """Parameters a node trains under a plan with these ranks."""
        return lora_params(self.task.spec, ranks)

    def state_dict(self) -> tuple[dict[str, object], Arrays]:
        """Everything a checkpoint keeps of the strategy: JSON-able state and named arrays (global state included)."""
        return {"profiles": {str(n): p.to_dict() for n, p in self.profiles.items()}, "places": self.places}, {}

    def load_state_dict(self, state: dict[str, object], tensors: Arrays) -> None:
        """Continue from a checkpoint's :meth:`state_dict`."""
        self.profiles = {int(n): ClientProfile(**p) for n, p in dict(state["profiles"]).items()}
        self.places = {int(n): int(place) for n, place in dict(state.get("places", {})).items()}


class ArrayState(Strategy):
    """A strategy whose global state is exactly its :meth:`global_arrays` (the factor and dense strategies)."""

    def state_dict(self) -> tuple[dict[str, object], Arrays]:
        state, tensors = super().state_dict()
        return state, tensors | {f"global/{k}": v for k, v in self.global_arrays().items()}

    def load_state_dict(self, state: dict[str, object], tensors: Arrays) -> None:
        super().load_state_dict(state, tensors)
        self.load_global_arrays(under(tensors, "global/"))

    @abstractmethod
    def load_global_arrays(self, arrays: Arrays) -> None:
        """Set the global state from what :meth:`global_arrays` gave."""


def under(tensors: Arrays, prefix: str) -> Arrays:
    """The arrays whose names start with ``prefix``, the prefix removed."""
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
