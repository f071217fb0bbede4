"""``fedpipe-check CONFIG [--data FILE] [--run-config "k=v ..."]``: validate a run config and a data file, no run.

``CONFIG`` is the app's ``pyproject.toml`` (its ``[tool.flwr.app.config]``) or a TOML file of run-config
keys (flat dotted keys or nested tables), overridden by ``--run-config`` as ``flwr run`` does. ``--data``
reads a site's data file the way its node does (``--prompt-field`` / ``--response-field`` as its node
config) and prints how it splits into training, validation and test shares. Errors are the one-line
messages a run would stop with; the exit status is 2 on the first one, 0 when everything checks.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tomllib

from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.metrics import meteor_missing

if TYPE_CHECKING:
    from fedpipe_core.data import Fields


def flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables as Flower's flat dotted keys."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        out |= flat(value, f"{name}.") if isinstance(value, dict) else {name: value}
    return out


def read_run_config(path: Path, overrides: str = "") -> RunConfig:
    """The run config of a pyproject.toml or run-config TOML file, with ``flwr run --run-config``-style overrides."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{str(path)!r}: not a readable TOML file ({exc})") from exc
    table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config", document)
    values = flat(table)
    for item in shlex.split(overrides):
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--run-config: {item!r} is not key=value")
        try:
            values[key] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = raw
    config = RunConfig.from_mapping(values)
    from fedpipe_core.strategies import strategy_class  # the strategies (torch) once the file has been read

    strategy_class(config.strategy)
    return config


def check_data(config: RunConfig, data: str, fields: Fields) -> str:
    """One line on a site's data file: examples, groups and its train / validation / test shares."""
    from fedpipe_core.data import load_examples, split_examples
    from fedpipe_core.task import file_hash, held_out_shares

    examples = load_examples(config.task, data, where="--data", fields=fields)
    shares = held_out_shares(split_examples(examples), file_hash(data), f"--data {data!r}")
    groups = len({e.group for e in examples})
    line = (
        f"data {data!r}: {len(examples)} {config.task} examples in {groups} groups; shares train {len(shares.train)}, "
        f"validation {len(shares.validation)}, test {len(shares.test)}; sha256 {shares.data_hash}"
    )
    return f"{line}\n{shares.note}" if shares.note else line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-check", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="pyproject.toml of the app, or a TOML file of run-config keys")
    parser.add_argument("--run-config", default="", help='overrides, as flwr run takes them: "key=value key=value"')
    parser.add_argument("--data", help="a site's data file (or save_to_disk directory) to check")
    parser.add_argument("--prompt-field", default="", help="the site's node config prompt-field (default: the run config's)")
    parser.add_argument("--response-field", default="", help="the site's node config response-field")
    args = parser.parse_args(argv)
    from fedpipe_core.data import Fields
    from fedpipe_core.model import BUILTIN_MODELS

    try:
        config = read_run_config(args.config, args.run_config)
        summary = f"strategy {config.strategy}, task {config.task}, evaluation at {config.eval_where}"
        print(f"run config of {str(args.config)!r}: valid ({summary})")
        if config.model not in BUILTIN_MODELS and not (Path(config.model).expanduser() / "config.json").is_file():
            raise ConfigError(f"run config 'model.name': {config.model!r} is neither built in nor a local checkpoint directory")
        if config.task == "e2e" and meteor_missing():
            print(meteor_missing())
        if args.data is not None:
            fields = Fields(args.prompt_field, args.response_field) or Fields(config.prompt_field, config.response_field)
            print(check_data(config, args.data, fields))
    except ConfigError as exc:
        print(f"fedpipe-check: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
