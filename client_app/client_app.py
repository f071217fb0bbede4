"""FedPipe ClientApp: sync ΔW into the local base, train the assigned adapters, return A and B."""

from __future__ import annotations

import json

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedpipe_core.config import RunConfig
from fedpipe_core.task import client_examples, load_task, node_state_dir, run_client_round, sync_node_state
from server_app.records import from_record, to_record

app = ClientApp()


def _partition(context: Context) -> tuple[int, int]:
    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise ValueError("node config needs 'partition-id' and 'num-partitions'")
    return int(node["partition-id"]), int(node["num-partitions"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """One local round; the server's config says which modules, which ranks and which ΔW to merge."""
    config = RunConfig.from_mapping(context.run_config)
    task = load_task(config)
    partition_id, num_partitions = _partition(context)
    examples = client_examples(task, partition_id, num_partitions)
    instruction = msg.content["config"]
    ranks = {str(k): int(v) for k, v in json.loads(str(instruction["ranks"])).items()}
    unknown = sorted(set(ranks) - set(task.shapes))
    if unknown:
        raise ValueError(f"plan names modules this model cannot adapt: {unknown[:3]}")
    payload = from_record(msg.content["arrays"])
    server_round = int(instruction["server-round"])
    seed = config.seed * 1_000_003 + server_round * 1_009 + partition_id
    if instruction["mode"] == "fedpipe":
        start, end = int(instruction["state-from"]), int(instruction["state-to"])
        delta = sync_node_state(task, node_state_dir(task, context.run_id, context.node_id), payload, start, end)
        out = run_client_round(task, examples=examples, ranks=ranks, base_delta=delta, initial_factors=None, seed=seed, state_version=end)
    else:
        out = run_client_round(task, examples=examples, ranks=ranks, base_delta={}, initial_factors=payload, seed=seed, state_version=0)
    metrics = MetricRecord(
        {
            "num-examples": out.num_examples,
            "train-loss": out.result.mean_loss,
            "steps": out.result.steps,
            "state-version": out.state_version,
        }
    )
    return Message(RecordDict({"arrays": to_record(out.arrays), "metrics": metrics}), reply_to=msg)
