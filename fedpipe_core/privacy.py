"""Sample-level differential privacy at a site: DP-SGD on the adapters, with each site's own (ε, δ).

What is protected: one training example of the site (add/remove adjacency). Each local step samples the site's
training share with Poisson sampling at rate q = batch / |train| (every example independently), clips every
example's adapter gradient to the L2 bound C, sums them, adds Gaussian noise N(0, (zC)²) per coordinate and
divides by the expected batch q·|train| (Abadi et al. 2016). The noise multiplier z is calibrated with
dp-accounting's RDP accountant so that the run's planned steps (``num-server-rounds × train.local-steps``) spend
at most the site's ε at its δ; a site's :class:`PrivacyLedger` (on its own disk) composes the steps actually
done, and a round that would take it past ε is refused before any step. Everything the site sends that is
computed from the noised gradients (the adapters, FedPipe's importance scores) is covered by post-processing;
its losses (train loss, federated evaluation) are not, and the site guide says so.
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import dp_accounting as dpa
import torch
from dp_accounting.mechanism_calibration import ExplicitBracketInterval, calibrate_dp_mechanism

from fedpipe_core.data import IGNORE_INDEX

LEDGER_FILE = "privacy.json"
logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting notes every RDP order it drops as a warning


class PrivacyBudgetSpent(RuntimeError):
    """This round would take the site past its ε: it is refused before any step."""


def spent_epsilon(events: Sequence[tuple[float, float, int]], delta: float) -> float:
    """ε at ``delta`` of the composition of (sampling rate q, noise multiplier z, steps) Poisson-sampled Gaussian
    steps (RDP accountant)."""
    accountant = dpa.rdp.RdpAccountant()
    for rate, noise, steps in events:
        if steps > 0 and rate > 0:
            accountant.compose(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(noise)), steps)
    return float(accountant.get_epsilon(delta))


def calibrate_noise(rate: float, steps: int, epsilon: float, delta: float) -> float:
    """The smallest noise multiplier z whose ``steps`` steps at sampling rate ``rate`` spend at most ``epsilon``."""
    if not (epsilon > 0 and 0 < delta < 1 and 0 < rate <= 1 and steps >= 1):
        raise ValueError(
            f"calibrate_noise: need ε > 0, 0 < δ < 1, 0 < q <= 1, steps >= 1 (got {epsilon}, {delta}, {rate}, {steps})"
        )
    event = lambda z: dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(rate, dpa.GaussianDpEvent(z)), steps)  # noqa: E731
    noise = calibrate_dp_mechanism(dpa.rdp.RdpAccountant, event, epsilon, delta, ExplicitBracketInterval(1e-3, 1e4), tol=1e-4)
    return float(noise)


@dataclass
class PrivacyLedger:
    """A site's budget and what it has spent in this run, kept on its disk between messages."""

    epsilon: float
    delta: float
    noise: float = 0.0
    """The noise multiplier z, calibrated at the site's first private round for the run's planned steps."""
    events: list[tuple[float, float, int]] = field(default_factory=list)

    def spent(self) -> float:
        return spent_epsilon(self.events, self.delta) if self.events else 0.0

    def admit(self, rate: float, steps: int, planned_steps: int) -> None:
        """Check that ``steps`` more steps at ``rate`` keep the spend within ε (calibrating z first if needed);
        :class:`PrivacyBudgetSpent` otherwise. Nothing is recorded until :meth:`record`."""
        if not self.noise:
            self.noise = calibrate_noise(rate, max(planned_steps, steps), self.epsilon, self.delta)
        after = spent_epsilon([*self.events, (rate, self.noise, steps)], self.delta)
        if after > self.epsilon * (1 + 1e-6):
            raise PrivacyBudgetSpent(
                f"privacy budget: {steps} more steps at q = {rate:.4g}, z = {self.noise:.4g} would spend ε = {after:.4g} "
                f"of this site's ε = {self.epsilon:g} (δ = {self.delta:g}); spent so far {self.spent():.4g}"
            )

    def record(self, rate: float, steps: int) -> float:
        """Add the steps done; the ε spent so far."""
        self.events.append((rate, self.noise, steps))
        return self.spent()

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (LEDGER_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(directory / LEDGER_FILE)


def load_ledger(directory: Path, epsilon: float, delta: float) -> PrivacyLedger:
    """The site's ledger for this run (a fresh one the first time); a budget changed mid-run keeps what was spent."""
    path = directory / LEDGER_FILE
    if not path.is_file():
        return PrivacyLedger(epsilon, delta)
    stored = json.loads(path.read_text())
    events = [(float(q), float(z), int(n)) for q, z, n in stored["events"]]
    return PrivacyLedger(epsilon, delta, float(stored["noise"]), events)


@dataclass(frozen=True)
class DpSgd:
    """One site's DP-SGD settings for a round: clip bound C, noise multiplier z, sampling rate q."""

    clip: float
    noise: float
    rate: float
    seed: int

    def batches(self, examples: list, steps: int) -> list[list]:
        """``steps`` Poisson samples of ``examples`` (each example in each batch with probability q)."""
        rng = random.Random(self.seed)
        return [[e for e in examples if rng.random() < self.rate] for _ in range(steps)]


def example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each example's causal-LM loss: the mean cross-entropy over its own target tokens (labels shifted by one,
    ``IGNORE_INDEX`` ignored), what the model's ``loss`` is for a batch of that one example."""
    targets = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])  # the layout the model's own loss uses (same rounding)
    tokens = torch.nn.functional.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    return tokens.view(targets.shape).sum(1) / (targets != IGNORE_INDEX).sum(1).clamp_min(1)


def per_example_gradients(
    model: torch.nn.Module, params: list[torch.Tensor], inputs: dict[str, torch.Tensor]
) -> tuple[list[torch.Tensor], list[float]]:
    """Every example's own gradient of its own loss, for each of ``params`` (stacked: (examples, *shape)), from one
    batched forward and backward pass: Opacus' per-sample gradients (``GradSampleModule``'s hooks on the layers that
    hold ``params``; ``loss_reduction="sum"`` over :func:`example_losses`). Examples do not mix in a right-padded
    causal-LM batch (the attention mask), so these are the gradients of one pass per example."""
    from opacus.grad_sample import GradSampleModule

    # strict=False: a transformer holds buffers (rotary frequencies) that Opacus' strict check refuses; they are
    # constants, and every trainable parameter's per-sample gradient is checked below
    sampled = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=False)
    try:
        logits = sampled(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        losses = example_losses(logits, inputs["labels"])
        with warnings.catch_warnings():  # the first adapter's input (the frozen base's activation) needs no gradient
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            losses.sum().backward()
        missing = [i for i, p in enumerate(params) if getattr(p, "grad_sample", None) is None]
        if missing:
            raise RuntimeError(f"DP-SGD: Opacus gave no per-example gradient for {len(missing)} trainable parameter(s)")
        grads = [p.grad_sample.detach().clone() for p in params]
    finally:
        sampled.cleanup()
        for p in params:
            p.grad = None
    return grads, losses.detach().tolist()


def clip_and_sum(grads: list[torch.Tensor], clip: float) -> list[torch.Tensor]:
    """Σ over examples of each one's gradient clipped to L2 norm ``clip`` (over all parameters together): the
    sensitivity bound of one DP-SGD step. ``grads`` are per-example gradients stacked on the first dimension."""
    norms = torch.stack([g.flatten(1).double().pow(2).sum(1) for g in grads]).sum(0).sqrt()
    factors = (clip / norms.clamp_min(1e-30)).clamp(max=1.0)
    return [torch.einsum("n,n...->...", factors.to(g.dtype), g) for g in grads]


def noisy_mean(
    total: list[torch.Tensor], clip: float, noise: float, expected_batch: float, generator: torch.Generator
) -> list[torch.Tensor]:
    """(Σ clipped gradients + N(0, (zC)²)) / (q·n): the private gradient of one step."""
    return [
        (t + noise * clip * torch.randn(t.shape, generator=generator, dtype=t.dtype, device="cpu").to(t.device)) / expected_batch
        for t in total
    ]
