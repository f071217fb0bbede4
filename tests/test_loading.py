"""Shard-wise loading: the streamed model equals from_pretrained, and a quantized node never holds the FP32 model."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from fedpipe_core.config import ConfigError
from fedpipe_core.loading import load_linear, skeleton, stream_model
from fedpipe_tools.checkpoints import builtin_vocab_size, write_random_checkpoint

TINY = {
    "llama": LlamaConfig(
        num_hidden_layers=3,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        tie_word_embeddings=False,
    ),
    "gpt2": GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0),
}


@pytest.mark.parametrize("arch", sorted(TINY))
def test_streamed_model_equals_from_pretrained_over_shards(arch, tmp_path):
    checkpoint = write_random_checkpoint(tmp_path / arch, TINY[arch], shard_size="40KB")
    assert len(list(checkpoint.glob("model-*.safetensors"))) > 2
    reference = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    streamed = stream_model(checkpoint, lambda _name, module, read: load_linear(module, read))
    tokens = torch.randint(0, 300, (2, 12))
    assert torch.equal(streamed(tokens).logits, reference(tokens).logits)
    assert dict(streamed.named_buffers()).keys() == dict(reference.named_buffers()).keys()
    assert streamed.get_output_embeddings().weight is not None


def test_skeleton_holds_no_memory_and_missing_tensors_are_named(tmp_path):
    checkpoint = write_random_checkpoint(tmp_path / "llama", TINY["llama"], shard_size="40KB")
    model = skeleton(checkpoint)
    assert all(p.is_meta for p in model.parameters())
    index = checkpoint / "model.safetensors.index.json"
    meta = json.loads(index.read_text())
    del meta["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="no tensor 'model.norm.weight'"):
        stream_model(checkpoint, lambda _name, module, read: load_linear(module, read))


PEAK_SCRIPT = """
import json, sys
import torch
from fedpipe_core.config import RunConfig
from fedpipe_core.device import PeakMemory
from fedpipe_core.qlinear import stored_bytes
from fedpipe_core.node.state import node_base
from fedpipe_core.task import load_task
task = load_task(RunConfig(model=sys.argv[1], cache_dir=sys.argv[2], max_train_examples=8))
with PeakMemory(torch.device("cpu")) as peak:
    model, _ = node_base(task, __import__("pathlib").Path(sys.argv[2]) / "state", {}, 0, 0, sys.argv[3])
print(json.dumps({"increase": peak.increase_bytes, "held": stored_bytes(model)}))
"""


@pytest.fixture(scope="module")
def mid_checkpoint(tmp_path_factory):
    """A 58M-parameter random LLaMA (the built-in tokenizer's vocabulary) in 20 MB shards."""
    config = LlamaConfig(
        num_hidden_layers=8,
        hidden_size=512,
        intermediate_size=1536,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=builtin_vocab_size(),
        tie_word_embeddings=True,
    )
    return write_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama58m", config, shard_size="20MB")


def _node_load_peak(checkpoint, tmp_path, precision):
    out = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(checkpoint), str(tmp_path), precision],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_quantized_node_loads_shard_by_shard_below_the_fp32_model(mid_checkpoint, tmp_path):
    fp32_bytes = sum(p.numel() * 4 for p in skeleton(mid_checkpoint).parameters())
    nf4 = _node_load_peak(mid_checkpoint, tmp_path / "nf4", "nf4")
    fp32 = _node_load_peak(mid_checkpoint, tmp_path / "fp32", "fp32")
    assert fp32["held"] == pytest.approx(fp32_bytes, rel=0.01)
    assert nf4["held"] < 0.6 * fp32_bytes  # the tied FP32 embedding is 43% of this model
    assert nf4["increase"] < 0.75 * fp32_bytes, nf4
    assert nf4["increase"] < 1.25 * nf4["held"], nf4
