"""Secure aggregation's rounds (``privacy.mode = secure``): the stages between sites, the ClientApp's masked replies,
and the server that learns the exact sums, with one of four sites lost after masking."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

import client_app.client_app as client
from fedpipe_core.config import ConfigError
from fedpipe_core.protocol import TrainInstruction, TrainReply
from fedpipe_core.secagg import SecAggError
from fedpipe_core.secure_round import Layout, ServerRound, advertise, deal, fixed_point, majority, mask, reveal
from fedpipe_flower.messages import from_record, read_instruction, train_reply
from fedpipe_flower.secure import MASKED, PRIVATE_METRICS, is_stage

NODES = [11, 22, 33, 44]


def test_four_sites_one_lost_after_masking_give_the_exact_sum_of_the_other_three():
    layout = Layout((("m.q", 3), ("m.v", 2)), rank=2)
    rng = np.random.default_rng(0)
    rnd = ServerRound.start(5, majority(4))
    assert rnd.threshold == 3
    secrets, vectors = {}, {}
    for site in NODES:
        secrets[site], c_pk, s_pk = advertise(5, rnd.nonce)
        rnd.admit_keys(site, c_pk, s_pk)
    for site in NODES:
        rnd.admit_shares(site, deal(secrets[site], site, rnd.roster, rnd.threshold))
    rnd.narrow(NODES)
    code = fixed_point(1e6, len(NODES))
    for site in NODES:
        b = {"m.q": rng.normal(size=(3, 2)) * 0.1} | ({"m.v": rng.normal(size=(2, 2))} if site != 33 else {})
        vectors[site] = layout.flatten(b, examples=8 * site, loss=2.5, evaluation=(1.5, 4))
        words = mask(secrets[site], site, vectors[site], code, rnd.dealt[site])
        assert np.abs(code.decode(words) - vectors[site]).min() > 1e3  # one upload alone: noise, nowhere near its vector
        if site != 44:  # site 44 masked its vector and its upload never arrived
            rnd.admit_upload(site, words, layout.size)
    sent, lost = rnd.survivors()
    assert (sent, lost) == ([11, 22, 33], [44])
    reveals = {site: reveal(secrets[site], site, sent, lost) for site in sent[:2] + [33]}
    assert set(reveals[11]["seed"]) == {11, 22, 33} and set(reveals[11]["key"]) == {44}  # never both for one site
    total = code.decode(rnd.unmask(reveals))
    expected = sum(vectors[s] for s in sent)
    np.testing.assert_allclose(total, expected, atol=3 * 2.0**-code.frac_bits)
    sums, weights, tail = layout.unflatten(total)
    assert weights == pytest.approx({"m.q": 8 * 66, "m.v": 8 * 33})  # Σ n_k over the sites that trained each module
    assert tail["examples"] == pytest.approx(8 * 66) and tail["eval-examples"] == pytest.approx(12)
    with pytest.raises(SecAggError, match="2 site\\(s\\) revealed"):
        rnd.unmask({s: reveals[s] for s in sent[:2]})  # fewer than t reveals cannot unmask


def test_a_site_refuses_to_reveal_both_secrets_of_a_site_twice_or_to_a_minority():
    rnd = ServerRound.start(1, 3)
    secrets = {}
    for site in NODES:
        secrets[site], c_pk, s_pk = advertise(1, rnd.nonce)
        rnd.admit_keys(site, c_pk, s_pk)
    dealt = {site: deal(secrets[site], site, rnd.roster, 3) for site in NODES}
    with pytest.raises(SecAggError, match="already dealt"):  # a second sharing of the same secrets, to another roster
        deal(secrets[11], 11, {s: rnd.roster[s] for s in (11, 22)}, 2)
    code = fixed_point(1e6, 4)
    mask(secrets[11], 11, np.zeros(3), code, {d: dealt[d][11] for d in NODES if d != 11})
    with pytest.raises(SecAggError, match="split the roster"):
        reveal(secrets[11], 11, [11, 22, 33, 44], [44])  # 44 named a survivor and lost: both its secrets
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        reveal(secrets[11], 11, [11, 22], [33, 44])
    reveal(secrets[11], 11, [11, 22, 33], [44])
    with pytest.raises(SecAggError, match="already revealed"):
        reveal(secrets[11], 11, [11, 22, 33, 44], [])
    with pytest.raises(SecAggError, match="already sent"):
        mask(secrets[11], 11, np.zeros(3), code, {})
    tampered = dict({d: dealt[d][22] for d in NODES if d != 22})
    tampered[11] = tampered[11][:-1] + bytes([tampered[11][-1] ^ 1])
    mask(secrets[22], 22, np.zeros(3), code, tampered)
    with pytest.raises(SecAggError, match="from site 11 do not authenticate"):
        reveal(secrets[22], 22, [11, 22, 33], [44])
    with pytest.raises(SecAggError, match="outside the range"):
        mask(secrets[33], 33, np.array([2e6]), code, {d: dealt[d][33] for d in NODES if d != 33})


def test_secure_mode_is_fedpipe_only_and_its_settings_are_checked(task):
    with pytest.raises(ConfigError, match="'privacy.mode' = 'secure' needs strategy 'fedpipe'"):
        replace(task.config, privacy_mode="secure", strategy="lora-fedavg")
    with pytest.raises(ConfigError, match="privacy.secagg-threshold"):
        replace(task.config, privacy_mode="secure", privacy_secagg_threshold=1)
    with pytest.raises(ConfigError, match="'privacy.mode'"):
        replace(task.config, privacy_mode="hidden")
    assert replace(task.config, privacy_mode="secure").trains_frozen_a


# --- the apps: real stage handlers and masked replies over a grid that calls the ClientApp -------------------------
class RoutingGrid:
    """Calls the ClientApp's handlers for every message, each node with its own context (its state kept); the TRAIN
    replies of ``drop`` are computed (the node masks) and then lost; ``silent`` nodes never answer a secure stage."""

    def __init__(self, contexts: dict[int, Context], drop: set[int] = frozenset(), silent: set[int] = frozenset()):
        self.contexts, self.drop, self.silent = contexts, drop, silent

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        out = []
        for message in messages:
            node = message.metadata.dst_node_id
            if node in self.silent and is_stage(message):
                continue
            handler = client.train if message.metadata.message_type == "train" else client.query
            reply = handler(message, self.contexts[node])
            if not (handler is client.train and node in self.drop):
                out.append(reply)
        return out


def _fake_round(msg, context, entered, startup):
    """A node's local round without training: B drawn from its id at its planned ranks (zero-padded), its examples
    batch × steps, the reply the real round builds."""
    order, _ = read_instruction(msg)
    top = max(int(r) for r in str(context.run_config["lora.candidate-ranks"]).split(","))
    g = torch.Generator().manual_seed(context.node_id)
    arrays = {}
    for module, rank in sorted(order.ranks.items()):
        b = torch.zeros(context.node_config["out"][module], top)
        b[:, :rank] = torch.randn(b.shape[0], rank, generator=g) * 0.01
        arrays[f"{module}::B"] = b.numpy()
    report = TrainReply(
        num_examples=order.batch_size * order.local_steps,
        train_loss=1.0 + context.node_id / 100,
        steps=order.local_steps,
        state_version=order.state_to,
        importance={m: 0.5 for m in order.ranks},
        eval_loss=2.0 + context.node_id / 100 if order.evaluate else None,
        eval_examples=5 if order.evaluate else 0,
    )
    return train_reply(msg, arrays, report)


def _adapter(task, **overrides):
    from fedpipe_core.strategies import FedPipe
    from server_app.strategy import FlowerAdapter

    config = replace(task.config, min_train_nodes=4, **overrides)
    return FlowerAdapter(FedPipe(replace(task, config=config)))


def _contexts(task, config):
    out = {m: task.shapes[m][0] for m in task.targets}
    mapping = config.to_mapping()
    node = {"memory-gb": 16.0, "tflops": 20.0, "device": "cpu", "out": out}
    return {n: Context(run_id=1, node_id=n, node_config=dict(node), state=RecordDict(), run_config=mapping) for n in NODES}


def _round(adapter, grid):
    messages = list(adapter.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    return messages, replies, adapter.aggregate_train(1, replies)


@pytest.mark.parametrize("drop", [set(), {33}])
def test_the_server_learns_the_exact_average_from_masked_replies_and_survives_a_lost_site(task, monkeypatch, drop):
    monkeypatch.setattr(client, "_local_round", _fake_round)
    secure = _adapter(task, privacy_mode="secure", eval_where="both")
    contexts = _contexts(task, secure.config)
    messages, replies, (arrays, metrics) = _round(secure, RoutingGrid(contexts, drop))
    assert {m.metadata.dst_node_id for m in messages} == set(NODES) and len(replies) == 4 - len(drop)
    for reply in replies:  # one masked vector; no example count, loss or importance in the clear
        sent = from_record(reply.content["arrays"])
        assert set(sent) == {MASKED} and sent[MASKED].dtype == np.uint64
        assert not set(reply.content["metrics"]) & set(PRIVATE_METRICS)
        assert not any(k.startswith("importance::") for k in reply.content["metrics"])
    plain = _adapter(task, privacy_frozen_a=True, eval_where="both")
    plain_messages = list(plain.configure_train(1, ArrayRecord(), ConfigRecord(), RoutingGrid(_contexts(task, plain.config))))
    plain_replies = [_fake_round(m, contexts[m.metadata.dst_node_id], 0, 0) for m in plain_messages]
    plain.aggregate_train(1, [r for r in plain_replies if r.metadata.src_node_id not in drop])
    got, want = secure.strategy.increments[1], plain.strategy.increments[1]
    assert sorted(got) == sorted(want)
    for module in want:
        torch.testing.assert_close(got[module].dense(), want[module].dense(), atol=1e-9, rtol=1e-7)
    s_stats, p_stats = secure.stats[1], plain.stats[1]
    assert s_stats.clients == p_stats.clients == 4 - len(drop) and s_stats.num_examples == p_stats.num_examples
    assert s_stats.train_loss == pytest.approx(p_stats.train_loss, abs=1e-9)
    losses = [2.0 + n / 100 for n in NODES if n not in drop]
    assert s_stats.secure_eval == (pytest.approx(sum(losses) / len(losses), abs=1e-9), 5 * len(losses))
    assert not s_stats.site_eval  # no per-site loss reached the server
    assert all(c.state.config_records.get("secagg") is None for n, c in contexts.items() if n not in drop)  # used once


def test_a_site_silent_in_the_key_stages_is_sent_no_train_message_and_no_bytes_are_counted_for_it(task, monkeypatch):
    monkeypatch.setattr(client, "_local_round", _fake_round)
    adapter = _adapter(task, privacy_mode="secure")
    contexts = _contexts(task, adapter.config)
    _round(adapter, RoutingGrid(contexts))  # round 1: a ΔW to send in round 2
    messages = list(adapter.configure_train(2, ArrayRecord(), ConfigRecord(), RoutingGrid(contexts, silent={44})))
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 22, 33]
    assert adapter.stats[2].bytes_down == sum(m.content["arrays"].count_bytes() for m in messages) > 0


def test_a_round_with_fewer_sites_than_the_threshold_trains_nothing(task, monkeypatch):
    monkeypatch.setattr(client, "_local_round", _fake_round)
    adapter = _adapter(task, privacy_mode="secure", privacy_secagg_threshold=4)
    contexts = _contexts(task, adapter.config)
    _, _, result = _round(adapter, RoutingGrid(contexts, drop={22}))
    assert result == (None, None) and 1 not in adapter.strategy.increments


def test_a_train_message_for_another_round_or_roster_is_refused(task, monkeypatch):
    monkeypatch.setattr(client, "_local_round", _fake_round)
    adapter = _adapter(task, privacy_mode="secure")
    contexts = _contexts(task, adapter.config)
    grid = RoutingGrid(contexts)
    messages = list(adapter.configure_train(1, ArrayRecord(), ConfigRecord(), grid))
    message = messages[0]
    config = dict(message.content["config"])
    message.content["config"] = ConfigRecord({**config, "secagg-sites": [str(n) for n in NODES] + ["99"]})
    reply = client.train(message, contexts[message.metadata.dst_node_id])
    assert reply.has_error() and "roster or threshold" in reply.error.reason
    order = TrainInstruction.from_config(config)
    assert order.server_round == 1
