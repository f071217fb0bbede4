"""FedPipe automation parts: quantization, cost model, profiles, two-stage search vs MILP."""

import random
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedpipe_core.config import RunConfig
from fedpipe_core.cost import lora_params, model_spec, peak_memory, step_flops
from fedpipe_core.device import measure
from fedpipe_core.lora import attach_lora, resolve_target_modules
from fedpipe_core.plan import choose_precision
from fedpipe_core.profile import ClientProfile, declared, simulated
from fedpipe_core.quantize import (
    PRECISIONS,
    QuantizedWeight,
    bytes_per_param,
    normal_float_code,
    quantize,
)
from fedpipe_core.search import Budget, SearchSpace, batch_sizes, cheapest, exact, greedy, plan_client, round_budget_s
from fedpipe_core.task import load_task, node_profile


def test_nf4_code_is_bitsandbytes_nf4_and_nf8_is_its_8bit_analogue():
    nf4 = normal_float_code(4)
    torch.testing.assert_close(nf4, bnbf.get_4bit_type("nf4", device="cpu").float(), atol=1e-4, rtol=0)
    nf8 = normal_float_code(8)
    assert nf8.shape == (256,) and nf8.min() == -1 and nf8.max() == 1 and (nf8 == 0).sum() == 1
    assert torch.all(nf8[1:] > nf8[:-1])


def test_quantization_error_falls_with_bits_and_stored_weights_read_back_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 192, generator=g) * 0.05
    errors = {p: (quantize(w, p).dequantize() - w).abs().mean().item() for p in PRECISIONS}
    assert errors["fp32"] == 0 < errors["fp16"] < errors["nf8"] < errors["nf4"] < 0.01
    sizes = {p: quantize(w, p).nbytes() for p in PRECISIONS}
    assert sizes == {p: pytest.approx(w.numel() * bytes_per_param(p)) for p in PRECISIONS}
    for p in PRECISIONS:
        stored = quantize(w, p)
        parts = {k: v.clone() for k, v in stored.tensors().items()}
        assert set(parts) == ({"data", "absmax"} if p.startswith("nf") else {"data"})
        assert torch.equal(QuantizedWeight.from_tensors(p, stored.shape, parts).dequantize(), stored.dequantize())
    with pytest.raises(ValueError, match="unknown precision"):
        quantize(w, "int3")


@pytest.fixture(scope="module")
def spec_and_model(task):
    model = task.base_model()
    candidates = resolve_target_modules(model, "all-linear")
    return model_spec(model, candidates), candidates


@pytest.mark.parametrize("layers", ["all", "top"])
def test_step_flops_match_torch_flop_counter_within_3_percent(task, spec_and_model, layers):
    spec, candidates = spec_and_model
    chosen = list(task.targets) if layers == "all" else [c for c in candidates if ".29." in c][:4]
    ranks = {m: 4 for m in chosen}
    peft_model = attach_lora(task.base_model(), ranks, 8.0, 0)
    ids = torch.randint(0, 1000, (2, 48))
    counter = FlopCounterMode(display=False)
    with counter:
        peft_model(input_ids=ids, labels=ids).loss.backward()
    measured = counter.get_total_flops()
    assert step_flops(spec, ranks, 2, 48) == pytest.approx(measured, rel=0.03)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert lora_params(spec, ranks) == trainable


def test_memory_model_orders_precisions_and_counts_adapter_state_exactly(spec_and_model):
    spec, candidates = spec_and_model
    ranks = {candidates[-1]: 8}
    mem = {p: peak_memory(spec, ranks, 4, 64, p) for p in PRECISIONS}
    assert mem["fp32"] > mem["fp16"] > mem["nf8"] > mem["nf4"]
    more = peak_memory(spec, {candidates[-1]: 16}, 4, 64, "fp32") - mem["fp32"]
    assert more == 4 * 4 * 8 * sum(spec.modules[candidates[-1]][1:])  # params, grads, 2 Adam moments


def test_profiles_measured_declared_simulated():
    cpu = measure("cpu")
    assert cpu.source == "cpu" and cpu.memory_bytes > 2**30 and cpu.flops > 1e9
    d = declared({"memory-gb": 12, "tflops": 35.6})
    assert d == ClientProfile(12 * 2**30, 35.6e12, "declared")
    assert declared({"partition-id": 0}) is None
    with pytest.raises(ValueError, match="memory-gb"):
        declared({"memory-gb": 12})
    with pytest.raises(ValueError, match="'tflops': must be a finite number"):
        declared({"memory-gb": 12, "tflops": "nan"})
    with pytest.raises(ValueError, match="'memory-gb': expected a number, got '12GB'"):
        declared({"memory-gb": "12GB", "tflops": 35.6})
    sims = [simulated(i, 7, weight_bytes=1e9, training_bytes=1e8) for i in range(50)]
    assert all(0.55e9 <= s.memory_bytes <= 1.0e9 for s in sims)
    assert all(0.25 * 35.6e12 <= s.flops <= 35.6e12 for s in sims)
    assert simulated(3, 7, 1e9, 1e8) == sims[3] and simulated(3, 8, 1e9, 1e8) != sims[3]


def test_batch_sizes_follow_flops_share():
    assert batch_sizes([40e12, 20e12, 5e12], 2, 8) == [8, 4, 2]
    assert batch_sizes([10.0, 10.0], 1, 16) == [16, 16]


def _attention_only(spec, candidates):
    """The model spec, the same spec with only the Wq, Wk, Wv, Wo candidates, and those candidates."""
    pool = [c for c in candidates if c.endswith(("q_proj", "k_proj", "v_proj", "o_proj"))]
    return spec, type(spec)(**{**spec.__dict__, "modules": {m: spec.modules[m] for m in pool}}), pool


@pytest.mark.parametrize("shape", ["uniform", "depth-heavy"])
def test_greedy_stays_in_budget_and_within_5_percent_of_the_milp(spec_and_model, shape):
    spec, sub, pool = _attention_only(*spec_and_model)
    space = SearchSpace(ranks=(2, 4, 8), seq=64, local_steps=4)
    full = 4 * step_flops(sub, {m: 8 for m in pool}, 8, 64)
    rng = random.Random(f"{shape}:1")
    ratios = []
    for _ in range(4):
        if shape == "depth-heavy":  # the most important weights sit low: taking them deepens the backward pass
            importance = {m: rng.random() * (1 + 4 * (spec.num_layers - sub.modules[m][0]) / spec.num_layers) for m in pool}
        else:
            importance = {m: rng.random() for m in pool}
        budget = full * rng.uniform(0.75, 0.98)  # the forward pass alone is ~70% of the full cost
        g = greedy(sub, importance, 8, space, Budget(budget))
        e = exact(sub, importance, 8, space, Budget(budget))
        for plan in (g, e):
            assert plan and 4 * step_flops(sub, plan, 8, 64) <= budget
        og, oe = (sum(importance[m] * r for m, r in p.items()) for p in (g, e))
        assert og <= oe * (1 + 1e-6)
        ratios.append(og / oe)
    assert min(ratios) >= 0.95, ratios  # its time (≤ 50 ms for 120 weights) is printed by fedpipe-automation


def test_the_milp_plan_does_not_depend_on_the_scale_of_the_importances(spec_and_model):
    spec, sub, pool = _attention_only(*spec_and_model)
    space = SearchSpace(ranks=(2, 4, 8), seq=64, local_steps=4)
    budget = Budget(0.9 * 4 * step_flops(sub, {m: 8 for m in pool}, 8, 64))
    rng = random.Random("scale")
    importance = {m: rng.random() for m in pool}
    plan = exact(sub, importance, 8, space, budget)
    assert len(plan) > len(pool) // 2
    for scale in (1e-9, 1e-12):  # measured importances after a round are this small
        assert exact(sub, {m: v * scale for m, v in importance.items()}, 8, space, budget) == plan


def test_equal_clients_with_ample_budget_train_every_candidate_at_the_top_rank(spec_and_model):
    spec, candidates = spec_and_model
    space = SearchSpace(ranks=(2, 4, 8), seq=64, local_steps=4)
    everything = {m: 8 for m in candidates}
    budget = 4 * step_flops(spec, everything, 8, 64)  # the round time of the top rank on every weight
    assert greedy(spec, dict.fromkeys(candidates, 1.0), 8, space, Budget(budget)) == everything


def test_a_node_too_slow_for_every_step_of_the_cheapest_adapter_does_the_steps_that_fit(spec_and_model, caplog):
    spec, sub, pool = _attention_only(*spec_and_model)
    space = SearchSpace(ranks=(2, 4, 8), seq=64, local_steps=4)
    round_s = round_budget_s(sub, space, 8, 1e13)
    assert round_s == pytest.approx(4 * step_flops(sub, {m: 8 for m in pool}, 8, 64) / 1e13)  # the fastest's time for all
    least = step_flops(sub, cheapest(sub, pool, 2), 8, 64)
    importance = dict.fromkeys(pool, 1.0)
    for steps in (1, 2, 3):
        flops = (steps + 0.5) * least / round_s  # affords steps and a half of the cheapest adapter
        plan = plan_client(sub, ClientProfile(1e12, flops, "declared"), importance, 8, round_s, space)
        assert plan.local_steps == steps and not plan.over_budget and len(plan.ranks) == 1
        assert plan.local_steps * plan.step_flops <= plan.flops_budget  # it finishes within the round
    assert "training the cheapest adapter for 3" in caplog.text
    ample = plan_client(sub, ClientProfile(1e12, 1e13, "declared"), importance, 8, round_s, space)
    assert ample.local_steps == 0 and ample.ranks == {m: 8 for m in pool}  # the strategy's steps: all of them


def test_plans_pick_precision_by_memory_and_keep_slow_nodes(spec_and_model, caplog):
    spec, candidates = spec_and_model
    pool = candidates[-8:]
    importance = {m: float(i + 1) for i, m in enumerate(pool)}
    space = SearchSpace(ranks=(2, 4, 8), seq=64, local_steps=4)
    fp32_need = peak_memory(spec, {pool[-1]: 2}, 8, 64, "fp32")
    rich = plan_client(spec, ClientProfile(4 * fp32_need, 1e13, "declared"), importance, 8, 10.0, space)
    assert rich.precision == "fp32" and rich.feasible and rich.memory_bytes <= 4 * fp32_need and not rich.over_budget
    small = ClientProfile(peak_memory(spec, {pool[-1]: 2}, 8, 64, "nf4") * 1.01, 1e13, "declared")
    assert choose_precision(spec, small, {pool[-1]: 2}, 8, 64) == "nf4"
    none = plan_client(spec, ClientProfile(1e6, 1e13, "declared"), importance, 8, 10.0, space)
    assert not none.feasible and "cannot hold the NF4 base" in none.reason
    assert "cheapest adapter" not in caplog.text
    slow = plan_client(spec, ClientProfile(4 * fp32_need, 1.0, "declared"), importance, 8, 10.0, space)
    assert "greedy search: no (weight, rank) plan fits" in caplog.text  # the fallback is said, not silent
    top = max(pool, key=lambda m: (spec.modules[m][0], m))
    assert slow.feasible and slow.ranks == {top: 2}  # no budget at all: the cheapest adapter, never dropped
    assert slow.over_budget and slow.local_steps == 1  # one step, and the plan says it overruns (plans.jsonl's over_budget)
    assert slow.step_flops > slow.flops_budget


def test_memory_scale_widens_simulated_budgets_and_the_testbed_seed_fixes_them(task):
    from dataclasses import replace

    from fedpipe_core.task import load_task, node_profile

    roomy = load_task(replace(task.config, memory_scale=1.7))
    reseeded = load_task(replace(task.config, seed=7))  # another training seed: the same testbed
    for k in range(3):
        base, big = node_profile(task, {}, k), node_profile(roomy, {}, k)
        assert big.flops == base.flops and big.memory_bytes > base.memory_bytes
        assert node_profile(reseeded, {}, k) == base


def _binding_plans(setting: str, importance: dict[str, float] | None = None):
    """Round-2 FedPipe plans of the 4 simulated nodes of the `binding` suite's ``setting``, ranked by ``importance``."""
    from fedpipe_core.strategies.fedpipe import FedPipe
    from fedpipe_tools.bench import load_suites

    suite = load_suites()["binding"]
    cfg = RunConfig.from_mapping(suite.config_of("fedpipe", setting, Path("/tmp/unused"), 1))
    task = load_task(cfg)
    strategy = FedPipe(task)
    strategy.profiles = {k: node_profile(task, {}, k) for k in range(suite.supernodes)}
    strategy.importance = dict(importance or {})
    return task, strategy.make_plans(2, sorted(strategy.profiles))


def test_in_the_binding_setting_the_plans_bind_and_importance_and_random_picks_differ():
    task, _ = _binding_plans("binding")
    rng = random.Random("measured-like")  # heavy-tailed, as measured scores are (max ≈ 18 × the mean)
    importance = {m: rng.random() ** 4 for m in task.targets}
    _, picked = _binding_plans("binding", importance)
    _, drawn = _binding_plans("binding-random", importance)
    _, solved = _binding_plans("binding-exact", importance)
    everything = len(task.targets)
    assert {p.batch_size for p in picked.values()} == {8}  # batch 8 on every node: the plans must bind elsewhere
    assert {p.precision for p in picked.values()} >= {"nf8"}  # memory puts nodes on a quantized base
    assert all(len(p.ranks) < everything for p in picked.values())  # nobody trains every weight at the top rank
    assert all(lora_params(task.spec, p.ranks) <= 3.0e6 / 8 for p in picked.values() if p.local_steps == 0)
    assert any(p.local_steps < task.config.local_steps for p in picked.values())  # the slowest does the steps that fit
    assert [p.ranks for p in picked.values()] != [p.ranks for p in drawn.values()]
    value = {
        name: sum(importance[m] * r for p in plans.values() for m, r in p.ranks.items())
        for name, plans in (("importance", picked), ("random", drawn), ("exact", solved))
    }
    assert value["random"] < value["importance"] <= value["exact"] * (1 + 1e-6)  # the greedy may reach the optimum
    assert value["importance"] >= 0.95 * value["exact"]
