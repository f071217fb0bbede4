"""Peer strategies: aggregation on hand-computed cases, per-device configurations, a round of each."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from fakes import FakeGrid, client_factors, factors, reply
from flwr.app import ArrayRecord, ConfigRecord

from fedpipe_core.aggregate import (
    ClientUpdate,
    aggregate_dense,
    aggregate_padded,
    module_weights,
    norm_weights,
)
from fedpipe_core.codec import (
    decode_delta,
    decode_factors,
    encode_dense,
    encode_factors,
)
from fedpipe_core.config import ConfigError
from fedpipe_core.cost import step_flops
from fedpipe_core.local import lora_alphas, run_full_round
from fedpipe_core.lowrank import LowRank, best_rank
from fedpipe_core.profile import ClientProfile
from fedpipe_core.protocol import TrainReply
from fedpipe_core.strategies import STRATEGIES, FedAdapter, FlexLoRA, FullFT, HetLoRA, Legend
from fedpipe_core.strategies.base import deadline_steps
from fedpipe_core.strategies.peer_rules import (
    AdapterConfig,
    capability_rank,
    fedadapter_start,
    fedadapter_trials,
    legend_ranks,
    rising_ranks,
)
from fedpipe_flower.messages import from_record
from server_app.strategy import FlowerAdapter


def test_hetlora_zero_padding_with_norm_weights_by_hand():
    s = 2.0
    f1, f2 = factors(2, 6, 5, 1, s), factors(4, 6, 5, 2, s)
    (a1, b1), (a2, b2) = (f1.A, f1.B), (f2.A, f2.B)
    updates = [ClientUpdate({"q": f1}, 10), ClientUpdate({"q": f2}, 30)]
    n1, n2 = float(torch.linalg.norm(s * b1 @ a1)), float(torch.linalg.norm(s * b2 @ a2))
    w1, w2 = n1 / (n1 + n2), n2 / (n1 + n2)
    averaged = aggregate_padded(updates, {"q": 4}, norm_weights)["q"]
    A, B = averaged.A, averaged.B
    assert A.shape == (4, 5) and B.shape == (6, 4) and averaged.scale == s
    torch.testing.assert_close(A[:2], w1 * a1 + w2 * a2[:2])
    torch.testing.assert_close(A[2:], w2 * a2[2:])  # client 1's padded rows are zeros
    torch.testing.assert_close(B[:, :2], w1 * b1 + w2 * b2[:, :2])
    torch.testing.assert_close(B[:, 2:], w2 * b2[:, 2:])
    # example weights (LoRA-FedAvg / LEGEND) differ from norm weights
    A_ex = aggregate_padded(updates, {"q": 4}, module_weights)["q"].A
    torch.testing.assert_close(A_ex[:2], 0.25 * a1 + 0.75 * a2[:2])


def test_legend_per_layer_weights_by_hand():
    # client 1 (10 examples) trains layers 0 and 1, client 2 (30) layer 1 only, client 3 (20) layer 2 only
    l0_1, l1_1, l1_2, l2_3 = factors(2, 4, 3, 1), factors(4, 4, 3, 2), factors(2, 4, 3, 3), factors(4, 4, 3, 4)
    updates = [
        ClientUpdate({"l0": l0_1, "l1": l1_1}, 10),
        ClientUpdate({"l1": l1_2}, 30),
        ClientUpdate({"l2": l2_3}, 20),
    ]
    out = aggregate_padded(updates, {"l0": 4, "l1": 4, "l2": 4}, Legend.weighting)
    torch.testing.assert_close(out["l0"].A[:2], l0_1.A)  # the only device on layer 0 gets weight 1
    torch.testing.assert_close(out["l0"].A[2:], torch.zeros(2, 3))
    torch.testing.assert_close(out["l1"].A[:2], 0.25 * l1_1.A[:2] + 0.75 * l1_2.A)
    torch.testing.assert_close(out["l1"].A[2:], 0.25 * l1_1.A[2:])
    torch.testing.assert_close(out["l2"].B, l2_3.B)


def test_flexlora_svd_truncation_meets_the_eckart_young_bound():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 9, generator=g)
    sigma = torch.linalg.svdvals(delta.double())
    for rank in (1, 3, 9, 20):
        best = best_rank(delta, rank)
        r = min(rank, 9)
        assert best.A.shape == (r, 9) and best.B.shape == (12, r) and best.scale == 1.0
        error = float(torch.linalg.norm(delta - best.dense()))
        assert error == pytest.approx(float(sigma[r:].pow(2).sum().sqrt()), abs=1e-4)
        other = factors(r, 12, 9, rank)  # any other rank-r product is no closer
        assert error <= float(torch.linalg.norm(delta - other.dense())) + 1e-6


def test_ft_averages_dense_updates_by_examples():
    d1, d2 = torch.ones(3, 2), torch.full((3, 2), 5.0)
    out = aggregate_dense([ClientUpdate({}, 30, dense={"w": d1}), ClientUpdate({}, 10, dense={"w": d2, "u": d2})])
    torch.testing.assert_close(out["w"], torch.full((3, 2), 2.0))
    torch.testing.assert_close(out["u"], d2)


def test_every_rank_gets_the_same_adapter_scaling(task):
    alphas = lora_alphas(task.config, {"a": 2, "b": 8})
    scale = task.config.lora_alpha / task.config.lora_rank
    assert {m: a / r for (m, a), r in zip(alphas.items(), (2, 8))} == {"a": scale, "b": scale}


def test_capability_rank_and_rising_ranks():
    assert [capability_rank(f, 100.0, (2, 4, 8)) for f in (100, 60, 50, 30, 10)] == [8, 4, 4, 2, 2]
    assert rising_ranks(1, (2, 4, 8)) == [8]
    assert rising_ranks(6, (2, 4, 8)) == [8, 8, 4, 4, 2, 2]
    assert rising_ranks(4, (4, 2)) == [4, 4, 2, 2]


def test_legend_depth_grows_with_capacity_and_ranks_rise_to_the_output(task):
    spec, cfg = task.spec, task.config
    modules = list(task.targets)
    unit = cfg.local_steps * step_flops(spec, {modules[-1]: 8}, cfg.batch_size, cfg.max_seq_len)
    depths = []
    for factor in (0.5, 1.2, 2.0, 100.0):
        ranks = legend_ranks(spec, modules, factor * unit, cfg.batch_size, cfg.max_seq_len, cfg.local_steps, (2, 4, 8))
        layers = sorted({spec.modules[m][0] for m in ranks})
        assert layers == list(range(spec.num_layers - len(layers), spec.num_layers))  # the last L layers
        by_layer = [next(r for m, r in ranks.items() if spec.modules[m][0] == layer) for layer in layers]
        assert by_layer == sorted(by_layer)  # non-decreasing towards the output
        depths.append(len(layers))
        if factor >= 1.2:
            assert cfg.local_steps * step_flops(spec, ranks, cfg.batch_size, cfg.max_seq_len) <= factor * unit
    assert depths[0] == 1 and depths == sorted(depths) and depths[-1] == spec.num_layers


def test_fedadapter_starts_shallow_and_narrow_and_tries_one_step_deeper_and_one_wider():
    start = fedadapter_start(30, (2, 4, 8))
    assert start == AdapterConfig(5, 2)  # the top sixth (its paper's 2 of 12 layers) at the smallest rank
    assert fedadapter_trials(start, 30, (2, 4, 8)) == [start, AdapterConfig(10, 2), AdapterConfig(5, 4)]
    assert fedadapter_trials(AdapterConfig(28, 4), 30, (2, 4, 8)) == [
        AdapterConfig(28, 4),
        AdapterConfig(30, 4),
        AdapterConfig(28, 8),
    ]
    assert fedadapter_trials(AdapterConfig(30, 8), 30, (2, 4, 8)) == [AdapterConfig(30, 8)]  # nothing left to try


def _scaled_update(strategy, ranks, seed, std, examples=8):
    """A node's update with factors of this standard deviation (no norm check: large ones are meant to wreck the model)."""
    g = torch.Generator().manual_seed(seed)
    shapes = strategy.task.shapes
    factors = {
        m: LowRank(std * torch.randn(r, shapes[m][1], generator=g), std * torch.randn(shapes[m][0], r, generator=g))
        for m, r in ranks.items()
    }
    report = TrainReply(num_examples=examples, train_loss=2.0, state_version=0)
    return strategy.decode_update(encode_factors(factors), ranks, examples), report


def test_fedadapter_trial_groups_keep_the_configuration_whose_model_scores_best_on_validation(task):
    strategy = FedAdapter(task)
    strategy.profiles = {n: ClientProfile(64 * 2**30, 20e12, "declared") for n in (1, 2, 3, 4)}
    start = strategy.current
    deeper, wider = fedadapter_trials(start, len(strategy.layers), task.config.rank_candidates())[1:]
    plans = strategy.plan_round(1, [4, 2, 3, 1])
    # the nodes split in turn by id: current, deeper, wider, current
    assert {n: p.ranks for n, p in plans.items()} == {
        1: strategy.ranks_of(start),
        2: strategy.ranks_of(deeper),
        3: strategy.ranks_of(wider),
        4: strategy.ranks_of(start),
    }
    assert len(plans[2].ranks) == 2 * len(plans[1].ranks) and set(plans[3].ranks.values()) == {4}
    # the deeper group's update leaves the model as it is; the others' wreck it
    updates = {n: _scaled_update(strategy, plans[n].ranks, n, 1e-4 if n == 2 else 1.0) for n in (1, 2, 3, 4)}
    strategy.combine(1, updates)
    assert strategy.current == deeper
    trials = strategy.round_record(1)["fedadapter_trials"]
    assert [(t["depth"], t["width"], t["nodes"], t["chosen"]) for t in trials] == [
        (start.depth, start.width, [1, 4], False),
        (deeper.depth, deeper.width, [2], True),
        (wider.depth, wider.width, [3], False),
    ]
    chosen_loss, others = trials[1]["eval_loss"], [trials[0]["eval_loss"], trials[2]["eval_loss"]]
    assert chosen_loss < 2 * chosen_loss < min(others)  # the untouched base against wrecked ones
    module = next(iter(plans[1].ranks))  # trained by every group: the global factors are the deeper group's alone
    torch.testing.assert_close(strategy.factors[module].A[:2], updates[2][0].factors[module].A)
    torch.testing.assert_close(strategy.factors[module].B[:, :2], updates[2][0].factors[module].B)
    # the next decision round tries from the configuration chosen
    assert {frozenset(p.ranks.items()) for p in strategy.plan_round(2, [1, 2, 3]).values()} == {
        frozenset(strategy.ranks_of(c).items()) for c in fedadapter_trials(deeper, len(strategy.layers), (2, 4, 8))
    }
    state, tensors = strategy.state_dict()
    resumed = FedAdapter(task)
    resumed.load_state_dict(state, tensors)
    assert resumed.current == deeper


def test_fedadapter_trial_groups_follow_the_nodes_places_not_the_ids_flower_drew(task):
    strategy = FedAdapter(task)
    strategy.profiles = {n: ClientProfile(64 * 2**30, 20e12, "declared") for n in (1, 2, 3, 4)}
    strategy.places = {4: 0, 2: 1, 1: 2, 3: 3}
    start = strategy.current
    deeper, wider = fedadapter_trials(start, len(strategy.layers), task.config.rank_candidates())[1:]
    plans = strategy.plan_round(1, [1, 2, 3, 4])
    assert {n: p.ranks for n, p in plans.items()} == {  # places 0, 1, 2, 3: current, deeper, wider, current
        4: strategy.ranks_of(start),
        2: strategy.ranks_of(deeper),
        1: strategy.ranks_of(wider),
        3: strategy.ranks_of(start),
    }


def test_fedadapter_decides_every_upgrade_every_rounds_and_needs_a_server_validation_split(task):
    strategy = FedAdapter(replace(task, config=replace(task.config, adapter_upgrade_every=2)))
    strategy.profiles = {n: ClientProfile(64 * 2**30, 20e12, "declared") for n in (1, 2, 3)}
    assert {len(p.ranks) for p in strategy.plan_round(1, [1, 2, 3]).values()} == {len(strategy.ranks_of(strategy.current))}
    assert len({frozenset(p.ranks.items()) for p in strategy.plan_round(2, [1, 2, 3]).values()}) == 3
    with pytest.raises(ConfigError, match="'eval.where'.*trial groups"):
        FedAdapter(replace(task, config=replace(task.config, eval_where="sites")))


def test_deadline_cuts_local_steps_and_leaves_out_a_node_that_cannot_finish_one(task):
    assert deadline_steps(0.3, 6, 0.0) == 6
    assert deadline_steps(0.3, 6, 1.0) == 3
    assert deadline_steps(0.3, 6, 0.2) == 0
    cfg = task.config
    step = step_flops(task.spec, task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len)
    deadline = 1.0
    # node 1 does one step in 0.1 s, node 2 in 0.4 s, node 3 in 2 s
    profiles = {1: (64 * 2**30, step / 0.1), 2: (64 * 2**30, step / 0.4), 3: (64 * 2**30, step / 2.0)}
    strategy = FlowerAdapter(
        STRATEGIES["lora-fedavg"](replace(task, config=replace(cfg, round_deadline_s=deadline, local_steps=6)))
    )
    messages = {
        m.metadata.dst_node_id: m
        for m in strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2, 3], profiles=profiles))
    }
    assert sorted(messages) == [1, 2]
    assert messages[1].content["config"]["local-steps"] == 6 and messages[2].content["config"]["local-steps"] == 2
    assert strategy.stats[1].left_out == 1
    assert strategy.stats[1].sim_time_s == pytest.approx(0.8)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_on_plain_arrays_and_moves_the_global_delta(task, name):
    """The strategy alone, no Flower: plan -> payloads -> read -> combine -> global ΔW."""
    strategy = STRATEGIES[name](task)
    strategy.profiles = {n: ClientProfile(64 * 2**30, f, "declared") for n, f in ((1, 35e12), (2, 20e12), (3, 9e12))}
    assert all(float(d.abs().sum()) == 0 for d in strategy.global_delta().values())
    plans = strategy.plan_round(1, [1, 2, 3, 4])  # node 4 has no profile: not planned
    sent = strategy.payloads(1, plans)
    assert sorted(plans) == sorted(sent) == [1, 2, 3]
    assert all(
        order.server_round == 1 and order.mode == strategy.mode and order.ranks == plans[n].ranks
        for n, (_, order) in sent.items()
    )
    updates = {}
    for node in (1, 2, 3):
        ranks = plans[node].ranks
        if name == "ft":
            arrays = encode_dense(
                {m: 0.01 * torch.randn(*task.shapes[m], generator=torch.Generator().manual_seed(node)) for m in ranks}
            )
        else:
            arrays = encode_factors(client_factors(task, ranks, node))
        report = TrainReply(num_examples=10 * node, train_loss=2.0, state_version=0)
        updates[node] = (strategy.read_update(arrays, report, ranks), report)
    strategy.combine(1, updates)
    delta = strategy.global_delta()
    trained = set().union(*(plans[n].ranks for n in (1, 2, 3)))
    if name == "fedadapter":  # its trial groups: only the chosen configuration's group counts
        trained = set(strategy.ranks_of(strategy.current))
    assert {m for m, d in delta.items() if float(d.abs().sum()) > 0} == trained
    assert set(strategy.payloads(2, strategy.plan_round(2, [1, 2, 3]))) == {1, 2, 3}  # round 2 dispatches from the new state


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_over_flower_messages_and_counts_bytes(task, name):
    strategy = FlowerAdapter(STRATEGIES[name](task))
    grid = FakeGrid([1, 2, 3], profiles={1: (64 * 2**30, 35e12), 2: (64 * 2**30, 20e12), 3: (64 * 2**30, 9e12)})
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    replies = []
    for node in (1, 2, 3):
        ranks = strategy.stats[1].ranks[node]
        if name == "ft":
            arrays = encode_dense(
                {m: 0.01 * torch.randn(*task.shapes[m], generator=torch.Generator().manual_seed(node)) for m in ranks}
            )
        else:
            arrays = encode_factors(client_factors(task, ranks, node))
        memory = {"model-bytes": 100 * node, "peak-memory-bytes": 2 * 10**9 * node}
        replies.append(reply(node, arrays, {"train-loss": 2.0, "num-examples": 10 * node, "state-version": 0, **memory}))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == 3 and strategy.stats[1].rejected == 0
    recorded = strategy.stats[1].node_memory()  # measured beside predicted, per node
    assert sorted(recorded) == ["1", "2", "3"] and recorded["2"]["measured_peak_bytes"] == 4 * 10**9
    assert recorded["3"]["measured_vs_predicted"] == pytest.approx(6e9 / recorded["3"]["predicted_peak_bytes"])
    assert strategy.stats[1].train_loss == 2.0 and strategy.stats[1].num_examples == 60
    assert strategy.stats[1].bytes_up == sum(r.content.array_records["arrays"].count_bytes() for r in replies)
    assert strategy.stats[1].bytes_down == sum(m.content["arrays"].count_bytes() for m in messages)
    mirrored = from_record(arrays)  # what Flower holds is the strategy's own global state
    assert set(mirrored) == set(strategy.strategy.global_arrays())


def test_heterogeneous_rank_strategies_give_slow_nodes_lower_ranks(task):
    profiles = {1: (64 * 2**30, 35e12), 2: (64 * 2**30, 9e12)}
    for cls in (HetLoRA, FlexLoRA):
        strategy = FlowerAdapter(cls(task))
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2], profiles=profiles)))
        assert set(strategy.stats[1].ranks[1].values()) == {8} and set(strategy.stats[1].ranks[2].values()) == {2}


def test_flexlora_sends_each_node_the_truncated_global_delta(task):
    strategy = FlowerAdapter(FlexLoRA(task))
    grid = FakeGrid([1, 2], profiles={1: (64 * 2**30, 35e12), 2: (64 * 2**30, 9e12)})
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = [
        reply(n, encode_factors(client_factors(task, strategy.stats[1].ranks[n], n)), {"train-loss": 1.0, "num-examples": 5})
        for n in (1, 2)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    delta = strategy.strategy.global_delta()
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)}
    module = task.targets[0]
    sent = decode_factors(from_record(messages[2].content["arrays"]), task.shapes, strategy.strategy.scaling())[module]
    assert sent.rank == 2
    torch.testing.assert_close(sent.dense(), best_rank(delta[module], 2).dense(), rtol=1e-4, atol=1e-6)


def test_ft_leaves_out_nodes_that_cannot_hold_it_and_rejects_factor_replies(task):
    strategy = FlowerAdapter(FullFT(task))
    grid = FakeGrid([1, 2], profiles={1: (64 * 2**30, 35e12), 2: (0.5 * 2**30, 35e12)})
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert [m.metadata.dst_node_id for m in messages] == [1] and strategy.stats[1].left_out == 1
    bad = reply(1, encode_factors(client_factors(task, {task.targets[0]: 2}, 0)), {"train-loss": 1.0, "num-examples": 5})
    assert strategy.aggregate_train(1, [bad]) == (None, None) and strategy.stats[1].rejected == 1
    assert strategy.strategy.trainable_params(strategy.stats[1].ranks[1]) == sum(o * i for o, i in task.shapes.values())


def test_full_round_trains_whole_target_weights_only(task):
    examples = task.splits["train"][:4]
    modules = list(task.targets[-2:])
    out = run_full_round(task, examples=examples, modules=modules, base_delta={}, seed=0, batch_size=2, local_steps=1)
    delta = decode_delta(out.arrays, task.shapes)
    assert set(delta) == set(modules)
    for module in modules:
        assert delta[module].shape == task.shapes[module]
        assert torch.linalg.matrix_rank(delta[module].double()) > 8  # a full-rank change, not an adapter
    assert math.isfinite(out.result.mean_loss) and out.result.steps == 1
    assert np.isfinite(next(iter(out.arrays.values()))).all()


def test_a_widened_fedadapter_component_starts_like_fresh_lora_and_trains(task, tmp_path):
    from fedpipe_core.local import run_client_round
    from fedpipe_core.node.state import node_base

    strategy = FedAdapter(task)
    strategy.profiles = {1: ClientProfile(64 * 2**30, 35e12, "declared")}
    initial = {m: LowRank(f.A.clone(), f.B.clone(), f.scale) for m, f in strategy.factors.items()}
    plan = strategy.plan_round(1, [1])[1]
    narrow = set(plan.ranks.values()).pop()
    arrays = encode_factors(client_factors(task, plan.ranks, 1))
    report = TrainReply(num_examples=10, train_loss=2.0, state_version=0)
    strategy.combine(1, {1: (strategy.read_update(arrays, report, plan.ranks), report)})
    module = next(iter(plan.ranks))
    A, B = strategy.factors[module].A, strategy.factors[module].B
    assert float(A[:narrow].abs().sum()) > 0 and not torch.equal(A[:narrow], initial[module].A[:narrow])
    assert torch.equal(A[narrow:], initial[module].A[narrow:]) and float(A[narrow:].abs().sum()) > 0  # fresh random rows
    assert float(B[:, narrow:].abs().sum()) == 0  # fresh zero columns
    wide = 2 * narrow
    payload = encode_factors({module: strategy.factors[module].truncated(wide)})
    model, _ = node_base(task, tmp_path, {}, 0, 0, "fp32")
    out = run_client_round(
        task, model=model, examples=task.splits["train"][:4], ranks={module: wide}, initial_factors=payload, seed=0, local_steps=2
    )
    trained_B = decode_factors(out.arrays, task.shapes, strategy.scaling())[module].B
    assert float(trained_B[:, narrow:].abs().sum()) > 0  # the widened columns got gradients
