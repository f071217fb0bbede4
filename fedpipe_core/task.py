"""The task module: what a client does in a round and what the server evaluates.

Both Flower apps call only into this module; it ties config, model, data, LoRA, training,
aggregation codec and evaluation together, and holds nothing Flower-specific.
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from fedpipe_core.codec import (
    decode_delta,
    decode_factors,
    encode_dense,
    encode_factors,
)
from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.cost import ModelSpec, block_linears, model_spec, peak_memory
from fedpipe_core.data import (
    Example,
    load_examples,
    partition,
    references_by_group,
    split_examples,
)
from fedpipe_core.evaluate import LossResult, evaluate_loss, generate
from fedpipe_core.importance import ImportanceTracker
from fedpipe_core.lora import (
    attach_lora,
    lora_factors,
    merge_delta,
    module_shape,
    resolve_target_modules,
    set_lora_factors,
)
from fedpipe_core.metrics import e2e_scores
from fedpipe_core.model import (
    default_cache_dir,
    load_model,
    load_tokenizer,
    resolve_checkpoint,
)
from fedpipe_core.profile import ClientProfile, declared, measure, simulated
from fedpipe_core.quantize import QuantizedWeight, quantize
from fedpipe_core.state import NodeState, load_state, save_state, state_dir
from fedpipe_core.train import TrainResult, train_local


def quiet() -> None:
    """Silence library chatter (progress bars, advisory warnings) so round lines stay readable."""
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    logging.getLogger("datasets").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=FutureWarning)


@dataclass(frozen=True, eq=False)
class Task:
    """Everything a round needs that does not change during a run."""

    config: RunConfig
    checkpoint: Path
    tokenizer: PreTrainedTokenizerBase
    splits: dict[str, list[Example]]
    targets: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    spec: ModelSpec

    def base_model(self) -> PreTrainedModel:
        """A fresh copy of the frozen base model."""
        return load_model(self.checkpoint)

    def uniform_ranks(self) -> dict[str, int]:
        """The default plan: run-config rank on every target module."""
        return {m: self.config.lora_rank for m in self.targets}


@functools.lru_cache(maxsize=4)
def load_task(config: RunConfig) -> Task:
    """Resolve model, tokenizer, target modules and data splits; validates before training."""
    quiet()
    checkpoint = resolve_checkpoint(config.model, config.cache_dir)
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint)
    targets = tuple(resolve_target_modules(model, config.lora_target_modules))
    shapes = {m: module_shape(model, m) for m in targets}
    spec = model_spec(model, list(targets))
    splits = split_examples(load_examples(config.task, config.data_path))
    if config.max_train_examples:
        splits["train"] = splits["train"][: config.max_train_examples]
    for name in ("train", "validation"):
        if not splits[name]:
            raise ConfigError(f"run config 'data-path': the {config.task} data has no {name} example after splitting by group")
    return Task(config, checkpoint, tokenizer, splits, targets, shapes, spec)


@functools.lru_cache(maxsize=16)
def client_examples(task: Task, partition_id: int, num_partitions: int) -> list[Example]:
    """This client's share of the training split."""
    cfg = task.config
    return partition(task.splits["train"], num_partitions, partition_id, cfg.partitioner, cfg.dirichlet_alpha, cfg.seed)


@functools.lru_cache(maxsize=4)
def site_examples(task: Task, data_path: str) -> list[Example]:
    """Every example of a site's own data file (node config ``data-path``), all used for training.

    The file never leaves the node; a missing or malformed one raises ConfigError naming it.
    """
    return load_examples(task.config.task, data_path, where="node config 'data-path'")


@functools.lru_cache(maxsize=4)
def weight_norms(task: Task) -> dict[str, float]:
    """‖W‖_F of every target weight of the base model (the scale an update is judged against)."""
    model = task.base_model()
    return {m: float(model.get_submodule(m).weight.detach().norm()) for m in task.targets}


@dataclass(frozen=True)
class ClientRound:
    """What a client sends back: its LoRA factors (encoded) and how it trained."""

    arrays: dict[str, np.ndarray]
    result: TrainResult
    num_examples: int
    importance: dict[str, float]
    importance_history: dict[str, tuple[float, float]] = field(default_factory=dict)
    train_s: float = 0.0
    """Seconds of local training (the optimizer steps), to set the round's overhead against."""


class StateMismatch(RuntimeError):
    """The server sent ΔW rounds that do not continue this node's saved state."""


def node_base(task: Task, directory: Path, payload: Mapping[str, np.ndarray], start: int, end: int,
              precision: str) -> tuple[PreTrainedModel, NodeState]:
    """This round's frozen base, W0 + the merged ΔW held at ``precision`` (eqs 11-12), and the node's state.

    Merges the server's ΔW rounds ``start+1..end`` into the state saved on the node's disk. The
    quantized block weights are saved too, so at an unchanged precision only the weights this
    round's ΔW touches are re-quantized; at a new precision the whole base is. A weight is held as
    Q(W0 + ΣΔW) rather than Q(deQ(W_t) + ΔW_t): the iterated form drops every ΔW smaller than a
    quantization step, so a node's base would stop following the global model.
    """
    state = load_state(directory)
    if start == 0 and (state.version or state.delta):
        state = NodeState(importance=state.importance)  # the server resends every ΔW round: start over
    if state.version != start:
        raise StateMismatch(f"node state is at round {state.version}, the server sent ΔW from round {start}")
    increment = decode_delta(payload, task.shapes)
    state.add(increment, end)
    model = task.base_model()
    merge_delta(model, state.delta)  # W0 + ΣΔW in FP32
    if precision == "fp32":
        requantized, state.base = bool(state.base), {}
    else:
        if state.precision == precision and state.base:
            names = [m for m in increment if m in state.base]
        else:
            names, state.base = [name for name, _ in block_linears(model)], {}
        state.base |= {name: quantize(model.get_submodule(name).weight, precision) for name in names}
        _hold(model, state.base)
        requantized = bool(names)
    state.precision = precision
    save_state(directory, state, delta=bool(increment) or start == 0, base=requantized)
    return model, state


def _hold(model: PreTrainedModel, base: dict[str, QuantizedWeight]) -> None:
    """Set each block weight to deQ(Q(W)): what a quantized base computes in its matmuls (eq 8); adapters stay FP32."""
    with torch.no_grad():
        for name, weight in base.items():
            target = model.get_submodule(name).weight
            target.copy_(weight.dequantize().to(target.dtype))


def save_importance(directory: Path, state: NodeState, history: dict[str, tuple[float, float]]) -> None:
    """Keep this round's (Ī, Ū) per weight on the node for the next round's EMAs."""
    state.importance |= history
    save_state(directory, state, delta=False, base=False)


def lora_alphas(config: RunConfig, ranks: dict[str, int]) -> dict[str, float]:
    """Per-module alpha · r / lora-rank: every rank gets the same scaling alpha / lora-rank, so updates
    of different ranks (and strategies) share one scale and a higher rank is not a smaller step."""
    return {m: config.lora_alpha * r / config.lora_rank for m, r in ranks.items()}


def run_client_round(
    task: Task,
    *,
    model: PreTrainedModel,
    examples: list[Example],
    ranks: dict[str, int],
    initial_factors: Mapping[str, np.ndarray] | None,
    seed: int,
    batch_size: int | None = None,
    local_steps: int | None = None,
    importance_history: dict[str, tuple[float, float]] | None = None,
) -> ClientRound:
    """Attach adapters to the prepared base (see :func:`node_base`), train them, score them (eqs 3-7)."""
    cfg = task.config
    peft_model = attach_lora(model, ranks, lora_alphas(cfg, ranks), seed)
    if initial_factors is not None:
        set_lora_factors(peft_model, decode_factors(initial_factors, task.shapes))
    tracker = ImportanceTracker(peft_model, cfg.importance_beta1, cfg.importance_beta2, importance_history)
    started = time.perf_counter()
    result = _train(task, peft_model, examples, seed, batch_size, local_steps, tracker.update)
    return ClientRound(
        arrays=encode_factors(lora_factors(peft_model)),
        result=result,
        num_examples=len(examples),
        importance=tracker.scores(),
        importance_history=tracker.history(),
        train_s=time.perf_counter() - started,
    )


def run_full_round(
    task: Task,
    *,
    examples: list[Example],
    modules: list[str],
    base_delta: dict[str, torch.Tensor],
    seed: int,
    batch_size: int | None = None,
    local_steps: int | None = None,
) -> ClientRound:
    """Full fine-tuning: train the whole weight of each module in ``modules``, return W_after - W_before."""
    model = task.base_model()
    merge_delta(model, base_delta)
    for param in model.parameters():
        param.requires_grad_(False)
    weights = {m: model.get_submodule(m).weight for m in modules}
    before = {m: w.detach().clone() for m, w in weights.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    started = time.perf_counter()
    result = _train(task, model, examples, seed, batch_size, local_steps, None)
    train_s = time.perf_counter() - started
    deltas = {}
    for module, weight in weights.items():
        change = weight.detach() - before[module]
        deltas[module] = change.T if isinstance(model.get_submodule(module), Conv1D) else change
    return ClientRound(arrays=encode_dense(deltas), result=result, num_examples=len(examples), importance={}, train_s=train_s)


def _train(task: Task, model: torch.nn.Module, examples: list[Example], seed: int, batch_size: int | None,
           local_steps: int | None, after_backward: Callable[[], None] | None) -> TrainResult:
    cfg = task.config
    return train_local(
        model, task.tokenizer, examples,
        steps=local_steps or cfg.local_steps, batch_size=batch_size or cfg.batch_size, lr=cfg.lr,
        weight_decay=cfg.weight_decay, max_len=cfg.max_seq_len, seed=seed, after_backward=after_backward,
    )


def client_profile(task: Task, node_config: Mapping[str, object], partition_id: int) -> ClientProfile:
    """Declared in node config, else simulated (run config ``profile``), else measured here."""
    profile = declared(node_config)
    if profile is not None:
        return profile
    cfg = task.config
    if cfg.profile == "simulated":
        weights = 4.0 * (task.spec.linear_params + task.spec.other_params)
        training = peak_memory(task.spec, task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len, "fp32") - weights
        return simulated(partition_id, cfg.seed, weights, training, ideal=cfg.heterogeneity == "ideal")
    return measure()


def node_state_dir(task: Task, run_id: int, node_id: int) -> Path:
    """This node's state directory for the run."""
    return state_dir(default_cache_dir(task.config.cache_dir), run_id, node_id)


def global_model(task: Task, delta: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Base + global ΔW."""
    model = task.base_model()
    merge_delta(model, delta)
    return model


def evaluate_validation(task: Task, delta: dict[str, torch.Tensor]) -> LossResult:
    """Eval loss / PPL of base + ΔW on (the first ``eval-examples`` of) the validation split."""
    examples = task.splits["validation"][: task.config.eval_examples]
    return evaluate_loss(global_model(task, delta), task.tokenizer, examples, task.config.max_seq_len)


def score_test(task: Task, delta: dict[str, torch.Tensor], examples: list[Example] | None = None, limit: int | None = None) -> dict[str, float]:
    """Final scores on the test split: PPL always; for E2E also the five generation metrics.

    Without ``limit`` the run-config caps apply (``eval-examples`` for PPL, ``test-groups`` MRs for
    generation); with it, PPL uses every example and generation the first ``limit`` MRs.
    """
    examples = task.splits["test"] if examples is None else examples
    model = global_model(task, delta)
    scored = examples[: task.config.eval_examples if limit is None else len(examples)]
    scores: dict[str, float] = {"ppl": evaluate_loss(model, task.tokenizer, scored, task.config.max_seq_len).ppl}
    if task.config.task == "e2e":
        refs = references_by_group(examples)
        groups = sorted(refs)[: task.config.test_groups if limit is None else limit]
        if groups:
            prompts = [next(e.prompt for e in examples if e.group == g) for g in groups]
            hyps = generate(model, task.tokenizer, prompts, task.config.max_new_tokens)
            scores.update(e2e_scores(dict(zip(groups, hyps)), {g: refs[g] for g in groups}))
            scores["scored_groups"] = float(len(groups))
    return scores
