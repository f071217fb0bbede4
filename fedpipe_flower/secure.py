"""Secure aggregation's stages (:mod:`fedpipe_core.secure_round`) as Flower messages, for both apps.

The server runs the keys and shares stages as QUERY messages before its TRAIN messages and the unmask stage as a
QUERY after their replies; config ``secagg-stage`` names the stage. A site keeps its round secrets in its context's
state (``context.state``, on the node, never sent); its TRAIN reply's adapters are replaced by the masked vector.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict

from fedpipe_core.protocol import ARRAYS, CONFIG, IMPORTANCE_PREFIX, METRICS, SEP
from fedpipe_core.secure_round import Layout, SiteSecrets, advertise, deal, fixed_point, mask, reveal
from fedpipe_flower.messages import from_record, to_record

STAGE = "secagg-stage"
MASKED = "secagg::masked"
"""The one array of a secure TRAIN reply."""
PRIVATE_METRICS = ("num-examples", "train-loss", "eval-loss", "eval-examples")
"""Metrics computed from a site's data: in secure mode they travel only inside the masked sum."""
_STATE = "secagg"


def _ids(values: list[int]) -> list[str]:
    return [str(v) for v in values]  # node ids as text: a ConfigRecord int is signed 64-bit


def stage_message(node_id: int, server_round: int, stage: str, values: dict) -> Message:
    content = RecordDict({CONFIG: ConfigRecord({STAGE: stage, "server-round": server_round, **values})})
    return Message(content, dst_node_id=node_id, message_type=MessageType.QUERY, group_id=f"{server_round}-{stage}")


def roster_config(roster: dict[int, tuple[bytes, bytes]]) -> dict:
    sites = sorted(roster)
    return {"roster": _ids(sites), "roster-c": [roster[s][0] for s in sites], "roster-s": [roster[s][1] for s in sites]}


def read_roster(config: ConfigRecord) -> dict[int, tuple[bytes, bytes]]:
    return {int(s): (c, p) for s, c, p in zip(config["roster"], config["roster-c"], config["roster-s"], strict=True)}


def train_config(
    nonce: bytes, threshold: int, layout: Layout, sites: list[int], value_range: float, shares: dict[int, bytes]
) -> dict:
    """What a secure TRAIN message adds to its config: the round, the layout, the final roster, the shares to this node."""
    return {
        "secagg-nonce": nonce,
        "secagg-threshold": threshold,
        "secagg-layout": json.dumps({"modules": layout.modules, "rank": layout.rank}),
        "secagg-sites": _ids(sites),
        "secagg-range": value_range,
        "secagg-from": _ids(sorted(shares)),
        "secagg-shares": [shares[s] for s in sorted(shares)],
    }


# --- a site's side ----------------------------------------------------------------------------------------------
def _save(context: Context, secrets: SiteSecrets) -> None:
    values = asdict(secrets)
    roster = values.pop("roster")
    received = values.pop("received")
    values["own_shares"] = list(values["own_shares"])
    context.state[_STATE] = ConfigRecord(
        {
            **values,
            **roster_config(roster),
            "received-from": _ids(sorted(received)),
            "received": [received[s] for s in sorted(received)],
        }
    )


def _load(context: Context, server_round: int, nonce: bytes) -> SiteSecrets:
    if _STATE not in context.state.config_records:
        raise ValueError("secure aggregation: this node holds no secrets for the round (it missed the keys stage)")
    record = context.state.config_records[_STATE]
    if int(record["server_round"]) != server_round or record["nonce"] != nonce:
        raise ValueError(f"secure aggregation: this node's secrets are of round {record['server_round']}, not {server_round}")
    return SiteSecrets(
        server_round=server_round,
        nonce=record["nonce"],
        c_private=record["c_private"],
        s_private=record["s_private"],
        self_seed=record["self_seed"],
        roster=read_roster(record) if record["roster"] else {},
        threshold=int(record["threshold"]),
        own_shares=tuple(record["own_shares"]),
        received=dict(zip((int(s) for s in record["received-from"]), record["received"], strict=True)),
        masked=bool(record["masked"]),
        revealed=bool(record["revealed"]),
    )


def answer_stage(msg: Message, context: Context) -> Message:
    """A keys, shares or unmask QUERY: this site's part of the stage (a SecAggError or ValueError is the caller's)."""
    config = msg.content[CONFIG]
    stage, server_round, me = str(config[STAGE]), int(config["server-round"]), context.node_id
    if stage == "keys":
        secrets, c_public, s_public = advertise(server_round, config["nonce"])
        _save(context, secrets)
        return Message(RecordDict({CONFIG: ConfigRecord({"c-pk": c_public, "s-pk": s_public})}), reply_to=msg)
    secrets = _load(context, server_round, config["nonce"])
    if stage == "shares":
        dealt = deal(secrets, me, read_roster(config), int(config["threshold"]))
        _save(context, secrets)
        return Message(
            RecordDict({CONFIG: ConfigRecord({"to": _ids(sorted(dealt)), "blob": [dealt[s] for s in sorted(dealt)]})}),
            reply_to=msg,
        )
    if stage == "unmask":
        shares = reveal(secrets, me, [int(s) for s in config["survivors"]], [int(s) for s in config.get("lost", [])])
        del context.state[_STATE]  # a round's secrets serve one unmasking
        out = {f"{kind}-of": _ids(sorted(part)) for kind, part in shares.items()}
        out |= {kind: [part[s] for s in sorted(part)] for kind, part in shares.items()}
        return Message(RecordDict({CONFIG: ConfigRecord(out)}), reply_to=msg)
    raise ValueError(f"secure aggregation: unknown stage {stage!r}")


def masked_reply(msg: Message, reply: Message, context: Context) -> Message:
    """A secure round's TRAIN reply: the adapters and data-derived metrics of ``reply`` folded into one masked vector
    (:meth:`Layout.flatten`); the rest of its metrics (timing, memory, profile, ε spent) as they were."""
    config = msg.content[CONFIG]
    secrets = _load(context, int(config["server-round"]), config["secagg-nonce"])
    sites = [int(s) for s in config["secagg-sites"]]
    if (
        not set(sites) <= set(secrets.roster)
        or context.node_id not in sites
        or int(config["secagg-threshold"]) != secrets.threshold
    ):
        raise ValueError("secure aggregation: the TRAIN message's roster or threshold is not the one this node dealt to")
    secrets.roster = {s: secrets.roster[s] for s in sites}
    spec = json.loads(str(config["secagg-layout"]))
    layout = Layout(tuple((str(m), int(o)) for m, o in spec["modules"]), int(spec["rank"]))
    arrays = from_record(reply.content[ARRAYS])
    metrics = dict(reply.content[METRICS])
    b = {key.rpartition(SEP)[0]: value for key, value in arrays.items()}
    evaluation = (float(metrics["eval-loss"]), int(metrics["eval-examples"])) if "eval-loss" in metrics else None
    vector = layout.flatten(b, int(metrics["num-examples"]), float(metrics["train-loss"]), evaluation)
    received = dict(zip((int(s) for s in config["secagg-from"]), config["secagg-shares"], strict=True))
    words = mask(secrets, context.node_id, vector, fixed_point(float(config["secagg-range"]), len(sites)), received)
    _save(context, secrets)
    kept = {k: v for k, v in metrics.items() if k not in PRIVATE_METRICS and not k.startswith(IMPORTANCE_PREFIX)}
    return Message(RecordDict({ARRAYS: to_record({MASKED: words}), METRICS: MetricRecord(kept)}), reply_to=msg)


def is_stage(msg: Message) -> bool:
    return CONFIG in msg.content.config_records and STAGE in msg.content[CONFIG]


def is_secure_train(msg: Message) -> bool:
    return "secagg-nonce" in msg.content[CONFIG]
