"""Per-device configurations of the peer systems FedPipe is compared with.

- HetLoRA (Cho et al., 2024) and FlexLoRA (Bai et al., 2024) give each device one LoRA rank by its
  capability: here the largest candidate rank r <= r_max · F_k / F_max.
- LEGEND (adaptive LoRA depth and rank distribution): per device, LoRA on the last L layers only,
  ranks rising towards the output; L is chosen greedily (the LCD algorithm) as the deepest
  configuration the device's capacity for the round affords.
- FedAdapter (Cai et al., 2022): one adapter configuration, depth (top layers) and width (here the
  LoRA rank), that starts shallow and narrow and is upgraded by trial groups: in a decision round the
  devices split into groups training the current, a deeper and a wider configuration, and the group
  whose model scores best becomes the global model and configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedpipe_core.cost import ModelSpec, step_flops


def capability_rank(flops: float, max_flops: float, candidates: tuple[int, ...]) -> int:
    """HetLoRA / FlexLoRA rank of a device: the largest candidate <= r_max · F_k / F_max (>= r_min)."""
    ceiling = max(candidates) * flops / max_flops
    fitting = [r for r in candidates if r <= ceiling + 1e-9]
    return max(fitting) if fitting else min(candidates)


def layers_top_down(spec: ModelSpec, modules: list[str]) -> list[tuple[int, list[str]]]:
    """Target modules grouped by transformer block, output side first."""
    by_layer: dict[int, list[str]] = {}
    for module in modules:
        by_layer.setdefault(spec.modules[module][0], []).append(module)
    return sorted(by_layer.items(), reverse=True)


def rising_ranks(depth: int, candidates: tuple[int, ...]) -> list[int]:
    """LEGEND's rank distribution over ``depth`` layers, top first: equal groups of ascending rank.

    The layers split, from the output down, into len(candidates) groups; the group next to the
    output gets the highest rank (LoRA close to the output matters most).
    """
    ranks = sorted(candidates)
    return [ranks[len(ranks) - 1 - (q * len(ranks)) // depth] for q in range(depth)]


def legend_ranks(
    spec: ModelSpec, modules: list[str], budget_flops: float, batch: int, seq: int, local_steps: int, candidates: tuple[int, ...]
) -> dict[str, int]:
    """LEGEND's greedy LoRA configuration (LCD) for one device.

    Depth grows from the output down while the round's FLOPs (local steps × step FLOPs with the
    rising rank distribution) stay within the device's budget. A device that cannot afford even
    one layer still trains the top layer at the smallest rank (it stretches the round).
    """
    layers = layers_top_down(spec, modules)
    chosen: dict[str, int] = {}
    for depth in range(1, len(layers) + 1):
        ranks = rising_ranks(depth, candidates)
        plan = {m: rank for (_, names), rank in zip(layers[:depth], ranks) for m in names}
        if local_steps * step_flops(spec, plan, batch, seq) > budget_flops:
            break
        chosen = plan
    return chosen or {m: min(candidates) for m in layers[0][1]}


@dataclass(frozen=True)
class AdapterConfig:
    """A FedAdapter configuration: adapters on the top ``depth`` layers at ``width`` (here the LoRA rank)."""

    depth: int
    width: int


def depth_step(num_layers: int) -> int:
    """FedAdapter's depth unit: a sixth of the layers (its paper's 2 of BERT-base's 12)."""
    return max(1, math.ceil(num_layers / 6))


def fedadapter_start(num_layers: int, candidates: tuple[int, ...]) -> AdapterConfig:
    """Where FedAdapter starts: shallow and narrow, one depth unit on top at the smallest width."""
    return AdapterConfig(depth_step(num_layers), min(candidates))


def fedadapter_trials(current: AdapterConfig, num_layers: int, candidates: tuple[int, ...]) -> list[AdapterConfig]:
    """FedAdapter's trial configurations for a decision round: the current one, one depth unit deeper and one width
    wider (the next candidate rank), the last two only where the model and the candidates leave room."""
    trials = [current]
    if current.depth < num_layers:
        trials.append(AdapterConfig(min(num_layers, current.depth + depth_step(num_layers)), current.width))
    wider = [w for w in sorted(candidates) if w > current.width]
    if wider:
        trials.append(AdapterConfig(current.depth, wider[0]))
    return trials
