"""Evaluation of a model: token-level loss / perplexity on targets, and greedy generation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpipe_core.data import IGNORE_INDEX, Example, collate


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
) -> LossResult:
    """PPL = exp(mean token cross-entropy over the target tokens only)."""
    if not examples:
        raise ValueError("evaluate_loss: no example to evaluate")
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        inputs = collate(tokenizer, examples[start : start + batch_size], max_len)
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        labels = inputs["labels"][:, 1:]
        logits = logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX, reduction="sum"))
        count += int((labels != IGNORE_INDEX).sum())
    loss = total / count
    return LossResult(loss=loss, ppl=math.exp(min(loss, 50.0)), tokens=count)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations, cut at the first newline (E2E references are one line)."""
    model.eval()
    outputs: list[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            outputs.extend(t.strip().split("\n")[0].strip() for t in texts)
    finally:
        tokenizer.padding_side = side
    return outputs
