"""Run configuration: one typed, validated view of the Flower run config.

Flower hands the app a flat ``{key: value}`` mapping (``[tool.flwr.app.config]`` in
pyproject.toml, overridden by ``flwr run --run-config``). Keys are grouped with dots, as in
Flower's LLM examples: ``model.*``, ``data.*``, ``lora.*``, ``train.*``, ``strategy.*``,
``eval.*``, ``fedpipe.*`` (FedPipe only), ``fedadapter.*``, ``sim.*`` (simulated profiles).
Every key is declared once below, in the docstring of its typed field with its meaning; the user guide's table
(docs/user-guide.md) is generated from these declarations (``python -m fedpipe_core.config``). Invalid values and
unknown keys stop the run before any training with one line naming the key (``strategy.name`` is
checked against the strategy registry, :func:`fedpipe_core.strategies.strategy_class`).
"""

from __future__ import annotations

import ast
import difflib
import math
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

STRATEGY_NAMES = ("fedpipe", "lora-fedavg", "hetlora", "flexlora", "legend", "fedadapter", "ft")
"""`strategy.name`'s choices: the registry of :mod:`fedpipe_core.strategies`, named here so that a config is checked without
importing the strategies (torch)."""
TASKS = ("e2e", "alpaca")
PARTITIONERS = ("iid", "dirichlet")
SEARCHES = ("greedy", "exact")
PROFILES = ("simulated", "measure")
HETEROGENEITY = ("hetero", "ideal")
WEIGHT_SELECTIONS = ("importance", "random")
BASE_PRECISIONS = ("auto", "fp32", "fp16", "nf8", "nf4")
DISPATCHES = ("svd", "exact")
LORA_INITS = ("per-client", "shared")
EVAL_WHERE = ("server", "sites", "both")


class ConfigError(ValueError):
    """A run-config value that cannot be used; the message names key and value."""


@dataclass(frozen=True)
class RunConfig:
    """Every knob of a run. Defaults are the embedded CPU default."""

    num_server_rounds: int = 4
    """`num-server-rounds`: federated rounds."""
    seed: int = 42
    """`seed`: training: adapter initialisation, batch order, random weight picks (the testbed has its own seed)."""
    output_dir: str = ""
    """`output-dir`: results root: `<output-dir>/<run-id>/` (see [Results contract](#results-contract)); empty:
    `$FEDPIPE_OUTPUT_DIR`, else `$XDG_DATA_HOME/fedpipe/runs` (`~/.local/share/fedpipe/runs`), whatever the working
    directory of the SuperLink."""
    resume_from: str = ""
    """`resume-from`: a previous run directory: continue it from its last checkpoint (same model, task, strategy,
    adapters, seed)."""
    model: str = "smollm2-135m"
    """`model.name`: built-in model name, or the path of a local Hugging Face checkpoint directory."""
    cache_dir: str = ""
    """`model.cache-dir`: where the built-in model's safetensors cache and node state live (`$FEDPIPE_CACHE_DIR` or
    `~/.cache/fedpipe`)."""
    task: str = "e2e"
    """`data.task`: `e2e` (NLG, five metrics) or `alpaca` (instruction tuning, perplexity)."""
    data_path: str = ""
    """`data.path`: your own data: E2E `mr,ref` CSV, or Alpaca `alpaca_data.json` / seed-task JSONL; with
    `data.prompt-field` also any JSONL, CSV or `save_to_disk` dataset directory; empty = the shipped sample."""
    prompt_field: str = ""
    """`data.prompt-field`: the field of your rows that goes into the task's prompt template (the E2E meaning
    representation, the Alpaca instruction); with `data.response-field`; empty = the task's own format."""
    response_field: str = ""
    """`data.response-field`: the field of your rows the model learns to write (with `data.prompt-field`)."""
    partitioner: str = "iid"
    """`data.partitioner`: client partitions (flwr-datasets): `iid` or `dirichlet` (skewed by restaurant for E2E, by
    task for Alpaca)."""
    dirichlet_alpha: float = 0.5
    """`data.dirichlet-alpha`: concentration of the `dirichlet` partitioner."""
    max_train_examples: int = 0
    """`data.max-train-examples`: cap the training split (0 = all)."""
    lora_target_modules: str = "auto"
    """`lora.target-modules`: `auto` (peft's default projections for the architecture), `attention` (Wq, Wk, Wv, Wo of
    every block, the paper's candidates), `all-linear`, or suffixes such as `q_proj,v_proj` or `c_attn`."""
    lora_rank: int = 4
    """`lora.rank`: default rank; every adapter is scaled by alpha / this rank, whatever its own rank."""
    lora_alpha: float = 8.0
    """`lora.alpha`: LoRA alpha."""
    candidate_ranks: str = "2,4,8"
    """`lora.candidate-ranks`: ranks a heterogeneous strategy may give a node (FedPipe's search, HetLoRA, FlexLoRA,
    LEGEND, FedAdapter)."""
    lora_init: str = "per-client"
    """`lora.init`: the fresh adapters' random A each round: `per-client` (each node draws its own) or `shared` (every
    node draws the same A from the run seed and round; ablation)."""
    local_steps: int = 6
    """`train.local-steps`: AdamW steps per node and round."""
    batch_size: int = 8
    """`train.batch-size`: batch size (FedPipe: the largest, for the fastest node)."""
    lr: float = 1e-3
    """`train.lr`: learning rate."""
    weight_decay: float = 0.0
    """`train.weight-decay`: AdamW weight decay."""
    max_seq_len: int = 96
    """`train.max-seq-len`: tokens per example (prompt + reference)."""
    strategy: str = "fedpipe"
    """`strategy.name`: `fedpipe`, or a peer: `lora-fedavg`, `hetlora`, `flexlora`, `legend`, `fedadapter`, `ft` (see
    [Strategies](#strategies))."""
    fraction_train: float = 1.0
    """`strategy.fraction-train`: fraction of the connected nodes sampled each round, drawn by `seed` and the round."""
    min_train_nodes: int = 2
    """`strategy.min-train-nodes`: nodes a round waits for before it starts."""
    round_timeout_s: float = 3600.0
    """`strategy.round-timeout-s`: how long the server waits for a round's replies."""
    round_deadline_s: float = 0.0
    """`strategy.round-deadline-s`: simulated round deadline: a node does only the local steps it finishes in time, none
    = left out (0: no deadline)."""
    time_budget_s: float = 0.0
    """`strategy.time-budget-s`: simulated seconds the run may take: no round starts that would end past it (0: no budget;
    the run then ends after `num-server-rounds`)."""
    weight_by: str = "examples"
    """`strategy.weight-by`: what an update weighs in the average: `examples` (the examples the node processed in the
    round, batch × the steps it did) or `data` (the size of its training share, the usual FedAvg weight; ablation)."""
    max_update_ratio: float = 1.0
    """`strategy.max-update-ratio`: an update whose ‖ΔW‖_F on a module exceeds this × ‖W‖_F of that weight is rejected."""
    eval_examples: int = 48
    """`eval.examples`: validation examples of the per-round eval loss (and test examples of the PPL), taken round-robin
    over the meaning representations / tasks so that a cap ≥ their number covers each (0: every example)."""
    test_groups: int = 24
    """`eval.test-groups`: E2E test meaning representations scored by generation after the last round, evenly spaced
    (0: every one)."""
    max_new_tokens: int = 40
    """`eval.max-new-tokens`: generation length."""
    eval_base_generation: bool = True
    """`eval.base-generation`: also score the base model (summary's `base`; with sites, each site's `base`)."""
    eval_where: str = "server"
    """`eval.where`: who evaluates: `server` (on the run's data, which the server holds), `sites` (each node on its own
    held-out share; the server reads no data and no weight) or `both`."""
    eval_every: int = 1
    """`eval.every`: evaluate the global model every this many rounds (and always after the last)."""
    eval_local_baseline: bool = False
    """`eval.local-baseline`: with sites, each site also fine-tunes alone on its own training share (same LoRA settings, the
    same local steps in total) and scores that model on its test share (summary's `sites[node].local_only`)."""
    privacy_site_epsilon: float = 0.0
    """`privacy.site-epsilon`: every site's ε for sample-level DP-SGD unless its node config sets `dp-epsilon` (0: no DP
    at sites that set none)."""
    privacy_site_delta: float = 1e-5
    """`privacy.site-delta`: every site's δ unless its node config sets `dp-delta`."""
    privacy_clip_norm: float = 0.0
    """`privacy.clip-norm`: DP-SGD's bound C on each example's adapter-gradient L2 norm, sent to every node; 0: the run
    offers no DP, and a site that asks for it (`dp-epsilon`) refuses to train."""
    privacy_frozen_a: bool = False
    """`privacy.frozen-a`: FedPipe nodes train only B against a frozen A drawn from the run seed at the largest candidate
    rank (its first r_k rows) and send B zero-padded, so the average Σ n_k B_k A = (Σ n_k B_k) A is a plain sum (what
    secure aggregation can compute) and DP noise is not amplified through A (FFA-LoRA)."""
    privacy_mode: str = "plain"
    """`privacy.mode`: `plain` (each node's update reaches the server) or `secure` (FedPipe with a frozen A; the server
    learns only the sums Σ n_k B_k, Σ n_k and the aggregate losses, by secure aggregation)."""
    privacy_secagg_threshold: int = 0
    """`privacy.secagg-threshold`: sites needed to unmask a secure round (and the most that may collude with the server,
    less one); 0: a majority of the round's sites (at least 2)."""
    privacy_secagg_range: float = 1e6
    """`privacy.secagg-range`: every value a site masks (n_k·B_k, its example count and losses) must lie within ± this;
    a site whose vector leaves it drops out of the round."""
    search: str = "greedy"
    """`fedpipe.search`: configuration search: `greedy` (Algorithm 1) or `exact` (MILP, pulp/CBC)."""
    batch_min: int = 2
    """`fedpipe.batch-min`: smallest batch of stage 1 (batch ∝ FLOPS)."""
    importance_beta1: float = 0.85
    """`fedpipe.importance-beta1`: EMA factor of the sensitivity (eq 5)."""
    importance_beta2: float = 0.85
    """`fedpipe.importance-beta2`: EMA factor of its uncertainty (eq 6)."""
    upload_budget_mb: float = 0.0
    """`fedpipe.upload-budget-mb`: MB (10^6 bytes) each node may upload per round: the search keeps the FP32 adapters a
    node sends (with the starting adapters a continued node sends beside them) within it; 0: no limit."""
    weight_selection: str = "importance"
    """`fedpipe.weight-selection`: `importance`, or `random` weight picks (ablation)."""
    base_precision: str = "auto"
    """`fedpipe.base-precision`: `auto` (the memory rule), or a fixed `fp32`/`fp16`/`nf8`/`nf4` base (ablation)."""
    round_start: str = "continue"
    """`fedpipe.round-start`: `continue` (each node keeps its adapters and AdamW moments, its base holding W0 + ΣΔW − its
    adapters' product) or `restart` (fresh adapters every round, the paper's eq 12; ablation)."""
    keep_moments: bool = True
    """`fedpipe.keep-moments`: with `round-start = continue`, each node's AdamW moments go on across rounds (`false`: a
    fresh AdamW every round while the adapters continue; ablation)."""
    dispatch: str = "svd"
    """`fedpipe.dispatch`: how the round's averaged ΔW goes to the nodes: `svd` (best factors of the largest candidate
    rank, the rest carried to the next round) or `exact` (rank Σ r_k)."""
    adapter_upgrade_every: int = 1
    """`fedadapter.upgrade-every`: `fedadapter`: every this many rounds its trial groups decide the configuration."""
    profile: str = "simulated"
    """`sim.profile`: node profiles when a node declares none: `simulated` (drawn) or `measure`."""
    memory_scale: float = 1.0
    """`sim.memory-scale`: multiplies the simulated memory budgets (e.g. 1.6: a testbed whose largest clients can hold full
    fine-tuning, as in the paper)."""
    testbed_seed: int = 42
    """`sim.testbed-seed`: the testbed: simulated profiles and the data partition, fixed while `seed` varies training."""
    heterogeneity: str = "hetero"
    """`sim.heterogeneity`: simulated profiles: `hetero` (paper-like spread) or `ideal` (every client the middle of the
    ranges)."""

    @property
    def trains_frozen_a(self) -> bool:
        """FedPipe nodes train B against the frozen A: ``privacy.frozen-a``, or implied by ``privacy.mode = secure``."""
        return self.privacy_frozen_a or self.privacy_mode == "secure"

    @property
    def secure(self) -> bool:
        return self.privacy_mode == "secure"

    def __post_init__(self) -> None:
        check_choice("task", self.task, TASKS)
        check_choice("strategy", self.strategy, STRATEGY_NAMES)
        check_choice("partitioner", self.partitioner, PARTITIONERS)
        check_choice("search", self.search, SEARCHES)
        check_choice("profile", self.profile, PROFILES)
        check_choice("heterogeneity", self.heterogeneity, HETEROGENEITY)
        check_choice("weight_selection", self.weight_selection, WEIGHT_SELECTIONS)
        check_choice("base_precision", self.base_precision, BASE_PRECISIONS)
        check_choice("dispatch", self.dispatch, DISPATCHES)
        check_choice("lora_init", self.lora_init, LORA_INITS)
        check_choice("eval_where", self.eval_where, EVAL_WHERE)
        check_choice("round_start", self.round_start, ("continue", "restart"))
        check_choice("weight_by", self.weight_by, ("examples", "data"))
        if not self.keep_moments and self.round_start != "continue":
            raise ConfigError(
                f"run config {key_of('keep_moments')!r} = false needs {key_of('round_start')!r} = 'continue' (a restart "
                "starts every round with a fresh AdamW anyway)"
            )
        _check_min("eval_every", self.eval_every, 1)
        _check_min("adapter_upgrade_every", self.adapter_upgrade_every, 1)
        if not 0.0 < self.privacy_site_delta < 1.0:
            raise ConfigError(f"run config {key_of('privacy_site_delta')!r}: must be in (0, 1), got {self.privacy_site_delta!r}")
        for name in ("privacy_site_epsilon", "privacy_clip_norm", "upload_budget_mb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"run config {key_of(name)!r}: must be >= 0, got {getattr(self, name)!r}")
        if self.privacy_site_epsilon > 0 and self.privacy_clip_norm <= 0:
            raise ConfigError(
                f"run config {key_of('privacy_site_epsilon')!r} = {self.privacy_site_epsilon:g} needs "
                f"{key_of('privacy_clip_norm')!r} > 0 (DP-SGD's clipping bound)"
            )
        check_choice("privacy_mode", self.privacy_mode, ("plain", "secure"))
        _check_min("privacy_secagg_threshold", self.privacy_secagg_threshold, 0)
        if self.privacy_secagg_threshold == 1 or not self.privacy_secagg_range > 0:
            raise ConfigError(
                f"run config {key_of('privacy_secagg_threshold')!r} must be 0 or >= 2 and {key_of('privacy_secagg_range')!r} "
                f"> 0, got {self.privacy_secagg_threshold!r} and {self.privacy_secagg_range!r}"
            )
        if self.privacy_mode == "secure" and self.weight_by != "examples":
            raise ConfigError(
                f"run config {key_of('weight_by')!r} = {self.weight_by!r}: secure aggregation weights by the examples each "
                "site processed (its count travels inside the masked sum)"
            )
        if self.privacy_mode == "secure" and self.strategy != "fedpipe":
            raise ConfigError(f"run config {key_of('privacy_mode')!r} = 'secure' needs strategy 'fedpipe', got {self.strategy!r}")
        if self.upload_budget_mb > 0 and self.trains_frozen_a:
            raise ConfigError(
                f"run config {key_of('upload_budget_mb')!r} bounds (A, B) uploads; with {key_of('privacy_frozen_a')!r} a node "
                "sends B zero-padded to the largest rank whatever its plan, so set one of them only"
            )
        if self.time_budget_s < 0:
            raise ConfigError(f"run config {key_of('time_budget_s')!r}: must be >= 0 (0: no budget), got {self.time_budget_s!r}")
        if self.round_deadline_s < 0:
            raise ConfigError(
                f"run config {key_of('round_deadline_s')!r}: must be >= 0 (0: no deadline), got {self.round_deadline_s!r}"
            )
        _check_min("batch_min", self.batch_min, 1)
        if self.batch_min > self.batch_size:
            raise ConfigError(
                f"run config {key_of('batch_min')!r}: {self.batch_min} exceeds {key_of('batch_size')!r} "
                f"{self.batch_size} (the largest batch)"
            )
        for name in ("importance_beta1", "importance_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"run config {key_of(name)!r}: must be in [0, 1), got {getattr(self, name)!r}")
        self.rank_candidates()
        for name, low in (
            ("num_server_rounds", 1),
            ("min_train_nodes", 1),
            ("local_steps", 1),
            ("batch_size", 1),
            ("max_seq_len", 8),
            ("lora_rank", 1),
            ("max_train_examples", 0),
            ("eval_examples", 0),
            ("test_groups", 0),
            ("max_new_tokens", 1),
        ):
            _check_min(name, getattr(self, name), low)
        for name in ("lr", "lora_alpha", "dirichlet_alpha", "round_timeout_s", "max_update_ratio", "memory_scale"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"run config {key_of(name)!r}: must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"run config {key_of('fraction_train')!r}: must be in (0, 1], got {self.fraction_train!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"run config {key_of('weight_decay')!r}: must be >= 0, got {self.weight_decay!r}")
        if not self.model.strip():
            raise ConfigError(f"run config {key_of('model')!r}: must name a built-in model or a local checkpoint directory")

    @property
    def server_evaluates(self) -> bool:
        """The server scores the global model on data it holds (``eval.where`` = server or both)."""
        return self.eval_where != "sites"

    @property
    def sites_evaluate(self) -> bool:
        """The nodes score the global model on their held-out shares (``eval.where`` = sites or both)."""
        return self.eval_where != "server"

    def evaluated(self, server_round: int) -> bool:
        """Whether the global model after ``server_round`` is evaluated (round 0, every ``eval.every``-th, the last)."""
        return server_round % self.eval_every == 0 or server_round == self.num_server_rounds

    def rank_candidates(self) -> tuple[int, ...]:
        """``lora.candidate-ranks`` as sorted distinct positive integers."""
        try:
            ranks = sorted({int(r) for r in self.candidate_ranks.split(",") if r.strip()})
        except ValueError:
            ranks = []
        if not ranks or ranks[0] < 1:
            raise ConfigError(
                f"run config {key_of('candidate_ranks')!r}: expected positive integers like '2,4,8', got {self.candidate_ranks!r}"
            )
        return tuple(ranks)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build from Flower's flat mapping of dotted, kebab-case keys (``context.run_config``)."""
        types = {f.name: f.type for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            name = _BY_KEY.get(key)
            if name is None:
                raise ConfigError(f"run config {key!r}: unknown key{closest(key, list(_BY_KEY))}")
            kwargs[name] = _coerce(key, value, types[name])
        return cls(**kwargs)

    def to_mapping(self) -> dict[str, Any]:
        """The flat mapping of dotted keys (what ``config.json`` stores and ``pyproject.toml`` declares)."""
        return {_KEYS[f.name]: getattr(self, f.name) for f in fields(self)}


def key_of(name: str) -> str:
    """The run-config key of a field (``lr`` -> ``train.lr``)."""
    return _KEYS[name]


def closest(key: str, known: list[str]) -> str:
    """'; did you mean …?' naming the valid key closest to ``key`` (same last part first), or ''."""
    tail = key.replace("-", ".").rsplit(".", 1)[-1]
    same_tail = [k for k in known if k.rsplit(".", 1)[-1] == tail or k.endswith("-" + tail)]
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    best = same_tail[0] if len(same_tail) == 1 else (near[0] if near else (same_tail[0] if same_tail else ""))
    return f"; did you mean {best!r}?" if best else f" (known: {', '.join(sorted(known))})"


def markdown_table() -> str:
    """The user guide's run-config table, generated from the field declarations."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for f in fields(RunConfig):
        key, meaning = _DECLARED[f.name]
        rows.append(f"| `{key}` | `{json_default(f.default)}` | {meaning} |")
    return "\n".join(rows) + "\n"


def json_default(value: Any) -> str:
    """A default as TOML writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


def _declarations() -> dict[str, tuple[str, str]]:
    """(key, meaning) of every field, read from the docstring below it (```key`: meaning.``)."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "RunConfig")
    out = {}
    for field, doc in zip(cls.body, cls.body[1:]):
        if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant):
            match = re.fullmatch(r"`([^`]+)`: (.*)", " ".join(str(doc.value.value).split()), flags=re.S)
            if match is None:
                raise RuntimeError(f"RunConfig.{field.target.id}: its docstring must read '`key`: meaning'")
            out[field.target.id] = (match.group(1), match.group(2).removesuffix("."))
    missing = [f.name for f in fields(RunConfig) if f.name not in out]
    if missing:
        raise RuntimeError(f"RunConfig fields without a '`key`: meaning' docstring: {missing}")
    return out


_DECLARED = _declarations()
_KEYS = {name: key for name, (key, _) in _DECLARED.items()}
_BY_KEY = {key: name for name, key in _KEYS.items()}


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
        if not math.isfinite(value):
            raise ConfigError(f"run config '{key}': must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"run config '{key}': expected a string, got {value!r}")
    return value


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    """ConfigError naming the field's key unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"run config {key_of(name)!r}: {value!r} is not one of {', '.join(choices)}")


def _check_min(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"run config {key_of(name)!r}: must be >= {low}, got {value!r}")


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
