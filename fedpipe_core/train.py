"""Local training: a few AdamW steps on the trainable (LoRA) parameters only."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedpipe_core.data import Example, collate
from fedpipe_core.device import autocast, compute_dtype
from fedpipe_core.privacy import DpSgd, clip_and_sum, noisy_mean, per_example_gradients


@dataclass(frozen=True)
class TrainResult:
    """What one client's local training produced (the adapter itself stays in the model)."""

    mean_loss: float
    steps: int
    examples: int = 0
    """Examples processed: Σ over the steps done of the batch's size (what the update is weighted by)."""
    optimizer_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    """AdamW's moments per trainable parameter name after the last step (to continue them next round)."""


def batches(examples: list[Example], batch_size: int, steps: int, seed: int) -> list[list[Example]]:
    """``steps`` batches drawn without replacement, reshuffling each pass over the data."""
    rng = random.Random(seed)
    order: list[int] = []
    out: list[list[Example]] = []
    for _ in range(steps):
        batch: list[Example] = []
        while len(batch) < min(batch_size, len(examples)):
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        out.append(batch)
    return out


def train_local(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    max_len: int,
    seed: int,
    after_backward: Callable[[], None] | None = None,
    dp: DpSgd | None = None,
    optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None,
) -> TrainResult:
    """Run ``steps`` optimizer steps of causal-LM loss on the target tokens, on the model's device.

    ``after_backward`` runs once per step between the backward pass and the optimizer step
    (where gradients are available, e.g. for importance scoring). On a GPU the forward runs in
    its compute dtype (BF16, or FP16 with loss scaling, the gradients unscaled before
    ``after_backward``); trainable parameters and the optimizer state stay FP32. With ``dp`` the steps are
    DP-SGD (:mod:`fedpipe_core.privacy`): Poisson-sampled batches, each example's gradient clipped, Gaussian noise
    added, in FP32; ``after_backward`` then sees the private gradient. ``optimizer_state`` (AdamW moments by
    parameter name, from an earlier round's result) continues the moments of the parameters whose shapes match.
    """
    if not examples:
        raise ValueError("train_local: this client has no training example")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if not params:
        raise ValueError("train_local: the model has no trainable parameter")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    restore_moments(optimizer, named, optimizer_state or {})
    if dp is not None:
        return _train_private(model, tokenizer, examples, named, optimizer, steps, max_len, dp, after_backward)
    device = params[0].device
    scaler = torch.amp.GradScaler(device.type) if compute_dtype(device) == torch.float16 else None
    model.train()
    losses: list[float] = []
    processed = 0
    for batch in batches(examples, batch_size, steps, seed):
        inputs = {k: v.to(device) for k, v in collate(tokenizer, batch, max_len).items()}
        with autocast(device):
            loss = model(**inputs).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"train_local: non-finite loss {loss.item()} at step {len(losses)}")
        if scaler is None:
            loss.backward()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        if after_backward is not None:
            after_backward()
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        processed += len(batch)
    model.eval()
    return TrainResult(sum(losses) / len(losses), len(losses), processed, export_moments(optimizer, named))


def restore_moments(
    optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]], state: dict[str, dict[str, torch.Tensor]]
) -> None:
    """Give AdamW the saved moments of every parameter of the same name and shape (the others start at zero)."""
    for name, param in named:
        saved = state.get(name)
        if saved is None or saved["exp_avg"].shape != param.shape:
            continue
        optimizer.state[param] = {
            "step": saved["step"].detach().clone().float().cpu().reshape(()),
            "exp_avg": saved["exp_avg"].to(param.device, param.dtype).clone(),
            "exp_avg_sq": saved["exp_avg_sq"].to(param.device, param.dtype).clone(),
        }


def export_moments(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """AdamW's moments by parameter name, on the CPU."""
    out = {}
    for name, param in named:
        state = optimizer.state.get(param)
        if state and "exp_avg" in state:
            out[name] = {
                k: torch.as_tensor(state[k]).detach().float().cpu().reshape(-1 if k == "step" else state[k].shape)
                for k in ("step", "exp_avg", "exp_avg_sq")
            }
    return out


def _train_private(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    examples: list[Example],
    named: list[tuple[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    steps: int,
    max_len: int,
    dp: DpSgd,
    after_backward: Callable[[], None] | None,
) -> TrainResult:
    """DP-SGD steps: each Poisson batch's per-example gradients in one pass (Opacus), clipped and summed, the private
    gradient (:func:`~fedpipe_core.privacy.noisy_mean`), then AdamW."""
    params = [p for _, p in named]
    device = params[0].device
    generator = torch.Generator().manual_seed(dp.seed)
    model.train()
    losses: list[float] = []
    processed = 0
    for batch in dp.batches(examples, steps):
        if batch:
            inputs = {k: v.to(device) for k, v in collate(tokenizer, batch, max_len).items()}
            grads, batch_losses = per_example_gradients(model, params, inputs)
            total = clip_and_sum(grads, dp.clip)
            losses += batch_losses
        else:  # a Poisson sample may be empty: its step is noise alone
            total = [torch.zeros_like(p) for p in params]
        for param, grad in zip(params, noisy_mean(total, dp.clip, dp.noise, dp.rate * len(examples), generator)):
            param.grad = grad.to(param.dtype)
        if after_backward is not None:
            after_backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        processed += len(batch)
    model.eval()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean_loss, steps, processed, export_moments(optimizer, named))
