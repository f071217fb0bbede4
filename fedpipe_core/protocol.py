"""The messages between the ServerApp and the ClientApp: every key and its type, written once.

A round has three kinds of message, each a small typed object here with the flat mapping the
transport carries (Flower's ConfigRecord / MetricRecord; arrays travel beside them as the
``{key: ndarray}`` dicts of :mod:`fedpipe_core.codec`):

- the profile query (``QUERY``) and its :class:`ProfileReply`;
- the :class:`TrainInstruction` a node is sent with its arrays (``config`` record);
- the :class:`TrainReply` a node returns with its arrays (``metrics`` record).

Reading a mapping validates it: a bad reply raises :class:`~fedpipe_core.codec.UpdateError` and a
bad instruction :class:`ProtocolError`, each naming the key and the problem.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedpipe_core.profile import ClientProfile


class UpdateError(ValueError):
    """An array payload (or its report) that does not fit the model: the message names module and problem."""


CONFIG, ARRAYS, METRICS, PROFILE = "config", "arrays", "metrics", "profile"
"""Record names inside a message's content."""

MODES = ("factors", "fedpipe", "ft")
"""How a node trains: start from the sent A, B (``factors``); merge the sent ΔW and train fresh
adapters (``fedpipe``, eqs 11-12); or fine-tune whole weights (``ft``)."""

IMPORTANCE_PREFIX = "importance::"
PROFILE_QUERY: dict[str, str] = {"want": "profile"}


class ProtocolError(ValueError):
    """A message that does not follow this protocol; the text names the key."""


def checked_profile(memory_bytes: object, flops: object, source: str, compute_bytes: object = 4) -> ClientProfile:
    """A ClientProfile from reported numbers, which must be positive."""
    profile = ClientProfile(float(memory_bytes), float(flops), source, int(compute_bytes))
    if not (profile.memory_bytes > 0 and profile.flops > 0):
        raise ValueError(f"memory {profile.memory_bytes} and flops {profile.flops} must be > 0")
    if profile.compute_bytes not in (2, 4):
        raise ValueError(f"compute bytes {profile.compute_bytes} must be 2 (BF16/FP16) or 4 (FP32)")
    return profile


def profile_to_config(profile: ClientProfile) -> dict[str, float | str]:
    """A node's answer to the profile query."""
    return {
        "memory-bytes": profile.memory_bytes,
        "flops": profile.flops,
        "source": profile.source,
        "compute-bytes": profile.compute_bytes,
    }


def profile_from_config(values: Mapping[str, Any]) -> ClientProfile:
    """The profile a node reported (KeyError, TypeError or ValueError when unusable)."""
    return checked_profile(values["memory-bytes"], values["flops"], str(values["source"]), values.get("compute-bytes", 4))


@dataclass(frozen=True)
class TrainInstruction:
    """What a node is told to do in a round (with the arrays of :meth:`Strategy.payloads`)."""

    server_round: int
    mode: str
    ranks: dict[str, int]
    batch_size: int
    local_steps: int
    precision: str
    state_from: int = 0
    state_to: int = 0
    """FedPipe: the ΔW rounds ``state_from + 1 .. state_to`` travel with this message."""

    def to_config(self) -> dict[str, int | str]:
        return {
            "server-round": self.server_round,
            "mode": self.mode,
            "ranks": json.dumps(self.ranks),
            "batch-size": self.batch_size,
            "local-steps": self.local_steps,
            "precision": self.precision,
            "state-from": self.state_from,
            "state-to": self.state_to,
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> TrainInstruction:
        try:
            ranks = {str(k): int(v) for k, v in json.loads(str(values["ranks"])).items()}
            instruction = cls(
                server_round=int(values["server-round"]),
                mode=str(values["mode"]),
                ranks=ranks,
                batch_size=int(values["batch-size"]),
                local_steps=int(values["local-steps"]),
                precision=str(values["precision"]),
                state_from=int(values.get("state-from", 0)),
                state_to=int(values.get("state-to", 0)),
            )
        except KeyError as exc:
            raise ProtocolError(f"train instruction lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ProtocolError(f"train instruction is malformed: {exc}") from None
        if instruction.mode not in MODES:
            raise ProtocolError(f"unknown train mode {instruction.mode!r} (known: {', '.join(MODES)})")
        return instruction


@dataclass(frozen=True)
class TrainReply:
    """What a node reports with its trained arrays."""

    num_examples: int
    train_loss: float
    steps: int = 0
    state_version: int | None = None
    """FedPipe: the last server round whose ΔW the node has merged."""
    profile: ClientProfile | None = None
    train_s: float | None = None
    setup_s: float | None = None
    startup_s: float | None = None
    importance: dict[str, float] = field(default_factory=dict)
    model_bytes: int | None = None
    """Bytes of the frozen model as the node held it this round."""
    peak_bytes: int | None = None
    """Measured peak memory of the round (CUDA allocator peak, or model bytes + resident-memory increase on CPU)."""

    def to_metrics(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {"num-examples": self.num_examples, "train-loss": self.train_loss, "steps": self.steps}
        if self.state_version is not None:
            out["state-version"] = self.state_version
        if self.profile is not None:
            out |= {
                "profile-memory-bytes": self.profile.memory_bytes,
                "profile-flops": self.profile.flops,
                "profile-compute-bytes": self.profile.compute_bytes,
            }
        for key, value in (
            ("train-s", self.train_s),
            ("setup-s", self.setup_s),
            ("startup-s", self.startup_s),
            ("model-bytes", self.model_bytes),
            ("peak-memory-bytes", self.peak_bytes),
        ):
            if value is not None:
                out[key] = value
        return out | {f"{IMPORTANCE_PREFIX}{m}": v for m, v in self.importance.items()}

    @classmethod
    def from_metrics(cls, values: Mapping[str, Any]) -> TrainReply:
        """Read and check a reply's metrics: UpdateError for what makes the update unusable.

        A malformed profile, timing or importance is dropped (the update itself stays usable).
        """
        for key in ("num-examples", "train-loss"):
            if key not in values:
                raise UpdateError(f"reply metrics lack {key!r}")
        num_examples = values["num-examples"]
        if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
            raise UpdateError(f"num-examples must be a positive integer, got {num_examples!r}")
        train_loss = float(values["train-loss"])
        if not math.isfinite(train_loss):
            raise UpdateError(f"train-loss is not finite: {values['train-loss']!r}")
        profile = None
        if "profile-memory-bytes" in values and "profile-flops" in values:
            try:
                profile = checked_profile(
                    values["profile-memory-bytes"], values["profile-flops"], "reported", values.get("profile-compute-bytes", 4)
                )
            except (TypeError, ValueError):
                profile = None
        timing = {k: float(values[k]) for k in ("train-s", "setup-s", "startup-s") if k in values}
        memory = {
            k: int(values[k])
            for k in ("model-bytes", "peak-memory-bytes")
            if k in values and isinstance(values[k], int) and values[k] >= 0
        }
        importance = {
            k.removeprefix(IMPORTANCE_PREFIX): float(v)
            for k, v in values.items()
            if k.startswith(IMPORTANCE_PREFIX) and math.isfinite(float(v))
        }
        return cls(
            num_examples=num_examples,
            train_loss=train_loss,
            steps=int(values.get("steps", 0)),
            state_version=int(values["state-version"]) if "state-version" in values else None,
            profile=profile,
            train_s=timing.get("train-s"),
            setup_s=timing.get("setup-s"),
            startup_s=timing.get("startup-s"),
            importance=importance,
            model_bytes=memory.get("model-bytes"),
            peak_bytes=memory.get("peak-memory-bytes"),
        )

    def timing(self) -> dict[str, float] | None:
        """(train, setup, start-up) seconds when all three were reported, finite, >= 0, with training > 0."""
        values = {"train-s": self.train_s, "setup-s": self.setup_s, "startup-s": self.startup_s}
        if any(v is None for v in values.values()):
            return None
        if not (values["train-s"] > 0 and all(math.isfinite(v) and v >= 0 for v in values.values())):
            return None
        return values
