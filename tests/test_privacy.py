"""Sample-level DP-SGD at a site: the accountant, the ledger that never lets a site pass its ε, per-example
clipping, and the node that fails closed."""

from __future__ import annotations

import re
from dataclasses import replace
from types import SimpleNamespace

import dp_accounting as dpa
import pytest
import torch

from fedpipe_core.privacy import (
    DpSgd,
    PrivacyBudgetSpent,
    PrivacyLedger,
    calibrate_noise,
    clip_and_sum,
    load_ledger,
    noisy_mean,
    per_example_gradients,
    spent_epsilon,
)
from fedpipe_core.protocol import TrainInstruction


def test_the_accountant_is_dp_accounting_s_rdp_for_poisson_sampled_gaussian_steps():
    reference = dpa.rdp.RdpAccountant()
    reference.compose(dpa.PoissonSampledDpEvent(0.01, dpa.GaussianDpEvent(1.0)), 3000)
    assert spent_epsilon([(0.01, 1.0, 3000)], 1e-5) == pytest.approx(reference.get_epsilon(1e-5))
    assert 3.2 < spent_epsilon([(0.01, 1.0, 3000)], 1e-5) < 3.6  # the published figure for q 0.01, z 1, 3,000 steps
    assert spent_epsilon([(0.01, 1.0, 1000), (0.01, 1.0, 2000)], 1e-5) == pytest.approx(spent_epsilon([(0.01, 1.0, 3000)], 1e-5))
    z = calibrate_noise(0.05, 24, 8.0, 1e-5)
    assert spent_epsilon([(0.05, z, 24)], 1e-5) <= 8.0 < spent_epsilon([(0.05, 0.97 * z, 24)], 1e-5)


def test_a_site_never_exceeds_its_epsilon_and_refuses_the_round_that_would(tmp_path):
    ledger = PrivacyLedger(epsilon=3.0, delta=1e-5)
    planned, rate, spent = 24, 0.1, []
    for _ in range(4):  # the run's four planned rounds of six steps fit
        ledger.admit(rate, 6, planned)
        spent.append(ledger.record(rate, 6))
        ledger.save(tmp_path)
        ledger = load_ledger(tmp_path, 3.0, 1e-5)  # a fresh process per message: the ledger comes from the site's disk
    assert spent == sorted(spent) and spent[-1] <= 3.0 and spent[-1] > 2.5
    with pytest.raises(PrivacyBudgetSpent, match="privacy budget: 6 more steps .* of this site's ε = 3"):
        ledger.admit(rate, 6, planned)  # a fifth round would pass ε: refused before any step
    assert ledger.spent() == pytest.approx(spent[-1])  # the refusal spent nothing


def test_dp_sgd_clips_every_example_s_gradient_to_the_bound():
    torch.manual_seed(0)
    own = [torch.randn(3, 4) * scale for scale in (0.01, 1.0, 30.0)], [torch.randn(2) * scale for scale in (0.01, 1.0, 30.0)]
    clip = 1.0
    total = clip_and_sum([torch.stack(own[0]), torch.stack(own[1])], clip)
    norms = [float(torch.cat([a.flatten(), b]).norm()) for a, b in zip(*own)]
    factors = [min(1.0, clip / n) for n in norms]
    assert norms[0] < clip < norms[2]  # one example under the bound (kept), one far above (clipped)
    for got, grads in zip(total, own):
        assert torch.allclose(got, sum(f * g for f, g in zip(factors, grads)), atol=1e-6)  # one norm over both tensors
    silent = noisy_mean(total, clip, 0.0, 2.0, torch.Generator().manual_seed(1))
    assert torch.allclose(silent[0], total[0] / 2.0)
    noised = noisy_mean(total, clip, 1.0, 2.0, torch.Generator().manual_seed(1))
    assert 0.1 < float((noised[0] - silent[0]).std()) * 2.0 < 3.0  # N(0, (zC)²) per coordinate, then / q·n
    sampled = DpSgd(1.0, 1.0, 0.25, seed=3).batches(list(range(400)), 50)
    assert 90 < sum(map(len, sampled)) / 50 < 110  # Poisson: each of the 400 examples kept with probability 0.25


def test_one_batched_pass_gives_each_example_its_own_gradient(task):
    from fedpipe_core.data import collate
    from fedpipe_core.lora import attach_lora

    modules = task.targets[:3]
    model = attach_lora(task.base_model(), {m: 4 for m in modules}, 8.0, seed=0)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)  # B non-zero: A gets a gradient too
    model.train()
    examples = [e for e in task.splits["train"][:12]][::3]  # four examples of different lengths: padded in the batch
    inputs = collate(task.tokenizer, examples, 64)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) > 1
    grads, losses = per_example_gradients(model, params, inputs)
    assert [tuple(g.shape) for g in grads] == [(len(examples), *p.shape) for p in params]
    for i, example in enumerate(examples):  # a pass of the example alone
        loss = model(**collate(task.tokenizer, [example], 64)).loss
        alone = torch.autograd.grad(loss, params)
        assert losses[i] == pytest.approx(float(loss.detach()), rel=1e-5)  # a padded batch's attention rounds apart
        for g, a in zip(grads, alone):
            assert float((g[i] - a).norm()) <= 1e-4 * float(a.norm())
    assert all(p.grad is None and not hasattr(p, "grad_sample") for p in params)  # Opacus' hooks and fields are gone
    assert model(**inputs).loss.requires_grad  # the model trains on as before


def test_a_site_with_dp_fails_closed_on_an_instruction_without_it(task, tmp_path):
    from fedpipe_core.node.round import PrivacyRefusal, private_round, site_ledger
    from fedpipe_core.task import NodeData

    data = NodeData(task.splits["train"][:40], [], [], "h")
    context = SimpleNamespace(node_config={"dp-epsilon": 4.0}, run_id=7, node_id=3)
    local = replace(task, config=replace(task.config, cache_dir=str(tmp_path)))
    ledger = site_ledger(local, context)
    assert ledger.epsilon == 4.0 and ledger.delta == local.config.privacy_site_delta
    plain = TrainInstruction(1, "fedpipe", {"m": 2}, 4, 2, "fp32")
    with pytest.raises(PrivacyRefusal, match="trains only with DP-SGD"):
        private_round(local, ledger, plain, data, seed=0)
    dp = private_round(local, ledger, replace(plain, dp_clip=0.5), data, seed=0)
    assert dp.clip == 0.5 and dp.rate == pytest.approx(4 / 40) and dp.noise > 0
    assert site_ledger(local, SimpleNamespace(node_config={}, run_id=7, node_id=3)) is None  # no ε anywhere: no DP
    for node_config, fragment in [
        ({"dp-epsilon": -4.0}, "'dp-epsilon': must be >= 0"),  # a typo must not read as "no DP"
        ({"dp-epsilon": "nan"}, "'dp-epsilon': must be a finite number"),
        ({"dp-epsilon": "four"}, "'dp-epsilon': expected a number"),
        ({"dp-epsilon": 4.0, "dp-delta": 1.0}, "'dp-delta': must be in (0, 1)"),
    ]:
        with pytest.raises(ValueError, match=re.escape(fragment)):
            site_ledger(local, SimpleNamespace(node_config=node_config, run_id=7, node_id=3))


def test_a_private_round_trains_the_adapters_on_a_quantized_base(task):
    from fedpipe_core.local import run_client_round
    from fedpipe_core.qlinear import stored_linear
    from fedpipe_core.quantize import quantize

    module = task.targets[0]
    model = task.base_model()
    parent, _, leaf = module.rpartition(".")
    linear = model.get_submodule(module)
    setattr(model.get_submodule(parent), leaf, stored_linear(quantize(linear.weight.detach(), "nf4"), None))
    examples = task.splits["train"][:20]
    out = run_client_round(
        task,
        model=model,
        examples=examples,
        ranks={module: 4},
        initial_factors=None,
        seed=0,
        local_steps=2,
        dp=DpSgd(clip=0.5, noise=1.0, rate=0.2, seed=5),
    )
    B = out.arrays[f"{module}::B"]
    assert abs(B).sum() > 0 and out.result.steps == 2
    assert out.num_examples == len(sum(DpSgd(0.5, 1.0, 0.2, 5).batches(examples, 2), []))  # the Poisson batches' examples


def test_the_server_records_each_site_s_spend_and_ends_when_no_site_has_budget(task):
    from fakes import FakeGrid, client_factors, reply
    from flwr.app import ArrayRecord, ConfigRecord

    from fedpipe_core.codec import encode_factors
    from fedpipe_core.protocol import TrainReply
    from fedpipe_core.strategies import LoRAFedAvg
    from server_app.strategy import FlowerAdapter, PrivacySpent

    config = replace(task.config, privacy_clip_norm=0.5, privacy_site_epsilon=3.0)
    adapter = FlowerAdapter(LoRAFedAvg(replace(task, config=config)))
    messages = list(adapter.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    assert {m.content["config"]["dp-clip"] for m in messages} == {0.5}  # the DP instruction goes to every node
    arrays = encode_factors(client_factors(task, adapter.stats[1].ranks[1], 1))
    replies = [
        reply(1, arrays, TrainReply(8, 2.0, 2, epsilon_spent=1.25).to_metrics()),
        reply(2, {}, {}, error="privacy budget: 6 more steps at q = 0.1 would spend ε = 3.2 of this site's ε = 3"),
    ]
    adapter.aggregate_train(1, replies)
    assert adapter.stats[1].site_epsilon == {1: 1.25} and adapter.stats[1].privacy_refused == 1
    list(adapter.configure_train(2, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    refusals = [reply(n, {}, {}, error="privacy budget: no more steps") for n in (1, 2)]
    with pytest.raises(PrivacySpent, match="no site has privacy budget left"):
        adapter.aggregate_train(2, refusals)


def test_with_a_frozen_a_the_average_is_a_plain_sum_of_the_bs(task, tmp_path):
    import numpy as np

    from fedpipe_core.local import RoundSeeds, adapter_scaling
    from fedpipe_core.node.round import ROUTINES, LocalJob
    from fedpipe_core.protocol import UpdateError
    from fedpipe_core.round_start import shared_a
    from fedpipe_core.strategies import FedPipe
    from fedpipe_core.task import NodeData

    config = replace(task.config, privacy_frozen_a=True, cache_dir=str(tmp_path))
    local = replace(task, config=config)
    module, top = task.targets[0], max(config.rank_candidates())
    a = shared_a(task.shapes, task.targets, top, config.seed)
    data = NodeData(task.splits["train"][:16], [], [], "h")
    order = TrainInstruction(1, "fedpipe", {module: 4}, 2, 2, "fp32", 0, 0)
    out, _ = ROUTINES["fedpipe"](
        LocalJob(local, SimpleNamespace(run_id=1, node_id=2, node_config={}), order, {}, data, RoundSeeds(1, 1), None)
    )
    assert set(out.arrays) == {f"{module}::B"} and out.arrays[f"{module}::B"].shape == (task.shapes[module][0], top)
    assert not out.arrays[f"{module}::B"][:, 4:].any() and out.arrays[f"{module}::B"][:, :4].any()  # B only, zero-padded
    from fedpipe_core.node.state import node_state_dir
    from fedpipe_core.round_start import load_adapters

    kept, _ = load_adapters(node_state_dir(local, 1, 2), adapter_scaling(local.config))
    assert torch.equal(kept[module].A, a[module][:4])  # A stayed frozen through training
    strategy = FedPipe(local)
    assert all(torch.equal(strategy.frozen_a[m], a[m]) for m in task.targets)  # the server draws the same A
    out_features = task.shapes[module][0]
    assert strategy.trainable_params({module: 4}) == 4 * out_features  # B alone trains
    assert FedPipe(task).trainable_params({module: 4}) == 4 * sum(task.shapes[module])  # A and B
    g = torch.Generator().manual_seed(0)
    bs = [torch.randn(task.shapes[module][0], top, generator=g) * 0.01 for _ in range(2)]
    updates = [strategy.decode_update({f"{module}::B": b.numpy()}, {module: 4}, n) for b, n in zip(bs, (30, 10))]
    from fedpipe_core.strategies.fedpipe import average_b

    averaged, s = average_b(updates, strategy.frozen_a)[module], adapter_scaling(config)
    A, B = averaged.A, averaged.B
    assert averaged.scale == 1.0 and {u.factors[module].scale for u in updates} == {s}  # the nodes' scale folded into B
    plain_sum = (30 * bs[0] + 10 * bs[1]) / 40  # what a secure sum of n_k B_k and n_k gives
    assert torch.allclose(B @ A, s * plain_sum @ a[module], atol=1e-6) and A.shape[0] == top
    exact = sum(w * s * b @ a[module] for b, w in zip(bs, (0.75, 0.25)))
    assert torch.allclose(B @ A, exact, atol=1e-6)  # eq 10's average of ΔW_k = s B_k A, exactly
    with pytest.raises(UpdateError, match="sends '<assigned module>::B' only"):
        strategy.decode_update({f"{module}::A": np.zeros((4, task.shapes[module][1]), np.float32)}, {module: 4}, 1)
