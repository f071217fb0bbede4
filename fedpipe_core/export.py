"""Export a run's global ΔW for the tools people already use.

- a peft LoRA adapter directory (``adapter_config.json``, ``adapter_model.safetensors``) that
  ``PeftModel.from_pretrained(base, DIR)`` loads: each module's ΔW as its best rank-r factors
  (truncated SVD, Eckart-Young), scaling 1 (alpha = r), the rank per module in ``rank_pattern``;
- a merged transformers checkpoint, base + ΔW with the tokenizer, that
  ``AutoModelForCausalLM.from_pretrained(DIR)`` loads.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fedpipe_core.lora import attach_lora, merge_delta, set_lora_factors
from fedpipe_core.lowrank import best_rank
from fedpipe_core.results import DEFAULT_MAX_ERROR
from fedpipe_core.task import Task

"""Default bound on a module's relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F when the rank is chosen."""
REPORT_FILE = "fedpipe_export.json"


@dataclass(frozen=True)
class ModuleExport:
    """How one module's ΔW was exported: the rank used, ΔW's own rank, the relative Frobenius error."""

    module: str
    rank: int
    delta_rank: int
    rel_error: float


def tail_error(singular: torch.Tensor, rank: int) -> float:
    """‖ΔW − ΔW_r‖_F / ‖ΔW‖_F of the best rank-``rank`` approximation: the energy of the dropped singular values."""
    total = float(singular.square().sum())
    return math.sqrt(float(singular[rank:].square().sum()) / total) if total > 0 else 0.0


def chosen_rank(singular: torch.Tensor, rank: int | None, max_rel_error: float) -> int:
    """``rank`` capped at ΔW's size, or the smallest rank whose relative error is at most ``max_rel_error``."""
    if rank is not None:
        return max(1, min(rank, singular.shape[0]))
    return next(r for r in range(1, singular.shape[0] + 1) if tail_error(singular, r) <= max_rel_error)


def delta_rank(singular: torch.Tensor, shape: tuple[int, int]) -> int:
    """ΔW's numerical rank (singular values above the float32 round-off of its largest)."""
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return 0
    return int((singular > singular[0] * max(shape) * torch.finfo(torch.float32).eps).sum())


def export_peft(
    task: Task, delta: dict[str, torch.Tensor], out: Path, rank: int | None = None, max_rel_error: float = DEFAULT_MAX_ERROR
) -> list[ModuleExport]:
    """Write ``delta`` as a peft LoRA adapter of ``task``'s base model; returns what each module kept."""
    if not delta:
        raise ValueError("the run has no ΔW to export")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not 0.0 <= max_rel_error < 1.0:
        raise ValueError(f"max relative error must be in [0, 1), got {max_rel_error}")
    factors, report = {}, []
    for name, change in delta.items():
        singular = torch.linalg.svdvals(change.double())
        r = chosen_rank(singular, rank, max_rel_error)
        factors[name] = best_rank(change, r)  # scale 1: alpha = r below
        report.append(ModuleExport(name, r, delta_rank(singular, tuple(change.shape)), tail_error(singular, r)))
    ranks = {name: lowrank.rank for name, lowrank in factors.items()}
    peft_model = attach_lora(task.base_model(), ranks, {name: float(r) for name, r in ranks.items()}, seed=0)
    set_lora_factors(peft_model, factors)
    peft_model.save_pretrained(str(out))
    (out / REPORT_FILE).write_text(json.dumps({"format": "peft", "modules": [asdict(m) for m in report]}, indent=2) + "\n")
    return report


def export_merged(task: Task, delta: dict[str, torch.Tensor], out: Path) -> Path:
    """Write base + ``delta`` (eq 11 without quantization) as a transformers checkpoint in the base's dtype."""
    model = task.base_model()
    merge_delta(model, delta)
    stored = model.config.dtype  # the checkpoint's dtype (the model may have been loaded wider)
    if isinstance(stored, str):
        stored = getattr(torch, stored)
    model.to(stored or next(model.parameters()).dtype).save_pretrained(str(out))
    task.tokenizer.save_pretrained(str(out))
    (out / REPORT_FILE).write_text(json.dumps({"format": "merged", "modules": sorted(delta)}, indent=2) + "\n")
    return out
