"""Evaluation: token-level loss / perplexity on targets, greedy generation, and a run's validation and test scores."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpipe_core.data import IGNORE_INDEX, Example, collate, references_by_group
from fedpipe_core.device import autocast, resolve_device
from fedpipe_core.lora import merge_delta
from fedpipe_core.metrics import e2e_scores
from fedpipe_core.task import Task


@dataclass(frozen=True)
class LossResult:
    """Mean cross-entropy per target token, its perplexity, and how many tokens were scored."""

    loss: float
    ppl: float
    tokens: int


@torch.no_grad()
def evaluate_loss(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    max_len: int,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> LossResult:
    """PPL = exp(mean token cross-entropy over the target tokens only); ``progress`` gets each batch's size."""
    if not examples:
        raise ValueError("evaluate_loss: no example to evaluate")
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    ordered = sorted(examples, key=lambda e: len(e.prompt) + len(e.target))  # similar lengths share a batch: less padding
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        inputs = {k: v.to(device) for k, v in collate(tokenizer, batch, max_len).items()}
        with autocast(device):
            logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:]
        logits = logits[:, :-1].float()
        total += float(
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int((labels != IGNORE_INDEX).sum())
        if progress is not None:
            progress(len(batch))
    loss = total / count
    return LossResult(loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=count)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    one_line: bool = True,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy continuations in batches, cut at the first newline with ``one_line`` (E2E references are one line);
    ``progress`` gets each batch's size."""
    model.eval()
    device = next(model.parameters()).device
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            with autocast(device):
                out = model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs.extend(t.strip().split("\n")[0].strip() if one_line else t.strip() for t in texts)
            if progress is not None:
                progress(len(chunk))
    finally:
        tokenizer.padding_side = side
    return outputs


def global_model(task: Task, delta: dict[str, torch.Tensor]) -> PreTrainedModel:
    """Base + global ΔW, on this machine's accelerator when it has one (see :func:`~fedpipe_core.device.resolve_device`)."""
    model = task.base_model()
    merge_delta(model, delta)
    return model.to(resolve_device("auto"))


def spread(examples: list[Example], cap: int) -> list[Example]:
    """At most ``cap`` examples (0: all), taken round-robin over the groups: the first reference of every
    meaning representation (or task), then the second, ... — so a cap of at least the number of groups
    scores every group, and a smaller one as many groups as it can, instead of the first few."""
    by_group: dict[str, list[Example]] = {}
    for example in examples:
        by_group.setdefault(example.group, []).append(example)
    ordered = [e for row in itertools.zip_longest(*by_group.values()) for e in row if e is not None]
    return ordered[:cap] if cap else ordered


def pick_groups(groups: list[str], cap: int) -> list[str]:
    """``cap`` groups (0: all) evenly spaced over the sorted ``groups``, not the first ``cap`` alphabetically."""
    ordered = sorted(groups)
    if not cap or cap >= len(ordered):
        return ordered
    return [ordered[(i * len(ordered)) // cap] for i in range(cap)]


def evaluate_validation(task: Task, delta: dict[str, torch.Tensor]) -> LossResult:
    """Eval loss / PPL of base + ΔW on the validation split (``eval.examples`` of it, spread over its groups)."""
    examples = spread(task.splits["validation"], task.config.eval_examples)
    return evaluate_loss(global_model(task, delta), task.tokenizer, examples, task.config.max_seq_len)


def score_test(
    task: Task,
    delta: dict[str, torch.Tensor],
    examples: list[Example] | None = None,
    max_examples: int | None = None,
    max_groups: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    outputs: list[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Final scores of base + ``delta`` on the test split (or ``examples``): see :func:`score_model`."""
    examples = task.splits["test"] if examples is None else examples
    return score_model(task, global_model(task, delta), examples, max_examples, max_groups, progress, outputs)


def score_model(
    task: Task,
    model: PreTrainedModel,
    examples: list[Example],
    max_examples: int | None = None,
    max_groups: int | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    outputs: list[tuple[str, str]] | None = None,
) -> dict[str, float]:
    """Final scores of ``model`` on ``examples``: PPL always; for E2E also the five generation metrics (Alpaca:
    perplexity only). ``outputs``, when given, receives (meaning representation, output) in the order scored.

    PPL is over ``max_examples`` examples spread over the groups (:func:`spread`), generation over
    ``max_groups`` meaning representations evenly spaced (:func:`pick_groups`); 0 means all, and the
    defaults are the run config's ``eval.examples`` and ``eval.test-groups``. ``progress(stage, done, total)``
    follows the two stages (``perplexity``, ``generation``) batch by batch.
    """
    cfg = task.config
    scored = spread(examples, cfg.eval_examples if max_examples is None else max_examples)
    loss = evaluate_loss(model, task.tokenizer, scored, cfg.max_seq_len, progress=_stage(progress, "perplexity", len(scored)))
    scores: dict[str, float] = {"ppl": loss.ppl, "scored_examples": float(len(scored))}
    if cfg.task == "e2e":
        refs = references_by_group(examples)
        groups = pick_groups(list(refs), cfg.test_groups if max_groups is None else max_groups)
        prompts = [next(e.prompt for e in examples if e.group == g) for g in groups]
        hyps = generate(model, task.tokenizer, prompts, cfg.max_new_tokens, progress=_stage(progress, "generation", len(prompts)))
        scores.update(e2e_scores(dict(zip(groups, hyps)), {g: refs[g] for g in groups}))
        if outputs is not None:
            outputs.extend(zip(groups, hyps))
        scores["scored_groups"] = float(len(groups))
    return scores


def _stage(progress: Callable[[str, int, int], None] | None, stage: str, total: int) -> Callable[[int], None] | None:
    """A per-batch counter that reports ``(stage, done, total)``."""
    if progress is None:
        return None
    done = [0]

    def step(count: int) -> None:
        done[0] += count
        progress(stage, done[0], total)

    return step
