"""Server checkpoints: after every round, the round and the strategy's whole state (its global state included).

``<run dir>/checkpoint/`` holds ``tensors.safetensors`` (the strategy's arrays: its global factors
or ΔW, FedPipe's per-round ΔW increments and dispatch residual) and ``state.json`` (round, run-config
fields a resume must match, running totals, strategy state such as profiles and importance). It
is replaced atomically (written beside, then renamed), so a run stopped at any moment leaves the
last complete round behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fedpipe_core.config import ConfigError, RunConfig, key_of

MATCHING = tuple(
    key_of(name) for name in ("model", "task", "data_path", "strategy", "lora_target_modules", "lora_rank", "lora_alpha", "seed")
)
"""Run-config keys a resumed run must share with the checkpoint."""


@dataclass
class Checkpoint:
    """What a run needs to continue after ``round``."""

    round: int
    tensors: dict[str, np.ndarray]
    state: dict[str, Any]
    totals: dict[str, float]
    config: dict[str, Any]


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> Path:
    """Write ``run_dir/checkpoint`` atomically."""
    final, staging = run_dir / "checkpoint", run_dir / "checkpoint.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in checkpoint.tensors.items()}, str(staging / "tensors.safetensors"))
    meta = {"round": checkpoint.round, "state": checkpoint.state, "totals": checkpoint.totals, "config": checkpoint.config}
    (staging / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    old = run_dir / "checkpoint.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(run_dir: Path, config: RunConfig) -> Checkpoint:
    """The checkpoint of a previous run, checked against the run config that resumes it."""
    directory = run_dir / "checkpoint"
    if not (directory / "state.json").is_file():
        raise ConfigError(f"run config 'resume-from': {str(run_dir)!r} has no checkpoint (no finished round)")
    try:
        meta = json.loads((directory / "state.json").read_text())
        tensors = load_file(str(directory / "tensors.safetensors"))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ConfigError(f"run config 'resume-from': the checkpoint in {str(run_dir)!r} is unreadable ({exc})") from exc
    mine = config.to_mapping()
    for key in MATCHING:
        if meta["config"].get(key) != mine[key]:
            raise ConfigError(
                f"run config 'resume-from': the checkpoint has {key}={meta['config'].get(key)!r}, this run {key}={mine[key]!r}"
            )
    if meta["round"] >= config.num_server_rounds:
        raise ConfigError(
            f"run config 'resume-from': the checkpoint is at round {meta['round']}; "
            f"'num-server-rounds' ({config.num_server_rounds}) leaves nothing to run"
        )
    return Checkpoint(meta["round"], tensors, meta["state"], meta["totals"], meta["config"])
