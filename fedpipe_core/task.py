"""The task of a run: model checkpoint, tokenizer, target modules, data splits, and each node's data.

Loaded once per process from the run config (cached); both apps and the strategies read it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpipe_core import quiet
from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.cost import ModelSpec, model_spec
from fedpipe_core.data import Example, load_examples, partition, split_examples
from fedpipe_core.loading import skeleton
from fedpipe_core.lora import module_shape, resolve_target_modules
from fedpipe_core.model import load_model, load_tokenizer, resolve_checkpoint


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
    splits = split_examples(load_examples(config.task, config.data_path))
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
def site_examples(task: Task, data_path: str) -> list[Example]:
    """Every example of a site's own data file (node config ``data-path``), all used for training.

    The file never leaves the node; a missing or malformed one raises ConfigError naming it.
    """
    return load_examples(task.config.task, data_path, where="node config 'data-path'")
