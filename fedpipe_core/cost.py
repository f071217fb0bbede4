"""Cost model of a client configuration: FLOPs of one local step and peak training memory.

A configuration is (modules with their ranks, batch size, sequence length, base precision).
Everything is derived from the model's real shapes (:class:`ModelSpec`):

- forward: 2 · (linear params of the blocks + LM head) per token, plus attention scores
  (4 · s · d per token and layer);
- backward through the frozen base only computes activation gradients (no weight gradients),
  and only from the output down to the lowest adapted layer: 1 × forward for those layers;
- each LoRA adapter of rank r on an (out, in) weight costs 2 · r · (in + out) per token forward
  and twice that backward (gradients of A, B and of its input).

Memory: the block linears at their precision, the rest (embeddings, norms, LM head) in FP32 as
a node holds them; adapters with gradient and two AdamW moments (4 FP32 copies); activations in
the compute dtype (2 bytes on a GPU, 4 on the CPU) for every block the backward pass goes
through (34 · s · b · d + 5 · heads · s² · b per layer in 16-bit units, Korthikanti et al.: it
counts more than a frozen linear keeps, which the transients of the backward pass make up for;
measured peaks agree within ±20%, see benchmarks/memory.py); and the FP32 logits with their
gradient. On a GPU (2-byte compute dtype, autocast) three casts are kept as well: the logits in
the compute dtype beside their FP32 copy, the LM head's weight cast for the backward pass and, for
an FP32 base, every block linear's weight cast in the blocks the backward pass goes through (a
stored FP16/NF8/NF4 layer dequantizes again in its backward instead of keeping a copy).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedpipe_core.quantize import bytes_per_param
from fedpipe_core.structure import block_linears, layer_of

FP32 = 4
"""Bytes of what a node keeps in FP32 whatever its device: non-block weights, adapters, optimizer state, logits."""


@dataclass(frozen=True)
class ModelSpec:
    """The shapes the cost model needs."""

    num_layers: int
    hidden: int
    heads: int
    vocab: int
    layer_linear_params: int
    head_params: int
    other_params: int
    modules: dict[str, tuple[int, int, int]]
    """candidate module -> (layer index, out, in)."""

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.layer_linear_params


def model_spec(model: PreTrainedModel, candidates: list[str]) -> ModelSpec:
    """Read layer count, widths and parameter counts off a loaded model."""
    cfg = model.config
    hidden = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    vocab = int(cfg.vocab_size)
    block_linear = sum(module.weight.numel() for _, module in block_linears(model))
    total = sum(p.numel() for p in model.parameters())
    modules = {}
    for name in candidates:
        module = model.get_submodule(name)
        w = module.weight
        out_dim, in_dim = (w.shape[1], w.shape[0]) if isinstance(module, Conv1D) else tuple(w.shape)
        modules[name] = (layer_of(name), int(out_dim), int(in_dim))
    return ModelSpec(
        num_layers=layers,
        hidden=hidden,
        heads=heads,
        vocab=vocab,
        layer_linear_params=block_linear // layers,
        head_params=vocab * hidden,
        other_params=total - block_linear,
        modules=modules,
    )


def lora_params(spec: ModelSpec, ranks: dict[str, int]) -> int:
    """Trainable adapter parameters: Σ r · (in + out)."""
    return sum(r * (spec.modules[m][1] + spec.modules[m][2]) for m, r in ranks.items())


@dataclass(frozen=True)
class LinearCost:
    """A cost that is linear in the configuration: see :meth:`of`."""

    idle: float
    """Cost with no adapter at all (nothing to train)."""
    fixed: float
    per_block: float
    """Added for every transformer block the backward pass reaches."""
    per_param: float
    """Added for every adapter parameter."""

    def of(self, spec: ModelSpec, ranks: dict[str, int]) -> float:
        """fixed + per_block · blocks reached + per_param · adapter parameters (idle without adapters)."""
        if not ranks:
            return float(self.idle)
        return float(self.fixed + self.per_block * backward_blocks(spec, ranks) + self.per_param * lora_params(spec, ranks))


def backward_blocks(spec: ModelSpec, ranks: dict[str, int]) -> int:
    """Blocks from the lowest adapted one to the output: those the backward pass goes through."""
    return spec.num_layers - min(spec.modules[m][0] for m in ranks) if ranks else 0


def flops_terms(spec: ModelSpec, batch: int, seq: int) -> LinearCost:
    """Step FLOPs as a linear cost (see module docstring)."""
    tokens = batch * seq
    layer_fwd = 2 * spec.layer_linear_params * tokens + 4 * seq * spec.hidden * tokens
    head_fwd = 2 * spec.head_params * tokens
    forward = spec.num_layers * layer_fwd + head_fwd
    return LinearCost(idle=forward, fixed=forward + head_fwd, per_block=layer_fwd, per_param=6 * tokens)


def memory_terms(spec: ModelSpec, batch: int, seq: int, precision: str, compute_bytes: int = 4) -> LinearCost:
    """Peak training bytes as a linear cost (see module docstring)."""
    base = spec.linear_params * bytes_per_param(precision) + spec.other_params * FP32
    logits = 2 * batch * seq * spec.vocab * FP32
    per_block = (34 * seq * batch * spec.hidden + 5 * spec.heads * seq * seq * batch) * compute_bytes / 2
    if compute_bytes < FP32:  # autocast's kept casts
        logits += (batch * seq * spec.vocab + spec.head_params) * compute_bytes
        if precision == "fp32":
            per_block += spec.layer_linear_params * compute_bytes
    return LinearCost(idle=base + logits, fixed=base + logits, per_block=per_block, per_param=4 * FP32)


def step_flops(spec: ModelSpec, ranks: dict[str, int], batch: int, seq: int) -> float:
    """FLOPs of one forward + backward step of ``batch`` sequences of ``seq`` tokens."""
    return flops_terms(spec, batch, seq).of(spec, ranks)


def peak_memory(spec: ModelSpec, ranks: dict[str, int], batch: int, seq: int, precision: str, compute_bytes: int = 4) -> float:
    """Peak bytes of training this configuration (see module docstring)."""
    return memory_terms(spec, batch, seq, precision, compute_bytes).of(spec, ranks)


def full_params(spec: ModelSpec, modules: list[str]) -> int:
    """Parameters of the target weights that full fine-tuning trains: Σ out · in."""
    return sum(spec.modules[m][1] * spec.modules[m][2] for m in modules)


def full_step_flops(spec: ModelSpec, modules: list[str], batch: int, seq: int) -> float:
    """FLOPs of one FT step: forward, activation gradients down to the lowest trained block,
    and the weight gradients (2 · out · in per token) of every trained weight."""
    terms = flops_terms(spec, batch, seq)
    blocks = backward_blocks(spec, {m: 1 for m in modules})
    return float(terms.fixed + terms.per_block * blocks + 2 * batch * seq * full_params(spec, modules))


def full_peak_memory(spec: ModelSpec, modules: list[str], batch: int, seq: int) -> float:
    """Peak bytes of FT: an FP32 base, gradient and two AdamW moments of the trained weights, activations."""
    terms = memory_terms(spec, batch, seq, "fp32")
    blocks = backward_blocks(spec, {m: 1 for m in modules})
    return float(terms.fixed + terms.per_block * blocks + 3 * 4 * full_params(spec, modules))
