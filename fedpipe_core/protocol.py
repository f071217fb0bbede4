"""The messages between the ServerApp and the ClientApp: every key and its type, written once.

A run has three kinds of message, each a small typed object here with the flat mapping the
transport carries (Flower's ConfigRecord / MetricRecord; arrays travel beside them as the
``{key: ndarray}`` dicts of :mod:`fedpipe_core.codec`):

- the profile query (``QUERY``) and its :class:`ProfileReply`;
- the :class:`TrainInstruction` a node is sent with its arrays (``config`` record), and the
  :class:`TrainReply` it returns with its arrays (``metrics`` record); with ``evaluate`` set, the reply
  also carries the loss of the model the node started the round from on its validation share (the
  previous round's global model: federated evaluation without a second message);
- after the last round, the :class:`FinalInstruction` (``EVALUATE``, with the final ΔW) and the
  :class:`FinalReply`: each site's scores and counts on its own test share, never a text.

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
SEP = "::"
"""Between a module's name and its array's part in an array key (``<module>::A``)."""

MODES = ("factors", "fedpipe", "ft")
"""How a node trains: start from the sent A, B (``factors``); merge the sent ΔW and train fresh
adapters (``fedpipe``, eqs 11-12); or fine-tune whole weights (``ft``)."""

IMPORTANCE_PREFIX = "importance::"
WEIGHT_NORM_PREFIX = "weight-norm::"
PHASE_PREFIX = "phase::"
"""Reply metrics of where a TRAIN handler's time and disk went (:attr:`TrainReply.phases`)."""
MODELS = ("federated", "base", "local_only")
"""The models a site scores after the last round: the final global one, the untrained base, and its own
model fine-tuned alone (``eval.local-baseline``)."""
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


PLACE = "place"
"""A profile reply's key for the node's place in the federation's order: its node config's ``partition-id``."""


def _place(value: object, where: str) -> int | None:
    """``value`` as a place (None stays None); ValueError naming ``where`` when it is not an integer >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} = {value!r} is not an integer >= 0")
    return value


def place_of(node_config: Mapping[str, Any]) -> int | None:
    """The place a node reports: its node config's ``partition-id`` (every simulated node has one), else None."""
    return _place(node_config.get("partition-id"), "node config 'partition-id'")


def place_from_config(values: Mapping[str, Any]) -> int | None:
    """The place a profile reply gives (None when it gives none)."""
    return _place(values.get(PLACE), f"profile reply {PLACE!r}")


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
    dp_clip: float = 0.0
    """DP-SGD's per-example clipping bound offered by the run (``privacy.clip-norm``; 0: no DP instruction)."""
    evaluate: bool = False
    """Report the loss of the model this round starts from (the global model after round ``server_round - 1``)
    on the node's validation share."""

    def to_config(self) -> dict[str, int | str | bool]:
        return {
            "evaluate": self.evaluate,
            "dp-clip": self.dp_clip,
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
                evaluate=bool(values.get("evaluate", False)),
                dp_clip=float(values.get("dp-clip", 0.0)),
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
    """The examples the node processed in the round (batch × the steps it did)."""
    train_loss: float
    steps: int = 0
    data_examples: int = 0
    """The size of the node's training share (what ``strategy.weight-by = data`` weighs its update by)."""
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
    eval_loss: float | None = None
    """With ``evaluate``: the start model's loss on the node's validation share (None: it holds none out)."""
    eval_examples: int = 0
    weight_norms: dict[str, float] = field(default_factory=dict)
    """‖W‖_F of each trained weight as the node holds it: the scale a server without weights judges updates by."""
    epsilon_spent: float | None = None
    """With DP-SGD at the site: its ε spent in this run so far, this round included."""
    phases: dict[str, float] = field(default_factory=dict)
    """Where the handler's time and the node's disk went: ``import-s`` (the training stack), ``data-s`` (task and data),
    ``base-s`` (the base built or updated), ``state-bytes`` (bytes of the node's state written by this message)."""

    def to_metrics(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {"num-examples": self.num_examples, "train-loss": self.train_loss, "steps": self.steps}
        if self.data_examples:
            out["data-examples"] = self.data_examples
        if self.eval_loss is not None:
            out |= {"eval-loss": self.eval_loss, "eval-examples": self.eval_examples}
        out |= {f"{WEIGHT_NORM_PREFIX}{m}": v for m, v in self.weight_norms.items()}
        if self.epsilon_spent is not None:
            out["epsilon-spent"] = self.epsilon_spent
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
        out |= {f"{PHASE_PREFIX}{k}": v for k, v in self.phases.items()}
        return out | {f"{IMPORTANCE_PREFIX}{m}": v for m, v in self.importance.items()}

    @classmethod
    def from_metrics(cls, values: Mapping[str, Any], masked: bool = False) -> TrainReply:
        """Read and check a reply's metrics: UpdateError for what makes the update unusable.

        A malformed profile, timing or importance is dropped (the update itself stays usable). ``masked``: a secure
        round's reply, whose example count and losses travel only inside the masked sum (0 and NaN here).
        """
        num_examples, train_loss = (0, math.nan) if masked else _counted(values)
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
        importance = _prefixed(values, IMPORTANCE_PREFIX)
        norms = {m: v for m, v in _prefixed(values, WEIGHT_NORM_PREFIX).items() if v > 0}
        evaluation = read_evaluation(values, "eval-loss", "eval-examples")
        return cls(
            num_examples=num_examples,
            train_loss=train_loss,
            steps=int(values.get("steps", 0)),
            data_examples=_count(values.get("data-examples", 0)),
            state_version=int(values["state-version"]) if "state-version" in values else None,
            profile=profile,
            train_s=timing.get("train-s"),
            setup_s=timing.get("setup-s"),
            startup_s=timing.get("startup-s"),
            importance=importance,
            model_bytes=memory.get("model-bytes"),
            peak_bytes=memory.get("peak-memory-bytes"),
            eval_loss=evaluation[0] if evaluation else None,
            eval_examples=evaluation[1] if evaluation else 0,
            weight_norms=norms,
            epsilon_spent=float(values["epsilon-spent"]) if "epsilon-spent" in values else None,
            phases={k: v for k, v in _prefixed(values, PHASE_PREFIX).items() if v >= 0},
        )

    def timing(self) -> dict[str, float] | None:
        """(train, setup, start-up) seconds when all three were reported, finite, >= 0, with training > 0."""
        values = {"train-s": self.train_s, "setup-s": self.setup_s, "startup-s": self.startup_s}
        if any(v is None for v in values.values()):
            return None
        if not (values["train-s"] > 0 and all(math.isfinite(v) and v >= 0 for v in values.values())):
            return None
        return values


def _counted(values: Mapping[str, Any]) -> tuple[int, float]:
    """A plain reply's (num-examples, train-loss), checked."""
    for key in ("num-examples", "train-loss"):
        if key not in values:
            raise UpdateError(f"reply metrics lack {key!r}")
    num_examples = values["num-examples"]
    if not isinstance(num_examples, int) or isinstance(num_examples, bool) or num_examples <= 0:
        raise UpdateError(f"num-examples must be a positive integer, got {num_examples!r}")
    train_loss = float(values["train-loss"])
    if not math.isfinite(train_loss):
        raise UpdateError(f"train-loss is not finite: {values['train-loss']!r}")
    return num_examples, train_loss


def _count(value: Any) -> int:
    """A non-negative integer count from a reply, else 0 (unknown)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _prefixed(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers under keys ``prefix<name>``, by name."""
    return {k.removeprefix(prefix): float(v) for k, v in values.items() if k.startswith(prefix) and math.isfinite(float(v))}


def read_evaluation(values: Mapping[str, Any], loss_key: str, count_key: str) -> tuple[float, int] | None:
    """(loss, examples) when both are reported and usable (a finite loss >= 0, a positive count), else None."""
    if loss_key not in values or count_key not in values:
        return None
    loss, count = values[loss_key], values[count_key]
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return None
    if not isinstance(loss, (int, float)) or isinstance(loss, bool) or not (math.isfinite(loss) and loss >= 0):
        return None
    return float(loss), count


@dataclass(frozen=True)
class FinalInstruction:
    """After the last round: score the final model (sent as dense ΔW) on the site's held-out shares."""

    server_round: int
    base: bool = True
    """Also score the untrained base (``eval.base-generation``)."""
    local_baseline: bool = False
    """Also fine-tune alone on the training share for ``local_steps`` steps and score that (``eval.local-baseline``)."""
    local_steps: int = 0

    def to_config(self) -> dict[str, int | bool]:
        return {
            "server-round": self.server_round,
            "final": True,
            "base": self.base,
            "local-baseline": self.local_baseline,
            "local-steps": self.local_steps,
        }

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> FinalInstruction:
        if not values.get("final"):
            raise ProtocolError("evaluate instruction lacks 'final' (the only evaluation this app sends)")
        try:
            return cls(
                int(values["server-round"]), bool(values["base"]), bool(values["local-baseline"]), int(values["local-steps"])
            )
        except KeyError as exc:
            raise ProtocolError(f"evaluate instruction lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"evaluate instruction is malformed: {exc}") from None


@dataclass(frozen=True)
class FinalReply:
    """A site's scores: the final model's validation loss, and per model (:data:`MODELS`) its test scores; counts
    and its data's hash, never a text."""

    eval_loss: float | None
    eval_examples: int
    test_examples: int
    scores: dict[str, dict[str, float]]
    data_hash: str = ""
    note: str = ""

    def to_metrics(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {"test-examples": self.test_examples}
        if self.eval_loss is not None:
            out |= {"eval-loss": self.eval_loss, "eval-examples": self.eval_examples}
        return out | {f"{model}::{metric}": value for model, scores in self.scores.items() for metric, value in scores.items()}

    def to_config(self) -> dict[str, str]:
        return {"data-hash": self.data_hash, "note": self.note}

    @classmethod
    def from_records(cls, metrics: Mapping[str, Any], config: Mapping[str, Any]) -> FinalReply:
        """Read a site's final scores; UpdateError naming the key when they cannot be used."""
        evaluation = read_evaluation(metrics, "eval-loss", "eval-examples")
        scores: dict[str, dict[str, float]] = {}
        for key, value in metrics.items():
            model, sep, metric = key.partition("::")
            if not sep:
                continue
            if model not in MODELS:
                raise UpdateError(f"final scores: unknown model {model!r} in {key!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise UpdateError(f"final scores: {key!r} is not a finite number ({value!r})")
            scores.setdefault(model, {})[metric] = float(value)
        test_examples = metrics.get("test-examples", 0)
        if not isinstance(test_examples, int) or test_examples < 0:
            raise UpdateError(f"final scores: test-examples must be a count, got {test_examples!r}")
        return cls(
            evaluation[0] if evaluation else None,
            evaluation[1] if evaluation else 0,
            test_examples,
            scores,
            str(config.get("data-hash", "")),
            str(config.get("note", "")),
        )
