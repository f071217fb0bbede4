"""Per-device configurations of the peer systems FedPipe is compared with.

- HetLoRA (Cho et al., 2024) and FlexLoRA (Bai et al., 2024) give each device one LoRA rank by its
  capability: here the largest candidate rank r <= r_max · F_k / F_max.
- LEGEND (adaptive LoRA depth and rank distribution): per device, LoRA on the last L layers only,
  ranks rising towards the output; L is chosen greedily (the LCD algorithm) as the deepest
  configuration the device's capacity for the round affords.
- FedAdapter (Cai et al., 2022): one adapter configuration for every device, depth (top layers)
  and width (here the LoRA rank), upgraded progressively as training goes on.
"""

from __future__ import annotations

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


def fedadapter_config(server_round: int, num_layers: int, candidates: tuple[int, ...], every: int) -> tuple[int, int]:
    """FedAdapter's progressive configuration (depth, width) for ``server_round``.

    Training starts shallow and narrow (the top eighth of the layers, the smallest rank); every
    ``every`` rounds the configuration is upgraded, alternately twice as deep and one rank wider.
    """
    depth, widths = max(1, num_layers // 8), sorted(candidates)
    width = 0
    for upgrade in range((server_round - 1) // every):
        if upgrade % 2 == 0:
            depth = min(num_layers, depth * 2)
        else:
            width = min(len(widths) - 1, width + 1)
    return depth, widths[width]
