"""Planning for real cards: a 7B LLaMA's shapes (meta device, no weights) against 12 and 24 GB GPUs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from fedpipe_core.cost import model_spec, peak_memory
from fedpipe_core.lora import resolve_target_modules
from fedpipe_core.profile import ClientProfile
from fedpipe_core.quantize import PRECISIONS
from fedpipe_core.search import SearchSpace, plan_client

GIB = 2**30
PAPER = SearchSpace(ranks=(2, 4, 8), seq=512, local_steps=6)
"""The paper's LLaMA2-7B setting: sequence 512, rank 4 among the candidates."""


@pytest.fixture(scope="module")
def llama7b():
    config = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, vocab_size=32000
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    spec = model_spec(model, resolve_target_modules(model, "q_proj,v_proj"))
    assert 6.7e9 < spec.linear_params + spec.other_params < 6.8e9
    return spec


def _plan(spec, memory_gb: float, batch: int):
    gpu = ClientProfile(memory_gb * GIB, 35.6e12, "declared", compute_bytes=2)
    importance = dict.fromkeys(spec.modules, 1.0)
    ample = 1e30  # memory decides here, not FLOPS
    return plan_client(spec, gpu, importance, batch, ample / gpu.flops, PAPER)


def _highest_fitting(spec, memory_gb: float, batch: int) -> str:
    """The paper's rule: the most bits whose peak (every weight at the smallest rank) fits the budget."""
    everything = dict.fromkeys(spec.modules, min(PAPER.ranks))
    fitting = [p for p in PRECISIONS if peak_memory(spec, everything, batch, PAPER.seq, p, 2) <= memory_gb * GIB]
    return fitting[0] if fitting else "nf4"


def test_a_12gb_card_trains_a_7b_model_on_an_nf4_base_with_adapters_that_fit(llama7b):
    plan = _plan(llama7b, 12, batch=8)
    assert plan.precision == "nf4"
    assert plan.ranks and plan.memory_bytes <= 12 * GIB
    assert peak_memory(llama7b, plan.ranks, 8, PAPER.seq, "nf8", 2) > 12 * GIB  # eight bits would not fit


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
def test_a_24gb_card_gets_the_most_bits_that_fit(llama7b, batch):
    plan = _plan(llama7b, 24, batch)
    assert plan.precision == _highest_fitting(llama7b, 24, batch)
    assert plan.memory_bytes <= 24 * GIB
    small = _plan(llama7b, 12, batch)
    assert PRECISIONS.index(plan.precision) <= PRECISIONS.index(small.precision)
    assert len(plan.ranks) >= len(small.ranks)


def test_fewer_activation_bytes_on_a_gpu_than_on_the_cpu(llama7b):
    ranks = dict.fromkeys(llama7b.modules, 4)
    gpu, cpu = (peak_memory(llama7b, ranks, 8, 512, "nf4", b) for b in (2, 4))
    assert gpu < 0.6 * cpu
