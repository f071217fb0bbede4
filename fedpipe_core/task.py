"""The task of a run: model checkpoint, tokenizer, target modules, data splits, and each node's data.

Loaded once per process from the run config (cached); both apps and the strategies read it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpipe_core import quiet
from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.cost import ModelSpec, model_spec, peak_memory
from fedpipe_core.data import Example, Fields, load_examples, partition, split_examples
from fedpipe_core.device import measure
from fedpipe_core.loading import skeleton
from fedpipe_core.lora import module_shape, resolve_target_modules
from fedpipe_core.model import load_model, load_tokenizer, resolve_checkpoint
from fedpipe_core.profile import MEMORY_RANGE, ClientProfile, declared_on_device, simulated


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
    model = skeleton(checkpoint)  # shapes only: planning a run loads no weight
    targets = tuple(resolve_target_modules(model, config.lora_target_modules))
    shapes = {m: module_shape(model, m) for m in targets}
    spec = model_spec(model, list(targets))
    splits = split_examples(
        load_examples(config.task, config.data_path, fields=Fields(config.prompt_field, config.response_field))
    )
    if config.max_train_examples:
        splits["train"] = splits["train"][: config.max_train_examples]
    for name in ("train", "validation"):
        if not splits[name]:
            raise ConfigError(f"run config 'data.path': the {config.task} data has no {name} example after splitting by group")
    return Task(config, checkpoint, tokenizer, splits, targets, shapes, spec)


@functools.lru_cache(maxsize=16)
def client_examples(task: Task, partition_id: int, num_partitions: int) -> list[Example]:
    """This client's share of the training split."""
    cfg = task.config
    return partition(task.splits["train"], num_partitions, partition_id, cfg.partitioner, cfg.dirichlet_alpha, cfg.testbed_seed)


@functools.lru_cache(maxsize=4)
def site_examples(task: Task, data_path: str, prompt_field: str = "", response_field: str = "") -> list[Example]:
    """Every example of a site's own data (node config ``data-path``), all used for training.

    Its fields are the node config's ``prompt-field`` / ``response-field`` when given (a site's own format),
    else the run config's. The data never leaves the node; a missing or malformed file raises ConfigError
    naming it, its row and the problem, before any training.
    """
    cfg = task.config
    fields = (
        Fields(prompt_field, response_field) if prompt_field or response_field else Fields(cfg.prompt_field, cfg.response_field)
    )
    return load_examples(cfg.task, data_path, where="node config 'data-path'", fields=fields)


def node_profile(task: Task, node_config: Mapping[str, object], partition_id: int) -> ClientProfile:
    """Declared in node config, else simulated (run config ``sim.profile``), else measured here (on its ``device``)."""
    profile = declared_on_device(node_config)
    if profile is not None:
        return profile
    cfg = task.config
    if cfg.profile == "simulated":
        weights = 4.0 * (task.spec.linear_params + task.spec.other_params)
        training = peak_memory(task.spec, task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len, "fp32") - weights
        memory_range = (cfg.memory_scale * MEMORY_RANGE[0], cfg.memory_scale * MEMORY_RANGE[1])
        return simulated(partition_id, cfg.testbed_seed, weights, training, memory_range, ideal=cfg.heterogeneity == "ideal")
    return measure(str(node_config.get("device", "auto")))
