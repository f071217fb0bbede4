"""The frozen layers that store a base weight at its precision: bytes, outputs, peft on top of them."""

import bitsandbytes as bnb
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fedpipe_core.lora import attach_lora, lora_factors
from fedpipe_core.qlinear import StoredLinear, effective_weight, place, stored_bytes, stored_linear
from fedpipe_core.quantize import quantize


def _weight_and_bias(out=256, fan_in=192, seed=0):
    g = torch.Generator().manual_seed(seed)
    return 0.05 * torch.randn(out, fan_in, generator=g), 0.01 * torch.randn(out, generator=g)


@pytest.mark.parametrize(
    ("precision", "bytes_per_weight", "layer"),
    [("fp16", 2.0, StoredLinear), ("nf8", 1.0 + 4 / 64, StoredLinear), ("nf4", 0.5 + 4 / 64, bnb.nn.Linear4bit)],
)
def test_a_stored_layer_holds_its_precisions_bytes_and_computes_with_dequantized_weights(precision, bytes_per_weight, layer):
    weight, bias = _weight_and_bias()
    stored = quantize(weight, precision)
    module = stored_linear(stored, bias)
    assert isinstance(module, layer) and not any(p.requires_grad for p in module.parameters())
    assert stored_bytes(module) == pytest.approx(weight.numel() * bytes_per_weight + bias.numel() * 4, abs=1024)
    code = 256 * 4 if precision == "nf8" else 0  # the NF8 code table (one per model: shared by its layers)
    assert stored_bytes(module) == stored.nbytes() + bias.numel() * 4 + code
    x = torch.randn(3, 7, weight.shape[1])
    reference = F.linear(x, stored.dequantize(), bias)  # deQ(Q(W)), the FP32 reference the layer must match
    torch.testing.assert_close(module(x), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(effective_weight(module), stored.dequantize())
    if precision == "nf4":
        assert stored_bytes(module) <= 0.16 * weight.numel() * 4  # the target against FP32


@pytest.mark.parametrize("precision", ["fp16", "nf8", "nf4"])
def test_peft_trains_fp32_adapters_on_a_stored_layer_and_nothing_else(precision):
    config = LlamaConfig(
        vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    name = "model.layers.0.self_attn.q_proj"
    base = model.get_submodule(name)
    stored = quantize(base.weight, precision)
    model.set_submodule(name, stored_linear(stored, base.bias))
    peft_model = attach_lora(model, {name: 4}, 8.0, seed=0)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    layer = peft_model.get_submodule(f"base_model.model.{name}")
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(0.1)
    x = torch.randn(5, 64)
    layer(x).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
    (lowrank,) = lora_factors(peft_model).values()
    assert lowrank.scale == 2.0  # scaling alpha / r = 8 / 4
    expected = F.linear(x, stored.dequantize()) + 2.0 * x @ lowrank.A.T @ lowrank.B.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp16", "nf8", "nf4"])
def test_a_stored_layer_backpropagates_under_16_bit_autocast_and_place_sets_its_compute_dtype(precision):
    weight, bias = _weight_and_bias()
    stored = quantize(weight, precision)
    layer = stored_linear(stored, bias)  # built as a node builds it: FP32 compute, before it knows its device
    x = torch.randn(4, weight.shape[1], requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a GPU round runs under, here on the CPU
        out = layer(x)
    out.float().sum().backward()
    torch.testing.assert_close(x.grad, stored.dequantize().sum(0).expand_as(x), rtol=2e-2, atol=2e-2)
    assert place(layer, torch.device("cpu")).compute_dtype == torch.float32
