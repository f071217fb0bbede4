"""Federated evaluation: held-out shares at each site, the sites' evaluation in the TRAIN reply, the final scores,
a server without data or weights, the best round, the model card and the site's own checks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fakes import FakeGrid, client_factors, finished_run, reply
from flwr.app import ArrayRecord, ConfigRecord

from fedpipe_core.codec import encode_factors
from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.protocol import FinalReply, TrainInstruction, TrainReply, UpdateError
from fedpipe_core.task import held_out_shares, partition_data, site_data

ROOT = Path(__file__).parents[1]


def _site_file(tmp_path, groups: int, name: str = "site.csv"):
    path = tmp_path / name
    rows = [f'"name[Place {g}], food[Thai]",Place {g} serves Thai food {k}.' for g in range(groups) for k in range(2)]
    path.write_text("mr,ref\n" + "\n".join(rows) + "\n")
    return path


def test_held_out_shares_are_disjoint_by_group_and_stable(task, tmp_path):
    path = _site_file(tmp_path, 60)
    first, again = site_data(task, str(path)), site_data(task, str(path))
    assert first == again and first.held_out and not first.note  # the same shares in every message
    groups = {name: {e.group for e in getattr(first, name)} for name in ("train", "validation", "test")}
    assert groups["train"].isdisjoint(groups["validation"]) and groups["train"].isdisjoint(groups["test"])
    assert groups["validation"].isdisjoint(groups["test"])
    assert len(first.train) + len(first.validation) + len(first.test) == 120
    assert first.data_hash == hashlib.sha256(path.read_bytes()).hexdigest()  # what sha256sum prints
    shares = partition_data(task, 1, 3)
    assert {e.group for e in shares.validation} <= {e.group for e in task.splits["validation"]}
    assert {e.group for e in shares.test} <= {e.group for e in task.splits["test"]}
    assert {e.group for e in shares.train}.isdisjoint({e.group for e in shares.validation + shares.test})
    assert partition_data(task, 1, 3) == shares and partition_data(task, 0, 3).validation != shares.validation


def test_a_site_with_too_few_groups_trains_on_everything_and_says_so(task, tmp_path):
    path = _site_file(tmp_path, 1)
    shares = site_data(task, str(path))
    assert not shares.held_out and len(shares.train) == 2 and not shares.validation
    assert "1 group(s) leave no validation and test share; training on all of it" in shares.note
    assert str(path) in shares.note
    assert held_out_shares({"train": [], "validation": [], "test": []}, "h", "x").note.startswith("x: 0 group(s)")


def test_the_train_reply_carries_the_evaluation_and_drops_unusable_values():
    report = TrainReply(num_examples=8, train_loss=2.0, eval_loss=1.5, eval_examples=16, weight_norms={"m": 3.0})
    back = TrainReply.from_metrics(report.to_metrics())
    assert (back.eval_loss, back.eval_examples, back.weight_norms) == (1.5, 16, {"m": 3.0})
    for bad in ({"eval-loss": float("nan"), "eval-examples": 4}, {"eval-loss": 1.0, "eval-examples": 0}, {"eval-loss": 1.0}):
        odd = TrainReply.from_metrics({"num-examples": 8, "train-loss": 2.0, **bad})
        assert odd.eval_loss is None and odd.eval_examples == 0  # the update stays usable, the evaluation is dropped
    order = TrainInstruction(3, "fedpipe", {"m": 4}, 8, 6, "fp32", evaluate=True)
    assert TrainInstruction.from_config(order.to_config()).evaluate is True


def test_final_replies_carry_scores_and_counts_only():
    final = FinalReply(2.1, 16, 40, {"federated": {"ppl": 8.0, "bleu": 30.0}, "base": {"ppl": 15.0}}, "abc")
    back = FinalReply.from_records(final.to_metrics(), final.to_config())
    assert back == final
    with pytest.raises(UpdateError, match="unknown model 'peeked'"):
        FinalReply.from_records({"test-examples": 1, "peeked::bleu": 1.0}, {})
    with pytest.raises(UpdateError, match="'federated::ppl' is not a finite number"):
        FinalReply.from_records({"test-examples": 1, "federated::ppl": float("inf")}, {})


def _adapter(task, **overrides):
    from fedpipe_core.strategies import strategy_class
    from server_app.strategy import FlowerAdapter

    config = replace(task.config, **overrides)
    return FlowerAdapter(strategy_class(config.strategy)(replace(task, config=config)))


def _train_round(adapter, nodes, server_round, evaluations, norms=None):
    """One round of ``adapter`` with nodes that reply small random factors, their ``evaluations`` {node: (loss, n)}
    and reported weight ``norms`` {node: {module: norm}}; the messages and what aggregate_train returned."""
    messages = list(adapter.configure_train(server_round, ArrayRecord(), ConfigRecord(), FakeGrid(nodes)))
    replies = []
    for message in messages:
        node = message.metadata.dst_node_id
        ranks = json.loads(message.content["config"]["ranks"])
        arrays = encode_factors(client_factors(adapter.strategy.task, ranks, node))
        loss, count = evaluations.get(node, (None, 0))
        report = TrainReply(8, 2.0, 1, eval_loss=loss, eval_examples=count, weight_norms=(norms or {}).get(node, {}))
        replies.append(reply(node, arrays, report.to_metrics()))
    return messages, adapter.aggregate_train(server_round, replies)


def test_federated_eval_loss_is_the_example_weighted_mean_of_the_sites(task):
    from server_app.strategy import site_mean

    adapter = _adapter(task, eval_where="sites", strategy="lora-fedavg")
    norms = {n: {m: 10.0 for m in task.targets} for n in (1, 2, 3)}
    messages, _ = _train_round(adapter, [1, 2, 3], 1, {1: (2.0, 10), 2: (3.0, 30), 3: (1.0, 0)}, norms=norms)
    assert all(m.content["config"]["evaluate"] for m in messages)  # round 1 asks for the base's evaluation
    stats = adapter.stats[1]
    assert stats.site_eval == {1: (2.0, 10), 2: (3.0, 30)}  # node 3 returned none: left out of the mean
    mean, per_site = site_mean(stats.site_eval)
    assert mean == pytest.approx((2.0 * 10 + 3.0 * 30) / 40)
    assert per_site == {"1": {"loss": 2.0, "examples": 10}, "2": {"loss": 3.0, "examples": 30}}
    every = _adapter(task, eval_where="sites", strategy="lora-fedavg", eval_every=2, num_server_rounds=4)
    messages, _ = _train_round(every, [1, 2], 2, {}, norms=norms)
    assert not any(m.content["config"]["evaluate"] for m in messages)  # round 1's model is not an evaluated one


def test_a_server_without_weights_judges_updates_by_the_sites_reported_norms(task, monkeypatch):
    import fedpipe_core.strategies.base as base

    monkeypatch.setattr(base, "weight_norms", lambda task: pytest.fail("the server read a weight"))
    adapter = _adapter(task, eval_where="sites", strategy="lora-fedavg")
    module = task.targets[0]
    tiny = {n: {m: 1e-6 if m == module else 10.0 for m in task.targets} for n in (1, 2, 3)}
    _, (arrays, _) = _train_round(adapter, [1, 2, 3], 1, {}, norms=tiny)
    assert adapter.stats[1].rejected == 3 and arrays is None  # ‖ΔW‖ > 1 × the median reported ‖W‖ on that module
    assert adapter.strategy.reported_norms[module] == pytest.approx(1e-6)
    fine = _adapter(task, eval_where="sites", strategy="lora-fedavg")
    _train_round(fine, [1, 2, 3], 1, {}, norms={n: {m: 10.0 for m in task.targets} for n in (1, 2, 3)})
    assert fine.stats[1].clients == 3 and fine.stats[1].rejected == 0
    unreported = _adapter(task, eval_where="sites", strategy="lora-fedavg")
    _train_round(unreported, [1, 2], 1, {})
    assert unreported.stats[1].rejected == 2  # nothing to judge an update by: rejected, not trusted


def test_fresh_factors_without_a_model_are_peft_s_own(task):
    from fedpipe_core.lora import attach_lora, fresh_factors, lora_factors

    ranks = {m: 8 for m in task.targets[:6]}
    expected = lora_factors(attach_lora(task.base_model(), ranks, 8.0, 42))
    got = fresh_factors(task.shapes, ranks, 42, scale=1.0)
    assert list(got) == list(expected) and {f.scale for f in expected.values()} == {1.0}  # alpha 8 = rank 8
    assert all(torch.equal(got[m].A, expected[m].A) and torch.equal(got[m].B, expected[m].B) for m in ranks)


def test_a_task_reads_no_data_until_its_splits_are_used(task, monkeypatch):
    import fedpipe_core.task as task_module
    from fedpipe_core.task import load_task

    monkeypatch.setattr(task_module, "load_examples", lambda *a, **k: pytest.fail("the task read a dataset"))
    config = RunConfig(eval_where="sites", data_path="/nowhere/at/all.csv", eval_examples=7)
    planned = load_task(config)
    assert planned.shapes == task.shapes and planned.targets == task.targets
    with pytest.raises(pytest.fail.Exception):
        planned.splits  # noqa: B018


def test_site_summary_weights_each_site_by_its_test_examples():
    from server_app.recorder import site_summary

    final = {
        7: FinalReply(2.0, 8, 10, {"federated": {"bleu": 10.0, "scored_groups": 2.0}, "base": {"bleu": 1.0}}, "h7"),
        9: FinalReply(1.0, 8, 30, {"federated": {"bleu": 30.0, "scored_groups": 3.0}, "base": {"bleu": 3.0}}, "h9"),
        11: FinalReply(None, 0, 0, {}, "h11", "partition 2 of 3: 1 group(s) leave no validation and test share"),
    }
    summary = site_summary(final)
    assert summary["federated"]["bleu"] == pytest.approx((10 * 10 + 30 * 30) / 40)
    assert summary["federated"]["base"]["bleu"] == pytest.approx((1 * 10 + 3 * 30) / 40)
    assert summary["federated"]["scored_groups"] == 5.0 and summary["federated"]["sites"] == 2
    assert summary["sites"]["9"]["bleu"] == 30.0 and summary["sites"]["9"]["base"] == {"bleu": 3.0}
    assert summary["sites"]["11"]["note"].startswith("partition 2 of 3") and summary["sites"]["11"]["data_hash"] == "h11"


def test_best_and_last_rounds_and_the_model_card(task, tmp_path, capsys):
    from fedpipe_core.results import RunWriter, load_run
    from fedpipe_tools.export import main as export

    run, delta = finished_run(task, tmp_path, rank=12)  # above the largest candidate rank, as rounds of rank-8 ΔW add up
    writer = RunWriter.__new__(RunWriter)
    writer.dir = run
    best = {m: d * 0.5 for m, d in delta.items()}
    writer.save_delta(best, best=True)
    writer.note_best(1, 1.75)
    sites = {"5": {"ppl": 9.0, "bleu": 20.0, "examples": 12, "data_hash": "f00d", "base": {"ppl": 15.0, "bleu": 1.0}}}
    (run / "summary.json").write_text(json.dumps({"sites": sites, "federated": {"ppl": 9.0, "examples": 12, "sites": 1}}))
    assert all(torch.equal(load_run(run, "best")[1][m], best[m]) for m in best)
    assert all(torch.equal(load_run(run, "last")[1][m], delta[m]) for m in delta)
    with pytest.raises(ConfigError, match="--which: 'first' is not one of best, last"):
        load_run(run, "first")
    assert export([str(run), "--format", "peft", "--out", str(tmp_path / "out"), "--which", "best"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "round 1 (lowest eval loss, 1.7500)" in card and "SmolLM2-135M-Instruct.Q4_1.gguf" in card
    assert "Meaning representation: {input}\nReference:" in card and "`f00d`" in card
    assert "| site 5 (12 test examples): federated | 9 | 20 |" in card and '"strategy.name": "fedpipe"' in card
    kept = json.loads((tmp_path / "out" / "fedpipe_export.json").read_text())["modules"]
    worst = max(m["rel_error"] for m in kept)
    assert "## Adapter" in card and f"largest relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F = {worst:.3g}" in card
    assert f"the sum of {task.config.num_server_rounds} rounds' averaged updates" in card
    assert all(f"| `{m['module']}` | {m['rank']} | {m['delta_rank']} |" in card for m in kept)
    assert export([str(run), "--format", "peft", "--out", str(tmp_path / "fixed"), "--rank", "1"]) == 0
    assert "`--rank 1` on every module: 1 to 1" in (tmp_path / "fixed" / "README.md").read_text()


def test_generate_takes_its_flags_before_the_inputs(task, tmp_path, capsys):
    from fedpipe_tools.generate import main as generate

    run, _ = finished_run(task, tmp_path)
    assert generate([str(run), "--base", "--max-new-tokens", "2", "name[The Eagle]"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])[0]["input"] == "name[The Eagle]"


def test_fedpipe_check_validates_a_config_and_a_site_file_without_a_run(tmp_path, capsys):
    from fedpipe_tools.check import main as check

    pyproject = str(ROOT / "pyproject.toml")
    site = _site_file(tmp_path, 60)
    assert check([pyproject, "--data", str(site)]) == 0
    out = capsys.readouterr().out
    assert "valid (strategy fedpipe, task e2e, evaluation at server)" in out and "120 e2e examples in 60 groups" in out
    assert check([pyproject, "--run-config", 'eval.where="site"']) == 2
    assert capsys.readouterr().err.strip() == "fedpipe-check: run config 'eval.where': 'site' is not one of server, sites, both"
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    assert check([pyproject, "--data", str(empty)]) == 2
    assert f"{str(empty)!r} is empty" in capsys.readouterr().err
    flat = tmp_path / "run.toml"
    flat.write_text("[train]\nlr = -1.0\n")
    assert check([str(flat)]) == 2 and "run config 'train.lr': must be > 0" in capsys.readouterr().err


def test_meteor_is_left_out_and_said_so_without_java(monkeypatch):
    import fedpipe_core.metrics as metrics

    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    assert "no Java runtime" in metrics.meteor_missing()
    scores = metrics.e2e_scores({"a": "The Eagle is a pub."}, {"a": ["The Eagle is a pub.", "A pub, The Eagle."]})
    assert "meteor" not in scores and scores["bleu"] > 50


def test_an_update_weighs_the_examples_it_processed(task):
    from fedpipe_core.aggregate import ClientUpdate, module_weights
    from fedpipe_core.local import run_client_round

    module = task.targets[0]

    def round_on(count: int):
        return run_client_round(
            task,
            model=task.base_model(),
            examples=task.splits["train"][:count],
            ranks={module: 2},
            initial_factors=None,
            seed=0,
            batch_size=3,
            local_steps=2,
        )

    out = round_on(40)
    assert out.num_examples == 3 * 2 == out.result.examples  # batch × steps done, not the 40 examples it holds
    small = round_on(2)
    assert small.num_examples == 2 * 2  # a batch cannot exceed the data
    updates = [
        ClientUpdate({module: None}, out.num_examples),
        ClientUpdate({module: None}, small.num_examples),
    ]
    assert [w for _, w in module_weights(updates, module)] == pytest.approx([0.6, 0.4])


def test_weight_by_data_weighs_an_update_by_the_node_s_training_share(task):
    from fedpipe_core.strategies import STRATEGIES

    ranks = {task.targets[0]: task.config.lora_rank}
    arrays = encode_factors(client_factors(task, ranks, 1))
    sent = TrainReply(num_examples=6, train_loss=2.0, steps=2, data_examples=40)
    received = TrainReply.from_metrics(sent.to_metrics())
    assert (received.num_examples, received.data_examples) == (6, 40)
    by_examples = STRATEGIES["lora-fedavg"](task)
    assert by_examples.read_update(arrays, received, ranks).num_examples == 6  # the default: examples processed
    by_data = STRATEGIES["lora-fedavg"](replace(task, config=replace(task.config, weight_by="data")))
    assert by_data.read_update(arrays, received, ranks).num_examples == 40
    with pytest.raises(UpdateError, match="does not say the size of the node's training share"):
        by_data.read_update(arrays, replace(received, data_examples=0), ranks)
    with pytest.raises(ConfigError, match="'strategy.weight-by': 'size' is not one of examples, data"):
        RunConfig.from_mapping({"strategy.weight-by": "size"})
    with pytest.raises(ConfigError, match="secure aggregation weights by the examples"):
        RunConfig.from_mapping({"strategy.weight-by": "data", "privacy.mode": "secure"})


def test_a_time_budget_stops_the_run_before_a_round_that_would_overrun(task):
    from server_app.strategy import TimeBudgetSpent

    probe = _adapter(task, strategy="lora-fedavg")
    list(probe.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    round_s = probe.stats[1].sim_time_s
    assert round_s > 0
    adapter = _adapter(task, strategy="lora-fedavg", time_budget_s=2.5 * round_s)
    assert len(list(adapter.configure_train(1, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))) == 2
    adapter.sim_time_s = 2 * round_s  # two rounds done: a third would end at 3 × round_s > 2.5 × round_s
    with pytest.raises(TimeBudgetSpent, match="round 3 would end at .* past the time budget"):
        list(adapter.configure_train(3, ArrayRecord(), ConfigRecord(), FakeGrid([1, 2])))
    assert sorted(adapter.stats) == [1] and adapter.trainable_params() > 0  # the run's figures end with its last round
    with pytest.raises(ConfigError, match="'strategy.time-budget-s': must be >= 0"):
        RunConfig(time_budget_s=-1.0)


def test_a_node_parses_its_data_once_per_run_and_measures_its_profile_once(task, tmp_path, monkeypatch):
    import fedpipe_core.node.round as local_round
    import fedpipe_core.task as task_module
    from fedpipe_core.profile import ClientProfile

    local = replace(task, config=replace(task.config, cache_dir=str(tmp_path)))
    path = _site_file(tmp_path, 60)
    parsed = []
    real = task_module.load_examples
    monkeypatch.setattr(task_module, "load_examples", lambda *a, **k: parsed.append(a) or real(*a, **k))
    first = site_data(local, str(path))
    task_module.site_examples.cache_clear()  # the next message is a fresh process
    assert site_data(local, str(path)) == first and len(parsed) == 1  # parsed once, then read from the node's cache
    path.write_text(path.read_text() + '"name[Another]",Another place.\n')
    task_module.site_examples.cache_clear()
    assert (
        len(site_data(local, str(path)).train + site_data(local, str(path)).validation + site_data(local, str(path)).test) == 121
    )
    assert len(parsed) == 2  # a changed file is parsed again
    measured = []
    monkeypatch.setattr(local_round, "load_task", lambda config: local)
    monkeypatch.setattr(
        local_round, "node_profile", lambda *a: measured.append(1) or ClientProfile(2.0 * 2**30, 1e12, "measured")
    )
    context = SimpleNamespace(run_config={}, node_config={"partition-id": 0, "num-partitions": 2}, run_id=3, node_id=4)
    assert local_round.profile(context) == local_round.profile(context) and len(measured) == 1
    context.node_config["profile-changes"] = "true"
    local_round.profile(context)
    assert len(measured) == 2
