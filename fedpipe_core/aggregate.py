"""Server-side aggregation of heterogeneous LoRA updates (FedPipe eqs 9-12) and LoRA-FedAvg.

FedPipe: each client k returns its factors (A_k, B_k) per adapted module, possibly with a rank
of its own and over a subset of modules. The server forms ΔW_k = s_k · B_k · A_k (eq 9),
averages ΔW over the clients that trained the module, weighted by their example counts (eq 10),
and sends ΔW back; clients merge it into their base and re-initialise A, B (eqs 11-12).

ΔW is kept *exactly* in factored form: Σ_k w_k s_k B_k A_k = [w_1 s_1 B_1 | ... ] · [A_1; ...],
a product of rank Σ_k r_k, which is what travels when it is smaller than the dense matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpipe_core.lora import Factors

LowRank = tuple[torch.Tensor, torch.Tensor]
"""(A of shape (r, in), B of shape (out, r)) with ΔW = B · A (scale already folded into B)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: factors per adapted module, their alpha/r scaling, its example count."""

    factors: Factors
    scaling: dict[str, float]
    num_examples: int


def client_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW_k = s_k · B_k · A_k (FedPipe eq 9)."""
    return scale * (B.double() @ A.double()).float()


def module_weights(updates: list[ClientUpdate], module: str) -> list[tuple[ClientUpdate, float]]:
    """The clients that trained ``module`` with their weights n_k / Σ n_j over those clients."""
    trained = [u for u in updates if module in u.factors]
    total = sum(u.num_examples for u in trained)
    if total <= 0:
        raise ValueError(f"no example behind the updates of {module}")
    return [(u, u.num_examples / total) for u in trained]


def aggregate_lowrank(updates: list[ClientUpdate]) -> dict[str, LowRank]:
    """The averaged ΔW of every module that at least one client trained (eq 10), factored exactly."""
    modules = sorted({m for u in updates for m in u.factors})
    out: dict[str, LowRank] = {}
    for module in modules:
        pairs = module_weights(updates, module)
        A = torch.cat([u.factors[module][0].float() for u, _ in pairs], dim=0)
        B = torch.cat([w * u.scaling[module] * u.factors[module][1].float() for u, w in pairs], dim=1)
        out[module] = (A, B)
    return out


def aggregate_delta(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Dense averaged ΔW per module (eq 10): Σ_k w_k ΔW_k over the clients that trained it."""
    return {m: to_dense(lr) for m, lr in aggregate_lowrank(updates).items()}


def to_dense(lowrank: LowRank) -> torch.Tensor:
    """B · A in FP32 (accumulated in FP64)."""
    A, B = lowrank
    return (B.double() @ A.double()).float()


def concat_lowrank(parts: list[LowRank]) -> LowRank:
    """Σ_i B_i A_i as one factor pair (exact)."""
    return torch.cat([A for A, _ in parts], dim=0), torch.cat([B for _, B in parts], dim=1)


def is_cheaper_dense(lowrank: LowRank) -> bool:
    """True when r · (out + in) numbers are no fewer than the out · in of the dense ΔW."""
    A, B = lowrank
    rank, fan_in = A.shape
    return rank * (B.shape[0] + fan_in) >= B.shape[0] * fan_in


def fedavg_factors(updates: list[ClientUpdate]) -> Factors:
    """LoRA-FedAvg: average A and B *separately*, weighted by examples (fixed rank per module)."""
    modules = sorted({m for u in updates for m in u.factors})
    out: Factors = {}
    for module in modules:
        pairs = module_weights(updates, module)
        ranks = {u.factors[module][0].shape[0] for u, _ in pairs}
        if len(ranks) != 1:
            raise ValueError(f"lora-fedavg needs one rank per module; {module} has ranks {sorted(ranks)}")
        A = sum(w * u.factors[module][0].float() for u, w in pairs)
        B = sum(w * u.factors[module][1].float() for u, w in pairs)
        out[module] = (A, B)
    return out
