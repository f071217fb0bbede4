"""A node's local state between rounds, on its own disk, keyed by run.

Clients are re-created for every message (a new process per message in deployment), so what a
node has merged must outlive the process:

- ``delta``: the cumulative ΔW it has merged; ``version`` is the last server round included
  (the server sends only the ΔW rounds a node has not merged yet). On disk it is kept as the server
  sent it: one file per message under ``increments/`` (factors, or dense where smaller), so the bytes
  a message writes scale with the adapters, not with the model; when the increments outweigh the
  dense ΔW they are folded into one dense FP32 ``delta.safetensors`` (exact, nothing cut);
- ``base``: the block weights W0 quantized at ``precision`` (NF4/NF8 codes and block scales, or
  FP16), written once per precision: a weight no ΔW has reached is taken from it without reading W0,
  and a weight with a ΔW (or held adapters) is quantized from W0 + ΣΔW when the base is built
  (eqs 11-12), never written, so a message writes bytes that scale with the adapters, not with the
  model; empty for an FP32 base, which is W0 + ``delta`` exactly;
- ``importance``: the EMA sensitivity and uncertainty per weight (eqs 5-6), carried across rounds.

Every tensor file is listed in ``meta.json`` with its SHA-256; a file that fails it (truncated, corrupted,
missing) makes :func:`load_state` raise :class:`StateCorrupt`, and the node is rebuilt from the server's whole ΔW
history instead of training on it (:func:`node_base`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from fedpipe_core.codec import SEP, decode_delta, stored_delta
from fedpipe_core.loading import BlockLayer, Reader, load_linear, rebuild_layers, stream_model
from fedpipe_core.lora import merge_delta
from fedpipe_core.model import default_cache_dir
from fedpipe_core.qlinear import stored_linear
from fedpipe_core.quantize import QuantizedWeight, quantize
from fedpipe_core.structure import block_linears, oriented
from fedpipe_core.task import Task


@dataclass
class NodeState:
    """Cumulative ΔW per module, up to and including server round ``version``, and what derives from it."""

    version: int = 0
    delta: dict[str, torch.Tensor] = field(default_factory=dict)
    precision: str = "fp32"
    base: dict[str, QuantizedWeight] = field(default_factory=dict)
    importance: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(smoothed sensitivity, uncertainty) per weight."""
    held: list[str] = field(default_factory=list)
    """Modules whose stored base leaves out the product of the node's own adapters (``round-start = continue``)."""
    increments: list[str] = field(default_factory=list)
    """The increment files (under ``increments/``) that, with a compacted ``delta.safetensors``, sum to ``delta``."""
    compacted: bool = False
    """``delta.safetensors`` holds the sum of the increments folded so far."""
    fresh: dict[str, torch.Tensor] = field(default_factory=dict)
    """This message's ΔW rounds as the server sent them (``<module>::A|B|dW``): what :func:`save_state` appends."""
    checksums: dict[str, str] = field(default_factory=dict)
    """SHA-256 of every tensor file of the state, by its path under the state's directory."""
    meta: str = ""
    """``meta.json`` as this state last read or wrote it (a warm worker's held state is current while the disk says so)."""

    def add(self, increment: dict[str, torch.Tensor], version: int, sent: Mapping[str, np.ndarray] | None = None) -> None:
        """Accumulate one increment (:func:`sum_into`; ``sent``: as it came, for the disk) and advance the version."""
        sum_into(self.delta, increment)
        self.fresh = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in (sent or {}).items()}
        self.version = version


def sum_into(delta: dict[str, torch.Tensor], increment: Mapping[str, torch.Tensor]) -> None:
    """ΣΔW += one increment, module by module, in place; ``delta`` takes over the increment's tensors of modules it
    lacks (no second copy of a model-sized ΔW)."""
    for module, d in increment.items():
        if module in delta:
            delta[module].add_(d)
        else:
            delta[module] = d


def run_states_dir(cache_dir: Path, run_id: int) -> Path:
    """Where the nodes on this machine keep their state for run ``run_id``."""
    return cache_dir / "node-state" / str(run_id)


def state_dir(cache_dir: Path, run_id: int, node_id: int) -> Path:
    """Where node ``node_id`` keeps its state for run ``run_id``."""
    return run_states_dir(cache_dir, run_id) / str(node_id)


def remove_run_states(cache_dir: Path, run_id: int) -> Path | None:
    """Delete every node's state of a finished run under ``cache_dir``; the directory removed, if any."""
    directory = run_states_dir(cache_dir, run_id)
    if not directory.is_dir():
        return None
    shutil.rmtree(directory, ignore_errors=True)
    return directory


INCREMENTS = "increments"
COMPACTED = "delta.safetensors"


class StateCorrupt(RuntimeError):
    """A file of the node's saved state is missing, truncated or fails its checksum."""


BASE = "base.safetensors"
BASE_OF = "w0"
"""What ``base.safetensors`` holds: Q(W0) (a state from before kept Q(W0 + ΣΔW) there and is rebuilt)."""


def _digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _read(directory: Path, name: str, checksums: Mapping[str, str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A tensor file of the state and its metadata, checked against its recorded SHA-256 (when the state records one)."""
    path = directory / name
    try:
        if name in checksums and _digest(path) != checksums[name]:
            raise StateCorrupt(f"node state {path}: fails its SHA-256 checksum (corrupted or truncated)")
        with safe_open(path, framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}
    except (OSError, ValueError) as exc:  # missing, or not a whole safetensors file
        raise StateCorrupt(f"node state {path}: cannot be read ({exc})") from None
    except SafetensorError as exc:  # a malformed header
        raise StateCorrupt(f"node state {path}: not a safetensors file ({exc})") from None


def load_state(directory: Path) -> NodeState:
    """The saved state, or an empty one (version 0) if none was saved; StateCorrupt when a file of it is damaged."""
    meta_path = directory / "meta.json"
    if not meta_path.is_file():
        return NodeState()
    try:
        text = meta_path.read_text()
        meta = json.loads(text)
        version = int(meta["version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StateCorrupt(f"node state {meta_path}: unreadable metadata ({exc})") from None
    checksums = dict(meta.get("checksums", {}))
    compacted = bool(meta.get("compacted", "increments" not in meta))  # a state from before the increments: dense
    state = NodeState(version, compacted=compacted, increments=list(meta.get("increments", [])), checksums=checksums, meta=text)
    if compacted and (directory / COMPACTED).is_file():
        state.delta, _ = _read(directory, COMPACTED, checksums)
    for name in state.increments:
        sum_into(state.delta, stored_delta(_read(directory, f"{INCREMENTS}/{name}", checksums)[0]))
    state.importance = {m: (float(s), float(u)) for m, (s, u) in meta.get("importance", {}).items()}
    state.held = list(meta.get("held", []))
    if meta.get("base_of") == BASE_OF and (directory / BASE).is_file():
        parts: dict[str, dict[str, torch.Tensor]] = {}
        tensors, metadata = _read(directory, BASE, checksums)
        for key, value in tensors.items():
            name, _, part = key.rpartition(SEP)
            parts.setdefault(name, {})[part] = value
        shapes = json.loads(metadata.get("shapes", "{}"))
        state.precision = str(meta["precision"])
        for name, shape in shapes.items():
            state.base[name] = QuantizedWeight.from_tensors(state.precision, tuple(shape), parts[name])
    return state


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_tensors(
    directory: Path, name: str, tensors: dict[str, torch.Tensor], state: NodeState, metadata: dict[str, str] | None = None
) -> None:
    """Write a tensor file of the state atomically and record its SHA-256 (the metadata written after vouches for it)."""
    path = directory / name
    _replace(path, lambda p: save_file(tensors, str(p), metadata=metadata))
    state.checksums[name] = _digest(path)


def _save_delta(directory: Path, state: NodeState) -> None:
    """Append this message's increment; fold every increment into the dense file once they outweigh it."""
    log = directory / INCREMENTS
    if state.fresh:
        log.mkdir(exist_ok=True)
        name = f"{state.version:06d}-{uuid.uuid4().hex[:8]}.safetensors"  # never the name of a file the old meta vouches for
        _write_tensors(directory, f"{INCREMENTS}/{name}", state.fresh, state)
        state.increments.append(name)
        state.fresh = {}
    logged = sum((log / name).stat().st_size for name in state.increments)
    dense = sum(d.numel() * d.element_size() for d in state.delta.values())
    if state.increments and logged > dense:
        _write_tensors(directory, COMPACTED, {k: v.contiguous() for k, v in state.delta.items()}, state)
        state.increments, state.compacted = [], True


def _collect_garbage(directory: Path, state: NodeState) -> None:
    """Remove the delta files the metadata just written no longer vouches for."""
    log = directory / INCREMENTS
    for path in log.glob("*.safetensors") if log.is_dir() else ():
        if path.name not in state.increments:
            path.unlink(missing_ok=True)
    if not state.compacted:
        (directory / COMPACTED).unlink(missing_ok=True)


def save_state(directory: Path, state: NodeState, delta: bool = True, base: bool = True) -> None:
    """Write atomically: tensors first, then the metadata that vouches for them, then drop what it no longer names.

    ``delta=False`` / ``base=False`` keep that file as it is (it did not change).
    """
    directory.mkdir(parents=True, exist_ok=True)
    if delta:
        _save_delta(directory, state)
    if base or not (directory / BASE).is_file():
        flat = {f"{name}{SEP}{part}": t.contiguous() for name, q in state.base.items() for part, t in q.tensors().items()}
        shapes = json.dumps({name: list(q.shape) for name, q in state.base.items()})
        _write_tensors(directory, BASE, flat, state, {"shapes": shapes})  # written once per precision, with its shapes
    named = {BASE, *(f"{INCREMENTS}/{n}" for n in state.increments), *([COMPACTED] if state.compacted else [])}
    state.checksums = {k: v for k, v in state.checksums.items() if k in named}
    meta = {
        "version": state.version,
        "precision": state.precision,
        "base_of": BASE_OF,
        "checksums": state.checksums,
        "importance": {m: list(v) for m, v in state.importance.items()},
        "held": state.held,
        "increments": state.increments,
        "compacted": state.compacted,
    }
    state.meta = json.dumps(meta)
    _replace(directory / "meta.json", lambda p: p.write_text(state.meta))
    if delta:
        _collect_garbage(directory, state)


@dataclass
class WarmBase:
    """A node's base as a long-lived worker holds it between messages (``fedpipe-node-worker``): the model after its
    last round (adapters stripped) and the state it reflects, so the next round neither reads the state back from disk
    nor rebuilds more than the weights it changes."""

    model: PreTrainedModel | None = None
    directory: Path | None = None
    state: NodeState | None = None
    version: int = -1
    precision: str = ""
    held: list[str] = field(default_factory=list)

    def keep(self, model: PreTrainedModel, directory: Path, state: NodeState) -> None:
        """Hold ``model`` as the base of ``directory``'s ``state`` (as last saved: its version, precision, held)."""
        self.model, self.directory, self.state = model, directory, state
        self.version, self.precision, self.held = state.version, state.precision, list(state.held)

    def take_state(self, directory: Path) -> NodeState | None:
        """The held state of ``directory`` while its ``meta.json`` is still the one that state wrote, else None (none
        held, or another process has changed the state since). Handed over: a round that fails part-way leaves no
        half-merged state here, and the next message reads the state from disk."""
        state, self.state = self.state, None
        if state is None or self.directory != directory:
            return None
        try:
            current = (directory / "meta.json").read_text()
        except OSError:
            return None
        return state if current == state.meta else None

    def serves(self, directory: Path, version: int, precision: str, state: NodeState) -> bool:
        """Whether the held model is this state's base at ``version`` and ``precision``."""
        return (
            self.model is not None
            and self.directory == directory
            and self.version == version == state.version
            and self.precision == precision == state.precision
            and self.held == state.held
        )


def files_on_disk(directory: Path) -> dict[Path, tuple[int, int]]:
    """(size, modification time) of every file under ``directory`` (none when it does not exist)."""
    if not directory.is_dir():
        return {}
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in directory.rglob("*") if p.is_file()}


def bytes_written(directory: Path, before: dict[Path, tuple[int, int]]) -> int:
    """Bytes of the files under ``directory`` that are new or changed since ``before`` (:func:`files_on_disk`)."""
    return sum(size for p, (size, mtime) in files_on_disk(directory).items() if before.get(p) != (size, mtime))


def node_state_dir(task: Task, run_id: int, node_id: int) -> Path:
    """This node's state directory for the run."""
    return state_dir(default_cache_dir(task.config.cache_dir), run_id, node_id)


class StateMismatch(RuntimeError):
    """The server sent ΔW rounds that do not continue this node's saved state."""


def node_base(
    task: Task,
    directory: Path,
    payload: Mapping[str, np.ndarray],
    start: int,
    end: int,
    precision: str,
    held: Mapping[str, torch.Tensor] | None = None,
    warm: WarmBase | None = None,
    device: torch.device | None = None,
) -> tuple[PreTrainedModel, NodeState]:
    """This round's frozen base, W0 + the merged ΔW held at ``precision`` (eqs 11-12), and the node's state.

    Merges the server's ΔW rounds ``start+1..end`` into the state saved on the node's disk. The
    model is streamed weight by weight from the checkpoint (:mod:`.loading`), never whole at FP32.
    Q(W0) of every block weight is saved once per precision, so a weight no ΔW has reached is taken
    from it without reading W0; a weight with a ΔW is read and quantized as Q(W0 + ΣΔW) and not
    saved (a message writes its increment, not the model). A weight is held as Q(W0 + ΣΔW) rather
    than Q(deQ(W_t) + ΔW_t): the iterated form drops every ΔW smaller than a quantization step, so a
    node's base would stop following the global model.

    ``held``: the products s·B·A the node's own continued adapters hold, left out of its base (W0 + ΣΔW − s·B·A;
    :mod:`fedpipe_core.round_start`).

    A damaged saved state (:class:`StateCorrupt`) is never trained on: with ``start = 0`` (the server's whole ΔW
    history) the node starts over from it, otherwise the error goes back in the reply, and the server answers a failed
    node with its whole history next time.

    ``warm``: the model a worker kept from this node's last round; when it is that state's base, only the weights this
    round changes are read and rebuilt in it (the same layers a fresh build gives), instead of the whole model.
    ``device``: where NF4/NF8 codes are computed (the node's accelerator; the model is built on the CPU either way).
    """
    held = dict(held or {})
    state = resume_state(directory, start, warm)
    reuse = warm is not None and warm.serves(directory, start, precision, state)
    increment = decode_delta(payload, task.shapes)
    touched = set(increment) | set(held) | set(state.held)  # the weights this message changes
    state.add(increment, end, payload)
    had_base = bool(state.base)
    if state.precision != precision or precision == "fp32":
        state.base = {}  # the stored Q(W0) is of another precision (or there is none at FP32)
    cached: list[str] = []
    block_layer = layer_rule(state, held, precision, cached, device)
    if reuse and touched <= {name for name, _ in block_linears(warm.model)}:
        model = warm.model
        rebuild_layers(task.checkpoint, model, sorted(touched), block_layer)
    else:
        model = stream_model(task.checkpoint, block_layer)
        blocks = {name for name, _ in block_linears(model)}  # stored layers are nn.Linear too
        outside = {m: state.delta.get(m, 0.0) - held.get(m, 0.0) for m in set(state.delta) | set(held) if m not in blocks}
        merge_delta(model, {m: d for m, d in outside.items() if isinstance(d, torch.Tensor)})
    state.held = sorted(held)
    state.precision = precision
    save_state(directory, state, delta=bool(increment) or start == 0, base=bool(cached) or (had_base and not state.base))
    return model, state


def resume_state(directory: Path, start: int, warm: WarmBase | None = None) -> NodeState:
    """The saved state the server's ΔW rounds from ``start`` continue: a fresh one when the server resends the whole
    history (``start = 0``: a new node, a resync, or a damaged state rebuilt); StateCorrupt or StateMismatch when the
    rounds sent cannot be merged into what this node holds. A warm worker's held state stands for the disk's while the
    disk still holds what it wrote (:meth:`WarmBase.take_state`): nothing is read back, Q(W0) and the increments
    included."""
    state = warm.take_state(directory) if warm is not None else None
    try:
        if state is None:
            state = load_state(directory)
    except StateCorrupt as exc:
        if start != 0:
            raise  # the reply is an error: the server sends the whole ΔW history with the next message
        logging.getLogger(__name__).warning("%s; rebuilding it from the server's whole ΔW history", exc)
        state = NodeState()
    if start == 0 and (state.version or state.delta):
        state = NodeState(importance=state.importance)  # the server resends every ΔW round: start over
    if state.version != start:
        raise StateMismatch(f"node state is at round {state.version}, the server sent ΔW from round {start}")
    return state


def layer_rule(
    state: NodeState, held: Mapping[str, torch.Tensor], precision: str, cached: list[str], device: torch.device | None = None
) -> BlockLayer:
    """How one block linear of the base is built at ``precision`` (eqs 11-12): W0 + ΣΔW − held exactly at FP32; else
    Q(W0 + ΣΔW − held) for a weight with a ΔW or held adapters (quantized now, on ``device``, never stored), and the
    stored Q(W0) for the others (quantized and appended to ``state.base`` and ``cached`` the first time)."""

    def merged(name: str, module: nn.Module, read: Reader) -> torch.Tensor:
        """W0 + ΣΔW (− what the node's adapters hold) of one block linear, (out, in), FP32."""
        weight = oriented(module, read("weight").float())  # read afresh for this build: summed into in place
        if name in state.delta:
            weight.add_(state.delta[name])
        if name in held:
            weight.sub_(held[name])
        return weight

    def block_layer(name: str, module: nn.Module, read: Reader) -> nn.Module:
        if precision == "fp32":
            return load_linear(module, read, oriented(module, merged(name, module, read)).contiguous())
        if name in state.delta or name in held:
            stored = quantize(merged(name, module, read), precision, device)
        else:
            if name not in state.base:
                state.base[name] = quantize(oriented(module, read("weight").float()), precision, device)
                cached.append(name)
            stored = state.base[name]  # Q(W0), W0 not read
        bias = read("bias").float() if getattr(module, "bias", None) is not None else None
        return stored_linear(stored, bias)

    return block_layer


def save_importance(directory: Path, state: NodeState, history: dict[str, tuple[float, float]]) -> None:
    """Keep this round's (Ī, Ū) per weight on the node for the next round's EMAs."""
    state.importance |= history
    save_state(directory, state, delta=False, base=False)
