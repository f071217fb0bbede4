"""Where a model's weights sit: the numbered transformer blocks and the linear layers inside them."""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

LAYER_PATTERN = re.compile(r"\.(\d+)\.")


def layer_of(name: str) -> int:
    """Transformer block index in a module name (``model.layers.7.self_attn.q_proj`` -> 7)."""
    match = LAYER_PATTERN.search(name)
    if match is None:
        raise ValueError(f"{name!r} is not inside a numbered transformer block")
    return int(match.group(1))


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The linear layers (Linear, GPT-2's Conv1D) inside numbered transformer blocks."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and LAYER_PATTERN.search(n)]
