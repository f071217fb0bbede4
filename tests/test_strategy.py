"""Strategies end to end inside the server: per-node messages, validation, ΔW state, bytes."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from fakes import FakeGrid, client_factors, fedavg_factors, reply
from flwr.app import ArrayRecord, ConfigRecord

from fedpipe_core.aggregate import ClientUpdate, aggregate_delta
from fedpipe_core.codec import decode_delta, decode_factors, encode_factors
from fedpipe_core.strategies import FedPipe, LoRAFedAvg
from fedpipe_flower.messages import from_record, to_record
from server_app.strategy import FlowerAdapter


def test_fedpipe_round_aggregates_valid_updates_and_rejects_bad_ones(task):
    strategy = FlowerAdapter(FedPipe(replace(task, config=replace(task.config, dispatch="exact"))))
    grid = FakeGrid([11, 22, 33])
    messages = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 22, 33]
    assert all(m.content["config"]["state-from"] == 0 and m.content["config"]["state-to"] == 0 for m in messages)
    modules = list(task.targets)
    # node 22 is planned a subset of modules at rank 2 (heterogeneous plan)
    strategy.stats[1].ranks[22] = {m: 2 for m in modules[:3]}
    scale = task.config.lora_alpha / task.config.lora_rank
    good11 = client_factors(task, strategy.stats[1].ranks[11], 1, scale)
    good22 = client_factors(task, strategy.stats[1].ranks[22], 2, scale)
    ok = {"train-loss": 2.0, "state-version": 0}
    bad_nan = encode_factors(client_factors(task, strategy.stats[1].ranks[33], 3))
    bad_nan[next(iter(bad_nan))][0, 0] = np.nan
    replies = [
        reply(11, encode_factors(good11), {**ok, "num-examples": 30}),
        reply(22, encode_factors(good22), {**ok, "num-examples": 10}),
        reply(33, bad_nan, {**ok, "num-examples": 10}),
        reply(44, encode_factors(good11), {**ok, "num-examples": 10}),  # never sent a plan
        reply(33, encode_factors(client_factors(task, {modules[0]: 9}, 4)), {**ok, "num-examples": 5}),  # wrong rank
        reply(33, encode_factors(good11), {"train-loss": 1.0, "num-examples": 5}),  # no state-version
        reply(33, encode_factors(good11), {**ok, "num-examples": 0}),
        reply(33, {}, {**ok, "num-examples": 3}, error="CUDA out of memory"),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["clients"] == 2 and strategy.stats[1].rejected == 6
    expected = aggregate_delta([ClientUpdate(good11, 30), ClientUpdate(good22, 10)])
    got = strategy.strategy.global_delta()
    assert set(got) == set(expected)
    for m in expected:
        torch.testing.assert_close(got[m], expected[m], rtol=1e-5, atol=1e-6)
    assert strategy.strategy.synced == {11: 0, 22: 0}
    # round 2: nodes 11/22 get round 1's ΔW exactly; node 33 (failed) also gets it from 0
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(2, arrays, ConfigRecord(), grid)}
    for node in (11, 22, 33):
        cfg = messages[node].content["config"]
        assert (cfg["state-from"], cfg["state-to"]) == (0, 1)
        sent = decode_delta(from_record(messages[node].content["arrays"]), task.shapes)
        for m in expected:
            torch.testing.assert_close(sent[m], expected[m], rtol=1e-5, atol=1e-6)
    assert strategy.stats[2].bytes_down == sum(m.content["arrays"].count_bytes() for m in messages.values())
    assert strategy.stats[1].bytes_up == sum(to_record(encode_factors(f)).count_bytes() for f in (good11, good22))


def test_fedpipe_svd_dispatch_sends_what_the_global_state_holds_and_carries_the_rest(task):
    strategy = FlowerAdapter(FedPipe(task))  # dispatch = svd by default
    grid = FakeGrid([1, 2, 3])
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    top = max(task.config.rank_candidates())
    scale = task.config.lora_alpha / task.config.lora_rank
    factors = {n: client_factors(task, {m: top for m in task.targets[:4]}, n, scale) for n in (1, 2, 3)}
    for n in factors:
        strategy.stats[1].ranks[n] = {m: top for m in task.targets[:4]}
    replies = [
        reply(n, encode_factors(f), {"train-loss": 2.0, "state-version": 0, "num-examples": 10}) for n, f in factors.items()
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    exact = aggregate_delta([ClientUpdate(f, 10) for f in factors.values()])
    held, final = strategy.strategy.global_delta(), strategy.strategy.final_delta()
    for m in exact:  # the global state + what was cut = the exact average; the cut is the SVD tail
        torch.testing.assert_close(held[m] + strategy.strategy.residual[m].dense(), exact[m], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(final[m], exact[m], rtol=1e-4, atol=1e-6)  # the final model keeps the tail
        tail = torch.linalg.svdvals(exact[m].double())[top:]
        assert float(strategy.strategy.residual[m].dense().norm()) == pytest.approx(float(tail.norm()), rel=1e-3)
        sv = torch.linalg.svdvals(held[m].double())
        assert sv[top] < 1e-5 * sv[0] < sv[top - 1]  # the nodes merge a rank-8 ΔW
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    for message in messages:
        payload = from_record(message.content["arrays"])
        assert all(v.shape[0] == top for k, v in payload.items() if k.endswith("::A"))
        sent = decode_delta(payload, task.shapes)
        for m in exact:
            torch.testing.assert_close(sent[m], held[m], rtol=1e-4, atol=1e-6)
    rank_top_bytes = sum(top * sum(task.shapes[m]) * 4 for m in exact)  # FP32 factors of rank 8, not 24
    assert strategy.stats[2].bytes_down == pytest.approx(3 * rank_top_bytes, rel=0.02)  # array names add a little


def test_lora_fedavg_round_averages_factors(task):
    strategy = FlowerAdapter(LoRAFedAvg(task))
    initial = to_record(strategy.strategy.global_arrays())
    start = decode_factors(from_record(initial), task.shapes, strategy.strategy.scaling())
    assert all(torch.count_nonzero(f.B) == 0 for f in start.values())
    assert all(t.abs().sum() == 0 for t in strategy.strategy.global_delta().values())
    grid = FakeGrid([1, 2])
    list(strategy.configure_train(1, initial, ConfigRecord(), grid))
    scale = strategy.strategy.scaling()
    f1 = client_factors(task, strategy.stats[1].ranks[1], 5, scale)
    f2 = client_factors(task, strategy.stats[1].ranks[2], 6, scale)
    replies = [
        reply(1, encode_factors(f1), {"train-loss": 2.0, "num-examples": 1}),
        reply(2, encode_factors(f2), {"train-loss": 2.0, "num-examples": 3}),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = fedavg_factors([ClientUpdate(f1, 1), ClientUpdate(f2, 3)])
    module = task.targets[0]
    got = strategy.strategy.global_delta()[module]
    assert expected[module].scale == task.config.lora_alpha / task.config.lora_rank
    torch.testing.assert_close(got, expected[module].dense(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("strategy_cls", [FedPipe, LoRAFedAvg])
def test_the_global_state_does_not_depend_on_the_order_replies_arrive_in(task, strategy_cls):
    """Same seeds, same numbers: under load the clients answer in any order, the aggregate must not follow it."""
    nodes = [11, 22, 33, 44, 55]
    states = []
    for order in (nodes, nodes[::-1], [33, 11, 55, 22, 44]):
        strategy = FlowerAdapter(strategy_cls(task))
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid(nodes)))
        ok = {"train-loss": 2.0, "state-version": 0}
        replies = {
            n: reply(n, encode_factors(client_factors(task, strategy.stats[1].ranks[n], n)), {**ok, "num-examples": 7 + n % 5})
            for n in nodes
        }
        _, metrics = strategy.aggregate_train(1, [replies[n] for n in order])
        states.append((metrics["train-loss"], strategy.strategy.global_delta()))
    for loss, delta in states[1:]:
        assert loss == states[0][0] and delta.keys() == states[0][1].keys()
        assert all(torch.equal(delta[m], states[0][1][m]) for m in delta)  # bitwise


@pytest.mark.parametrize("strategy_cls", [FedPipe, LoRAFedAvg])
def test_a_seed_fixes_the_global_state_whatever_node_ids_flower_draws(task, strategy_cls):
    """Flower draws a simulation's node ids afresh every run: the nodes are summed in the order of their places."""
    states = []
    for ids in ([11, 22, 33, 44, 55], [90, 12, 57, 31, 8]):  # place p is node ids[p]; the second run's ids are unordered
        strategy = FlowerAdapter(strategy_cls(task))
        grid = FakeGrid(ids, places={node: place for place, node in enumerate(ids)})
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        assert strategy.strategy.ordered(ids[::-1]) == ids
        ok = {"train-loss": 2.0, "state-version": 0}
        replies = [
            reply(node, encode_factors(client_factors(task, strategy.stats[1].ranks[node], 3 + p)), {**ok, "num-examples": 7 + p})
            for p, node in enumerate(ids)
        ]
        strategy.aggregate_train(1, replies)
        states.append(strategy.strategy.global_delta())
    assert all(torch.equal(states[1][m], states[0][m]) for m in states[0])  # bitwise


def test_a_sampled_round_draws_the_same_places_whatever_node_ids_flower_draws(task):
    """With ``fraction-train`` < 1 the round's nodes are drawn by the run seed and round, over the nodes' places."""

    def drawn(ids: list[int], seed: int) -> list[set[int]]:
        config = replace(task.config, fraction_train=0.5, min_train_nodes=2, seed=seed)
        strategy = FlowerAdapter(LoRAFedAvg(replace(task, config=config)))
        grid = FakeGrid(ids, places={node: place for place, node in enumerate(ids)})
        rounds = []
        for server_round in range(1, 7):
            sent = [m.metadata.dst_node_id for m in strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid)]
            assert len(sent) == 3  # ceil(0.5 × 6)
            rounds.append({ids.index(node) for node in sent})
        assert grid.queries == 6  # every connected node profiled once, sampled or not
        return rounds

    first = drawn([11, 22, 33, 44, 55, 66], seed=5)
    assert drawn([90, 12, 57, 31, 8, 70], seed=5) == first  # other node ids, same places drawn each round
    assert len({frozenset(r) for r in first}) > 1  # the draw changes with the round
    assert drawn([11, 22, 33, 44, 55, 66], seed=6) != first  # and with the seed


def test_nodes_without_a_place_follow_those_with_one_by_node_id(task):
    strategy = LoRAFedAvg(task)
    strategy.places = {40: 1, 7: 0}
    assert strategy.ordered([50, 40, 3, 7]) == [7, 40, 3, 50]
    state, tensors = strategy.state_dict()
    resumed = LoRAFedAvg(task)
    resumed.load_state_dict(state, tensors)
    assert resumed.places == {40: 1, 7: 0}
