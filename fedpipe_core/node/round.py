"""A site's local round, free of Flower: the node's data, base and state, the mode's routine, its report; and the
site's final scores after the last round.

The ClientApp (:mod:`client_app.local_round`) and the warm worker (:mod:`fedpipe_core.node.worker`) call it; torch,
transformers and peft load with this module, so a QUERY is answered without them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedpipe_core.codec import decode_delta, decode_factors
from fedpipe_core.config import RunConfig
from fedpipe_core.data import Example
from fedpipe_core.device import resolve_device
from fedpipe_core.evaluate import evaluate_loss, global_model, score_model, spread
from fedpipe_core.local import (
    ClientRound,
    RoundSeeds,
    adapter_scaling,
    round_seeds,
    run_client_round,
    run_full_round,
)
from fedpipe_core.lora import strip_lora
from fedpipe_core.metrics import meteor_missing
from fedpipe_core.node.cache import cached_profile
from fedpipe_core.node.state import WarmBase, bytes_written, files_on_disk, node_base, node_state_dir, save_importance
from fedpipe_core.privacy import DpSgd, PrivacyBudgetSpent, PrivacyLedger, load_ledger
from fedpipe_core.profile import ClientProfile, declared_on_device, node_number
from fedpipe_core.protocol import FinalInstruction, FinalReply, TrainInstruction, TrainReply
from fedpipe_core.round_start import RoundStart
from fedpipe_core.task import NodeData, Task, load_task, node_profile, partition_data, site_data

Arrays = dict[str, np.ndarray]


@dataclass(frozen=True)
class Site:
    """What a local round reads of its node: the attributes of Flower's ``Context`` it uses (a Context serves as one),
    without Flower (the warm worker gets them over its socket)."""

    run_config: Mapping[str, Any]
    node_config: Mapping[str, Any]
    run_id: int
    node_id: int


def _partition(context: Site) -> tuple[int, int]:
    node = context.node_config
    if "data-path" in node:  # a site with its own data file: one whole "partition"
        return int(node.get("partition-id", 0)), 1
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("node config needs 'data-path', or 'partition-id' and 'num-partitions'")
    return int(node["partition-id"]), int(node["num-partitions"])


def node_data(task: Task, context: Site) -> NodeData:
    """The node's own data file when its node config names one, else its partition of the run's data, split
    into its training, validation and test shares (:class:`~fedpipe_core.task.NodeData`)."""
    if "data-path" in context.node_config:
        node = context.node_config
        return site_data(task, str(node["data-path"]), str(node.get("prompt-field", "")), str(node.get("response-field", "")))
    return partition_data(task, *_partition(context))


def _device(context: Site) -> torch.device:
    """The node's accelerator: node config ``device`` (``auto`` by default: CUDA when present, else CPU)."""
    return resolve_device(str(context.node_config.get("device", "auto")))


@dataclass
class LocalJob:
    """What a mode's local routine reads: the run's task, the node, the instruction and its payload, the node's data,
    the round's seeds, its DP-SGD settings, the warm worker's base (None in process) and the phase timings it adds to."""

    task: Task
    site: Site
    order: TrainInstruction
    payload: Arrays
    data: NodeData
    seeds: RoundSeeds
    dp: DpSgd | None = None
    warm: WarmBase | None = None
    phases: dict[str, float] = field(default_factory=dict)


def _adapters_round(job: LocalJob) -> tuple[ClientRound, int]:
    """``fedpipe`` (merge the sent ΔW rounds; its own adapters continued, or fresh ones with ``round-start = restart``;
    eqs 11-12, :mod:`fedpipe_core.round_start`) and ``factors`` (start from the sent A, B)."""
    task, order, payload, warm = job.task, job.order, job.payload, job.warm
    fedpipe = order.mode == "fedpipe"
    start, end = (order.state_from, order.state_to) if fedpipe else (0, 0)
    directory = node_state_dir(task, job.site.run_id, job.site.node_id)
    policy = RoundStart.of(task.config, order.mode, task.shapes, task.targets, adapter_scaling(task.config))
    begun = policy.begin(directory, order.ranks, payload, task.shapes)
    built = time.perf_counter()
    where = _device(job.site)
    held = policy.held(begun)
    model, state = node_base(task, directory, payload if fedpipe else {}, start, end, order.precision, held, warm, where)
    job.phases["base-s"] = time.perf_counter() - built
    out = run_client_round(
        task,
        device=where,
        model=model,
        examples=job.data.train,
        ranks=order.ranks,
        seed=job.seeds.data,
        init_seed=job.seeds.init,
        importance_history=state.importance,
        initial_factors=begun.initial,
        batch_size=order.batch_size,
        local_steps=order.local_steps,
        evaluate_on=validation_share(task, job.data) if order.evaluate else None,
        dp=job.dp,
        optimizer_state=begun.moments,
        frozen_a=policy.frozen_a is not None,
    )
    save_importance(directory, state, out.importance_history)
    if warm is not None:
        warm.keep(strip_lora(model), directory, state)
    return replace(out, arrays=policy.end(directory, begun, out.arrays, out.result.optimizer_state, task.shapes)), end


def _full_round(job: LocalJob) -> tuple[ClientRound, int]:
    """``ft``: fine-tune the whole planned weights on base + the sent global ΔW (built each message: a warm worker keeps
    no full fine-tuning base)."""
    task, order = job.task, job.order
    out = run_full_round(
        task,
        device=_device(job.site),
        examples=job.data.train,
        modules=list(order.ranks),
        base_delta=decode_delta(job.payload, task.shapes),
        seed=job.seeds.data,
        batch_size=order.batch_size,
        local_steps=order.local_steps,
        evaluate_on=validation_share(task, job.data) if order.evaluate else None,
        dp=job.dp,
    )
    return out, 0


def validation_share(task: Task, data: NodeData) -> list[Example]:
    """What a node evaluates a model on: ``eval.examples`` of its validation share, spread over its groups."""
    return spread(data.validation, task.config.eval_examples)


ROUTINES: dict[str, Callable[[LocalJob], tuple[ClientRound, int]]] = {
    "fedpipe": _adapters_round,
    "factors": _adapters_round,
    "ft": _full_round,
}
"""The local routine of each train mode (:data:`fedpipe_core.protocol.MODES`): (its round, the ΔW version merged)."""


def profile(context: Site) -> ClientProfile:
    """This node's profile when it is not declared: simulated for the run's model, or measured here; worked out once
    per run and kept in the node's state (node config ``profile-changes = true``: every message)."""
    declared = declared_on_device(context.node_config)
    if declared is not None:  # the site's own declaration, as it stands now
        return declared
    task = load_task(RunConfig.from_mapping(context.run_config))
    changes = str(context.node_config.get("profile-changes", "false")).lower() == "true"
    directory = node_state_dir(task, context.run_id, context.node_id)
    return cached_profile(directory, lambda: node_profile(task, context.node_config, _partition(context)[0]), changes)


class RoundRefused(RuntimeError):
    """The node refuses this round (its privacy settings); the reply says why."""


def train_round(
    site: Site, order: TrainInstruction, payload: Arrays, entered: float, startup_s: float, warm: WarmBase | None = None
) -> tuple[Arrays, TrainReply]:
    """One local round; the instruction says which modules, which ranks and which ΔW to merge.

    ``entered`` is when the handler was entered (``time.perf_counter()``) and ``startup_s`` how long the
    process took to get there; ``setup-s`` is what this handler spent besides local training. ``warm``: the base a
    long-lived worker holds for this node between messages (:class:`~fedpipe_core.node.state.WarmBase`).
    """
    loaded = time.perf_counter()  # since ``entered``: the training stack's import (none in a warm worker)
    task = load_task(RunConfig.from_mapping(site.run_config))
    partition_id, _ = _partition(site)
    data = node_data(task, site)
    phases = {"import-s": loaded - entered, "data-s": time.perf_counter() - loaded}
    directory = node_state_dir(task, site.run_id, site.node_id)
    on_disk = files_on_disk(directory)
    unknown = sorted(set(order.ranks) - set(task.shapes))
    if unknown:
        raise ValueError(f"plan names modules this model cannot adapt: {unknown[:3]}")
    seeds = round_seeds(task.config, order.server_round, partition_id)
    ledger = site_ledger(task, site)
    try:
        dp = private_round(task, ledger, order, data, seeds.data)
    except (PrivacyRefusal, PrivacyBudgetSpent) as refusal:
        raise RoundRefused(str(refusal)) from refusal
    out, version = ROUTINES[order.mode](LocalJob(task, site, order, payload, data, seeds, dp, warm, phases))
    spent = None
    if ledger is not None and dp is not None:
        spent = ledger.record(dp.rate, out.result.steps)
        ledger.save(directory)
    phases["state-bytes"] = float(bytes_written(directory, on_disk))
    report = TrainReply(
        num_examples=out.num_examples,
        train_loss=out.result.mean_loss,
        steps=out.result.steps,
        data_examples=len(data.train),
        state_version=version,
        profile=profile(site),
        train_s=out.train_s,
        setup_s=time.perf_counter() - entered - out.train_s,
        startup_s=startup_s,
        importance=out.importance,
        model_bytes=out.model_bytes,
        peak_bytes=out.peak_bytes,
        eval_loss=out.start_eval.loss if out.start_eval else None,
        eval_examples=len(validation_share(task, data)) if out.start_eval else 0,
        weight_norms=out.weight_norms,
        epsilon_spent=spent,
        phases=phases,
    )
    return out.arrays, report


class PrivacyRefusal(RuntimeError):
    """A site that asks for DP-SGD was sent a TRAIN message without the DP instruction."""


def site_ledger(task: Task, context: Site) -> PrivacyLedger | None:
    """This site's privacy ledger when it trains with DP-SGD: its node config's ``dp-epsilon`` / ``dp-delta``, else the
    run config's ``privacy.site-epsilon`` / ``privacy.site-delta``; None when its ε is 0 (no DP)."""
    cfg, node = task.config, context.node_config
    epsilon = node_number(node, "dp-epsilon", cfg.privacy_site_epsilon)
    if epsilon < 0:  # a typo must not turn a site's DP off
        raise ValueError(f"node config 'dp-epsilon': must be >= 0 (0: no DP), got {epsilon:g}")
    if epsilon == 0:
        return None
    delta = node_number(node, "dp-delta", cfg.privacy_site_delta)
    if not 0 < delta < 1:
        raise ValueError(f"node config 'dp-delta': must be in (0, 1), got {delta:g}")
    return load_ledger(node_state_dir(task, context.run_id, context.node_id), epsilon, delta)


def private_round(task: Task, ledger: PrivacyLedger | None, order: TrainInstruction, data: NodeData, seed: int) -> DpSgd | None:
    """The round's DP-SGD settings, admitted by the site's ledger; None for a site without DP. A site with DP refuses
    (fails closed) an instruction without the DP clipping bound, and a round that would take it past its ε."""
    if ledger is None:
        return None
    if order.dp_clip <= 0:
        raise PrivacyRefusal(
            f"this site trains only with DP-SGD (ε = {ledger.epsilon:g}); the instruction carries no clipping bound "
            "(run config privacy.clip-norm)"
        )
    rate = min(1.0, order.batch_size / len(data.train))
    ledger.admit(rate, order.local_steps, task.config.num_server_rounds * task.config.local_steps)
    return DpSgd(order.dp_clip, ledger.noise, rate, seed)


def final_scores(site: Site, order: FinalInstruction, payload: Arrays) -> FinalReply:
    """After the last round: score the final model (and the base, and the site's own local-only model) on this
    site's held-out shares; only losses, scores, counts and the data's hash go back (:class:`FinalReply`)."""
    task = load_task(RunConfig.from_mapping(site.run_config))
    data = node_data(task, site)
    if not data.held_out:
        return FinalReply(None, 0, 0, {}, data.data_hash, data.note)
    delta = decode_delta(payload, task.shapes)
    device = _device(site)
    validation = validation_share(task, data)
    federated = global_model(task, delta).to(device)
    loss = evaluate_loss(federated, task.tokenizer, validation, task.config.max_seq_len)
    scores = {"federated": score_model(task, federated, data.test)}
    del federated
    if order.base:
        scores["base"] = score_model(task, task.base_model().to(device), data.test)
    if order.local_baseline:
        scores["local_only"] = score_model(task, local_only_model(task, data, order.local_steps, device), data.test)
    note = meteor_missing() if task.config.task == "e2e" else ""
    return FinalReply(loss.loss, len(validation), len(data.test), scores, data.data_hash, note)


def local_only_model(task: Task, data: NodeData, steps: int, device: torch.device) -> torch.nn.Module:
    """The site's model fine-tuned alone: rank ``lora.rank`` on every target, ``steps`` steps at ``train.batch-size``,
    one optimizer throughout, on its training share only; base + its ΔW."""
    cfg = task.config
    out = run_client_round(
        task,
        device=device,
        model=task.base_model(),
        examples=data.train,
        ranks=task.uniform_ranks(),
        initial_factors=None,
        seed=cfg.seed,
        local_steps=steps,
    )
    delta = {m: lowrank.dense() for m, lowrank in decode_factors(out.arrays, task.shapes, adapter_scaling(cfg)).items()}
    return global_model(task, delta).to(device)
