"""Offline model loading, node state between rounds, E2E scorers."""

import socket

import pytest
import torch
from transformers import GenerationConfig

from fedpipe_core.codec import encode_delta
from fedpipe_core.config import ConfigError
from fedpipe_core.lowrank import LowRank
from fedpipe_core.metrics import e2e_scores
from fedpipe_core.model import CACHE_MARKER, load_model, load_tokenizer, name_special_tokens, resolve_checkpoint
from fedpipe_core.node.state import (
    NodeState,
    StateCorrupt,
    StateMismatch,
    bytes_written,
    files_on_disk,
    load_state,
    node_base,
    save_importance,
    save_state,
)
from fedpipe_core.qlinear import effective_weight, stored_bytes
from fedpipe_core.quantize import quantize
from fedpipe_core.structure import block_linears


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


def test_the_cached_tokenizer_ends_examples_with_the_ggufs_eos_token(tmp_path):
    """SmolLM2's GGUF declares BOS <|im_start|> (1), EOS and PAD <|im_end|> (2); a converter that
    misnames EOS (transformers 5.17 gave <|im_start|>, no pad) is corrected from those ids."""
    stale = tmp_path / "models" / "smollm2-135m"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"an older cache format")  # no marker: rebuilt
    checkpoint = resolve_checkpoint("smollm2-135m", str(tmp_path))
    assert checkpoint == stale and (checkpoint / CACHE_MARKER).is_file()
    assert (checkpoint / "model.safetensors").stat().st_size > 500 * 2**20
    tokenizer = load_tokenizer(checkpoint)
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token == "<|im_end|>"

    tokenizer.eos_token, tokenizer.pad_token = "<|im_start|>", None
    name_special_tokens(tokenizer, GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2))
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_local_checkpoint_directories_and_errors(tmp_path):
    assert resolve_checkpoint(str(resolve_checkpoint("smollm2-135m"))) == resolve_checkpoint("smollm2-135m")
    with pytest.raises(ConfigError, match="neither a built-in model"):
        resolve_checkpoint(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="has no config.json"):
        resolve_checkpoint(str(tmp_path))


def _weight(model, name):
    """The weight the model computes with (a stored layer's deQ(Q(W)), or the FP32 weight)."""
    return effective_weight(model.get_submodule(name)).clone()


def test_node_state_accumulates_rounds_and_detects_gaps(task, tmp_path):
    name = task.targets[0]
    out, fan_in = task.shapes[name]
    g = torch.Generator().manual_seed(0)
    inc1 = LowRank(torch.randn(2, fan_in, generator=g), torch.randn(out, 2, generator=g))
    inc2 = LowRank(torch.randn(3, fan_in, generator=g), torch.randn(out, 3, generator=g))
    w0 = _weight(task.base_model(), name)
    model, state = node_base(task, tmp_path, encode_delta({name: inc1}), 0, 1, "fp32")
    torch.testing.assert_close(_weight(model, name), w0 + inc1.dense())
    model, state = node_base(task, tmp_path, encode_delta({name: inc2}), 1, 2, "fp32")
    torch.testing.assert_close(state.delta[name], inc1.dense() + inc2.dense())
    torch.testing.assert_close(_weight(model, name), w0 + inc1.dense() + inc2.dense())
    assert load_state(tmp_path).version == 2 and not load_state(tmp_path).base
    # on disk as sent: one factored file per message, the bytes of the adapters (rank 2 + 3), not of the dense ΔW
    files = sorted((tmp_path / "increments").glob("*.safetensors"))
    assert len(files) == 2 and not (tmp_path / "delta.safetensors").exists()
    assert sum(f.stat().st_size for f in files) < 4 * (2 + 3) * (out + fan_in) + 2000 < 4 * out * fan_in
    torch.testing.assert_close(load_state(tmp_path).delta[name], inc1.dense() + inc2.dense())
    with pytest.raises(StateMismatch, match="at round 2, the server sent ΔW from round 1"):
        node_base(task, tmp_path, encode_delta({name: inc2}), 1, 2, "fp32")
    # from 0 the server resends everything: the node resets rather than double-counting
    model, state = node_base(task, tmp_path, encode_delta({name: inc1}), 0, 1, "fp32")
    torch.testing.assert_close(state.delta[name], inc1.dense())
    assert len(list((tmp_path / "increments").glob("*.safetensors"))) == 1  # the old rounds' files are gone
    torch.testing.assert_close(load_state(tmp_path).delta[name], inc1.dense())


def test_node_state_folds_its_increments_into_one_dense_file_once_they_outweigh_it(tmp_path):
    g = torch.Generator().manual_seed(3)
    state, total = NodeState(), torch.zeros(16, 12)
    for version in range(1, 9):  # rank-4 increments: 112 floats (and a header) against 192 dense: they fold every second one
        A, B = torch.randn(4, 12, generator=g), torch.randn(16, 4, generator=g)
        sent = encode_delta({"m": LowRank(A, B)})
        state.add({"m": LowRank(A, B).dense()}, version, sent)
        save_state(tmp_path, state)
        total += LowRank(A, B).dense()
        loaded = load_state(tmp_path)
        torch.testing.assert_close(loaded.delta["m"], total)  # exact: folding cuts nothing
        kept = sorted(p.name for p in (tmp_path / "increments").glob("*.safetensors"))
        assert kept == sorted(loaded.increments)  # every file on disk is one the metadata vouches for
        dense = 16 * 12 * 4
        assert sum((tmp_path / "increments" / n).stat().st_size for n in kept) <= dense
    assert loaded.compacted and (tmp_path / "delta.safetensors").is_file() and loaded.version == 8


def test_node_keeps_q_w0_once_and_quantizes_only_what_a_delta_touches_from_w0(task, tmp_path):
    name, other = task.targets[0], task.targets[1]
    out, fan_in = task.shapes[name]
    g = torch.Generator().manual_seed(1)
    inc = LowRank(0.2 * torch.randn(2, fan_in, generator=g), 0.2 * torch.randn(out, 2, generator=g))
    w0 = _weight(task.base_model(), name)
    model, state = node_base(task, tmp_path, {}, 0, 0, "nf4")
    assert state.precision == "nf4" and len(state.base) == len(block_linears(model))
    q0 = quantize(w0, "nf4").dequantize()
    torch.testing.assert_close(_weight(model, name), q0)
    stored_before = {m: q.data.clone() for m, q in load_state(tmp_path).base.items()}
    base_file = (tmp_path / "base.safetensors").stat()

    model, state = node_base(task, tmp_path, encode_delta({name: inc}), 0, 1, "nf4")
    saved = load_state(tmp_path)
    assert saved.version == 1 and saved.precision == "nf4"
    # eqs 11-12: the touched weight is Q(W0 + ΣΔW); the saved Q(W0) of every weight is kept as it was, not rewritten
    expected = quantize(w0 + inc.dense(), "nf4").dequantize()
    torch.testing.assert_close(_weight(model, name), expected)
    assert all(torch.equal(saved.base[m].data, stored_before[m]) for m in saved.base)
    assert (tmp_path / "base.safetensors").stat().st_mtime_ns == base_file.st_mtime_ns
    torch.testing.assert_close(_weight(model, other), saved.base[other].dequantize())
    model, _ = node_base(task, tmp_path, {}, 1, 1, "nf4")  # the next message rebuilds Q(W0 + ΣΔW) from the state
    torch.testing.assert_close(_weight(model, name), expected)

    assert type(model.get_submodule(name)).__name__ == "Linear4bit"  # really stored at 4 bits, not held in FP32
    nf4_bytes = stored_bytes(model)

    # a new precision rebuilds the whole base from W0 + ΣΔW
    model, state = node_base(task, tmp_path, {}, 1, 1, "nf8")
    torch.testing.assert_close(_weight(model, name), quantize(w0 + inc.dense(), "nf8").dequantize())
    assert load_state(tmp_path).precision == "nf8"
    assert type(model.get_submodule(name)).__name__ == "StoredLinear" and stored_bytes(model) > nf4_bytes
    nf8_bytes = stored_bytes(model)
    # back to FP32: exact W0 + ΣΔW, no stored base
    model, state = node_base(task, tmp_path, {}, 1, 1, "fp32")
    assert stored_bytes(model) > nf8_bytes
    torch.testing.assert_close(_weight(model, name), w0 + inc.dense())
    assert not load_state(tmp_path).base


@pytest.mark.parametrize("precision", ["nf4", "fp32"])
def test_state_bytes_a_message_writes_do_not_grow_with_the_model(tmp_path, precision):
    from transformers import LlamaConfig

    from fedpipe_core.config import RunConfig
    from fedpipe_core.task import load_task
    from fedpipe_tools.checkpoints import builtin_vocab_size, write_random_checkpoint

    written, model_bytes = {}, {}
    for layers in (2, 6):  # the same adapted weight in both; the second model is three times the first's blocks
        config = LlamaConfig(
            num_hidden_layers=layers,
            hidden_size=128,
            intermediate_size=256,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=builtin_vocab_size(),
        )
        checkpoint = write_random_checkpoint(tmp_path / f"llama{layers}", config)
        task = load_task(RunConfig(model=str(checkpoint), cache_dir=str(tmp_path / "cache")))
        module = "model.layers.0.self_attn.q_proj"
        directory = tmp_path / f"state{layers}"
        node_base(task, directory, {}, 0, 0, precision)
        g = torch.Generator().manual_seed(0)
        per_message = []
        for version in (1, 2, 3):
            before = files_on_disk(directory)
            inc = LowRank(0.01 * torch.randn(4, 128, generator=g), 0.01 * torch.randn(128, 4, generator=g))
            model, _ = node_base(task, directory, encode_delta({module: inc}), version - 1, version, precision)
            per_message.append(bytes_written(directory, before))
        written[layers] = per_message
        model_bytes[layers] = sum(p.numel() * 4 for p in model.parameters())
    assert written[2] == written[6]  # the increment and the metadata: the same bytes, whatever the model's size
    assert max(written[6]) < 0.01 * model_bytes[6]


def test_a_damaged_state_file_is_detected_and_rebuilt_from_the_whole_history(task, tmp_path):
    name = task.targets[0]
    out, fan_in = task.shapes[name]
    g = torch.Generator().manual_seed(2)
    inc = LowRank(0.1 * torch.randn(2, fan_in, generator=g), 0.1 * torch.randn(out, 2, generator=g))
    node_base(task, tmp_path, {}, 0, 0, "nf8")
    good, _ = node_base(task, tmp_path, encode_delta({name: inc}), 0, 1, "nf8")
    (increment,) = (tmp_path / "increments").glob("*.safetensors")
    data = bytearray(increment.read_bytes())
    data[-5] ^= 0xFF  # one flipped byte inside a tensor: still a readable file, but not the one written
    increment.write_bytes(bytes(data))
    with pytest.raises(StateCorrupt, match="fails its SHA-256 checksum"):
        load_state(tmp_path)
    with pytest.raises(StateCorrupt):  # the server sends round 2's ΔW: the node refuses to train on a damaged state
        node_base(task, tmp_path, {}, 1, 1, "nf8")
    (tmp_path / "base.safetensors").write_bytes((tmp_path / "base.safetensors").read_bytes()[:1000])  # truncated too
    rebuilt, state = node_base(task, tmp_path, encode_delta({name: inc}), 0, 1, "nf8")  # the whole history, start = 0
    assert state.version == 1 and load_state(tmp_path).version == 1
    torch.testing.assert_close(_weight(rebuilt, name), _weight(good, name))
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(StateCorrupt, match="unreadable metadata"):
        load_state(tmp_path)


def test_importance_history_survives_between_messages(task, tmp_path):
    _, state = node_base(task, tmp_path, {}, 0, 0, "fp32")
    save_importance(tmp_path, state, {task.targets[0]: (0.5, 0.25)})
    assert load_state(tmp_path).importance == {task.targets[0]: (0.5, 0.25)}
    _, state = node_base(task, tmp_path, {}, 0, 0, "fp16")
    assert state.importance == {task.targets[0]: (0.5, 0.25)}


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
