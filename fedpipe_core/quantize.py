"""Base-weight quantization per client memory budget (FedPipe Section III-E, eq 8).

NF4 is bitsandbytes' 4-bit NormalFloat. NF8 is the same construction with 8 bits: 2^8 quantiles
of N(0, 1) (eq 8), normalised to [-1, 1], applied blockwise with absmax scaling through
bitsandbytes' blockwise quantizer with that code. FP16 and FP32 keep the weights as they are
(FP16 rounds them). LoRA adapters are never quantized.

Merging ΔW into a quantized base (eqs 11-12) is done by the node as Q(W0 + ΣΔW) on the weights
a round's ΔW touches (``task.node_base``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch
from torch.distributions import Normal

PRECISIONS = ("fp32", "fp16", "nf8", "nf4")
"""From the highest precision to the lowest."""
BITS = {"fp32": 32, "fp16": 16, "nf8": 8, "nf4": 4}
BLOCKSIZE = 64


@functools.lru_cache(maxsize=4)
def normal_float_code(bits: int) -> torch.Tensor:
    """The k-bit NormalFloat code (eq 8): quantiles of N(0,1), one exact zero, scaled to [-1, 1].

    2^(k-1) positive and 2^(k-1) - 1 negative quantiles, as in QLoRA's NF4 (for k = 4 this is
    bitsandbytes' NF4 table).
    """
    n = 2**bits
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    icdf = Normal(0.0, 1.0).icdf
    positive = icdf(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    negative = -icdf(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


@dataclass
class QuantizedWeight:
    """A frozen weight at some precision; ``dequantize`` gives it back as FP32."""

    precision: str
    shape: tuple[int, ...]
    data: torch.Tensor
    state: object | None = None

    def dequantize(self) -> torch.Tensor:
        if self.precision == "nf4":
            return bnbf.dequantize_4bit(self.data, self.state).float().reshape(self.shape)
        if self.precision == "nf8":
            return bnbf.dequantize_blockwise(self.data, self.state).float().reshape(self.shape)
        return self.data.float()

    def tensors(self) -> dict[str, torch.Tensor]:
        """What a stored weight is made of: its codes (or values) and, for NF4/NF8, the block scales."""
        if self.precision in ("nf4", "nf8"):
            return {"data": self.data, "absmax": self.state.absmax}
        return {"data": self.data}

    @classmethod
    def from_tensors(cls, precision: str, shape: tuple[int, ...], tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        """The inverse of :meth:`tensors` (codes and scales read back from disk)."""
        if precision == "nf4":
            state = bnbf.QuantState(
                absmax=tensors["absmax"],
                shape=torch.Size(shape),
                code=bnbf.get_4bit_type("nf4", device=tensors["absmax"].device),
                blocksize=BLOCKSIZE,
                quant_type="nf4",
                dtype=torch.float32,
            )
        elif precision == "nf8":
            state = bnbf.QuantState(absmax=tensors["absmax"], code=normal_float_code(8), blocksize=BLOCKSIZE, dtype=torch.float32)
        elif precision in PRECISIONS:
            state = None
        else:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
        return cls(precision, tuple(shape), tensors["data"], state)

    def nbytes(self) -> int:
        """Bytes of the stored weight, scales included."""
        extra = 0
        if self.precision in ("nf4", "nf8"):
            extra = self.state.absmax.numel() * self.state.absmax.element_size()
        return self.data.numel() * self.data.element_size() + extra


def quantize(weight: torch.Tensor, precision: str, device: torch.device | None = None) -> QuantizedWeight:
    """Store ``weight`` at ``precision`` (one of PRECISIONS), on the CPU.

    ``device``: where NF4/NF8 codes are computed (bitsandbytes' kernels for it; on a 2-core CPU the NF4 codes of a
    7B model's block weights take about 2 minutes); the codes and block scales come back to the CPU either way."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    w = weight.detach().float().contiguous()
    if precision in ("nf4", "nf8"):
        on = w if device is None else w.to(device)  # no copy when it is the CPU
        if precision == "nf4":
            data, state = bnbf.quantize_4bit(on, blocksize=BLOCKSIZE, quant_type="nf4")
        else:
            data, state = bnbf.quantize_blockwise(on, code=normal_float_code(8).to(on.device), blocksize=BLOCKSIZE)
        if data.device.type != "cpu":
            data = data.cpu()
            state.to("cpu")
        return QuantizedWeight(precision, tuple(w.shape), data, state)
    dtype = torch.float16 if precision == "fp16" else torch.float32
    return QuantizedWeight(precision, tuple(w.shape), w.to(dtype))


def bytes_per_param(precision: str) -> float:
    """Storage per base parameter, blockwise absmax scales (FP32 per 64 values) included."""
    if precision in ("nf4", "nf8"):
        return BITS[precision] / 8 + 4 / BLOCKSIZE
    return BITS[precision] / 8
