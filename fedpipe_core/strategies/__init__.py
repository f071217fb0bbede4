"""Federated LoRA strategies, free of any Flower type: the registry is the one list of their names.

One file per family: :mod:`.fedpipe` (FedPipe), :mod:`.factors` (global LoRA factors:
lora-fedavg, hetlora, legend, fedadapter), :mod:`.dense` (global dense ΔW: flexlora, ft), all on
:class:`~fedpipe_core.strategies.base.Strategy`.
"""

from __future__ import annotations

from fedpipe_core.config import check_choice
from fedpipe_core.strategies.base import Strategy
from fedpipe_core.strategies.dense import FlexLoRA, FullFT
from fedpipe_core.strategies.factors import FedAdapter, HetLoRA, Legend, LoRAFedAvg
from fedpipe_core.strategies.fedpipe import FedPipe

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (FedPipe, LoRAFedAvg, HetLoRA, FlexLoRA, Legend, FedAdapter, FullFT)
}
"""Every strategy by its run-config name (``strategy.name``)."""


def strategy_class(name: str) -> type[Strategy]:
    """The strategy called ``name``; ConfigError naming ``strategy.name`` and the choices otherwise."""
    check_choice("strategy", name, tuple(STRATEGIES))
    return STRATEGIES[name]


__all__ = [
    "STRATEGIES",
    "strategy_class",
    "FedAdapter",
    "FedPipe",
    "FlexLoRA",
    "FullFT",
    "HetLoRA",
    "Legend",
    "LoRAFedAvg",
    "Strategy",
]
