"""How a FedPipe node starts a round: restart its adapters (the paper's eq 12) or continue them.

``restart`` (``fedpipe.round-start = "restart"``): the node merges the sent ΔW rounds into its base and trains
fresh adapters (B = 0) with a fresh AdamW, every round.

``continue`` (the default): the node keeps its own adapters (B_k, A_k) and their AdamW moments on its disk and
holds its frozen base at W0 + ΣΔW − s·B_k·A_k, so that its effective weight W0 + ΣΔW + s·B_k·A_k − s·B_k·A_k
is still exactly the global model (eqs 9-12, up to the base's quantization) while nothing it learned is thrown
away. It sends its adapters after the round (``<module>::A|B``) and those it started from (``<module>::A0|B0``);
the server averages the round's *change* s(B_k A_k − B_k′A_k′) (the factors [B_k, −B_k′] · [A_k; A_k′]) as it
averages fresh adapters; folding the next global ΔW minus its own change into
its base is then the same as recomputing W0 + ΣΔW − s·B_k·A_k. When the plan changes between rounds: a module
no longer planned loses its adapter (its base becomes W0 + ΣΔW); a new module gets a fresh one; a higher rank
keeps the saved components first and fresh ones after (random A rows, zero B columns: the product is
unchanged); a lower rank keeps the best rank-r factors of s·B·A (SVD), the rest going into the base. AdamW
moments survive for the adapters whose shapes did not change and start afresh for the others.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedpipe_core.aggregate import lowrank_svd
from fedpipe_core.lora import Factors, fresh_factors

ROUND_STARTS = ("continue", "restart")
ADAPTERS_FILE, OPTIMIZER_FILE = "adapters.safetensors", "optimizer.safetensors"
OptimizerState = dict[str, dict[str, torch.Tensor]]
"""AdamW's state per trainable parameter name: ``exp_avg``, ``exp_avg_sq``, ``step``."""


def fitted(saved: Factors, ranks: dict[str, int]) -> Factors:
    """The saved adapters fitted to this round's planned ranks (see the module's note); unplanned modules dropped."""
    out: Factors = {}
    for module, rank in ranks.items():
        if module not in saved:
            continue
        A, B = saved[module]
        if A.shape[0] <= rank:
            out[module] = (A, B)
            continue
        U, S, V = lowrank_svd((A, B))  # from the factors: no dense SVD of the weight
        root = S[:rank].sqrt()
        out[module] = ((root[:, None] * V[:, :rank].T).float(), (U[:, :rank] * root).float())
    return out


def products(factors: Factors, scaling: float) -> dict[str, torch.Tensor]:
    """s · B · A per module, (out, in): what the node's base leaves out because its adapters hold it."""
    return {m: scaling * (B.double() @ A.double()).float() for m, (A, B) in factors.items()}


def change(before: Factors, after: Factors) -> Factors:
    """The round's change as factors: B·A − B′·A′ = [B, −B′] · [A; A′] (just B·A for a fresh adapter)."""
    out: Factors = {}
    for module, (A, B) in after.items():
        if module not in before:
            out[module] = (A, B)
            continue
        A0, B0 = before[module]
        out[module] = (torch.cat([A, A0], dim=0), torch.cat([B, -B0], dim=1))
    return out


def save_adapters(directory: Path, factors: Factors, optimizer: OptimizerState) -> None:
    """The node's adapters and their AdamW moments, written atomically (adapter-sized, whatever the model's size)."""
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"{m}::A": A.contiguous() for m, (A, _) in factors.items()} | {
        f"{m}::B": B.contiguous() for m, (_, B) in factors.items()
    }
    moments = {
        f"{name}::{key}": value.detach().float().cpu().contiguous() for name, s in optimizer.items() for key, value in s.items()
    }
    for name, tensors in ((ADAPTERS_FILE, flat), (OPTIMIZER_FILE, moments)):
        tmp = directory / (name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(directory / name)


def load_adapters(directory: Path) -> tuple[Factors, OptimizerState]:
    """What :func:`save_adapters` wrote ({}, {} before the node's first continued round)."""
    if not (directory / ADAPTERS_FILE).is_file():
        return {}, {}
    flat = load_file(str(directory / ADAPTERS_FILE))
    factors = {key[:-3]: (flat[key], flat[key[:-3] + "::B"]) for key in flat if key.endswith("::A")}
    optimizer: OptimizerState = {}
    if (directory / OPTIMIZER_FILE).is_file():
        for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
            name, _, part = key.rpartition("::")
            optimizer.setdefault(name, {})[part] = value
    return factors, optimizer


def shared_a(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """``privacy.frozen-a``: the frozen A of every target at the largest rank, drawn from the run seed (the server and
    every node draw the same; a node uses its first r_k rows)."""
    return {m: A for m, (A, _) in fresh_factors(shapes, {m: rank for m in targets}, seed).items()}


def frozen_fitted(saved: Factors, ranks: dict[str, int], a: dict[str, torch.Tensor]) -> Factors:
    """With a frozen A: the saved B fitted to this round's rank (columns kept or zero-padded), against A's first rows."""
    out: Factors = {}
    for module, rank in ranks.items():
        if module not in saved:
            continue
        B = saved[module][1][:, :rank]
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1) if B.shape[1] < rank else B
        out[module] = (a[module][:rank], B)
    return out


def padded_b(after: Factors, before: Factors, rank: int) -> dict[str, torch.Tensor]:
    """The round's change of B (B − B′; B for a fresh adapter) zero-padded to ``rank`` columns: all a frozen-A node sends."""
    out = {}
    for module, (_, B) in after.items():
        step = B - before[module][1] if module in before else B
        out[module] = torch.cat([step, step.new_zeros(step.shape[0], rank - step.shape[1])], dim=1)
    return out
