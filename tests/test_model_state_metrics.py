"""Offline model loading, node state between rounds, E2E scorers."""

import socket

import pytest
import torch

from fedpipe_core.aggregate import to_dense
from fedpipe_core.codec import encode_delta
from fedpipe_core.config import ConfigError
from fedpipe_core.metrics import e2e_scores
from fedpipe_core.model import load_model, resolve_checkpoint
from fedpipe_core.state import load_state
from fedpipe_core.task import StateMismatch, sync_node_state


def test_builtin_model_loads_offline_from_the_safetensors_cache(task, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access during model load")

    monkeypatch.setattr(socket, "create_connection", no_network)
    checkpoint = resolve_checkpoint("smollm2-135m")
    assert (checkpoint / "model.safetensors").is_file() and (checkpoint / "tokenizer.json").is_file()
    model = load_model(checkpoint)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    copy = load_model(checkpoint)
    with torch.no_grad():
        copy.get_submodule(task.targets[0]).weight.add_(1.0)
    assert not torch.equal(copy.get_submodule(task.targets[0]).weight, model.get_submodule(task.targets[0]).weight)


def test_local_checkpoint_directories_and_errors(tmp_path):
    assert resolve_checkpoint(str(resolve_checkpoint("smollm2-135m"))) == resolve_checkpoint("smollm2-135m")
    with pytest.raises(ConfigError, match="neither a built-in model"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_checkpoint(str(tmp_path))


def test_node_state_accumulates_rounds_and_detects_gaps(task, tmp_path):
    name = task.targets[0]
    out, fan_in = task.shapes[name]
    g = torch.Generator().manual_seed(0)
    inc1 = (torch.randn(2, fan_in, generator=g), torch.randn(out, 2, generator=g))
    inc2 = (torch.randn(3, fan_in, generator=g), torch.randn(out, 3, generator=g))
    total = sync_node_state(task, tmp_path, encode_delta({name: inc1}), 0, 1)
    torch.testing.assert_close(total[name], to_dense(inc1))
    total = sync_node_state(task, tmp_path, encode_delta({name: inc2}), 1, 2)
    torch.testing.assert_close(total[name], to_dense(inc1) + to_dense(inc2))
    assert load_state(tmp_path).version == 2
    with pytest.raises(StateMismatch, match="at round 2, the server sent ΔW from round 1"):
        sync_node_state(task, tmp_path, encode_delta({name: inc2}), 1, 2)
    # from 0 the server resends everything: the node resets rather than double-counting
    total = sync_node_state(task, tmp_path, encode_delta({name: inc1}), 0, 1)
    torch.testing.assert_close(total[name], to_dense(inc1))


def test_e2e_scores_reward_matching_hypotheses():
    refs = {"m1": ["The Eagle is a cheap pub.", "A cheap pub, The Eagle."], "m2": ["Aromi is a coffee shop in the city centre."]}
    perfect = e2e_scores({"m1": "The Eagle is a cheap pub.", "m2": "Aromi is a coffee shop in the city centre."}, refs)
    poor = e2e_scores({"m1": "Blue whales sing.", "m2": "Nothing here."}, refs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    assert perfect["meteor"] > 0.9
    for name in ("bleu", "nist", "meteor", "rouge_l", "cider"):
        assert perfect[name] > poor[name]
    with pytest.raises(ValueError, match="without references"):
        e2e_scores({"m3": "x"}, refs)
