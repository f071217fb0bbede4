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
(:func:`~fedpipe_core.lowrank.best_rank`), full fine-tuning averages dense weight changes (:func:`aggregate_dense`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fedpipe_core.lowrank import Factors, LowRank, concat, factor_svd


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: its factors per adapted module (each with its scale), its example count."""

    factors: Factors
    num_examples: int
    dense: dict[str, torch.Tensor] = field(default_factory=dict)
    """Full-weight updates W_after - W_before (full fine-tuning), by module."""


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
    """The averaged ΔW of every module that at least one client trained (eq 10), factored exactly: each client's
    weight and scale folded into its B (scale 1)."""
    modules = sorted({m for u in updates for m in u.factors})
    out: dict[str, LowRank] = {}
    for module in modules:
        pairs = module_weights(updates, module)
        A = torch.cat([u.factors[module].A.float() for u, _ in pairs], dim=0)
        B = torch.cat([w * u.factors[module].scale * u.factors[module].B.float() for u, w in pairs], dim=1)
        out[module] = LowRank(A, B)
    return out


def aggregate_delta(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """Dense averaged ΔW per module (eq 10): Σ_k w_k ΔW_k over the clients that trained it."""
    return {m: lowrank.dense() for m, lowrank in aggregate_lowrank(updates).items()}


Weighting = Callable[[list[ClientUpdate], str], list[tuple[ClientUpdate, float]]]
"""Which clients enter a module's average and with what weight (summing to 1)."""


def norm_weights(updates: list[ClientUpdate], module: str) -> list[tuple[ClientUpdate, float]]:
    """HetLoRA's sparsity-weighted aggregation: w_k ∝ ||s_k · B_k · A_k||_F over the trainers."""
    trained = [u for u in updates if module in u.factors]
    norms = [u.factors[module].norm() for u in trained]
    total = sum(norms)
    if total <= 0:
        return module_weights(updates, module)  # all-zero updates: fall back to example weights
    return [(u, n / total) for u, n in zip(trained, norms)]


def aggregate_padded(updates: list[ClientUpdate], ranks: dict[str, int], weighting: Weighting = module_weights) -> Factors:
    """Average A and B separately after zero-padding each client's factors to ``ranks[module]``.

    With equal ranks and example weights this is LoRA-FedAvg; with mixed ranks it is HetLoRA's
    zero-padding aggregation; restricted to the clients that trained a module it is LEGEND's
    per-layer aggregation. Modules nobody trained are absent from the result.
    """
    out: Factors = {}
    for module in sorted({m for u in updates for m in u.factors}):
        pairs = weighting(updates, module)
        padded = [(u.factors[module].padded(ranks[module]), w) for u, w in pairs]
        scale = _shared_scale([f for f, _ in padded], module)
        out[module] = LowRank(sum(w * f.A.float() for f, w in padded), sum(w * f.B.float() for f, w in padded), scale)
    return out


def aggregate_dense(updates: list[ClientUpdate]) -> dict[str, torch.Tensor]:
    """FedAvg of full-weight updates: Σ_k n_k ΔW_k / Σ_k n_k over the clients that sent the module."""
    out: dict[str, torch.Tensor] = {}
    for module in sorted({m for u in updates for m in u.dense}):
        trained = [u for u in updates if module in u.dense]
        total = sum(u.num_examples for u in trained)
        out[module] = sum((u.num_examples / total) * u.dense[module].double() for u in trained).float()
    return out


def _shared_scale(factors: list[LowRank], module: str) -> float:
    """The one scale of factors averaged A and B apart (an average of A and B means nothing across scales)."""
    scales = {f.scale for f in factors}
    if len(scales) != 1:
        raise ValueError(f"{module}: factors of different scales {sorted(scales)} cannot be averaged factor by factor")
    return scales.pop()


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
        if module not in residual and increment[module].rank <= rank:
            sent[module] = increment[module]
            continue
        parts = [p for p in (increment.get(module), residual.get(module)) if p is not None]
        U, S, V = factor_svd(concat(parts))
        significant = int((S > 1e-7 * S[0]).sum()) if S.numel() and S[0] > 0 else 0
        cut = min(rank, significant)
        if cut == 0:
            continue  # M = 0: nothing to send, nothing to keep
        sent[module] = LowRank(V[:, :cut].T.float().contiguous(), (U[:, :cut] * S[:cut]).float())
        if significant > cut:
            kept[module] = LowRank(
                V[:, cut:significant].T.float().contiguous(), (U[:, cut:significant] * S[cut:significant]).float()
            )
    return sent, kept
