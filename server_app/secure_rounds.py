"""The server's side of a secure round (``privacy.mode = "secure"``) over Flower's Grid.

Before the TRAIN messages: the keys and shares stages (:func:`open_round`); after their replies: the unmask stage
(:func:`close_round`). A site that fails a stage is left out of the round and logged; a round with fewer than the
threshold of sites at any stage trains nothing and leaves the global state unchanged. What each stage assumes and
protects: :mod:`fedpipe_core.secure_round`.
"""

from __future__ import annotations

from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid

from fedpipe_core.protocol import CONFIG
from fedpipe_core.secagg import SecAggError
from fedpipe_core.secure_round import Layout, ServerRound, majority
from fedpipe_flower.secure import roster_config, stage_message, train_config


def _exchange(grid: Grid, messages: list[Message], timeout: float, what: str, server_round: int) -> dict[int, ConfigRecord]:
    """The config record of every reply without an error, by node; the failed ones are logged."""
    out = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log(WARNING, "round %d: secure aggregation (%s): node %d left out: %s", server_round, what, node, reply.error.reason)
        else:
            out[node] = reply.content[CONFIG]
    return out


def open_round(
    grid: Grid, server_round: int, messages: list[Message], layout: Layout, threshold: int, value_range: float, timeout: float
) -> tuple[ServerRound | None, list[Message]]:
    """Run the keys and shares stages with the nodes of ``messages`` (their TRAIN messages); return the round and
    those messages with what secure aggregation adds, for the nodes that dealt their shares (none when too few)."""
    nodes = sorted(m.metadata.dst_node_id for m in messages)
    rnd = ServerRound.start(server_round, threshold or majority(len(nodes)))
    base = {"nonce": rnd.nonce}
    try:
        for node, record in _exchange(
            grid, [stage_message(n, server_round, "keys", base) for n in nodes], timeout, "keys", server_round
        ).items():
            rnd.admit_keys(node, record["c-pk"], record["s-pk"])
        if len(rnd.roster) < rnd.threshold:
            raise SecAggError(f"{len(rnd.roster)} node(s) sent keys, the threshold is {rnd.threshold}")
        shares_stage = {**base, **roster_config(rnd.roster), "threshold": rnd.threshold}
        dealt = _exchange(
            grid, [stage_message(n, server_round, "shares", shares_stage) for n in rnd.roster], timeout, "shares", server_round
        )
        dealers = []
        for node, record in dealt.items():
            try:
                rnd.admit_shares(node, dict(zip((int(s) for s in record["to"]), record["blob"], strict=True)))
                dealers.append(node)
            except (SecAggError, KeyError, ValueError) as exc:
                log(WARNING, "round %d: secure aggregation: node %d left out: %s", server_round, node, exc)
        rnd.narrow(dealers)
    except (SecAggError, KeyError) as exc:
        log(WARNING, "round %d: secure aggregation cannot start (%s); the round trains nothing", server_round, exc)
        return None, []
    sites = sorted(rnd.roster)
    out = []
    for message in messages:
        node = message.metadata.dst_node_id
        if node not in rnd.roster:
            continue
        shares = {dealer: blob for dealer, blob in rnd.dealt.get(node, {}).items() if dealer != node}
        extra = train_config(rnd.nonce, rnd.threshold, layout, sites, value_range, shares)
        message.content[CONFIG] = ConfigRecord({**dict(message.content[CONFIG]), **extra})
        out.append(message)
    return rnd, out


def close_round(grid: Grid, rnd: ServerRound, timeout: float) -> np.ndarray | None:
    """The unmask stage with the sites whose masked upload arrived: Σ of their encoded vectors, or None (logged)
    when fewer than the threshold uploaded or revealed."""
    sent, lost = rnd.survivors()
    if len(sent) < rnd.threshold:
        log(
            WARNING,
            "round %d: %d masked upload(s), the threshold is %d; the round is dropped",
            rnd.server_round,
            len(sent),
            rnd.threshold,
        )
        return None
    if lost:
        log(
            WARNING,
            "round %d: secure aggregation: nodes %s lost after the shares stage; their masks are removed",
            rnd.server_round,
            lost,
        )
    values = {"nonce": rnd.nonce, "survivors": [str(s) for s in sent], "lost": [str(s) for s in lost]}
    records = _exchange(
        grid, [stage_message(n, rnd.server_round, "unmask", values) for n in sent], timeout, "unmask", rnd.server_round
    )
    reveals = {}
    for node, record in records.items():
        try:
            reveals[node] = {
                kind: dict(zip((int(s) for s in record[f"{kind}-of"]), record[kind], strict=True)) for kind in ("seed", "key")
            }
        except (KeyError, ValueError) as exc:
            log(WARNING, "round %d: secure aggregation: the reveal of node %d is unusable: %s", rnd.server_round, node, exc)
    try:
        return rnd.unmask(reveals)
    except SecAggError as exc:
        log(WARNING, "round %d: %s; the round is dropped", rnd.server_round, exc)
        return None
