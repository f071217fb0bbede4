"""Server-side aggregation of heterogeneous LoRA updates (FedPipe eqs 9-12) and of the peers.

FedPipe: each client k returns its factors (A_k, B_k) per adapted module, possibly with a rank
of its own and over a subset of modules. The server forms ΔW_k = s_k · B_k · A_k (eq 9),
averages ΔW over the clients that trained the module, weighted by their example counts (eq 10),
and sends ΔW back; clients merge it into their base and re-initialise A, B (eqs 11-12).

ΔW is kept *exactly* in factored form: Σ_k w_k s_k B_k A_k = [w_1 s_1 B_1 | ... ] · [A_1; ...],
a product of rank Σ_k r_k. Dispatched as such (``dispatch = exact``) the nodes' download grows
with the number of clients; ``dispatch = svd`` sends its best rank-r factors instead and carries
what was cut into the next round (:func:`truncate_with_feedback`).

Peers: LoRA-FedAvg, HetLoRA and LEGEND average A and B after zero-padding (:func:`aggregate_padded`
with their weightings), FlexLoRA averages full products and redistributes them by truncated SVD
(:func:`svd_truncate`), full fine-tuning averages dense weight changes (:func:`aggregate_dense`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full-weight updates W_after - W_before (full fine-tuning), by module."""


def lowrank_norm(A: torch.Tensor, B: torch.Tensor, scale: float = 1.0) -> float:
    """‖s · B · A‖_F without forming the product: ‖BA‖_F² = Σ (BᵀB) ⊙ (AAᵀ) (r × r matrices)."""
    gram = (B.double().T @ B.double()) * (A.double() @ A.double().T)
    return abs(scale) * float(gram.sum().clamp_min(0.0).sqrt())


def module_weights(updates: list[ClientUpdate], module: str) -> list[tuple[ClientUpdate, float]]:
    """The clients that trained ``module`` with their weights n_k / Σ n_j over those clients (eq 10). n_k is the update's
    ``num_examples``, set by :meth:`~fedpipe_core.strategies.base.Strategy.update_weight`: by default the examples client
    k processed in the round (its batch × the steps it did: ``ClientRound.num_examples``), not its data's size
    (``strategy.weight-by = data``: that size, an ablation)."""
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


Weighting = Callable[[list[ClientUpdate], str], list[tuple[ClientUpdate, float]]]
"""Which clients enter a module's average and with what weight (summing to 1)."""


def norm_weights(updates: list[ClientUpdate], module: str) -> list[tuple[ClientUpdate, float]]:
    """HetLoRA's sparsity-weighted aggregation: w_k ∝ ||s_k · B_k · A_k||_F over the trainers."""
    trained = [u for u in updates if module in u.factors]
    norms = [lowrank_norm(*u.factors[module], u.scaling[module]) for u in trained]
    total = sum(norms)
    if total <= 0:
        return module_weights(updates, module)  # all-zero updates: fall back to example weights
    return [(u, n / total) for u, n in zip(trained, norms)]


def pad_factors(lowrank: LowRank, rank: int) -> LowRank:
    """Zero-pad (A, B) to ``rank``: extra rows of A and columns of B are 0, so B · A is unchanged."""
    A, B = lowrank
    extra = rank - A.shape[0]
    if extra < 0:
        raise ValueError(f"cannot pad rank {A.shape[0]} down to {rank}")
    return torch.cat([A, A.new_zeros(extra, A.shape[1])]), torch.cat([B, B.new_zeros(B.shape[0], extra)], dim=1)


def truncate_factors(lowrank: LowRank, rank: int) -> LowRank:
    """The first ``rank`` components: A[:r], B[:, :r] (HetLoRA's dispatch to a lower-rank client)."""
    A, B = lowrank
    return A[:rank].clone(), B[:, :rank].clone()


def aggregate_padded(updates: list[ClientUpdate], ranks: dict[str, int], weighting: Weighting = module_weights) -> Factors:
    """Average A and B separately after zero-padding each client's factors to ``ranks[module]``.

    With equal ranks and example weights this is LoRA-FedAvg; with mixed ranks it is HetLoRA's
    zero-padding aggregation; restricted to the clients that trained a module it is LEGEND's
    per-layer aggregation. Modules nobody trained are absent from the result.
    """
    out: Factors = {}
    for module in sorted({m for u in updates for m in u.factors}):
        pairs = weighting(updates, module)
        padded = [(pad_factors(u.factors[module], ranks[module]), w) for u, w in pairs]
        out[module] = (sum(w * A.float() for (A, _), w in padded), sum(w * B.float() for (_, B), w in padded))
    return out


def svd_truncate(delta: torch.Tensor, rank: int) -> LowRank:
    """FlexLoRA's redistribution: the best rank-``rank`` factors of ΔW (Eckart-Young).

    ΔW = U Σ Vᵀ; A = V_rᵀ, B = U_r Σ_r, so ||ΔW - B·A||_F = sqrt(Σ_{i>r} σ_i²).
    """
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, S.shape[0])
    return Vh[:r].float(), (U[:, :r] * S[:r]).float()


def aggregate_dense(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """FedAvg of full-weight updates: Σ_k n_k ΔW_k / Σ_k n_k over the clients that sent the module."""
    out: dict[str, torch.Tensor] = {}
    for module in sorted({m for u in updates for m in u.dense}):
        trained = [u for u in updates if module in u.dense]
        total = sum(u.num_examples for u in trained)
        out[module] = sum((u.num_examples / total) * u.dense[module].double() for u in trained).float()
    return out


def lowrank_svd(lowrank: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B · A = U diag(S) Vᵀ from the factors alone, in FP64: two thin QRs and the SVD of a small core.

    B = Q_B R_B, Aᵀ = Q_A R_A, R_B R_Aᵀ = U' S V'ᵀ, so U = Q_B U', V = Q_A V'. The cost grows with
    the rank of the factors, not with the weight's size (a dense SVD of every weight is not needed).
    """
    A, B = lowrank
    q_b, r_b = torch.linalg.qr(B.double())
    q_a, r_a = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ U, S, q_a @ Vh.T


def truncate_with_feedback(
    increment: dict[str, LowRank], residual: dict[str, LowRank], rank: int
) -> tuple[dict[str, LowRank], dict[str, LowRank]]:
    """The round's averaged ΔW cut to ``rank`` for dispatch, what was cut carried to the next round.

    Per module, M = ΔW_round + E_prev; the nodes are sent the best rank-``rank`` factors of M
    (Eckart-Young) and E = M - B·A is kept (error feedback), so Σ sent + E = Σ ΔW_round: what the
    clients learned is delayed, never dropped (singular values below 1e-7 of the largest, beneath
    FP32 resolution, excepted). A module whose M already has rank ≤ ``rank`` is sent exactly.
    Both are kept factored: E has rank at most min(out, in).
    """
    sent: dict[str, LowRank] = {}
    kept: dict[str, LowRank] = {}
    for module in sorted(set(increment) | set(residual)):
        if module not in residual and increment[module][0].shape[0] <= rank:
            sent[module] = increment[module]
            continue
        parts = [p for p in (increment.get(module), residual.get(module)) if p is not None]
        U, S, V = lowrank_svd(concat_lowrank(parts))
        significant = int((S > 1e-7 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        cut = min(rank, significant)
        if cut == 0:
            continue  # M = 0: nothing to send, nothing to keep
        sent[module] = (V[:, :cut].T.float().contiguous(), (U[:, :cut] * S[:cut]).float())
        if significant > cut:
            kept[module] = (V[:, cut:significant].T.float().contiguous(), (U[:, cut:significant] * S[cut:significant]).float())
    return sent, kept
