"""Where a model's weights sit: the numbered transformer blocks and the linear layers inside them."""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

LAYER_PATTERN = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int:
    """Transformer block index in a module name (``model.layers.7.self_attn.q_proj`` -> 7)."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not inside a numbered transformer block")
    return int(match.group(1))


def oriented(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A linear's weight between its own orientation and (out, in), that of nn.Linear and of LoRA
    (GPT-2's Conv1D stores (in, out)); the map is its own inverse."""
    return weight.T if isinstance(module, Conv1D) else weight


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers (Linear, GPT-2's Conv1D) inside numbered transformer blocks."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and LAYER_PATTERN.search(n)]
