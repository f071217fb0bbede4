"""FedPipe ClientApp: protocol in, the mode's local routine, protocol out.

Flower starts a fresh ClientApp process for every message, so this module imports only what a QUERY
needs (Flower and the profile); a TRAIN message imports :mod:`client_app.local_round` (torch,
transformers, peft) when it arrives, unless the node's warm worker (node config ``worker-socket``,
:mod:`fedpipe_core.node.worker`) takes the round. Node config ``messages`` (default ``query,train,evaluate``) lists the message
types this site answers; any other is refused with an error reply before anything is loaded (a site that
leaves out ``evaluate`` refuses the final scoring on its test share).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import WARNING

import psutil
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from client_app import LOADED
from fedpipe_core.node import wire
from fedpipe_core.profile import ClientProfile, declared_on_device, node_number
from fedpipe_core.protocol import ARRAYS, CONFIG, METRICS, PHASE_PREFIX, place_of
from fedpipe_flower import secure
from fedpipe_flower.messages import from_record, metrics_reply, profile_reply

MESSAGE_TYPES = ("query", "train", "evaluate")
"""What this ClientApp answers; a site narrows it with node config ``messages``."""
_process = {"started": psutil.Process().create_time(), "loaded": LOADED, "messages": 0}


def accepted_messages(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower mod: answer only the message types the node config's ``messages`` lists (all by default)."""
    listed = str(context.node_config.get("messages", ",".join(MESSAGE_TYPES)))
    accepted = {t.strip() for t in listed.split(",") if t.strip()}
    unknown = sorted(accepted - set(MESSAGE_TYPES))
    if unknown:
        reason = f"node config 'messages': {unknown} not among {list(MESSAGE_TYPES)}"
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
    kind = msg.metadata.message_type.split(".")[0]
    if kind not in accepted:
        reason = f"this node does not answer {kind!r} messages (node config 'messages' = {listed!r})"
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
    return call_next(msg, context)


app = ClientApp(mods=[accepted_messages])


def _profile(context: Context) -> ClientProfile:
    """Declared in the node config (cheap), else simulated or measured (loads the training stack)."""
    profile = declared_on_device(context.node_config)
    if profile is not None:
        return profile
    from fedpipe_core.node.round import profile  # the training stack: a profile to simulate or measure

    return profile(context)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's profile (declared, simulated or measured) and what the reply cost this process; or take
    this node's part in a stage of secure aggregation (:mod:`fedpipe_flower.secure`)."""
    if secure.is_stage(msg):
        return _refusing(msg, lambda: secure.answer_stage(msg, context))
    entered = time.time()
    startup = entered - _process["started"] if _process["messages"] == 0 else 0.0
    _process["messages"] += 1
    profile = _profile(context)
    timing = {"startup-s": startup, "handler-s": time.time() - entered}
    return profile_reply(msg, profile, timing, place_of(context.node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round (:func:`client_app.local_round.train`).

    Reports, besides the factors, how long the round's local training took (``train-s``), what it
    cost before and after that in this handler (``setup-s``: importing the training stack, task, node
    state, base, adapters) and, for the first message of a process, how long the process took to get
    here (``startup-s``), of it Flower's part (``phase::flower-s``: its own start-up, its pull of the message and its
    install of the app, until it loaded this package).
    """
    entered, entered_wall = time.perf_counter(), time.time()
    first = _process["messages"] == 0
    startup = entered_wall - _process["started"] if first else 0.0
    _process["messages"] += 1
    reply = _local_round(msg, context, entered, startup)
    if first and not reply.has_error() and METRICS in reply.content.metric_records:
        reply.content[METRICS][f"{PHASE_PREFIX}flower-s"] = _process["loaded"] - _process["started"]
    if reply.has_error() or not secure.is_secure_train(msg):
        return reply
    return _refusing(msg, lambda: secure.masked_reply(msg, reply, context))


def _local_round(msg: Message, context: Context, entered: float, startup: float) -> Message:
    """The round by the node's warm worker when it has one that answers, else in this process."""
    if "worker-socket" in context.node_config:
        reply = through_worker(msg, context, entered, startup)
        if reply is not None:
            return reply
    from client_app import local_round  # the training stack, loaded for TRAIN messages only

    return local_round.train(msg, context, entered, startup)


def _refusing(msg: Message, answer: Callable[[], Message]) -> Message:
    """``answer()``, or an error reply naming what secure aggregation refused (the round goes on without this node)."""
    try:
        return answer()
    except (ValueError, KeyError) as exc:  # SecAggError is a ValueError
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=str(exc)), reply_to=msg)


def through_worker(msg: Message, context: Context, entered: float, startup: float) -> Message | None:
    """The round run by the node's warm worker (node config ``worker-socket``, :mod:`fedpipe_core.node.worker`); None when
    no worker answers or it runs another app version (the round then runs in this process), an error reply when the
    worker took the round and failed it. ``setup-s`` is this handler's time besides the worker's training."""
    path = str(context.node_config["worker-socket"])
    job = {
        "kind": "train",
        "config": dict(msg.content[CONFIG]),
        "run_config": dict(context.run_config),
        "node_config": dict(context.node_config),
        "run_id": context.run_id,
        "node_id": context.node_id,
    }
    timeout = node_number(context.node_config, "worker-timeout-s", 3600.0)
    try:
        header, arrays = wire.ask(path, job, from_record(msg.content[ARRAYS]), timeout)
    except (wire.WorkerUnavailable, wire.WorkerRefused) as exc:
        log(WARNING, "node %d: %s; training in the ClientApp's process", context.node_id, exc)
        return None
    except wire.WorkerFailed as exc:
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)
    if "refused_round" in header:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=str(header["refused_round"])), reply_to=msg)
    metrics = dict(header["metrics"])
    metrics["startup-s"] = startup
    metrics["setup-s"] = time.perf_counter() - entered - float(metrics.get("train-s", 0.0))
    return metrics_reply(msg, arrays, metrics)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """After the last round: this site's scores of the final model on its own held-out shares
    (:func:`fedpipe_core.node.round.final_scores`)."""
    from client_app import local_round

    return local_round.evaluate(msg, context)
