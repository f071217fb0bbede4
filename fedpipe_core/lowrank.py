"""One module's low-rank update ΔW = scale · B · A, its scale carried with its factors (FedPipe eq 9: ΔW_k = s_k B_k A_k).

A node's adapters carry the run's adapter scale s = alpha / lora-rank (the same at every rank,
:func:`fedpipe_core.local.lora_alphas`); a server-side average folds each node's weight and scale into B and carries
scale 1. The scale never travels on the wire: both sides know s from the run config, and :mod:`fedpipe_core.codec`
takes it when it decodes factors.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class LowRank:
    """ΔW = scale · B · A of one module: A of shape (r, in), B of shape (out, r)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def dense(self) -> torch.Tensor:
        """scale · B · A in FP32 (the product accumulated in FP64)."""
        product = (self.B.double() @ self.A.double()).float()
        return product if self.scale == 1.0 else self.scale * product

    def folded(self) -> LowRank:
        """The same ΔW with the scale in B (scale 1)."""
        return self if self.scale == 1.0 else LowRank(self.A, self.scale * self.B)

    def norm(self) -> float:
        """‖scale · B · A‖_F without forming the product: ‖BA‖_F² = Σ (BᵀB) ⊙ (AAᵀ) (r × r matrices)."""
        gram = (self.B.double().T @ self.B.double()) * (self.A.double() @ self.A.double().T)
        return abs(self.scale) * float(gram.sum().clamp_min(0.0).sqrt())

    def padded(self, rank: int) -> LowRank:
        """Zero-padded to ``rank``: extra rows of A and columns of B are 0, so ΔW is unchanged."""
        extra = rank - self.rank
        if extra < 0:
            raise ValueError(f"cannot pad rank {self.rank} down to {rank}")
        A = torch.cat([self.A, self.A.new_zeros(extra, self.A.shape[1])])
        return replace(self, A=A, B=torch.cat([self.B, self.B.new_zeros(self.B.shape[0], extra)], dim=1))

    def truncated(self, rank: int) -> LowRank:
        """The first ``rank`` components: A[:r], B[:, :r] (HetLoRA's dispatch to a lower-rank client)."""
        return replace(self, A=self.A[:rank].clone(), B=self.B[:, :rank].clone())

    def is_cheaper_dense(self) -> bool:
        """True when r · (out + in) numbers are no fewer than the out · in of the dense ΔW."""
        out, fan_in = self.B.shape[0], self.A.shape[1]
        return self.rank * (out + fan_in) >= out * fan_in


Factors = dict[str, LowRank]
"""module name -> its factors and scale."""


def concat(parts: list[LowRank]) -> LowRank:
    """Σ_i s_i B_i A_i as one factor pair (exact): [s_1 B_1 | ...] · [A_1; ...], or the shared scale kept when all
    parts have the same one."""
    scales = {p.scale for p in parts}
    scale = scales.pop() if len(scales) == 1 else 1.0
    if scale == 1.0:
        parts = [p.folded() for p in parts]
    return LowRank(torch.cat([p.A for p in parts]), torch.cat([p.B for p in parts], dim=1), scale)


def factor_svd(lowrank: LowRank) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW = scale · B · A = U diag(S) Vᵀ from the factors alone, in FP64: two thin QRs and the SVD of a small core.

    B = Q_B R_B, Aᵀ = Q_A R_A, R_B R_Aᵀ = U' S V'ᵀ, so U = Q_B U', V = Q_A V'. The cost grows with
    the rank of the factors, not with the weight's size (a dense SVD of every weight is not needed).
    """
    folded = lowrank.folded()
    q_b, r_b = torch.linalg.qr(folded.B.double())
    q_a, r_a = torch.linalg.qr(folded.A.double().T)
    U, S, Vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return q_b @ U, S, q_a @ Vh.T


def best_rank(delta: torch.Tensor, rank: int) -> LowRank:
    """The best rank-``rank`` factors of a dense ΔW (Eckart-Young), scale 1.

    ΔW = U Σ Vᵀ; A = V_rᵀ, B = U_r Σ_r, so ||ΔW - B·A||_F = sqrt(Σ_{i>r} σ_i²).
    """
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, S.shape[0])
    return LowRank(Vh[:r].float(), (U[:, :r] * S[:r]).float())
