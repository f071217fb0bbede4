"""A node's local round: attach the planned adapters (or free whole weights), train, report.

Holds the one adapter-scaling rule every strategy shares (:func:`lora_alphas`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedpipe_core.codec import decode_factors, encode_dense, encode_factors
from fedpipe_core.config import RunConfig
from fedpipe_core.data import Example
from fedpipe_core.device import PeakMemory
from fedpipe_core.evaluate import LossResult, evaluate_loss
from fedpipe_core.importance import ImportanceTracker
from fedpipe_core.lora import attach_lora, lora_factors, lora_layers, merge_delta, set_lora_factors
from fedpipe_core.privacy import DpSgd
from fedpipe_core.qlinear import effective_weight, place, stored_bytes
from fedpipe_core.round_start import OptimizerState
from fedpipe_core.task import Task
from fedpipe_core.train import TrainResult, train_local


@dataclass(frozen=True)
class ClientRound:
    """What a client sends back: its LoRA factors (encoded) and how it trained."""

    arrays: dict[str, np.ndarray]
    result: TrainResult
    num_examples: int
    """Examples processed this round (batch × steps done): the weight of this update in every strategy's average."""
    importance: dict[str, float]
    importance_history: dict[str, tuple[float, float]] = field(default_factory=dict)
    train_s: float = 0.0
    """Seconds of local training (the optimizer steps), to set the round's overhead against."""
    model_bytes: int = 0
    """Bytes of the frozen model as the node holds it (its block linears at the plan's precision)."""
    peak_bytes: int = 0
    """Measured peak memory of the round (see :class:`~fedpipe_core.device.PeakMemory`)."""
    start_eval: LossResult | None = None
    """The loss of the model the round started from on ``evaluate_on`` (federated evaluation), when asked."""
    weight_norms: dict[str, float] = field(default_factory=dict)
    """‖W‖_F of each trained weight as the node held it at the round's start."""


def adapter_scaling(config: RunConfig) -> float:
    """The scaling s = alpha / lora-rank of every adapter, whatever its rank (see :func:`lora_alphas`)."""
    return config.lora_alpha / config.lora_rank


def lora_alphas(config: RunConfig, ranks: dict[str, int]) -> dict[str, float]:
    """Per-module alpha · r / lora-rank: every rank gets the same scaling alpha / lora-rank, so updates
    of different ranks (and strategies) share one scale and a higher rank is not a smaller step."""
    return {m: config.lora_alpha * r / config.lora_rank for m, r in ranks.items()}


@dataclass(frozen=True)
class RoundSeeds:
    """A node's seeds for one round: its batch order, and the random A of its fresh adapters."""

    data: int
    init: int


def round_seeds(config: RunConfig, server_round: int, partition_id: int) -> RoundSeeds:
    """Per node and round; the A initialisation is shared by every node with ``lora.init = shared`` (ablation)."""
    shared = config.seed * 1_000_003 + server_round * 1_009
    data = shared + partition_id
    return RoundSeeds(data=data, init=shared if config.lora_init == "shared" else data)


def run_client_round(
    task: Task,
    *,
    model: PreTrainedModel,
    examples: list[Example],
    ranks: dict[str, int],
    initial_factors: Mapping[str, np.ndarray] | None,
    seed: int,
    init_seed: int | None = None,
    batch_size: int | None = None,
    local_steps: int | None = None,
    importance_history: dict[str, tuple[float, float]] | None = None,
    device: torch.device | None = None,
    evaluate_on: list[Example] | None = None,
    dp: DpSgd | None = None,
    optimizer_state: OptimizerState | None = None,
    frozen_a: bool = False,
) -> ClientRound:
    """Attach adapters to the prepared base (see :func:`~fedpipe_core.node.state.node_base`), train them on
    ``device`` (the CPU by default), score them (eqs 3-7); the round's peak memory is measured.

    ``seed`` orders the batches; ``init_seed`` (default: ``seed``) draws the fresh adapters' A. With
    ``evaluate_on``, the model as sent (before any step) is evaluated on those examples first; ``optimizer_state``
    continues AdamW's moments of an earlier round (:mod:`fedpipe_core.round_start`); ``frozen_a`` trains B only."""
    cfg = task.config
    device = device or torch.device("cpu")
    model = place(model, device)
    model_bytes = stored_bytes(model)
    norms = held_norms(model, list(ranks))
    with PeakMemory(device) as peak:
        peft_model = attach_lora(model, ranks, lora_alphas(cfg, ranks), seed if init_seed is None else init_seed)
        if initial_factors is not None:
            set_lora_factors(peft_model, decode_factors(initial_factors, task.shapes, adapter_scaling(cfg)))
        if frozen_a:
            for layer in lora_layers(peft_model).values():
                layer.lora_A["default"].weight.requires_grad_(False)
        start_eval = _start_eval(task, peft_model, evaluate_on)
        tracker = ImportanceTracker(peft_model, cfg.importance_beta1, cfg.importance_beta2, importance_history)
        started = time.perf_counter()
        result = _train(task, peft_model, examples, seed, batch_size, local_steps, tracker.update, dp, optimizer_state)
        train_s = time.perf_counter() - started
    return ClientRound(
        arrays=encode_factors(lora_factors(peft_model)),
        result=result,
        num_examples=result.examples,
        importance=tracker.scores(),
        importance_history=tracker.history(),
        train_s=train_s,
        model_bytes=model_bytes,
        peak_bytes=peak.peak_bytes(model_bytes),
        start_eval=start_eval,
        weight_norms=norms,
    )


def held_norms(model: torch.nn.Module, modules: list[str]) -> dict[str, float]:
    """‖W‖_F of each named weight as the model holds it (dequantized when stored at NF4/NF8/FP16)."""
    return {m: float(effective_weight(model.get_submodule(m)).float().norm()) for m in modules}


def _start_eval(task: Task, model: torch.nn.Module, examples: list[Example] | None) -> LossResult | None:
    """Federated evaluation of the model a round starts from, before its first step; one that fails (out of
    memory, say) is logged and reported as none, and the round's training goes on."""
    if not examples:
        return None
    try:
        return evaluate_loss(model, task.tokenizer, examples, task.config.max_seq_len)
    except (RuntimeError, ValueError) as exc:
        logging.getLogger(__name__).warning("federated evaluation failed, the round trains without it: %s", exc)
        return None


def run_full_round(
    task: Task,
    *,
    examples: list[Example],
    modules: list[str],
    base_delta: dict[str, torch.Tensor],
    seed: int,
    batch_size: int | None = None,
    local_steps: int | None = None,
    device: torch.device | None = None,
    evaluate_on: list[Example] | None = None,
    dp: DpSgd | None = None,
) -> ClientRound:
    """Full fine-tuning: train the whole weight of each module in ``modules``, return W_after - W_before
    (with ``evaluate_on``, base + the sent ΔW is evaluated on those examples first)."""
    device = device or torch.device("cpu")
    model = task.base_model()
    merge_delta(model, base_delta)
    model = model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    weights = {m: model.get_submodule(m).weight for m in modules}
    before = {m: w.detach().clone() for m, w in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    model_bytes = stored_bytes(model)
    with PeakMemory(device) as peak:
        start_eval = _start_eval(task, model, evaluate_on)
        started = time.perf_counter()
        result = _train(task, model, examples, seed, batch_size, local_steps, None, dp)
        train_s = time.perf_counter() - started
    deltas = {}
    for module, weight in weights.items():
        change = (weight.detach() - before[module]).float().cpu()
        deltas[module] = change.T if isinstance(model.get_submodule(module), Conv1D) else change
    return ClientRound(
        arrays=encode_dense(deltas),
        result=result,
        num_examples=result.examples,
        importance={},
        train_s=train_s,
        model_bytes=model_bytes,
        peak_bytes=peak.peak_bytes(model_bytes),
        start_eval=start_eval,
        weight_norms={m: float(before[m].norm()) for m in modules},
    )


def _train(
    task: Task,
    model: torch.nn.Module,
    examples: list[Example],
    seed: int,
    batch_size: int | None,
    local_steps: int | None,
    after_backward: Callable[[], None] | None,
    dp: DpSgd | None = None,
    optimizer_state: OptimizerState | None = None,
) -> TrainResult:
    cfg = task.config
    return train_local(
        model,
        task.tokenizer,
        examples,
        steps=local_steps or cfg.local_steps,
        batch_size=batch_size or cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        max_len=cfg.max_seq_len,
        seed=seed,
        after_backward=after_backward,
        dp=dp,
        optimizer_state=optimizer_state,
    )
