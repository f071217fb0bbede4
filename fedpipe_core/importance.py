"""Weight importance (FedPipe Section III-C, eqs 3-7), measured during local training.

For each adapted weight m:
- eq 4: I_t = mean |θ · ∂L/∂θ| over the adapter parameters θ of m (one mini-batch);
- eq 5: Ī_t = β1 · Ī_{t-1} + (1 - β1) · I_t (sensitivity smoothed by an EMA);
- eq 6: Ū_t = β2 · Ū_{t-1} + (1 - β2) · |I_t - Ī_t| (its uncertainty);
- eq 7: S = Ī · Ū;
- eq 3: importance = mean singular value of ΔW = s · B · A, times S.
"""

from __future__ import annotations

from peft import PeftModel

from fedpipe_core.lora import lora_layers
from fedpipe_core.lowrank import LowRank, factor_svd


class ImportanceTracker:
    """Accumulates eqs 4-6 after every backward pass; :meth:`scores` gives eq 3 per weight."""

    def __init__(
        self,
        peft_model: PeftModel,
        beta1: float = 0.85,
        beta2: float = 0.85,
        history: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        """``history``: (Ī, Ū) per weight from earlier rounds; the EMAs continue from there (else from 0)."""
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"importance betas must be in [0, 1), got {beta1}, {beta2}")
        self.layers = lora_layers(peft_model)
        self.beta1, self.beta2 = beta1, beta2
        past = history or {}
        self.smoothed: dict[str, float] = {m: past.get(m, (0.0, 0.0))[0] for m in self.layers}
        self.uncertainty: dict[str, float] = {m: past.get(m, (0.0, 0.0))[1] for m in self.layers}

    def history(self) -> dict[str, tuple[float, float]]:
        """(Ī, Ū) per weight, to continue the EMAs next round."""
        return {m: (self.smoothed[m], self.uncertainty[m]) for m in self.layers}

    def update(self) -> None:
        """Call after ``loss.backward()`` and before the optimizer step."""
        for module, layer in self.layers.items():
            params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            total = sum(float((p.detach() * p.grad.detach()).abs().sum()) for p in params if p.grad is not None)
            sensitivity = total / sum(p.numel() for p in params)  # eq 4
            self.smoothed[module] = self.beta1 * self.smoothed[module] + (1 - self.beta1) * sensitivity  # eq 5
            self.uncertainty[module] = self.beta2 * self.uncertainty[module] + (1 - self.beta2) * abs(
                sensitivity - self.smoothed[module]
            )  # eq 6

    def sensitivity_scores(self) -> dict[str, float]:
        """Eq 7: Ī · Ū per weight."""
        return {m: self.smoothed[m] * self.uncertainty[m] for m in self.layers}

    def scores(self) -> dict[str, float]:
        """Eq 3: mean singular value of s · B · A times the sensitivity score."""
        out = {}
        sensitivity = self.sensitivity_scores()
        for module, layer in self.layers.items():
            A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
            # the r singular values of s · B · A from the factors: no dense SVD of the weight
            _, singular, _ = factor_svd(LowRank(A, B, float(layer.scaling["default"])))
            out[module] = float(singular.mean()) * sensitivity[module]
        return out
