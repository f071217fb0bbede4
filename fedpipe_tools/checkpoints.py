"""Random-weight checkpoints of real architectures, written locally (no download), for memory and loading checks.

The tokenizer is the built-in model's, so the vocabulary is its size; everything else follows the
given configuration (e.g. TinyLlama-1.1B's widths and depth).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig

from fedpipe_core.model import resolve_checkpoint

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")

TINYLLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
"""TinyLlama-1.1B's architecture (its vocabulary replaced by the built-in tokenizer's)."""

LLAMA2_7B = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
"""LLaMA-2-7B's architecture (its vocabulary replaced by the built-in tokenizer's)."""


def write_random_checkpoint(
    directory: Path,
    config: PretrainedConfig,
    shard_size: str = "500MB",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
) -> Path:
    """Write a randomly initialised model of ``config`` as safetensors shards at ``dtype``, with the built-in tokenizer,
    once (an existing checkpoint is kept); ``device`` is where the weights are drawn (a GPU draws a 7B model in
    seconds)."""
    if (directory / "config.json").is_file():
        return directory
    source = resolve_checkpoint("smollm2-135m")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, max_shard_size=shard_size)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy(source / name, staging / name)
    staging.rename(directory)
    return directory


def builtin_vocab_size() -> int:
    """The built-in tokenizer's vocabulary size (the random checkpoints use it)."""
    return int(LlamaConfig.from_pretrained(resolve_checkpoint("smollm2-135m")).vocab_size)
