"""The protocol of :mod:`fedpipe_core.protocol` as Flower messages, and ArrayRecord ↔ ndarray dicts.

Neither app owns this module: the ServerApp builds instructions and reads replies with it, the
ClientApp reads instructions and builds replies.
"""

from __future__ import annotations

import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from fedpipe_core.profile import ClientProfile
from fedpipe_core.protocol import (
    ARRAYS,
    CONFIG,
    METRICS,
    PLACE,
    PROFILE,
    PROFILE_QUERY,
    FinalInstruction,
    FinalReply,
    TrainInstruction,
    TrainReply,
    UpdateError,
    place_from_config,
    profile_from_config,
    profile_to_config,
)

Arrays = dict[str, np.ndarray]


INDEX = "index"
DATA_PREFIX = "data::"


def to_record(arrays: Arrays) -> ArrayRecord:
    """A flat ndarray dict as an ArrayRecord of one flat Array per dtype plus an index (key, dtype, shape).

    Flower 1.42 moves every Array as objects of its own (pushed and pulled one request each, twice per hop), so a
    message of a few hundred small factors spends seconds on requests; packed, it is a handful of objects whatever
    the number of adapted weights (the array bytes are the same). No arrays: an empty record (no bytes).
    """
    if not arrays:
        return ArrayRecord()
    index: list[list[object]] = []
    groups: dict[str, list[np.ndarray]] = {}
    for key, value in arrays.items():
        array = np.asarray(value)
        if array.dtype.hasobject:
            raise TypeError(f"array {key!r}: dtype {array.dtype} cannot be sent")
        index.append([key, array.dtype.str, list(array.shape)])
        groups.setdefault(array.dtype.str, []).append(array.ravel())
    record = {INDEX: Array(np.frombuffer(json.dumps(index).encode(), dtype=np.uint8))}
    for dtype, parts in groups.items():
        record[DATA_PREFIX + dtype] = Array(np.concatenate(parts))
    return ArrayRecord(record)


def from_record(record: ArrayRecord) -> Arrays:
    """The ndarray dict :func:`to_record` packed, each array a view of its dtype's flat Array; UpdateError naming what
    does not fit (an index that is not a list of [key, dtype, shape], a repeated key, sizes that do not add up)."""
    if not record:
        return {}
    if INDEX not in record:
        raise UpdateError(f"array record has no {INDEX!r} array: not packed by this app's version")
    flats = {key[len(DATA_PREFIX) :]: record[key].numpy() for key in record if key.startswith(DATA_PREFIX)}
    extra = sorted(key for key in record if key != INDEX and not key.startswith(DATA_PREFIX))
    if extra:
        raise UpdateError(f"array record has arrays outside its index: {extra}")
    offsets = dict.fromkeys(flats, 0)
    out: Arrays = {}
    for key, dtype, shape in _read_index(record[INDEX].numpy()):
        if key in out:
            raise UpdateError(f"array record index names {key!r} twice")
        flat = flats.get(dtype)
        if flat is None or flat.ndim != 1 or flat.dtype.str != dtype:
            raise UpdateError(f"array {key!r}: no flat {dtype} data for it")
        size = math.prod(shape)
        start = offsets[dtype]
        if start + size > flat.size:
            raise UpdateError(f"array {key!r}: {dtype} data ends at {flat.size}, before its shape {tuple(shape)} does")
        out[key] = flat[start : start + size].reshape(shape)
        offsets[dtype] = start + size
    short = {dtype: (offsets[dtype], flat.size) for dtype, flat in flats.items() if offsets[dtype] != flat.size}
    if short:
        raise UpdateError(f"array record data longer than its index: (indexed, held) per dtype {short}")
    return out


def _read_index(raw: np.ndarray) -> list[tuple[str, str, list[int]]]:
    try:
        entries = json.loads(raw.astype(np.uint8).tobytes().decode())
    except (UnicodeDecodeError, ValueError) as error:
        raise UpdateError(f"array record index is not JSON: {error}") from None
    if not isinstance(entries, list):
        raise UpdateError("array record index is not a list")
    out = []
    for entry in entries:
        match entry:
            case [str(key), str(dtype), list(shape)] if all(type(n) is int and n >= 0 for n in shape):
                out.append((key, dtype, shape))
            case _:
                raise UpdateError(f"array record index entry {str(entry)[:80]!r} is not [key, dtype, shape]")
    return out


def profile_query(node_id: int) -> Message:
    """The QUERY that asks a node for its profile."""
    return Message(RecordDict({CONFIG: ConfigRecord(PROFILE_QUERY)}), dst_node_id=node_id, message_type=MessageType.QUERY)


def profile_reply(
    msg: Message, profile: ClientProfile, timing: dict[str, float] | None = None, place: int | None = None
) -> Message:
    """A QUERY reply: the profile, the node's place when it has one (:func:`~fedpipe_core.protocol.place_of`) and,
    when given, what the reply cost the node (``startup-s``, ``handler-s``)."""
    content = RecordDict({PROFILE: ConfigRecord(profile_to_config(profile) | ({} if place is None else {PLACE: place}))})
    if timing is not None:
        content[METRICS] = MetricRecord(timing)
    return Message(content, reply_to=msg)


def read_query_timing(reply: Message) -> float | None:
    """Seconds a QUERY reply cost its node (process start-up + handler), when it says."""
    record = reply.content.metric_records.get(METRICS)
    if record is None or "startup-s" not in record or "handler-s" not in record:
        return None
    return float(record["startup-s"]) + float(record["handler-s"])


def read_profile(reply: Message) -> tuple[ClientProfile, int | None]:
    """The profile and the node's place (None: it gave none) in a QUERY reply (KeyError, TypeError or ValueError when
    unusable)."""
    values = reply.content.config_records[PROFILE]
    return profile_from_config(values), place_from_config(values)


def train_message(node_id: int, arrays: ArrayRecord, instruction: TrainInstruction, config: ConfigRecord) -> Message:
    """A node's TRAIN message: its arrays and its instruction (on top of the strategy's train config)."""
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord({**dict(config), **instruction.to_config()})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.TRAIN, group_id=str(instruction.server_round))


def read_instruction(msg: Message) -> tuple[TrainInstruction, Arrays]:
    """A TRAIN message's instruction and arrays."""
    return TrainInstruction.from_config(msg.content[CONFIG]), from_record(msg.content[ARRAYS])


def train_reply(msg: Message, arrays: Arrays, reply: TrainReply) -> Message:
    return metrics_reply(msg, arrays, reply.to_metrics())


def metrics_reply(msg: Message, arrays: Arrays, metrics: dict[str, int | float]) -> Message:
    """A TRAIN reply from its arrays and its report's metrics as they are (a warm worker's, already encoded)."""
    return Message(RecordDict({ARRAYS: to_record(arrays), METRICS: MetricRecord(metrics)}), reply_to=msg)


def read_train_reply(reply: Message, masked: bool = False) -> tuple[Arrays, TrainReply, int]:
    """A TRAIN reply's arrays, report and array bytes; UpdateError when it cannot be used. ``masked``: a secure round's
    reply (:meth:`TrainReply.from_metrics`)."""
    content = reply.content
    if ARRAYS not in content.array_records or METRICS not in content.metric_records:
        raise UpdateError(f"reply lacks its {ARRAYS!r} or {METRICS!r} record")
    record = content.array_records[ARRAYS]
    return from_record(record), TrainReply.from_metrics(content.metric_records[METRICS], masked), record.count_bytes()


def final_message(node_id: int, arrays: ArrayRecord, instruction: FinalInstruction) -> Message:
    """The EVALUATE message after the last round: the final ΔW and what to score."""
    content = RecordDict({ARRAYS: arrays, CONFIG: ConfigRecord(instruction.to_config())})
    return Message(content, dst_node_id=node_id, message_type=MessageType.EVALUATE, group_id="final")


def read_final(msg: Message) -> tuple[FinalInstruction, Arrays]:
    """An EVALUATE message's instruction and the final ΔW."""
    return FinalInstruction.from_config(msg.content[CONFIG]), from_record(msg.content[ARRAYS])


def final_reply(msg: Message, reply: FinalReply) -> Message:
    content = RecordDict({METRICS: MetricRecord(reply.to_metrics()), CONFIG: ConfigRecord(reply.to_config())})
    return Message(content, reply_to=msg)


def read_final_reply(reply: Message) -> FinalReply:
    """A site's final scores; UpdateError when they cannot be used."""
    content = reply.content
    if METRICS not in content.metric_records:
        raise UpdateError(f"final reply lacks its {METRICS!r} record")
    config = content.config_records.get(CONFIG, ConfigRecord({}))
    return FinalReply.from_records(content.metric_records[METRICS], config)
