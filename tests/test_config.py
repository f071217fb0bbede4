import re
from pathlib import Path

import pytest
import tomllib
from flwr.common.config import flatten_dict

from fedpipe_core.config import ConfigError, RunConfig, markdown_table
from fedpipe_core.strategies import STRATEGIES, strategy_class

ROOT = Path(__file__).parents[1]


def test_pyproject_run_config_matches_the_typed_config():
    run_config = flatten_dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"])
    parsed = RunConfig.from_mapping(run_config)
    assert set(run_config) == set(RunConfig().to_mapping())
    assert parsed == RunConfig()
    assert all(key == "num-server-rounds" or "." in key or key in ("seed", "output-dir", "resume-from") for key in run_config)


def test_the_user_guide_s_table_is_the_one_generated_from_the_fields():
    readme = (ROOT / "docs" / "user-guide.md").read_text()
    table = markdown_table()
    assert table in readme, "the user guide's run-config table differs from `python -m fedpipe_core.config`"
    documented = re.findall(r"^\| `([^`]+)` \|", readme.split("## Run config", 1)[1].split("\n## ", 1)[0], flags=re.M)
    assert documented == list(RunConfig().to_mapping())


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("train.lr", -1.0, "'train.lr': must be > 0"),
        ("train.lr", "fast", "'train.lr': expected a number"),
        ("data.task", "squad", "'data.task': 'squad'"),
        ("lora.rank", 0, "'lora.rank': must be >= 1"),
        ("num-server-rounds", 2.5, "'num-server-rounds': expected an integer"),
        ("strategy.fraction-train", 1.5, "'strategy.fraction-train': must be in (0, 1]"),
        ("eval.base-generation", "maybe", "'eval.base-generation': expected true/false"),
        ("data.partitioner", "zipf", "'data.partitioner'"),
        ("lora.candidate-ranks", "2,x", "'lora.candidate-ranks': expected positive integers"),
        ("fedpipe.upload-budget-mb", -1.0, "'fedpipe.upload-budget-mb': must be >= 0"),
        ("privacy.site-epsilon", float("nan"), "'privacy.site-epsilon': must be a finite number"),  # nan passes every >=
        ("train.lr", float("inf"), "'train.lr': must be a finite number"),
    ],
)
def test_invalid_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("lr", "train.lr"),  # an ungrouped key from before the groups
        ("lora-rank", "lora.rank"),
        ("local-steps", "train.local-steps"),
        ("strategy", "strategy.name"),
        ("train.batchsize", "train.batch-size"),  # a typo
        ("fedpipe.candidate-ranks", "lora.candidate-ranks"),  # the right name in another group
    ],
)
def test_an_unknown_key_names_the_closest_valid_one(key, suggestion):
    with pytest.raises(ConfigError, match=re.escape(f"run config '{key}': unknown key; did you mean '{suggestion}'?")):
        RunConfig.from_mapping({key: 1})


def test_a_strategy_name_is_checked_against_the_registry():
    assert strategy_class("hetlora") is STRATEGIES["hetlora"]
    with pytest.raises(ConfigError, match="'strategy.name': 'fedsgd' is not one of fedpipe, lora-fedavg, hetlora"):
        strategy_class(RunConfig.from_mapping({"strategy.name": "fedsgd"}).strategy)


def test_round_trip_and_coercion():
    cfg = RunConfig.from_mapping({"train.lr": 1, "eval.base-generation": "false", "train.local-steps": 3.0})
    assert cfg.lr == 1.0 and cfg.eval_base_generation is False and cfg.local_steps == 3
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg


def test_the_config_names_the_registry_s_strategies():
    from fedpipe_core.config import STRATEGY_NAMES
    from fedpipe_core.strategies import STRATEGIES

    assert tuple(STRATEGIES) == STRATEGY_NAMES
    with pytest.raises(ConfigError, match="'strategy.name': 'fedavg' is not one of fedpipe, lora-fedavg"):
        RunConfig(strategy="fedavg")
