"""The results contract: ``runs/<run-id>/`` with config, per-round metrics, summary and ΔW.

- ``config.json``: the run config (kebab-case keys) plus run id and strategy details;
- ``metrics.jsonl``: one object per round (round, eval_loss, ppl, clients, bytes_up, bytes_down, wall_s, ...);
- ``summary.json``: final metrics (bleu, nist, meteor, rouge_l, cider, ppl, trainable_params, bytes, wall_s);
- ``delta.safetensors``: the final global ΔW per adapted module, reloadable with :func:`load_run`;
- ``best/delta.safetensors`` and ``best/round.json``: the ΔW of the round with the lowest eval loss
  (federated when the sites evaluate), ``load_run(..., which="best")``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpipe_core.config import ConfigError, RunConfig

if TYPE_CHECKING:  # torch loads when a ΔW is saved or read, not with the module (a command's --help stays fast)
    import torch

RESULTS_VERSION = 2
"""Bumped whenever the same run config gives other numbers (2: updates weighted by the examples processed, rounds
evaluated on the saved model, FedPipe's adapters continued, the official E2E scorer); ``summary.json`` records it
and the benchmark reuses only runs of the current version."""
DELTA_FILE = "delta.safetensors"
BEST_DIR = "best"
WHICH = ("best", "last")
"""Which model of a run a command reads: the best round's (``best/``) or the last round's."""
DEFAULT_MAX_ERROR = 0.01
"""An exported peft adapter's default bound on ‖ΔW − B·A‖_F / ‖ΔW‖_F per module (its rank is the smallest that meets it)."""
RUN_EXTRAS = ("run-id", "checkpoint", "target-modules")
"""What config.json records besides the run config."""


def output_root(configured: str) -> Path:
    """Where runs go: the run config's ``output-dir``, else ``$FEDPIPE_OUTPUT_DIR``, else the per-user data directory
    ``$XDG_DATA_HOME/fedpipe/runs`` (``~/.local/share/fedpipe/runs``); absolute, so it never depends on the directory
    a background SuperLink happened to start in (a relative ``output-dir`` is taken from the ServerApp's)."""
    if configured.strip():
        return Path(configured).expanduser().resolve()
    if os.environ.get("FEDPIPE_OUTPUT_DIR", "").strip():
        return Path(os.environ["FEDPIPE_OUTPUT_DIR"]).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME", "").strip() or str(Path.home() / ".local" / "share")
    return (Path(data_home).expanduser() / "fedpipe" / "runs").resolve()


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/Inf become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class RunWriter:
    """Writes one run's directory."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.dir = root / run_id
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "metrics.jsonl").write_text("")

    def write_config(self, config: RunConfig, **extra: Any) -> None:
        payload = {**config.to_mapping(), **extra}
        (self.dir / "config.json").write_text(json.dumps(_clean(payload), indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(_clean(row)) + "\n")

    def write_summary(self, summary: dict[str, Any]) -> None:
        (self.dir / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n")

    def save_delta(self, delta: dict[str, torch.Tensor], best: bool = False) -> Path:
        """The final ΔW, or (``best``) that of the best round so far, written atomically."""
        path = self.dir / BEST_DIR / DELTA_FILE if best else self.dir / DELTA_FILE
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in delta.items()}, str(tmp))
        os.replace(tmp, path)
        return path

    def note_best(self, server_round: int, loss: float) -> None:
        (self.dir / BEST_DIR / "round.json").write_text(json.dumps({"round": server_round, "loss": loss}) + "\n")


def delta_path(run_dir: Path, which: str = "last") -> Path:
    """The ΔW file of a run's ``last`` (final) or ``best`` round."""
    if which not in WHICH:
        raise ConfigError(f"--which: {which!r} is not one of {', '.join(WHICH)}")
    return run_dir / BEST_DIR / DELTA_FILE if which == "best" else run_dir / DELTA_FILE


def load_run(run_dir: Path, which: str = "last") -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The run config and the global ΔW of its last (``which="last"``) or best round saved by a finished run."""
    config_path, delta_file = run_dir / "config.json", delta_path(run_dir, which)
    for path in (config_path, delta_file):
        if not path.is_file():
            raise ConfigError(f"run directory {str(run_dir)!r} has no {path.relative_to(run_dir)} (not a finished run?)")
    stored = json.loads(config_path.read_text())
    known = set(RunConfig().to_mapping())
    unknown = sorted(set(stored) - known - set(RUN_EXTRAS))
    if unknown:
        raise ConfigError(
            f"run directory {str(run_dir)!r}: config.json has keys this version does not know ({', '.join(unknown[:3])}); "
            "it was written by another version of the app"
        )
    config = RunConfig.from_mapping({k: v for k, v in stored.items() if k in known})
    from safetensors.torch import load_file

    return config, load_file(str(delta_file))
