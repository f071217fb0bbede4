"""A node's configuration for one round, and the memory rule that picks its base precision."""

from __future__ import annotations

from dataclasses import dataclass

from fedpipe_core.cost import ModelSpec, peak_memory
from fedpipe_core.profile import ClientProfile
from fedpipe_core.quantize import PRECISIONS


@dataclass
class Plan:
    """One client's configuration for a round (empty ``ranks`` with a ``reason``: left out)."""

    batch_size: int
    precision: str
    ranks: dict[str, int]
    flops_budget: float
    step_flops: float = 0.0
    memory_bytes: float = 0.0
    reason: str = ""
    search_s: float = 0.0
    local_steps: int = 0
    """Local steps this round: 0 from a search that leaves them to the strategy (the run config's, fewer under a
    deadline), fewer when not even the cheapest adapter fits the budget for all of them."""
    over_budget: bool = False
    """Not even one step of the cheapest adapter fits the FLOPS budget: the node does one and stretches the round."""
    scores: dict[str, float] | None = None
    """What the search ranked weights by (FedPipe: importance, eqs 3-7, or the random ablation's draws)."""

    @property
    def feasible(self) -> bool:
        return bool(self.ranks)


def choose_precision(spec: ModelSpec, profile: ClientProfile, ranks: dict[str, int], batch: int, seq: int) -> str | None:
    """The highest precision (FP32, FP16, NF8, NF4) whose peak memory for this configuration fits, or None."""
    for precision in PRECISIONS:
        if peak_memory(spec, ranks, batch, seq, precision, profile.compute_bytes) <= profile.memory_bytes:
            return precision
    return None
