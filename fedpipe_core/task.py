"""The task of a run: model checkpoint, tokenizer, target modules, data splits, and each node's data.

Loaded once per process from the run config (cached); both apps and the strategies read it. Planning
needs only the model's shapes (a meta skeleton): the run's data is read when :attr:`Task.splits` is
first used, so a server that leaves evaluation to the sites (``eval.where = sites``) reads no dataset.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpipe_core import quiet
from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.cost import ModelSpec, model_spec, peak_memory
from fedpipe_core.data import BUILTIN_DATA, Example, Fields, load_examples, partition, split_examples
from fedpipe_core.device import measure
from fedpipe_core.loading import skeleton
from fedpipe_core.lora import module_shape, resolve_target_modules
from fedpipe_core.model import default_cache_dir, load_model, load_tokenizer, resolve_checkpoint
from fedpipe_core.node.cache import cache_key, cached_shares
from fedpipe_core.profile import MEMORY_RANGE, ClientProfile, declared_on_device, simulated


@dataclass(frozen=True, eq=False)
class Task:
    """Everything a round needs that does not change during a run."""

    config: RunConfig
    checkpoint: Path
    tokenizer: PreTrainedTokenizerBase
    targets: tuple[str, ...]
    shapes: dict[str, tuple[int, int]]
    spec: ModelSpec

    @functools.cached_property
    def splits(self) -> dict[str, list[Example]]:
        """The run's data (``data.path``, else the packaged set) split by group; read on first use, checked then."""
        cfg = self.config
        splits = split_examples(load_examples(cfg.task, cfg.data_path, fields=Fields(cfg.prompt_field, cfg.response_field)))
        if cfg.max_train_examples:
            splits["train"] = splits["train"][: cfg.max_train_examples]
        for name in ("train", "validation"):
            if not splits[name]:
                raise ConfigError(f"run config 'data.path': the {cfg.task} data has no {name} example after splitting by group")
        return splits

    def base_model(self) -> PreTrainedModel:
        """A fresh copy of the frozen base model."""
        return load_model(self.checkpoint)

    def uniform_ranks(self) -> dict[str, int]:
        """The default plan: run-config rank on every target module."""
        return {m: self.config.lora_rank for m in self.targets}


@functools.lru_cache(maxsize=4)
def load_task(config: RunConfig) -> Task:
    """Resolve model, tokenizer and target modules from the model's shapes (no weight, no data is read)."""
    quiet()
    checkpoint = resolve_checkpoint(config.model, config.cache_dir)
    tokenizer = load_tokenizer(checkpoint)
    model = skeleton(checkpoint)  # shapes only: planning a run loads no weight
    targets = tuple(resolve_target_modules(model, config.lora_target_modules))
    shapes = {m: module_shape(model, m) for m in targets}
    spec = model_spec(model, list(targets))
    return Task(config, checkpoint, tokenizer, targets, shapes, spec)


@functools.lru_cache(maxsize=16)
def client_examples(task: Task, partition_id: int, num_partitions: int) -> list[Example]:
    """This client's share of the training split."""
    cfg = task.config
    return partition(task.splits["train"], num_partitions, partition_id, cfg.partitioner, cfg.dirichlet_alpha, cfg.testbed_seed)


@functools.lru_cache(maxsize=4)
def site_examples(task: Task, data_path: str, prompt_field: str = "", response_field: str = "") -> list[Example]:
    """Every example of a site's own data (node config ``data-path``); :func:`site_data` splits it.

    Its fields are the node config's ``prompt-field`` / ``response-field`` when given (a site's own format),
    else the run config's. The data never leaves the node; a missing or malformed file raises ConfigError
    naming it, its row and the problem, before any training.
    """
    cfg = task.config
    fields = (
        Fields(prompt_field, response_field) if prompt_field or response_field else Fields(cfg.prompt_field, cfg.response_field)
    )
    return load_examples(cfg.task, data_path, where="node config 'data-path'", fields=fields)


@dataclass(frozen=True)
class NodeData:
    """A node's own data, split by group with the task's rule (:func:`~fedpipe_core.data.split_of`): training,
    validation and test shares, no group on two sides. ``held_out`` is False when the node has too few groups
    for a validation and a test share: it then trains on all of it and evaluates nothing (``note`` says why)."""

    train: list[Example]
    validation: list[Example]
    test: list[Example]
    data_hash: str
    note: str = ""

    @property
    def held_out(self) -> bool:
        return bool(self.validation and self.test)


def site_data(task: Task, data_path: str, prompt_field: str = "", response_field: str = "") -> NodeData:
    """A site's own data file (node config ``data-path``) split into its train / validation / test shares; parsed
    and split once, then read from the node's cache (:mod:`fedpipe_core.node.cache`) while the file is unchanged."""
    cfg = task.config
    try:
        digest = file_hash(data_path)
    except OSError:
        site_examples(task, data_path, prompt_field, response_field)  # raises the one-line error naming the setting
        raise
    fields = [prompt_field or cfg.prompt_field, response_field or cfg.response_field]
    key = cache_key(kind="site", data=digest, task=cfg.task, fields=fields)

    def build() -> tuple[dict[str, list[Example]], str, str]:
        return split_examples(site_examples(task, data_path, prompt_field, response_field)), digest, ""

    shares, _, _ = cached_shares(node_data_dir(task), key, build)
    return held_out_shares(shares, digest, f"node config 'data-path' {data_path!r}")


def partition_data(task: Task, partition_id: int, num_partitions: int) -> NodeData:
    """A simulated node's partition of each of the run's splits: it trains on its share of the training split
    (the same as with server evaluation) and holds out its share of the validation and test splits; worked out
    once, then read from the node's cache."""
    cfg = task.config
    source = file_hash(cfg.data_path) if cfg.data_path else file_hash(str(BUILTIN_DATA[cfg.task]))
    shaping = dict(
        kind="partition",
        data=source,
        task=cfg.task,
        fields=[cfg.prompt_field, cfg.response_field],
        partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.testbed_seed,
        max_train=cfg.max_train_examples,
        partition=[partition_id, num_partitions],
    )
    digest = hashlib.sha256(f"{source}:{partition_id}/{num_partitions}".encode()).hexdigest()

    def build() -> tuple[dict[str, list[Example]], str, str]:
        shares = {"train": client_examples(task, partition_id, num_partitions)}
        for name in ("validation", "test"):
            examples = task.splits[name]
            shares[name] = (
                partition(examples, num_partitions, partition_id, cfg.partitioner, cfg.dirichlet_alpha, cfg.testbed_seed)
                if len(examples) >= num_partitions
                else []
            )
        return shares, digest, ""

    shares, _, _ = cached_shares(node_data_dir(task), cache_key(**shaping), build)
    return held_out_shares(shares, digest, f"partition {partition_id} of {num_partitions}")


def node_data_dir(task: Task) -> Path:
    """Where the nodes on this machine keep their data's shares (:mod:`fedpipe_core.node.cache`)."""
    return default_cache_dir(task.config.cache_dir) / "node-data"


def held_out_shares(shares: dict[str, list[Example]], data_hash: str, where: str) -> NodeData:
    """The shares as :class:`NodeData`; with no validation or no test group, everything is trained on."""
    if shares["validation"] and shares["test"]:
        return NodeData(shares["train"], shares["validation"], shares["test"], data_hash)
    groups = len({e.group for share in shares.values() for e in share})
    everything = [e for name in ("train", "validation", "test") for e in shares[name]]
    note = f"{where}: {groups} group(s) leave no validation and test share; training on all of it, evaluating none"
    return NodeData(everything, [], [], data_hash, note)


def file_hash(data_path: str) -> str:
    """SHA-256 of a data file (what ``sha256sum`` prints), or of a ``save_to_disk`` directory's files (name and
    content, in path order)."""
    path = Path(data_path).expanduser()
    if not path.is_dir():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


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
