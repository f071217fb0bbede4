"""LoRA on real modules: target resolution, per-module ranks, merge + re-init (eqs 11-12)."""

import pytest
import torch
from fakes import lora_scaling
from transformers import GPT2Config, GPT2LMHeadModel

from fedpipe_core.aggregate import ClientUpdate, aggregate_delta
from fedpipe_core.config import ConfigError
from fedpipe_core.lora import (
    attach_lora,
    lora_factors,
    merge_delta,
    module_shape,
    resolve_target_modules,
    set_lora_factors,
)
from fedpipe_core.lowrank import LowRank


def tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()


def test_targets_resolve_per_architecture(task):
    llama = task.base_model()
    auto = resolve_target_modules(llama, "auto")
    assert len(auto) == 60 and all(n.endswith(("q_proj", "v_proj")) for n in auto)
    assert resolve_target_modules(tiny_gpt2(), "auto") == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    attention = resolve_target_modules(llama, "attention")
    assert len(attention) == 30 * 4 and {n.rsplit(".", 1)[1] for n in attention} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    gpt2_attention = resolve_target_modules(tiny_gpt2(), "attention")
    assert gpt2_attention == [f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj")]  # not mlp.c_proj
    every = resolve_target_modules(llama, "all-linear")
    assert len(every) == 30 * 7 and "lm_head" not in every
    with pytest.raises(ConfigError, match="'c_attn' matches no linear module of LlamaForCausalLM"):
        resolve_target_modules(llama, "q_proj,c_attn")


def test_per_module_ranks_and_fresh_adapter_is_identity(task):
    model = task.base_model()
    names = list(task.targets)
    ranks = {name: (2 if i % 2 else 5) for i, name in enumerate(names[:6])}
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        before = model(ids).logits.clone()
    peft_model = attach_lora(model, ranks, alpha=8.0, seed=3)
    got = lora_factors(peft_model)
    assert {n: f.rank for n, f in got.items()} == ranks
    for name, f in got.items():
        assert f.B.shape == (module_shape(model, name)[0], ranks[name]) and torch.count_nonzero(f.B) == 0
    assert lora_scaling(peft_model) == {n: 8.0 / r for n, r in ranks.items()} == {n: f.scale for n, f in got.items()}
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, before)
    name = names[0]  # rank 5, scale 8 / 5: factors of another scale would make the layer compute another ΔW
    with pytest.raises(ValueError, match="factors of scale 1, the adapter applies 1.6"):
        set_lora_factors(peft_model, {name: LowRank(got[name].A, got[name].B + 1.0, 1.0)})
    assert torch.count_nonzero(lora_factors(peft_model)[name].B) == 0  # refused before anything was loaded
    set_lora_factors(peft_model, {name: LowRank(got[name].A[:2], got[name].B[:, :2] + 1.0, 8.0 / 5)})
    assert torch.count_nonzero(lora_factors(peft_model)[name].B[:, :2]) > 0


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_then_reinit_equals_base_plus_delta(task, arch):
    base = task.base_model() if arch == "llama" else tiny_gpt2()
    targets = resolve_target_modules(base, "auto")[:4]
    ids = torch.tensor([[1, 20, 30, 40, 5, 6]])
    # train-like adapter state: random non-zero B so that ΔW != 0
    trained = attach_lora(base, {t: 3 for t in targets}, alpha=6.0, seed=1)
    with torch.no_grad():
        for _, module in trained.named_modules():
            if hasattr(module, "lora_B") and "default" in module.lora_B:
                module.lora_B["default"].weight.normal_(0, 0.05)
        adapted_logits = trained(ids).logits.clone()
    factors = lora_factors(trained)
    assert {m: f.scale for m, f in factors.items()} == lora_scaling(trained)  # each layer's alpha / r
    update = ClientUpdate(factors, 1)
    delta = aggregate_delta([update])
    fresh = tiny_gpt2() if arch == "gpt2" else task.base_model()
    merge_delta(fresh, delta)
    reinit = attach_lora(fresh, {t: 3 for t in targets}, alpha=6.0, seed=99)
    with torch.no_grad():
        merged_logits = reinit(ids).logits
    torch.testing.assert_close(merged_logits, adapted_logits, rtol=1e-4, atol=1e-4)
    assert all(torch.count_nonzero(f.B) == 0 for f in lora_factors(reinit).values())


def test_merge_rejects_wrong_shape(task):
    model = task.base_model()
    name = task.targets[0]
    with pytest.raises(ValueError, match="has shape"):
        merge_delta(model, {name: torch.zeros(3, 3)})
