"""Run configuration: one typed, validated view of the Flower run config.

Flower hands the app a flat ``{key: value}`` mapping (``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``flwr run --run-config``). Every key here is kebab-case
there and snake_case here. Invalid values stop the run before any training with one
line naming the key and the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

TASKS = ("e2e", "alpaca")
PARTITIONERS = ("iid", "dirichlet")
SEARCHES = ("greedy", "exact")
PROFILES = ("simulated", "measure")
HETEROGENEITY = ("hetero", "ideal")
WEIGHT_SELECTIONS = ("importance", "random")
BASE_PRECISIONS = ("auto", "fp32", "fp16", "nf8", "nf4")
DISPATCHES = ("svd", "exact")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names key and value."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Defaults are the embedded CPU default."""

    model: str = "smollm2-135m"
    cache_dir: str = ""
    task: str = "e2e"
    data_path: str = ""
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    max_train_examples: int = 0
    num_server_rounds: int = 4
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    local_steps: int = 6
    batch_size: int = 8
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_seq_len: int = 96
    lora_target_modules: str = "auto"
    lora_rank: int = 4
    lora_alpha: float = 8.0
    strategy: str = "fedpipe"
    seed: int = 42
    output_dir: str = "runs"
    eval_examples: int = 48
    test_groups: int = 24
    max_new_tokens: int = 40
    eval_base_generation: bool = True
    round_timeout_s: float = 3600.0
    search: str = "greedy"
    candidate_ranks: str = "2,4,8"
    batch_min: int = 2
    importance_beta1: float = 0.85
    importance_beta2: float = 0.85
    profile: str = "simulated"
    heterogeneity: str = "hetero"
    round_deadline_s: float = 0.0
    adapter_upgrade_every: int = 1
    weight_selection: str = "importance"
    base_precision: str = "auto"
    max_update_ratio: float = 1.0
    dispatch: str = "svd"
    resume_from: str = ""

    def __post_init__(self) -> None:
        from fedpipe_core.strategies import STRATEGIES  # the registry is the one list of names (it imports this module)

        _check_choice("strategy", self.strategy, tuple(STRATEGIES))
        _check_choice("task", self.task, TASKS)
        _check_choice("partitioner", self.partitioner, PARTITIONERS)
        _check_choice("search", self.search, SEARCHES)
        _check_choice("profile", self.profile, PROFILES)
        _check_choice("heterogeneity", self.heterogeneity, HETEROGENEITY)
        _check_choice("weight-selection", self.weight_selection, WEIGHT_SELECTIONS)
        _check_choice("base-precision", self.base_precision, BASE_PRECISIONS)
        _check_choice("dispatch", self.dispatch, DISPATCHES)
        _check_min("adapter-upgrade-every", self.adapter_upgrade_every, 1)
        if self.round_deadline_s < 0:
            raise ConfigError(f"run config 'round-deadline-s': must be >= 0 (0: no deadline), got {self.round_deadline_s!r}")
        _check_min("batch-min", self.batch_min, 1)
        if self.batch_min > self.batch_size:
            raise ConfigError(f"run config 'batch-min': {self.batch_min} exceeds 'batch-size' {self.batch_size} (the largest batch)")
        for key, beta in (("importance-beta1", self.importance_beta1), ("importance-beta2", self.importance_beta2)):
            if not 0.0 <= beta < 1.0:
                raise ConfigError(f"run config '{key}': must be in [0, 1), got {beta!r}")
        self.rank_candidates()
        _check_min("num-server-rounds", self.num_server_rounds, 1)
        _check_min("min-train-nodes", self.min_train_nodes, 1)
        _check_min("local-steps", self.local_steps, 1)
        _check_min("batch-size", self.batch_size, 1)
        _check_min("max-seq-len", self.max_seq_len, 8)
        _check_min("lora-rank", self.lora_rank, 1)
        _check_min("max-train-examples", self.max_train_examples, 0)
        _check_min("eval-examples", self.eval_examples, 1)
        _check_min("test-groups", self.test_groups, 0)
        _check_min("max-new-tokens", self.max_new_tokens, 1)
        _check_positive("lr", self.lr)
        _check_positive("lora-alpha", self.lora_alpha)
        _check_positive("dirichlet-alpha", self.dirichlet_alpha)
        _check_positive("round-timeout-s", self.round_timeout_s)
        _check_positive("max-update-ratio", self.max_update_ratio)
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"run config 'fraction-train': must be in (0, 1], got {self.fraction_train!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"run config 'weight-decay': must be >= 0, got {self.weight_decay!r}")
        if not self.model.strip():
            raise ConfigError("run config 'model': must name a built-in model or a local checkpoint directory")

    def rank_candidates(self) -> tuple[int, ...]:
        """``candidate-ranks`` as sorted distinct positive integers."""
        try:
            ranks = sorted({int(r) for r in self.candidate_ranks.split(",") if r.strip()})
        except ValueError:
            ranks = []
        if not ranks or ranks[0] < 1:
            raise ConfigError(f"run config 'candidate-ranks': expected positive integers like '2,4,8', got {self.candidate_ranks!r}")
        return tuple(ranks)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from a flat kebab-case mapping (Flower's ``context.run_config``)."""
        by_key = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            field = by_key.get(key)
            if field is None:
                raise ConfigError(f"run config '{key}': unknown key (known: {', '.join(sorted(by_key))})")
            kwargs[field.name] = _coerce(key, value, field.type)
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The flat kebab-case mapping (what ``config.json`` stores)."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}


def _coerce(key: str, value: Any, type_name: Any) -> Any:
    """Convert one run-config value to the field's type, or raise ConfigError."""
    kind = {"str": str, "int": int, "float": float, "bool": bool}[str(type_name)]
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"run config '{key}': expected true/false, got {value!r}")
    if kind is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"run config '{key}': expected an integer, got {value!r}")
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"run config '{key}': expected a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run config '{key}': expected a string, got {value!r}")
    return value


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"run config '{key}': {value!r} is not one of {', '.join(choices)}")


def _check_min(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"run config '{key}': must be >= {low}, got {value!r}")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"run config '{key}': must be > 0, got {value!r}")
