"""LoRA adapters through peft: target resolution, per-module ranks, factors, ΔW merge.

Shapes follow the LoRA paper: for a weight W of shape (out, in), A is (r, in), B is (out, r)
and the adapter's update is ΔW = (alpha / r) · B · A. Merging adds ΔW into the base weight
(GPT-2's Conv1D stores W transposed; merge handles it).
"""

from __future__ import annotations

import math
import re
import warnings

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from fedpipe_core.config import ConfigError
from fedpipe_core.lowrank import Factors, LowRank

_PEFT_PREFIX = "base_model.model."
_ATTENTION = re.compile(r"\.(self_attn|attn|attention|self_attention)\.")


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def resolve_target_modules(model: PreTrainedModel, spec: str) -> list[str]:
    """Full names of the modules to adapt.

    ``spec`` is ``auto`` (peft's default projections for the architecture), ``attention`` (every
    projection of the attention blocks: Wq, Wk, Wv, Wo, the candidates FedPipe selects among),
    ``all-linear`` (every linear layer in the transformer blocks, not the LM head) or a
    comma-separated list of module-name suffixes (``q_proj,v_proj``; ``c_attn`` for GPT-2).
    """
    candidates = [name for name, mod in model.named_modules() if _adaptable(mod) and name]
    head = {name for name, mod in model.named_modules() if mod is model.get_output_embeddings()}
    candidates = [name for name in candidates if name not in head]
    spec = spec.strip()
    if spec == "all-linear":
        return candidates
    if spec == "attention":
        return [name for name in candidates if _ATTENTION.search(name)]
    if spec == "auto":
        suffixes = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model.config.model_type)
        if not suffixes:
            raise ConfigError(
                f"run config 'lora.target-modules': no default for model type {model.config.model_type!r}; "
                "name the modules (e.g. 'q_proj,v_proj')"
            )
    else:
        suffixes = [s.strip() for s in spec.split(",") if s.strip()]
    chosen: list[str] = []
    for suffix in suffixes:
        matches = [name for name in candidates if name == suffix or name.endswith("." + suffix)]
        if not matches:
            known = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            raise ConfigError(
                f"run config 'lora.target-modules': {suffix!r} matches no linear module of "
                f"{type(model).__name__} (it has: {', '.join(known)})"
            )
        chosen.extend(matches)
    order = {name: i for i, name in enumerate(candidates)}
    return sorted(set(chosen), key=order.__getitem__)


def module_shape(model: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of the weight ``name`` in the LoRA orientation."""
    module = model.get_submodule(name)
    if isinstance(module, Conv1D):
        fan_in, fan_out = module.weight.shape
        return int(fan_out), int(fan_in)
    return int(module.out_features), int(module.in_features)


def attach_lora(model: PreTrainedModel, ranks: dict[str, int], alpha: float | dict[str, float], seed: int) -> PeftModel:
    """Wrap ``model`` with fresh LoRA adapters, rank ``ranks[name]`` on each named module.

    A is Kaiming-initialised from ``seed``, B is zero, so the wrapped model computes exactly
    the base function until training moves B (the re-initialisation of FedPipe eq 12).
    ``alpha`` is one value or one per module (the scaling is alpha / r).
    """
    if not ranks:
        raise ValueError("attach_lora: no module to adapt")
    names = list(ranks)
    config = LoraConfig(
        r=ranks[names[0]],
        lora_alpha=alpha[names[0]] if isinstance(alpha, dict) else alpha,
        target_modules=names,
        rank_pattern={_exact(name): r for name, r in ranks.items()},
        alpha_pattern={_exact(name): alpha[name] if isinstance(alpha, dict) else alpha for name in names},
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        fan_in_fan_out=any(isinstance(model.get_submodule(n), Conv1D) for n in names),
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft 0.21 (the newest release) reads transformers 5's deprecated alias; nothing of ours to change
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, config)
    got = {name: f.rank for name, f in lora_factors(peft_model).items()}
    if got != ranks:
        raise RuntimeError(f"peft built ranks {got} instead of {ranks}")
    return peft_model


def _exact(name: str) -> str:
    """A rank_pattern key that matches exactly one module name (peft treats keys as regexes)."""
    return name.replace(".", r"\.")


def lora_layers(peft_model: PeftModel) -> dict[str, LoraLayer]:
    """The LoRA layers of a peft model by base-model module name."""
    return {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer) and "default" in module.lora_A
    }


def strip_lora(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` (wrapped in place by :func:`attach_lora`) with every LoRA layer replaced by the base layer it wraps
    and peft's marks removed, for the next round to attach its own (what ``PeftModel.unload`` does, without the
    wrapper object)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            model.set_submodule(name, module.get_base_layer())
    model.__dict__.pop("peft_config", None)
    return model


def fresh_factors(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], seed: int, scale: float) -> Factors:
    """The (A, B) :func:`attach_lora` would draw for these modules (in the model's order), without a model:
    peft's draws replayed (A's and B's layers built, then A Kaiming-uniform, B zero), so a server can start
    global factors from the model's shapes alone; ``scale`` is the adapters' (alpha / r)."""
    factors: Factors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, rank in ranks.items():
            out, fan_in = shapes[name]
            A, B = nn.Linear(fan_in, rank, bias=False).weight, nn.Linear(rank, out, bias=False).weight
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)
            factors[name] = LowRank(A.detach().clone(), B.detach().clone(), scale)
    return factors


def lora_factors(peft_model: PeftModel) -> Factors:
    """Detached copies of (A, B) for every adapted module, with the scale its layer applies (alpha / r)."""
    return {
        name: LowRank(
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
            float(layer.scaling["default"]),
        )
        for name, layer in lora_layers(peft_model).items()
    }


def set_lora_factors(peft_model: PeftModel, factors: Factors) -> None:
    """Load given (A, B) into the adapters (used by strategies that keep global factors).

    Factors of a lower rank than the adapter fill its first components (A[:r], B[:, :r]); the
    rest keeps its fresh initialisation (random A, zero B), so B · A is still the given product. Their scale must be
    the one the layer applies (alpha / r), or the layer would compute another ΔW.
    """
    layers = lora_layers(peft_model)
    for name, lowrank in factors.items():
        layer = layers[name]
        A, B, rank = lowrank.A, lowrank.B, lowrank.rank
        if not math.isclose(lowrank.scale, float(layer.scaling["default"]), rel_tol=1e-6):
            raise ValueError(f"{name}: factors of scale {lowrank.scale:g}, the adapter applies {layer.scaling['default']:g}")
        if rank > layer.lora_A["default"].weight.shape[0]:
            raise ValueError(
                f"{name}: factors of rank {rank} exceed the adapter's rank {layer.lora_A['default'].weight.shape[0]}"
            )
        with torch.no_grad():
            layer.lora_A["default"].weight[:rank].copy_(A)
            layer.lora_B["default"].weight[:, :rank].copy_(B)


def merge_delta(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """W ← W + ΔW for each named module (FedPipe eq 11, unquantized base)."""
    with torch.no_grad():
        for name, delta in deltas.items():
            module = model.get_submodule(name)
            weight = module.weight
            update = delta.T if isinstance(module, Conv1D) else delta
            if update.shape != weight.shape:
                raise ValueError(f"ΔW for {name} has shape {tuple(delta.shape)}, weight is {tuple(weight.shape)}")
            weight.add_(update.to(weight.dtype))
