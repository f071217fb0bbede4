"""Shard-wise model loading: a checkpoint streamed tensor by tensor into the layers a node holds.

The model is first built on the meta device (shapes only, no memory). Each block linear is then
replaced by the layer a caller builds from that weight alone (for a node: W0 + ΣΔW quantized to
its precision, :func:`~fedpipe_core.node.state.node_base`), reading one tensor at a time from the
safetensors shards (with ``pread``: a memory map would keep every page read resident), so the
whole model never exists at FP32: peak memory is the model as held plus one FP32 weight. The
other parameters (embeddings, norms, LM head) are read as they are, the tied ones tied, and the
non-persistent buffers (rotary frequencies) computed by transformers' own initialisation, as
``from_pretrained`` does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from fedpipe_core.config import ConfigError
from fedpipe_core.device import trim_heap
from fedpipe_core.structure import block_linears

Reader = Callable[[str], torch.Tensor]
"""Reads one tensor of the checkpoint by its parameter name."""

BlockLayer = Callable[[str, nn.Module, Reader], nn.Module]
"""(block linear's name, its meta-device module, reader of its own tensors by local name) -> the layer to hold."""


def skeleton(checkpoint: Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The checkpoint's model with every tensor on the meta device: its structure and shapes, no memory."""
    config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _shard_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (``model.safetensors`` or an index of shards)."""
    index = checkpoint / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: checkpoint / file for name, file in weight_map.items()}
    single = checkpoint / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    raise ConfigError(f"run config 'model.name': {checkpoint} has no safetensors weights (model.safetensors or its index)")


@contextmanager
def checkpoint_reader(checkpoint: Path, prefix: str = "") -> Iterator[Reader]:
    """A reader of the checkpoint's tensors by model parameter name (``prefix`` is the base model's,
    which some checkpoints leave out of their names); each shard is opened once and read with ``pread``."""
    files = _shard_files(checkpoint)
    with ExitStack() as stack:
        handles: dict[Path, object] = {}

        def read(name: str) -> torch.Tensor:
            key = name
            if key not in files and prefix and key.startswith(prefix + "."):
                key = key[len(prefix) + 1 :]
            if key not in files:
                raise ConfigError(f"run config 'model.name': {checkpoint} has no tensor {name!r}")
            path = files[key]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, framework="pt", backend="pread"))
            return handles[path].get_tensor(key)

        yield read


def stream_model(checkpoint: Path, block_layer: BlockLayer, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model with each block linear built by ``block_layer`` and the rest read at ``dtype`` (see module doc)."""
    model = skeleton(checkpoint, dtype)
    with checkpoint_reader(checkpoint, model.base_model_prefix) as read:
        for name, module in block_linears(model):
            layer = block_layer(name, module, lambda local, name=name: read(f"{name}.{local}"))
            model.set_submodule(name, layer)
            trim_heap()  # the FP32 weight just read is freed: give its pages back before the next
        tied = set(model.all_tied_weights_keys)
        rest = {
            key: read(key).to(dtype if tensor.is_floating_point() else tensor.dtype)
            for key, tensor in model.state_dict(keep_vars=True).items()
            if tensor.is_meta and key not in tied
        }
        model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    _initialise_buffers(model)
    left = [key for key, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise ConfigError(f"run config 'model.name': {checkpoint} left {', '.join(left[:3])} unloaded")
    return model


def rebuild_layers(checkpoint: Path, model: PreTrainedModel, names: list[str], block_layer: BlockLayer) -> None:
    """Rebuild these block linears of a built ``model`` in place with ``block_layer``, each from its meta-device module
    (as :func:`stream_model` gives it) and its own checkpoint tensors; the rest of the model is untouched."""
    blanks = skeleton(checkpoint)
    device = next(model.parameters()).device
    with checkpoint_reader(checkpoint, model.base_model_prefix) as read:
        for name in names:
            layer = block_layer(name, blanks.get_submodule(name), lambda local, name=name: read(f"{name}.{local}"))
            model.set_submodule(name, layer.to(device))
            trim_heap()


def _initialise_buffers(model: PreTrainedModel) -> None:
    """Compute the non-persistent buffers (not in any checkpoint) with transformers' initialisation,
    every loaded tensor marked as initialised so that nothing else is touched."""
    volatile = dict(model.named_non_persistent_buffers())
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor._is_hf_initialized = True
    for key, buffer in volatile.items():
        owner, _, local = key.rpartition(".")
        module = model.get_submodule(owner)
        module.register_buffer(local, torch.empty_like(buffer, device="cpu"), persistent=False)
    model.initialize_weights()


def load_linear(module: nn.Module, read: Reader, weight: torch.Tensor | None = None) -> nn.Module:
    """A meta-device linear (Linear, Conv1D) given its checkpoint tensors: ``weight`` in its own
    orientation when given (W0 + ΔW), else as stored; the bias as stored."""
    tensors = {"weight": read("weight").float() if weight is None else weight}
    if getattr(module, "bias", None) is not None:
        tensors["bias"] = read("bias").float()
    module.load_state_dict(tensors, assign=True)
    return module
