"""Frozen linear layers that hold their weight at the plan's precision (eq 8), for peft to wrap.

- NF4: bitsandbytes' ``Linear4bit`` over ``Params4bit`` (the QLoRA layer), built from the stored
  codes and block scales without quantizing again; it runs on the CPU as well as on CUDA.
- NF8 and FP16: :class:`StoredLinear`, an ``nn.Linear`` whose weight is the stored tensor (NF8
  codes with their blockwise absmax scales, or FP16 values), dequantized to the compute dtype
  inside ``forward``. Being an ``nn.Linear``, peft wraps it with its own LoRA layer.
- FP32: the model's own ``nn.Linear`` (nothing to store differently).

Only the linear layers inside the transformer blocks are stored at the plan's precision; the
embeddings, norms and LM head stay in the compute dtype: they are a small share of a model's
weights (the LM head excepted, which is tied to the embeddings in most small LMs), and the head's
logits decide the loss directly, so QLoRA leaves them unquantized too. Adapters stay FP32 (peft
gives them the layer's ``compute_dtype``).
"""

from __future__ import annotations

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
import torch.nn.functional as F
from torch import nn

from fedpipe_core.device import compute_dtype
from fedpipe_core.quantize import BLOCKSIZE, QuantizedWeight


class StoredLinear(nn.Linear):
    """A frozen linear whose weight is kept as NF8 codes + scales or as FP16, dequantized per forward."""

    def __init__(self, stored: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32) -> None:
        out_features, in_features = stored.shape
        super().__init__(in_features, out_features, bias=bias is not None, device="meta")
        del self.weight
        self.register_buffer("weight", stored.data)
        if stored.precision == "nf8":
            self.register_buffer("absmax", stored.state.absmax)
            self.register_buffer("code", stored.state.code)
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.precision = stored.precision
        self.compute_dtype = compute_dtype

    def dequantized(self) -> torch.Tensor:
        """The weight as the matmul sees it: deQ(Q(W)) in the compute dtype."""
        if self.precision == "nf8":
            state = bnbf.QuantState(absmax=self.absmax, code=self.code, blocksize=BLOCKSIZE, dtype=torch.float32)
            weight = bnbf.dequantize_blockwise(self.weight, state).reshape(self.out_features, self.in_features)
        else:
            weight = self.weight
        return weight.to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _FrozenMatmul.apply(x.to(self.compute_dtype), self)
        return out if self.bias is None else out + self.bias.to(self.compute_dtype)


class _FrozenMatmul(torch.autograd.Function):
    """x · deQ(W)ᵀ whose backward dequantizes W again instead of keeping it: the dequantized weight
    lives only while one layer computes (as in bitsandbytes' 4-bit matmul), not until the backward pass."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, layer: StoredLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized())

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad @ ctx.layer.dequantized().to(grad.dtype), None


def nf4_linear(
    stored: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32
) -> bnb.nn.Linear4bit:
    """bitsandbytes' Linear4bit holding ``stored``'s NF4 codes and scales as they are."""
    out_features, in_features = stored.shape
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias is not None, compute_dtype=compute_dtype, quant_type="nf4", device="meta"
    )
    layer.weight = bnb.nn.Params4bit(
        data=stored.data, requires_grad=False, quant_state=stored.state, blocksize=BLOCKSIZE, quant_type="nf4", bnb_quantized=True
    )
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    return layer


def stored_linear(stored: QuantizedWeight, bias: torch.Tensor | None, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """The frozen layer that holds ``stored`` at its precision (NF4, NF8 or FP16)."""
    if stored.precision == "nf4":
        return nf4_linear(stored, bias, compute_dtype)
    if stored.precision in ("nf8", "fp16"):
        return StoredLinear(stored, bias, compute_dtype)
    raise ValueError(f"precision {stored.precision!r} is held by the model's own layer")


def place(model: nn.Module, device: torch.device) -> nn.Module:
    """Move ``model`` to ``device``, its stored layers computing in the device's dtype (BF16/FP16 on a GPU, FP32
    on the CPU): on a GPU they neither up-cast their input to FP32 nor dequantize their weight to FP32."""
    model = model.to(device)
    dtype = compute_dtype(device)
    for module in model.modules():
        if isinstance(module, (StoredLinear, bnb.nn.Linear4bit)):
            module.compute_dtype = dtype
    return model


def effective_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) weight a block linear computes with, in FP32, whatever layer holds it."""
    if isinstance(module, bnb.nn.Linear4bit):
        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, StoredLinear):
        return module.dequantized().float()
    return module.weight.detach().float()


def stored_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (codes and scales of stored layers included)."""
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for module in model.modules():  # Linear4bit keeps its block scales in the quant state, not as a buffer
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.quant_state is not None:
            absmax = module.weight.quant_state.absmax
            total += absmax.numel() * absmax.element_size()
    return total
