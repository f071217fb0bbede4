"""FedPipe ClientApp: sync ΔW into the local base, train the assigned adapters, return A and B."""

from __future__ import annotations

import json
import time

import psutil
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpipe_core.codec import decode_delta
from fedpipe_core.config import RunConfig
from fedpipe_core.data import Example
from fedpipe_core.profile import ClientProfile
from fedpipe_core.task import (
    Task,
    client_examples,
    client_profile,
    load_task,
    node_base,
    node_state_dir,
    run_client_round,
    run_full_round,
    save_importance,
    site_examples,
)
from server_app.records import from_record, to_record

app = ClientApp()
_process = {"started": psutil.Process().create_time(), "messages": 0}


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "data-path" in node:  # a site with its own data file: one whole "partition"
        return int(node.get("partition-id", 0)), 1
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("node config needs 'data-path', or 'partition-id' and 'num-partitions'")
    return int(node["partition-id"]), int(node["num-partitions"])


def _examples(task: Task, context: Context) -> list[Example]:
    """The node's own data file when its node config names one, else its partition of the run's data."""
    if "data-path" in context.node_config:
        return site_examples(task, str(context.node_config["data-path"]))
    return client_examples(task, *_partition(context))


def _profile(context: Context) -> ClientProfile:
    task = load_task(RunConfig.from_mapping(context.run_config))
    return client_profile(task, context.node_config, _partition(context)[0])


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's profile (declared, simulated or measured)."""
    _process["messages"] += 1
    profile = _profile(context)
    record = ConfigRecord({"memory-bytes": profile.memory_bytes, "flops": profile.flops, "source": profile.source})
    return Message(RecordDict({"profile": record}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round; the server's config says which modules, which ranks and which ΔW to merge.

    Reports, besides the factors, how long the round's local training took (``train-s``), what it
    cost before and after that in this handler (``setup-s``: task, node state, base, adapters) and,
    for the first message of a process, how long the process took to get here (``startup-s``).
    """
    entered, entered_wall = time.perf_counter(), time.time()
    startup = entered_wall - _process["started"] if _process["messages"] == 0 else 0.0
    _process["messages"] += 1
    config = RunConfig.from_mapping(context.run_config)
    task = load_task(config)
    partition_id, _ = _partition(context)
    examples = _examples(task, context)
    instruction = msg.content["config"]
    ranks = {str(k): int(v) for k, v in json.loads(str(instruction["ranks"])).items()}
    unknown = sorted(set(ranks) - set(task.shapes))
    if unknown:
        raise ValueError(f"plan names modules this model cannot adapt: {unknown[:3]}")
    payload = from_record(msg.content["arrays"])
    server_round = int(instruction["server-round"])
    plan = {"batch_size": int(instruction["batch-size"]), "local_steps": int(instruction["local-steps"])}
    seed = config.seed * 1_000_003 + server_round * 1_009 + partition_id
    end = 0  # the last server round whose ΔW this node has merged (FedPipe only)
    mode = str(instruction["mode"])
    if mode in ("fedpipe", "factors"):
        start, end = (int(instruction["state-from"]), int(instruction["state-to"])) if mode == "fedpipe" else (0, 0)
        directory = node_state_dir(task, context.run_id, context.node_id)
        model, state = node_base(task, directory, payload if mode == "fedpipe" else {}, start, end, str(instruction["precision"]))
        out = run_client_round(task, model=model, examples=examples, ranks=ranks, seed=seed, importance_history=state.importance,
                               initial_factors=None if mode == "fedpipe" else payload, **plan)
        save_importance(directory, state, out.importance_history)
    elif mode == "ft":
        out = run_full_round(task, examples=examples, modules=list(ranks), base_delta=decode_delta(payload, task.shapes), seed=seed, **plan)
    else:
        raise ValueError(f"unknown train mode {mode!r}")
    profile = _profile(context)
    metrics = MetricRecord(
        {
            "num-examples": out.num_examples,
            "train-loss": out.result.mean_loss,
            "steps": out.result.steps,
            "state-version": end,
            "profile-memory-bytes": profile.memory_bytes,
            "profile-flops": profile.flops,
            "train-s": out.train_s,
            "setup-s": time.perf_counter() - entered - out.train_s,
            "startup-s": startup,
            **{f"importance::{m}": v for m, v in out.importance.items()},
        }
    )
    return Message(RecordDict({"arrays": to_record(out.arrays), "metrics": metrics}), reply_to=msg)
