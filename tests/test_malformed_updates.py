"""Malformed client updates are rejected one by one and leave the aggregate of the valid ones unchanged."""

import json

import numpy as np
import torch
from fakes import FakeGrid, client_factors, reply
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedpipe_core.codec import encode_factors
from fedpipe_core.lowrank import LowRank
from fedpipe_core.strategies import FedPipe
from fedpipe_flower.messages import DATA_PREFIX, INDEX
from server_app.strategy import FlowerAdapter


def _message(node_id, content):
    return reply(node_id, {}, {}).__class__(
        metadata=reply(node_id, {}, {}).metadata, has_error=lambda: False, error=None, content=content
    )


def _packed(index, data):
    """An arrays record as :func:`fedpipe_flower.messages.to_record` lays it out, with whatever index and data."""
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    record = {INDEX: Array(np.frombuffer(raw, dtype=np.uint8))}
    record.update({DATA_PREFIX + dtype: Array(flat) for dtype, flat in data.items()})
    return ArrayRecord(record)


def packing_cases(good, ok):
    """Records whose packing is wrong though their factors are right."""
    arrays = encode_factors(good)
    index = [[k, "<f4", list(v.shape)] for k, v in arrays.items()]
    flat = np.concatenate([v.ravel() for v in arrays.values()])
    first = index[0][0]
    cases = [
        ("arrays not packed (no index)", ArrayRecord({k: Array(v) for k, v in arrays.items()})),
        ("index that is not JSON", _packed(b"\xff{", {"<f4": flat})),
        ("index entry that is not [key, dtype, shape]", _packed([*index[1:], [first, "<f4", [-1]]], {"<f4": flat})),
        ("index longer than its data", _packed(index, {"<f4": flat[:-1]})),
        ("data longer than its index", _packed(index, {"<f4": np.append(flat, np.float32(0))})),
        ("a key twice in the index", _packed([*index, index[0]], {"<f4": np.append(flat, arrays[first].ravel())})),
        ("data of another dtype than its index says", _packed(index, {"<f4": flat.astype(np.float64)})),
        ("an array outside the index", ArrayRecord({**_packed(index, {"<f4": flat}), "stray": Array(flat)})),
    ]
    return [(label, 3, _message(3, RecordDict({"arrays": record, "metrics": MetricRecord(ok)}))) for label, record in cases]


def malformed_cases(task, plan, good):
    """(label, node id, reply) for every kind of bad update; node 3 was planned, node 9 was not."""
    ok = {"train-loss": 2.0, "num-examples": 10, "state-version": 0}
    modules = list(plan)
    m0, m1 = modules[0], modules[1]
    unplanned = next(m for m in task.targets if m not in plan)
    out, inn = task.shapes[m0]
    rank = plan[m0]

    def arrays(**changes):
        arr = encode_factors(good)
        for key, value in changes.items():
            if value is None:
                arr.pop(key)
            else:
                arr[key] = value
        return arr

    A, B = f"{m0}::A", f"{m0}::B"
    nan = encode_factors(good)[A].copy()
    nan[0, 0] = np.nan
    inf = encode_factors(good)[B].copy()
    inf[-1, -1] = np.inf
    cases = [
        ("NaN in A", arrays(**{A: nan})),
        ("Inf in B", arrays(**{B: inf})),
        ("A with the wrong input width", arrays(**{A: np.zeros((rank, inn + 1), np.float32)})),
        ("B with the wrong output height", arrays(**{B: np.zeros((out - 1, rank), np.float32)})),
        ("A and B of different ranks", arrays(**{B: np.zeros((out, rank + 1), np.float32)})),
        ("rank above the assigned one", encode_factors({**good, m0: client_factors(task, {m0: rank + 2}, 5)[m0]})),
        ("unknown module", arrays(**{"model.layers.99.nope::A": np.zeros((2, 3), np.float32)})),
        ("module not assigned", encode_factors({**good, unplanned: client_factors(task, {unplanned: 2}, 6)[unplanned]})),
        ("integer dtype", arrays(**{A: encode_factors(good)[A].astype(np.int32)})),
        ("3-D array", arrays(**{A: encode_factors(good)[A][None]})),
        ("A without B", arrays(**{B: None})),
        ("key without '::'", arrays(**{f"{m1}A": encode_factors(good)[f"{m1}::A"]})),
        ("unknown part name", arrays(**{f"{m1}::C": encode_factors(good)[f"{m1}::A"]})),
        ("absurd norm", encode_factors({m: LowRank(f.A * 1e3, f.B * 1e3) for m, f in good.items()})),
        ("dense ΔW where factors are expected", {f"{m0}::dW": np.zeros((out, inn), np.float32)}),
        ("no adapter at all", {}),
    ]
    replies = [(label, 3, reply(3, arr, ok)) for label, arr in cases]
    metric_cases = [
        ("missing num-examples", {"train-loss": 2.0, "state-version": 0}),
        ("zero examples", {**ok, "num-examples": 0}),
        ("negative examples", {**ok, "num-examples": -4}),
        ("fractional examples", {**ok, "num-examples": 2.5}),
        ("NaN train loss", {**ok, "train-loss": float("nan")}),
        ("missing train loss", {"num-examples": 10, "state-version": 0}),
        ("missing state-version", {"train-loss": 2.0, "num-examples": 10}),
    ]
    replies += [(label, 3, reply(3, encode_factors(good), metrics)) for label, metrics in metric_cases]
    replies += [
        ("missing metrics record", 3, _message(3, RecordDict({"arrays": ArrayRecord()}))),
        ("missing arrays record", 3, _message(3, RecordDict({"metrics": MetricRecord(ok)}))),
        ("node that was sent no plan", 9, reply(9, encode_factors(good), ok)),
        ("error reply", 3, reply(3, {}, ok, error="killed")),
    ]
    return replies + packing_cases(good, ok)


def test_at_least_twenty_malformed_updates_are_rejected_and_change_nothing(task):
    grid = FakeGrid([1, 2, 3], profiles={3: (64 * 2**30, 30e12)})  # node 3 is slower: it trains fewer weights

    def fresh_round():
        strategy = FlowerAdapter(FedPipe(task))
        list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
        return strategy

    reference = fresh_round()
    plans = reference.stats[1].ranks
    good = {n: client_factors(task, plans[n], n) for n in (1, 2)}
    ok = {"train-loss": 2.0, "num-examples": 10, "state-version": 0}
    valid = [reply(n, encode_factors(good[n]), ok) for n in (1, 2)]
    reference.aggregate_train(1, valid)
    expected = reference.strategy.global_delta()

    cases = malformed_cases(task, plans[3], client_factors(task, plans[3], 3))
    assert len(cases) >= 20
    for label, _, bad in cases:  # each case alone next to the valid updates
        strategy = fresh_round()
        _, metrics = strategy.aggregate_train(1, [valid[0], bad, valid[1]])
        assert strategy.stats[1].rejected == 1, label
        assert metrics["clients"] == 2, label
        got = strategy.strategy.global_delta()
        assert set(got) == set(expected), label
        for module in expected:
            torch.testing.assert_close(got[module], expected[module], rtol=0, atol=0, msg=label)
    strategy = fresh_round()  # and all at once, plus a duplicate reply of a valid node
    _, metrics = strategy.aggregate_train(1, [valid[0], *[bad for _, _, bad in cases], valid[1], valid[0]])
    assert strategy.stats[1].rejected == len(cases) + 1 and metrics["clients"] == 2
    for module in expected:
        torch.testing.assert_close(strategy.strategy.global_delta()[module], expected[module], rtol=0, atol=0)
