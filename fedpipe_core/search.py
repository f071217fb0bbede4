"""FedPipe's two-stage configuration search (Section III-D, Algorithm 1) and its exact MILP (eq 2).

Stage 1 gives each client a batch size proportional to its share of FLOPS within [b_min, b_max].
Stage 2 picks, per client, (weight, rank) pairs from the most important weight down and from the
highest candidate rank down, keeping the cost model's step FLOPs × local steps within the
client's FLOPS budget for the round (and the adapter parameters within its upload budget, when set);
a rank-adjustment pass then raises ranks where budget is left. The precision of the frozen base is
the highest whose peak memory fits the client.

Both solvers maximise the same objective, Σ importance(m) · r_m over the chosen pairs, under
the same constraints, so their ratio measures the greedy's gap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import pulp

from fedpipe_core.cost import (
    ModelSpec,
    flops_terms,
    lora_params,
    memory_terms,
    peak_memory,
    step_flops,
)
from fedpipe_core.plan import Plan, choose_precision
from fedpipe_core.profile import ClientProfile
from fedpipe_core.quantize import PRECISIONS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """What a plan may use."""

    ranks: tuple[int, ...]
    seq: int
    local_steps: int


@dataclass(frozen=True)
class Budget:
    """What a node may spend in a round: FLOPs, and peak memory with its base held at ``precision``."""

    flops: float
    memory: float = float("inf")
    precision: str = "fp32"
    compute_bytes: int = 4
    """Bytes per activation in the node's compute dtype (see :class:`~fedpipe_core.profile.ClientProfile`)."""
    params: float = float("inf")
    """Adapter parameters the node may send this round (its upload budget ÷ bytes sent per parameter)."""


def round_budget_s(spec: ModelSpec, space: SearchSpace, batch: int, fastest_flops: float) -> float:
    """The round's time budget: the fastest node's time for every candidate weight at the top candidate
    rank and the largest batch, so that equal nodes with ample memory train everything at the top rank."""
    top = dict.fromkeys(spec.modules, max(space.ranks))
    return space.local_steps * step_flops(spec, top, batch, space.seq) / fastest_flops


def cheapest(spec: ModelSpec, modules: list[str], rank: int) -> dict[str, int]:
    """The least there is to train: one adapter of ``rank`` on a module of the top block."""
    return {max(modules, key=lambda m: (spec.modules[m][0], m)): rank} if modules else {}


def batch_sizes(flops: list[float], b_min: int, b_max: int) -> list[int]:
    """Stage 1: b_k = b_max · F_k / max_j F_j, rounded and clipped to [b_min, b_max]."""
    top = max(flops)
    return [min(b_max, max(b_min, round(b_max * f / top))) for f in flops]


def _round_flops(spec: ModelSpec, ranks: dict[str, int], batch: int, space: SearchSpace) -> float:
    return space.local_steps * step_flops(spec, ranks, batch, space.seq)


def greedy(spec: ModelSpec, importance: dict[str, float], batch: int, space: SearchSpace, budget: Budget) -> dict[str, int]:
    """Algorithm 1, stage 2, aware of backward depth: the best of one fill per lowest adapted block.

    The backward pass runs from the output down to the lowest adapted block, so that block fixes
    the cost of everything but the adapter parameters. For each candidate lowest block the
    budgets left for adapter parameters are known, and Algorithm 1 fills them with the weights at
    or above it: by importance (ties: upper blocks first), each at the highest rank that fits, then
    rank adjustment; the same fill by importance per parameter is tried too. The plan with the
    highest Σ importance · rank wins; FLOPs stay within ``budget.flops`` and peak memory at
    ``budget.precision`` within ``budget.memory``.
    """
    flops = flops_terms(spec, batch, space.seq)
    memory = memory_terms(spec, batch, space.seq, budget.precision, budget.compute_bytes)
    steps = space.local_steps
    orders = [
        sorted(importance, key=key) for key in (_by_importance(importance, spec), _by_importance_per_param(importance, spec))
    ]
    best: dict[str, int] = {}
    best_value = -math.inf
    for lowest in sorted({spec.modules[m][0] for m in importance}):
        blocks = spec.num_layers - lowest
        room = min(
            (budget.flops / steps - flops.fixed - flops.per_block * blocks) / flops.per_param,
            (budget.memory - memory.fixed - memory.per_block * blocks) / memory.per_param,
            budget.params,
        )
        for order in orders:
            chosen = _fill(spec, [m for m in order if spec.modules[m][0] >= lowest], space.ranks, room)
            value = sum(importance[m] * r for m, r in chosen.items())
            if chosen and value > best_value:
                best, best_value = chosen, value
    return best


def _by_importance(importance: dict[str, float], spec: ModelSpec) -> Callable[[str], tuple[float, int, str]]:
    return lambda m: (-importance[m], -spec.modules[m][0], m)


def _by_importance_per_param(importance: dict[str, float], spec: ModelSpec) -> Callable[[str], tuple[float, int, str]]:
    return lambda m: (-importance[m] / (spec.modules[m][1] + spec.modules[m][2]), -spec.modules[m][0], m)


def _fill(spec: ModelSpec, order: list[str], ranks: tuple[int, ...], room: float) -> dict[str, int]:
    """Weights in ``order``, each at the highest rank whose adapter parameters still fit ``room``,
    then rank adjustment (raise ranks, in the same order, while they fit)."""
    chosen: dict[str, int] = {}
    used = 0.0
    width = {m: spec.modules[m][1] + spec.modules[m][2] for m in order}
    descending = sorted(ranks, reverse=True)
    for module in order:
        for rank in descending:
            if used + rank * width[module] <= room:
                chosen[module] = rank
                used += rank * width[module]
                break
    for module in [m for m in order if m in chosen]:
        for rank in (r for r in descending if r > chosen[module]):
            extra = (rank - chosen[module]) * width[module]
            if used + extra <= room:
                chosen[module], used = rank, used + extra
                break
    return chosen


def exact(
    spec: ModelSpec, importance: dict[str, float], batch: int, space: SearchSpace, budget: Budget, time_limit_s: float = 60.0
) -> dict[str, int]:
    """The same choice as an MILP (eq 2 with the cost model's constraints), solved by CBC (``pulp[cbc]``).

    x[m, r] picks rank r for weight m (at most one per weight); z[l] = 1 when the backward pass
    reaches block l, forced by any pick in a block at or below l. Step FLOPs and peak memory
    are both linear in x and z. The importances are divided by the largest (the argmax is the
    same): measured ones can be ~1e-9, below CBC's absolute tolerances, which then stops at
    an empty incumbent.
    """
    flops = flops_terms(spec, batch, space.seq)
    mem = memory_terms(spec, batch, space.seq, budget.precision, budget.compute_bytes)
    problem = pulp.LpProblem("fedpipe_config", pulp.LpMaximize)
    modules = sorted(importance)
    x = {(m, r): problem.add_variable(f"x_{i}_{r}", cat="Binary") for i, m in enumerate(modules) for r in space.ranks}
    z = {layer: problem.add_variable(f"z_{layer}", cat="Binary") for layer in range(spec.num_layers)}
    top = max(importance.values(), default=0.0)
    scale = 1.0 / top if top > 0 else 1.0
    problem += pulp.lpSum(importance[m] * scale * r * x[m, r] for m, r in x)
    for m in modules:
        problem += pulp.lpSum(x[m, r] for r in space.ranks) <= 1
        layer = spec.modules[m][0]
        for upper in range(layer, spec.num_layers):
            for r in space.ranks:
                problem += z[upper] >= x[m, r]
    blocks = pulp.lpSum(z.values())
    params = pulp.lpSum(lora_params(spec, {m: r}) * x[m, r] for m, r in x)
    problem += space.local_steps * (flops.fixed + flops.per_block * blocks + flops.per_param * params) <= budget.flops
    if budget.memory != float("inf"):
        problem += mem.fixed + mem.per_block * blocks + mem.per_param * params <= budget.memory
    if budget.params != float("inf"):
        problem += params <= budget.params
    solver = pulp.COIN_CMD(msg=False, timeLimit=time_limit_s)
    if not solver.available():
        raise RuntimeError("fedpipe.search='exact' needs the CBC solver: pip install 'pulp[cbc]'")
    problem.solve(solver)
    chosen = {m: r for (m, r), var in x.items() if var.value() is not None and var.value() > 0.5}
    over_memory = peak_memory(spec, chosen, batch, space.seq, budget.precision, budget.compute_bytes) > budget.memory * (1 + 1e-9)
    over_upload = lora_params(spec, chosen) > budget.params
    if not chosen or over_memory or over_upload or _round_flops(spec, chosen, batch, space) > budget.flops * (1 + 1e-9):
        return {}  # infeasible (or no incumbent within the time limit)
    return chosen


def plan_client(
    spec: ModelSpec,
    profile: ClientProfile,
    importance: dict[str, float],
    batch: int,
    round_time_s: float,
    space: SearchSpace,
    method: str = "greedy",
    precision: str = "auto",
    max_params: float = float("inf"),
) -> Plan:
    """Precision first, then weights and ranks under FLOPS and memory.

    The precision is the most bits with which every candidate weight at the smallest rank fits
    in memory (the paper quantizes by memory budget before the search); when none does, NF4,
    which leaves the most memory for adapters, if one adapter on the top block fits with it.
    A node whose FLOPS budget affords no adapter for every local step trains the cheapest one rather
    than drop out, for the local steps that fit the budget (at least one: only when a single step does
    not fit does its round take longer than the budget). A fixed ``precision`` (ablations)
    replaces the memory rule; the plan's predicted memory then shows what it costs. ``max_params`` bounds the adapter
    parameters the plan may train (the node's upload budget); the cheapest adapter is trained even past it.
    """
    started = time.perf_counter()
    budget = profile.flops * round_time_s
    everything = {m: min(space.ranks) for m in importance}
    least = cheapest(spec, list(importance), min(space.ranks))
    memory = profile.memory_bytes
    if precision != "auto":
        memory = float("inf")
    else:
        precision = choose_precision(spec, profile, everything, batch, space.seq)
    act = profile.compute_bytes
    if precision is None and peak_memory(spec, least, batch, space.seq, PRECISIONS[-1], act) <= profile.memory_bytes:
        precision = PRECISIONS[-1]  # tight memory: the fewest bits leave the most room for adapters
    if precision is None:
        need = peak_memory(spec, least, batch, space.seq, PRECISIONS[-1], act)
        return Plan(
            batch,
            "none",
            {},
            budget,
            reason=f"memory {profile.memory_bytes / 2**30:.2f} GiB cannot hold the NF4 base "
            f"and one rank-{min(space.ranks)} adapter ({need / 2**30:.2f} GiB)",
        )
    solver = exact if method == "exact" else greedy
    ranks = solver(spec, importance, batch, space, Budget(budget, memory, precision, act, max_params))
    elapsed = time.perf_counter() - started
    steps, fallback = 0, not ranks  # 0: the strategy's (all of the run config's local steps)
    ranks = ranks or least
    step = step_flops(spec, ranks, batch, space.seq)
    if fallback:  # a slow node still takes part, with the least work there is, for the steps that fit
        steps = min(space.local_steps, max(1, math.floor(budget / step + 1e-9)))
        log.warning(
            "%s search: no (weight, rank) plan fits the round budget of %.3g FLOPs at batch %d for %d local steps; "
            "training the cheapest adapter for %d",
            method,
            budget,
            batch,
            space.local_steps,
            steps,
        )
    return Plan(
        batch_size=batch,
        precision=precision,
        ranks=ranks,
        flops_budget=budget,
        step_flops=step,
        memory_bytes=peak_memory(spec, ranks, batch, space.seq, precision, act),
        search_s=elapsed,
        local_steps=steps,
        over_budget=fallback and step > budget,
    )
