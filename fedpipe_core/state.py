"""A node's local state between rounds, on its own disk: the ΔW merged so far and its version.

Clients are re-created for every message (a new process per message in deployment), so what a
node has merged must outlive the process. The server sends only the ΔW rounds a node has not
merged yet; ``version`` is the last server round whose ΔW is included.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class NodeState:
    """Cumulative ΔW per module, up to and including server round ``version``."""

    version: int = 0
    delta: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, increment: dict[str, torch.Tensor], version: int) -> None:
        """Accumulate one increment and advance the version."""
        for module, d in increment.items():
            self.delta[module] = self.delta[module] + d if module in self.delta else d.clone()
        self.version = version


def state_dir(cache_dir: Path, run_id: int, node_id: int) -> Path:
    """Where node ``node_id`` keeps its state for run ``run_id``."""
    return cache_dir / "node-state" / str(run_id) / str(node_id)


def load_state(directory: Path) -> NodeState:
    """The saved state, or an empty one (version 0) if none was saved."""
    meta = directory / "meta.json"
    if not meta.is_file():
        return NodeState()
    version = int(json.loads(meta.read_text())["version"])
    tensors = directory / "delta.safetensors"
    return NodeState(version, load_file(tensors) if tensors.is_file() else {})


def save_state(directory: Path, state: NodeState) -> None:
    """Write atomically: tensors first, then the version that vouches for them."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "delta.safetensors.tmp"
    save_file({k: v.contiguous() for k, v in state.delta.items()}, str(tmp))
    os.replace(tmp, directory / "delta.safetensors")
    tmp_meta = directory / "meta.json.tmp"
    tmp_meta.write_text(json.dumps({"version": state.version}))
    os.replace(tmp_meta, directory / "meta.json")
