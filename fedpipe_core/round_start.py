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

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fedpipe_core.codec import SEP, decode_factors, encode_factors
from fedpipe_core.config import RunConfig
from fedpipe_core.lora import fresh_factors
from fedpipe_core.lowrank import Factors, LowRank, factor_svd

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
        lowrank = saved[module]
        if lowrank.rank <= rank:
            out[module] = lowrank
            continue
        U, S, V = factor_svd(LowRank(lowrank.A, lowrank.B))  # B·A alone, from the factors: the refit keeps the scale
        root = S[:rank].sqrt()
        out[module] = LowRank((root[:, None] * V[:, :rank].T).float(), (U[:, :rank] * root).float(), lowrank.scale)
    return out


def products(factors: Factors) -> dict[str, torch.Tensor]:
    """s · B · A per module, (out, in): what the node's base leaves out because its adapters hold it."""
    return {m: lowrank.dense() for m, lowrank in factors.items()}


def change(before: Factors, after: Factors) -> Factors:
    """The round's change as factors: B·A − B′·A′ = [B, −B′] · [A; A′] (just B·A for a fresh adapter)."""
    out: Factors = {}
    for module, lowrank in after.items():
        if module not in before:
            out[module] = lowrank
            continue
        start = before[module]
        if start.scale != lowrank.scale:
            raise ValueError(f"{module}: adapters of scale {lowrank.scale:g} changed from ones of scale {start.scale:g}")
        out[module] = LowRank(torch.cat([lowrank.A, start.A]), torch.cat([lowrank.B, -start.B], dim=1), lowrank.scale)
    return out


def save_adapters(directory: Path, factors: Factors, optimizer: OptimizerState) -> None:
    """The node's adapters and their AdamW moments, written atomically (adapter-sized, whatever the model's size)."""
    directory.mkdir(parents=True, exist_ok=True)
    flat = {f"{m}::A": f.A.contiguous() for m, f in factors.items()} | {f"{m}::B": f.B.contiguous() for m, f in factors.items()}
    moments = {
        f"{name}::{key}": value.detach().float().cpu().contiguous() for name, s in optimizer.items() for key, value in s.items()
    }
    for name, tensors in ((ADAPTERS_FILE, flat), (OPTIMIZER_FILE, moments)):
        tmp = directory / (name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(directory / name)


def load_adapters(directory: Path, scale: float) -> tuple[Factors, OptimizerState]:
    """What :func:`save_adapters` wrote, the adapters at their ``scale`` ({}, {} before the node's first continued
    round)."""
    if not (directory / ADAPTERS_FILE).is_file():
        return {}, {}
    flat = load_file(str(directory / ADAPTERS_FILE))
    factors = {key[:-3]: LowRank(flat[key], flat[key[:-3] + "::B"], scale) for key in flat if key.endswith("::A")}
    optimizer: OptimizerState = {}
    if (directory / OPTIMIZER_FILE).is_file():
        for key, value in load_file(str(directory / OPTIMIZER_FILE)).items():
            name, _, part = key.rpartition("::")
            optimizer.setdefault(name, {})[part] = value
    return factors, optimizer


def shared_a(shapes: dict[str, tuple[int, int]], targets: tuple[str, ...], rank: int, seed: int) -> dict[str, torch.Tensor]:
    """``privacy.frozen-a``: the frozen A of every target at the largest rank, drawn from the run seed (the server and
    every node draw the same; a node uses its first r_k rows)."""
    return {m: f.A for m, f in fresh_factors(shapes, {m: rank for m in targets}, seed, scale=1.0).items()}  # A alone


def frozen_fitted(saved: Factors, ranks: dict[str, int], a: dict[str, torch.Tensor]) -> Factors:
    """With a frozen A: the saved B fitted to this round's rank (columns kept or zero-padded), against A's first rows."""
    out: Factors = {}
    for module, rank in ranks.items():
        if module not in saved:
            continue
        B = saved[module].B[:, :rank]
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], dim=1) if B.shape[1] < rank else B
        out[module] = LowRank(a[module][:rank], B, saved[module].scale)
    return out


def padded_b(after: Factors, before: Factors, rank: int) -> dict[str, torch.Tensor]:
    """The round's change of B (B − B′; B for a fresh adapter) zero-padded to ``rank`` columns: all a frozen-A node sends."""
    out = {}
    for module, lowrank in after.items():
        step = lowrank.B - before[module].B if module in before else lowrank.B
        out[module] = torch.cat([step, step.new_zeros(step.shape[0], rank - step.shape[1])], dim=1)
    return out


@dataclass(frozen=True)
class Start:
    """How one round's adapters start: the factors they are loaded with (None: fresh, B = 0), the node's own adapters
    the round continues (fitted to its ranks: what its base leaves out) and AdamW's moments to go on with."""

    initial: dict[str, np.ndarray] | None
    before: Factors = field(default_factory=dict)
    moments: OptimizerState = field(default_factory=dict)


@dataclass(frozen=True)
class RoundStart:
    """The round-start policy of a node's adapter round, one object for every strategy and choice: ``global`` (the
    peers: the adapters start from the factors the server sent), ``restart`` (FedPipe's eq 12: fresh adapters, a fresh
    AdamW) or ``continue`` (FedPipe's default: the node's own adapters and moments go on, its base holds
    W0 + ΣΔW − s·B·A); with ``frozen_a`` (``privacy.frozen-a``, secure mode) A is the run's shared one and only B
    trains and is sent."""

    kind: str
    scaling: float
    keep_moments: bool = True
    frozen_a: Mapping[str, torch.Tensor] | None = None

    @classmethod
    def of(
        cls, cfg: RunConfig, mode: str, shapes: dict[str, tuple[int, int]], targets: tuple[str, ...], scaling: float
    ) -> RoundStart:
        """The policy of an instruction of ``mode`` (``fedpipe`` or ``factors``) under the run config."""
        if mode != "fedpipe":
            return cls("global", scaling)
        frozen = shared_a(shapes, targets, max(cfg.rank_candidates()), cfg.seed) if cfg.trains_frozen_a else None
        return cls(cfg.round_start, scaling, cfg.keep_moments, frozen)

    def begin(
        self, directory: Path, ranks: dict[str, int], payload: Mapping[str, np.ndarray], shapes: dict[str, tuple[int, int]]
    ) -> Start:
        """Where this round's adapters start (see the module's note for a plan that changed since the last round)."""
        if self.kind == "global":
            return Start(dict(payload))
        saved, moments = load_adapters(directory, self.scaling) if self.kind == "continue" else ({}, {})
        moments = moments if self.keep_moments else {}  # the adapters go on, AdamW starts afresh (ablation)
        if self.frozen_a is None:
            before = fitted(saved, ranks)
            start = before
        else:
            before = frozen_fitted(saved, ranks, self.frozen_a)
            fresh = {m: LowRank(self.frozen_a[m][:r], torch.zeros(shapes[m][0], r), self.scaling) for m, r in ranks.items()}
            start = fresh | before
        return Start(encode_factors(start) if start else None, before, moments)

    def held(self, start: Start) -> dict[str, torch.Tensor]:
        """s · B · A of the adapters the round continues: what the node's base leaves out."""
        return products(start.before)

    def end(
        self,
        directory: Path,
        start: Start,
        arrays: dict[str, np.ndarray],
        optimizer: OptimizerState,
        shapes: dict[str, tuple[int, int]],
    ) -> dict[str, np.ndarray]:
        """What the node sends after training to ``arrays`` (its adapters), keeping them for the next round when it
        continues: its adapters (global, restart); B's change zero-padded to the largest rank (frozen A); its adapters
        and those it started from (continue: the server averages the change)."""
        if self.kind == "global":
            return arrays
        after = decode_factors(arrays, shapes, self.scaling)
        if self.kind == "continue":
            save_adapters(directory, after, optimizer)
        if self.frozen_a is not None:
            top = next(iter(self.frozen_a.values())).shape[0]
            return {f"{m}{SEP}B": b.numpy() for m, b in padded_b(after, start.before, top).items()}
        if self.kind == "continue":
            sent = {f"{k}0": v for k, v in encode_factors({m: f for m, f in start.before.items() if m in after}).items()}
            return {**arrays, **sent}
        return arrays
