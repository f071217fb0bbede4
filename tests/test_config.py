from pathlib import Path

import pytest
import tomllib

from fedpipe_core.config import ConfigError, RunConfig

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_pyproject_run_config_matches_the_typed_config():
    run_config = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    parsed = RunConfig.from_mapping(run_config)
    assert set(run_config) == set(RunConfig().to_mapping())
    assert parsed == RunConfig()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("lr", -1.0, "'lr': must be > 0"),
        ("lr", "fast", "'lr': expected a number"),
        ("strategy", "fedsgd", "'strategy': 'fedsgd' is not one of"),
        ("task", "squad", "'task': 'squad'"),
        ("lora-rank", 0, "'lora-rank': must be >= 1"),
        ("num-server-rounds", 2.5, "'num-server-rounds': expected an integer"),
        ("fraction-train", 1.5, "'fraction-train': must be in (0, 1]"),
        ("eval-base-generation", "maybe", "'eval-base-generation': expected true/false"),
        ("no-such-key", 1, "'no-such-key': unknown key"),
        ("partitioner", "zipf", "'partitioner'"),
    ],
)
def test_invalid_values_name_the_key(key, value, fragment):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_mapping({key: value})
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_round_trip_and_coercion():
    cfg = RunConfig.from_mapping({"lr": 1, "eval-base-generation": "false", "local-steps": 3.0})
    assert cfg.lr == 1.0 and cfg.eval_base_generation is False and cfg.local_steps == 3
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
