"""Importance scores (eqs 3-7) follow the EMA/uncertainty recursions and the SVD of ΔW."""

import pytest
import torch

from fedpipe_core.importance import ImportanceTracker
from fedpipe_core.lora import attach_lora
from fedpipe_core.train import train_local


def test_tracker_matches_the_recursions_by_hand(task):
    modules = list(task.targets[-2:])
    peft_model = attach_lora(task.base_model(), {m: 2 for m in modules}, 8.0, 0)
    tracker = ImportanceTracker(peft_model, beta1=0.5, beta2=0.5)
    layer = tracker.layers[modules[0]]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    sens = []
    for step in range(2):
        with torch.no_grad():
            B.fill_(0.1 * (step + 1))
        A.grad, B.grad = torch.full_like(A, 0.2), torch.full_like(B, -0.3 * (step + 1))
        for other in modules[1:]:
            tracker.layers[other].lora_A["default"].weight.grad = None
        sens.append(float(((A * A.grad).abs().sum() + (B * B.grad).abs().sum()).detach() / (A.numel() + B.numel())))
        tracker.update()
    ema1 = 0.5 * sens[0]
    unc1 = 0.5 * abs(sens[0] - ema1)
    ema2 = 0.5 * ema1 + 0.5 * sens[1]
    unc2 = 0.5 * unc1 + 0.5 * abs(sens[1] - ema2)
    assert tracker.sensitivity_scores()[modules[0]] == pytest.approx(ema2 * unc2)
    mean_sv = torch.linalg.svdvals(4.0 * (B.detach().double() @ A.detach().double()))[:2].mean().item()
    assert tracker.scores()[modules[0]] == pytest.approx(mean_sv * ema2 * unc2)


def test_training_produces_positive_scores_for_every_adapted_weight(task):
    ranks = {m: 2 for m in task.targets[:4]}
    peft_model = attach_lora(task.base_model(), ranks, 8.0, 0)
    tracker = ImportanceTracker(peft_model)
    train_local(
        peft_model,
        task.tokenizer,
        task.splits["train"][:8],
        steps=3,
        batch_size=2,
        lr=1e-3,
        weight_decay=0.0,
        max_len=48,
        seed=0,
        after_backward=tracker.update,
    )
    scores = tracker.scores()
    assert all(s > 0 and u > 0 for s, u in tracker.history().values())  # three steps moved both EMAs
    assert set(scores) == set(ranks) and all(v > 0 for v in scores.values())
    with pytest.raises(ValueError, match="betas"):
        ImportanceTracker(peft_model, beta1=1.0)


def test_history_continues_the_emas(task):
    module = task.targets[-1]
    peft_model = attach_lora(task.base_model(), {module: 2}, 8.0, 0)
    tracker = ImportanceTracker(peft_model, beta1=0.5, beta2=0.5, history={module: (0.4, 0.1)})
    layer = tracker.layers[module]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.fill_(0.1)
    A.grad, B.grad = torch.full_like(A, 0.2), torch.full_like(B, -0.3)
    sens = float(((A * A.grad).abs().sum() + (B * B.grad).abs().sum()).detach() / (A.numel() + B.numel()))
    tracker.update()
    ema = 0.5 * 0.4 + 0.5 * sens
    assert tracker.history()[module] == pytest.approx((ema, 0.5 * 0.1 + 0.5 * abs(sens - ema)))
