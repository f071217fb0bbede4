"""Server checkpoints after every round and resuming a stopped run from them."""

from dataclasses import replace

import pytest
import torch
from fakes import FakeGrid, client_factors, reply
from flwr.app import ArrayRecord, ConfigRecord

from fedpipe_core.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from fedpipe_core.codec import decode_delta, encode_factors
from fedpipe_core.config import ConfigError
from fedpipe_core.strategies import FedPipe
from fedpipe_flower.messages import from_record
from server_app.strategy import FlowerAdapter


def _round_one(task, grid):
    strategy = FlowerAdapter(FedPipe(task))
    list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = [
        reply(
            n,
            encode_factors(client_factors(task, strategy.stats[1].ranks[n], n)),
            {"train-loss": 2.0, "num-examples": 10 * n, "state-version": 0, f"importance::{task.targets[0]}": 0.5 * n},
        )
        for n in (1, 2)
    ]
    strategy.aggregate_train(1, replies)
    return strategy


def test_a_resumed_strategy_sends_what_the_uninterrupted_one_sends(task, tmp_path):
    grid = FakeGrid([1, 2], profiles={1: (64 * 2**30, 35e12), 2: (64 * 2**30, 12e12)})
    original = _round_one(task, grid)
    state, tensors = original.strategy.state_dict()
    save_checkpoint(tmp_path, Checkpoint(1, tensors, state, {"bytes_up": 5.0}, task.config.to_mapping()))
    save_checkpoint(tmp_path, Checkpoint(1, tensors, state, {"bytes_up": 5.0}, task.config.to_mapping()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]  # replaced in place, nothing left beside it

    checkpoint = load_checkpoint(tmp_path, replace(task.config, num_server_rounds=3))
    core = FedPipe(task)
    core.load_state_dict(checkpoint.state, checkpoint.tensors)
    resumed = FlowerAdapter(core, round_offset=checkpoint.round)
    assert core.importance == original.strategy.importance and core.profiles == original.strategy.profiles
    assert original.strategy.residual and set(core.residual) == set(
        original.strategy.residual
    )  # what dispatch = svd has not sent yet
    for module, rest in original.strategy.residual.items():
        torch.testing.assert_close(core.residual[module].dense(), rest.dense())
    for module, delta in original.strategy.global_delta().items():
        torch.testing.assert_close(core.global_delta()[module], delta, rtol=0, atol=0)
    assert checkpoint.totals == {"bytes_up": 5.0}

    expected = {m.metadata.dst_node_id: m for m in original.configure_train(2, ArrayRecord(), ConfigRecord(), grid)}
    got = {m.metadata.dst_node_id: m for m in resumed.configure_train(1, ArrayRecord(), ConfigRecord(), grid)}
    assert sorted(got) == sorted(expected)
    for node, message in got.items():
        want = expected[node]
        for key in ("server-round", "ranks", "batch-size", "precision", "state-from", "state-to"):
            assert message.content["config"][key] == want.content["config"][key], key
        sent = decode_delta(from_record(message.content["arrays"]), task.shapes)
        ref = decode_delta(from_record(want.content["arrays"]), task.shapes)
        assert set(sent) == set(ref)
        for module in ref:
            torch.testing.assert_close(sent[module], ref[module])
    assert 2 in resumed.stats and 1 not in resumed.stats  # the resumed round is numbered 2


def test_resume_refuses_a_mismatched_or_finished_checkpoint(task, tmp_path):
    with pytest.raises(ConfigError, match="no checkpoint"):
        load_checkpoint(tmp_path, task.config)
    save_checkpoint(tmp_path, Checkpoint(2, {}, {"profiles": {}}, {}, task.config.to_mapping()))
    with pytest.raises(ConfigError, match="strategy.name='fedpipe'"):
        load_checkpoint(tmp_path, replace(task.config, strategy="hetlora", num_server_rounds=4))
    with pytest.raises(ConfigError, match="leaves nothing to run"):
        load_checkpoint(tmp_path, replace(task.config, num_server_rounds=2))
    (tmp_path / "checkpoint" / "tensors.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="unreadable"):
        load_checkpoint(tmp_path, replace(task.config, num_server_rounds=4))
