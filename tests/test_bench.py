"""fedpipe-bench: suites, time/bytes to target, the report files, and a real smoke suite."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.metrics import SCORER
from fedpipe_core.results import RESULTS_VERSION
from fedpipe_tools import bench, report
from fedpipe_tools.bench import finished_identities, load_suites, reuse, run_dir, run_suite
from fedpipe_tools.report import Budgets, Point, Target, loss_at, to_target, write_report

ROOT = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_packaged_suites_are_valid_run_configs(tmp_path):
    suites = load_suites()
    assert {"smoke", "e2e", "alpaca", "ablation-importance", "ablation-ranks", "ablation-precision"} <= set(suites)
    assert len(suites["e2e"].runs) == 12 and {s for s, _ in suites["e2e"].runs} == {
        "fedpipe",
        "lora-fedavg",
        "legend",
        "hetlora",
        "flexlora",
        "fedadapter",
        "ft",
    }
    for suite in suites.values():
        for strategy, setting in suite.runs:
            values = suite.config_of(strategy, setting, tmp_path)
            assert values["strategy.name"] == strategy and values["output-dir"] == str(tmp_path)
    for name in [n for n in suites if n != "smoke"]:
        assert len(suites[name].seeds) >= 3 and suites[name].target_eval_loss is not None  # fixed before any run
    assert suites["e2e"].config_of("fedpipe", "hetero", tmp_path, seed=2)["seed"] == 2
    centralized = suites["e2e"].config_of("lora-fedavg", "centralized", tmp_path)  # 1 client x 16 steps = 4 clients x 4
    assert suites["e2e"].supernodes_of("centralized") == 1 and "supernodes" not in centralized
    assert centralized["train.local-steps"] == 4 * suites["e2e"].run_config["train.local-steps"]


def test_malformed_suites_are_refused(tmp_path):
    bad = tmp_path / "suites.yaml"
    bad.write_text("x:\n  strategies: [fedpipe]\n")
    with pytest.raises(ConfigError, match="suite 'x'"):
        load_suites(bad)
    bad.write_text("x:\n  strategies: [fedpipe]\n  settings: {a: {}}\n  runs: [[fedpipe, b]]\n")
    with pytest.raises(ConfigError, match="unknown settings"):
        load_suites(bad)
    bad.write_text("x:\n  strategies: [nope]\n  settings: {a: {}}\n")
    with pytest.raises(ConfigError, match="'strategy.name'"):
        load_suites(bad)["x"].config_of("nope", "a", tmp_path)
    target = "{metric: %s, setting: a, peer: %s, op: '>=', bound: 1}"
    bad.write_text("x:\n  strategies: [fedpipe, legend]\n  settings: {a: {}}\n  targets: [" + target % ("blue", "legend") + "]\n")
    with pytest.raises(ConfigError, match="target metric 'blue' is not a report figure"):
        load_suites(bad)
    bad.write_text("x:\n  strategies: [fedpipe]\n  settings: {a: {}}\n  targets: [" + target % ("bleu", "legend") + "]\n")
    with pytest.raises(ConfigError, match="compares rows the suite does not run"):
        load_suites(bad)


def test_time_and_bytes_to_target_interpolate_the_crossing():
    points = [Point(0.0, 0.0, 0, 3.0), Point(1.0, 10.0, 8, 2.5), Point(3.0, 30.0, 16, 1.5)]
    assert to_target(points, 2.0) == pytest.approx((2.0, 20.0))
    assert to_target(points, 2.5) == pytest.approx((1.0, 10.0))
    assert to_target(points, 3.5) == (0.0, 0.0)
    assert to_target(points, 1.0) == (None, None)
    assert loss_at(points, "time", 2.0) == pytest.approx(2.0) and loss_at(points, "steps", 4) == pytest.approx(2.75)
    assert loss_at(points, "time", 3.5) is None and loss_at(points, "steps", 0) is None


def _fake_run(
    directory: Path, losses: list[float], sim: list[float], mb: float, bleu: float, steps: int = 8, examples: int | None = None
) -> Path:
    """A finished run's records; ``examples`` per round when given (records from before metrics.jsonl counted them lack
    the key)."""
    run = directory / "1"
    run.mkdir(parents=True)
    rows = [
        {
            "round": r,
            "eval_loss": loss,
            "sim_time_s": t,
            "bytes_up": 0 if r == 0 else mb * 1e6 / 2,
            "bytes_down": 0 if r == 0 else mb * 1e6 / 2,
            "clients": 0 if r == 0 else 2,
            "client_steps": 0 if r == 0 else steps,
            **({} if examples is None else {"examples": 0 if r == 0 else examples}),
        }
        for r, (loss, t) in enumerate(zip(losses, sim))
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(
        json.dumps(
            {
                "bleu": bleu,
                **({"scorer": SCORER} if bleu != 1.0 else {}),  # the barely-training row: scored before the scorer
                "results_version": RESULTS_VERSION,
                "ppl": 5.0,
                "trainable_params": 100.0,
                "total_bytes_up": 1,
                "total_bytes_down": 2,
                "wall_s": 9.0,
                "sim_time_s": sim[-1],
            }
        )
    )
    plans = [
        {"round": r, "node_id": n, "profile": {"flops": 1e13 * (n + 1)}, "ranks": {"q": 2 * (n + 1)}}
        for r in (1, 2)
        for n in (0, 1)
    ]
    (run / "plans.jsonl").write_text("".join(json.dumps(p) + "\n" for p in plans))
    return run


def test_the_loss_plot_names_a_row_that_trained_nothing_instead_of_an_empty_curve(tmp_path, monkeypatch):
    import matplotlib.figure

    drawn: dict[str, object] = {}

    def keep(figure, path, **_):
        axes = figure.axes[0]
        drawn.update(title=axes.get_title(), labels=[t.get_text() for t in axes.get_legend().get_texts()], lines=axes.lines)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    curve = [Point(time=0.0, bytes=0.0, steps=0, loss=3.0), Point(time=1.0, bytes=1e6, steps=8, loss=2.0)]
    report.plot_loss("demo", {("fedpipe", "hetero"): {"_curve": curve}, ("ft", "hetero"): {"_curve": []}}, tmp_path / "x.png")
    assert drawn["labels"] == ["fedpipe / hetero"]
    assert [list(line.get_ydata()) for line in drawn["lines"]] == [[3.0, 2.0]]
    assert drawn["title"].endswith("N/A (trained nothing, see the table): ft / hetero")


def _two_runs(tmp_path: Path, steps: tuple[int, int] = (8, 8)) -> dict[tuple[str, str], Path]:
    """FedPipe reaching eval loss 1.5 by simulated second 2 and LoRA-FedAvg reaching 2.0 by second 6, in ``hetero``."""
    return {
        ("fedpipe", "hetero"): _fake_run(tmp_path / "a", [3.0, 2.0, 1.5], [0.0, 1.0, 2.0], 4.0, 30.0, steps=steps[0]),
        ("lora-fedavg", "hetero"): _fake_run(tmp_path / "b", [3.0, 2.5, 2.0], [0.0, 3.0, 6.0], 2.0, 20.0, steps=steps[1]),
    }


def test_report_files_and_ratios_from_finished_runs(tmp_path):
    runs = {
        **_two_runs(tmp_path),
        ("fedadapter", "hetero"): _fake_run(tmp_path / "c", [3.0, 2.9, 2.8], [0.0, 3.0, 6.0], 1.0, 1.0),  # barely trains
    }
    out = tmp_path / "report"
    rows = write_report("demo", runs, out)
    # target: the highest final eval loss among runs with >= half the best loss reduction (1.5) = 2.0;
    # fedadapter (reduction 0.2) does not set it and never reaches it
    assert rows["fedadapter/hetero"]["sim_time_to_target_s"] is None
    assert rows["fedpipe/hetero"]["target_eval_loss"] == 2.0
    assert rows["fedpipe/hetero"]["sim_time_to_target_s"] == pytest.approx(1.0)
    assert rows["lora-fedavg/hetero"]["sim_time_to_target_s"] == pytest.approx(6.0)
    assert rows["lora-fedavg/hetero"]["time_to_target_vs_fedpipe"] == pytest.approx(6.0)
    assert rows["lora-fedavg/hetero"]["bytes_to_target_vs_fedpipe"] == pytest.approx(4e6 / 4e6)
    assert json.loads((out / "results.json").read_text())["demo"]["fedpipe/hetero"]["bleu"] == 30.0
    table = (out / "demo.md").read_text()
    assert "| lora-fedavg | hetero | 1 | — | 20.00 |" in table and "6.00" in table
    assert "| fedadapter‡ | hetero |" in table and "‡ scored before the official-script scorer" in table
    assert "- fedadapter: bottleneck adapters" in table and "- lora-fedavg:" not in table  # what a method leaves out
    for name in ("demo-eval-loss-vs-sim-time.png", "demo-bytes-per-round.png", "runs/demo--fedpipe--hetero/plans.png"):
        assert (out / name).stat().st_size > 5000
    assert "![plans](plans.png)" in (out / "runs" / "demo--lora-fedavg--hetero" / "report.md").read_text()
    write_report("other", {("fedpipe", "x"): runs[("fedpipe", "hetero")]}, out, target=2.5)
    merged = json.loads((out / "results.json").read_text())
    assert set(merged) == {"demo", "other"} and merged["other"]["fedpipe/x"]["sim_time_to_target_s"] == pytest.approx(0.5)


@pytest.mark.slow
def test_smoke_suite_runs_for_real_writes_the_report_and_resumes(tmp_path):
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    cmd = ["fedpipe-bench", "--suite", "smoke", "--out", str(tmp_path / "bench"), "--app", str(ROOT)]
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        results = json.loads((tmp_path / "bench" / "report" / "results.json").read_text())["smoke"]
        assert set(results) == {"fedpipe/hetero", "lora-fedavg/hetero"}
        for row in results.values():
            assert row["bytes_up"] > 0 and row["bytes_down"] >= 0 and row["trainable_params"] > 0
            assert row["clients_per_round"] == [2] and row["bleu"] is not None
            assert 0 < row["final_eval_loss"] < row["base_eval_loss"] and row["wall_s"] > 0  # must learn
        assert (tmp_path / "bench" / "report" / "smoke.md").is_file()
        assert (tmp_path / "bench" / "report" / "runs" / "smoke--fedpipe--hetero" / "plans.png").is_file()
        again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0 and "2 already finished" in again.stdout and "done in" not in again.stdout
    finally:
        subprocess.run(["pkill", "-f", str(tmp_path / "flwr-home")], check=False)


def test_a_row_over_seeds_reports_mean_and_standard_deviation(tmp_path):
    seeds = [
        _fake_run(tmp_path / "s1", [3.0, 2.0, 1.5], [0.0, 1.0, 2.0], 4.0, 30.0),
        _fake_run(tmp_path / "s2", [3.0, 2.5, 1.9], [0.0, 1.0, 2.0], 4.0, 34.0),
        _fake_run(tmp_path / "s3", [3.0, 2.9, 2.8], [0.0, 1.0, 2.0], 4.0, 26.0),  # never reaches the target
    ]
    row = write_report("seeds", {("fedpipe", "hetero"): seeds}, tmp_path / "report", target=2.0)["fedpipe/hetero"]
    assert row["seeds"] == 3 and row["bleu"] == pytest.approx(30.0) and row["bleu_std"] == pytest.approx(4.0)
    assert row["final_eval_loss"] == pytest.approx((1.5 + 1.9 + 2.8) / 3)
    assert row["reached_target"] == 2  # time to target: mean over the two seeds that reached 2.0 (at 1.0 s and 1.83 s)
    assert row["sim_time_to_target_s"] == pytest.approx((1.0 + 1.0 + 0.5 / 0.6) / 2)
    assert "| fedpipe | hetero | 3 | — | 30.00 ± 4.00 |" in (tmp_path / "report" / "seeds.md").read_text()


def test_rows_are_read_against_the_centralized_reference(tmp_path):
    runs = {
        ("fedpipe", "hetero"): _fake_run(tmp_path / "a", [3.0, 2.0, 1.6], [0.0, 1.0, 2.0], 4.0, 30.0),
        ("lora-fedavg", "centralized"): _fake_run(tmp_path / "c", [3.0, 1.8, 1.4], [0.0, 1.0, 2.0], 1.0, 36.0),
    }
    rows = write_report("ref", runs, tmp_path / "report", target=2.0)
    assert rows["fedpipe/hetero"]["final_eval_loss_gap_to_centralized"] == pytest.approx(0.2)
    assert rows["fedpipe/hetero"]["bleu_gap_to_centralized"] == pytest.approx(-6.0)
    assert "- fedpipe / hetero: 0.2000" in (tmp_path / "report" / "ref.md").read_text()


def test_a_baseline_that_trained_nothing_is_not_applicable_never_base_scores(tmp_path):
    ft = _fake_run(tmp_path / "ft", [3.0, 3.0, 3.0], [0.0, 1.0, 2.0], 0.0, 0.5)
    summary = json.loads((ft / "summary.json").read_text())
    (ft / "summary.json").write_text(json.dumps({**summary, "total_bytes_up": 0}))
    plans = [
        {"round": 1, "node_id": n, "profile": {"flops": 1e13}, "ranks": {}, "left_out": "memory 1.5 GiB < 2 GiB"} for n in (0, 1)
    ]
    (ft / "plans.jsonl").write_text("".join(json.dumps(p) + "\n" for p in plans))
    runs = {("fedpipe", "hetero"): _fake_run(tmp_path / "a", [3.0, 2.0, 1.5], [0.0, 1.0, 2.0], 4.0, 30.0), ("ft", "hetero"): ft}
    rows = write_report("na", runs, tmp_path / "report", target=2.0)
    assert rows["ft/hetero"]["not_applicable"] == "no client fits: memory 1.5 GiB < 2 GiB"
    assert rows["ft/hetero"]["bleu"] is None and rows["ft/hetero"]["final_eval_loss"] is None
    assert "| ft | hetero | 1 | — | N/A (no client fits: memory 1.5 GiB < 2 GiB) |" in (tmp_path / "report" / "na.md").read_text()


def test_quality_at_equal_simulated_time_and_equal_client_steps(tmp_path):
    runs = _two_runs(tmp_path, steps=(8, 4))
    rows = write_report("equal", runs, tmp_path / "report", target=2.0)
    fedpipe, lora = rows["fedpipe/hetero"], rows["lora-fedavg/hetero"]
    assert fedpipe["equal_time_s"] == lora["equal_time_s"] == 2.0  # where fedpipe, the shorter run, ended
    assert fedpipe["eval_loss_at_equal_time"] == pytest.approx(1.5)
    assert lora["eval_loss_at_equal_time"] == pytest.approx(3.0 - 2.0 / 3.0 * 0.5)
    assert fedpipe["equal_steps"] == 8  # lora-fedavg's 2 rounds x 4 steps
    assert fedpipe["eval_loss_at_equal_steps"] == pytest.approx(2.0) and lora["eval_loss_at_equal_steps"] == pytest.approx(2.0)
    table = (tmp_path / "report" / "equal.md").read_text()
    assert "equal cost = where its shortest run ended: 2.0000 simulated s, 8 client steps" in table
    assert "| lora-fedavg | hetero | 1 | — | 20.00 | — | — | — | — | 5.00 | 2.0000 | 2.6667 | 2.0000 |" in table


def test_targets_fixed_before_the_runs_are_judged_on_the_means(tmp_path):
    runs = _two_runs(tmp_path)
    goals = tuple(
        Target.parse({"metric": m, "setting": "hetero", "peer": peer, "op": op, "bound": bound})
        for m, peer, op, bound in (
            ("bleu", "lora-fedavg", ">=", 1.0),  # 30 / 20 = 1.5: met
            ("sim_time_to_target_s", "lora-fedavg", "<=", 0.1),  # 1.0 / 6.0 = 0.167: not met
            ("sim_time_to_target_s", "legend", "<", 1.0),  # no legend run: pending
        )
    )
    write_report("goals", runs, tmp_path / "report", target=2.0, goals=goals)
    judged = json.loads((tmp_path / "report" / "goals-targets.json").read_text())
    assert [v["met"] for v in judged] == [True, False, None]
    assert judged[0]["value"] == pytest.approx(1.5) and judged[1]["value"] == pytest.approx(1.0 / 6.0)
    assert "no finished run of legend / hetero" in judged[2]["why"]
    table = (tmp_path / "report" / "goals.md").read_text()
    assert "- fedpipe ÷ lora-fedavg bleu in hetero >= 1: 1.50 → **met**" in table
    assert "- fedpipe ÷ lora-fedavg sim_time_to_target_s in hetero <= 0.1: 0.17 → **not met**" in table
    assert "- fedpipe ÷ legend sim_time_to_target_s in hetero < 1: — → pending" in table


def test_a_target_on_another_setting_reads_the_difference_of_the_two_rows(tmp_path):
    runs = {
        ("fedpipe", "importance"): _fake_run(tmp_path / "a", [3.0, 2.0, 1.50], [0.0, 1.0, 2.0], 4.0, 30.0),
        ("fedpipe", "random"): _fake_run(tmp_path / "b", [3.0, 2.0, 1.51], [0.0, 1.0, 2.0], 4.0, 30.0),
    }
    spec = {"metric": "final_eval_loss", "setting": "importance", "peer": "fedpipe/random", "op": "<=", "bound": -0.02}
    spec["compare"] = "difference"
    goals = (Target.parse(spec), Target.parse({**spec, "peer": "fedpipe/exact"}))
    write_report("bind", runs, tmp_path / "report", target=2.0, goals=goals)
    judged = json.loads((tmp_path / "report" / "bind-targets.json").read_text())
    assert judged[0]["value"] == pytest.approx(-0.01) and judged[0]["met"] is False
    assert judged[1]["met"] is None and "no finished run of fedpipe / exact" in judged[1]["why"]
    table = (tmp_path / "report" / "bind.md").read_text()
    assert "- fedpipe/importance − fedpipe/random final_eval_loss <= -0.02: -0.0100 → **not met**" in table
    with pytest.raises(ValueError, match="compare 'product'"):
        Target.parse({**spec, "compare": "product"})


def _suite(tmp_path: Path, text: str, name: str) -> tuple[bench.Suite, Path]:
    """Suite ``name`` of a suites.yaml of ``text`` written under ``tmp_path``, and the benchmark's output there."""
    path = tmp_path / "suites.yaml"
    path.write_text(text)
    return load_suites(path)[name], tmp_path / "bench"


def test_every_row_is_read_at_budgets_of_the_reference_s_time_and_examples_at_round_ends(tmp_path):
    # the reference (LoRA-FedAvg) takes 1 simulated s and 32 examples a round; after 2 rounds: 2 s, 64 examples
    reference = _fake_run(tmp_path / "r", [3.0, 2.5, 2.2, 2.0, 1.9], [0.0, 1.0, 2.0, 3.0, 4.0], 2.0, 20.0, examples=32)
    fast = [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8, 2.1, 2.4]  # FedPipe: 0.3 s and 24 examples a round, 8 rounds
    runs = {
        ("lora-fedavg", "b"): reference,
        ("fedpipe", "b"): _fake_run(tmp_path / "f", [3.0 - 0.15 * r for r in range(9)], fast, 1.0, 30.0, examples=24),
        ("ft", "b"): _fake_run(tmp_path / "o", [3.0, 2.9], [0.0, 1.0], 1.0, 5.0),  # no examples recorded, 1 round
    }
    budgets = Budgets.parse({"reference": "lora-fedavg/b", "rounds": 2, "factors": [0.5, 1, 2]})
    spec = {"metric": "eval_loss_at_time_1x", "setting": "b", "peer": "lora-fedavg", "op": "<=", "bound": 1.0}
    rows = write_report("bud", runs, tmp_path / "report", target=2.0, goals=(Target.parse(spec),), budgets=budgets)
    mine, ref, old = rows["fedpipe/b"], rows["lora-fedavg/b"], rows["ft/b"]
    assert mine["budgets"] == pytest.approx(
        {"time_0.5x": 1.0, "time_1x": 2.0, "time_2x": 4.0, **{"examples_0.5x": 32.0, "examples_1x": 64.0, "examples_2x": 128.0}}
    )
    # at 1 s FedPipe's last round end within it is round 3 (0.9 s), not an interpolation toward round 4 (1.2 s)
    assert mine["round_at_time_0.5x"] == 3 and mine["eval_loss_at_time_0.5x"] == pytest.approx(2.55)
    assert mine["round_at_time_1x"] == 6 and mine["eval_loss_at_time_1x"] == pytest.approx(2.1)
    assert mine["round_at_examples_1x"] == 2 and mine["eval_loss_at_examples_1x"] == pytest.approx(2.7)  # 48 <= 64 < 72
    assert ref["round_at_time_1x"] == 2 and ref["eval_loss_at_time_2x"] == pytest.approx(1.9)
    # FedPipe's 8 rounds end at 2.4 s: at the 4 s budget it ran out of rounds, and says so; at 2 s it did not
    assert mine["short_at_time_2x"] == 1 and mine["short_at_time_1x"] == 0 and ref["short_at_time_2x"] == 0
    assert old["eval_loss_at_time_1x"] == pytest.approx(2.9) and old["eval_loss_at_examples_1x"] is None
    judged = json.loads((tmp_path / "report" / "bud-targets.json").read_text())
    assert judged[0]["value"] == pytest.approx(2.1 / 2.2) and judged[0]["met"] is True
    table = (tmp_path / "report" / "bud.md").read_text()
    assert "| strategy | setting | seeds | 0.5x = 1.0000 | 1x = 2.0000 | 2x = 4.0000 |" in table
    assert "| fedpipe | b | 1 | 2.5500 (round 3) | 2.1000 (round 6) | 1.8000 (round 8)* |" in table
    assert "| strategy | setting | seeds | 0.5x = 32 | 1x = 64 | 2x = 128 |" in table


def test_budgets_wait_for_the_reference_and_a_bad_spec_is_refused(tmp_path):
    runs = {("fedpipe", "b"): _fake_run(tmp_path / "f", [3.0, 2.0], [0.0, 1.0], 1.0, 30.0)}
    budgets = Budgets.parse({"reference": "lora-fedavg/b", "rounds": 4, "factors": [1]})
    rows = write_report("bud", runs, tmp_path / "report", target=2.0, budgets=budgets)
    assert rows["fedpipe/b"]["budgets"] == {} and "eval_loss_at_time_1x" not in rows["fedpipe/b"]
    assert "Pending: no run of `lora-fedavg/b` has reached round 4 yet." in (tmp_path / "report" / "bud.md").read_text()
    with pytest.raises(ValueError, match="lacks \\['factors'\\]"):
        Budgets.parse({"reference": "lora-fedavg/b", "rounds": 4})
    with pytest.raises(ValueError, match="needs reference 'strategy/setting'"):
        Budgets.parse({"reference": "lora-fedavg", "rounds": 4, "factors": [1]})
    bad = tmp_path / "suites.yaml"
    bad.write_text(
        "x:\n  strategies: [fedpipe]\n  settings: {a: {}}\n  budgets: {reference: legend/a, rounds: 1, factors: [1]}\n"
    )
    with pytest.raises(ConfigError, match="budgets' reference legend/a is not a row it runs"):
        load_suites(bad)
    bad.write_text("x:\n  strategies: [fedpipe]\n  settings: {a: {}}\n  lr-from: nowhere\n")
    with pytest.raises(ConfigError, match="lr-from names no suite of this file \\('nowhere'\\)"):
        load_suites(bad)


def test_lr_from_runs_each_row_at_the_rate_another_suite_chose(tmp_path, monkeypatch):
    suite, out = _suite(
        tmp_path,
        "grid:\n  strategies: [fedpipe]\n  lr-grid: [0.001, 0.01]\n  settings: {a: {}}\n"
        "longer:\n  strategies: [fedpipe]\n  lr-from: grid\n  seeds: [1]\n  settings: {a: {num-server-rounds: 8}}\n",
        "longer",
    )
    with pytest.raises(ConfigError, match="lr-from 'grid' needs .*grid/lr.json \\(run that suite's lr trials first\\)"):
        run_suite(suite, out, app=tmp_path)
    (out / "grid").mkdir(parents=True)
    (out / "grid" / "lr.json").write_text(json.dumps({"rule": "r", "fedpipe/a": {"chosen": None}}))
    with pytest.raises(ConfigError, match="has chosen no rate for fedpipe/a"):
        run_suite(suite, out, app=tmp_path)
    (out / "grid" / "lr.json").write_text(json.dumps({"rule": "r", "fedpipe/a": {"chosen": 0.01}}))
    ran = []

    def fake(suite, strategy, setting, seed, suite_dir, app, timeout_s, lr=None, trial=False):
        ran.append((strategy, seed, lr, trial))
        run = _fake_run(run_dir(suite_dir, strategy, setting, seed), [3.0, 2.0], [0.0, 1.0], 4.0, 30.0)
        (run / "config.json").write_text(json.dumps({**suite.config_of(strategy, setting, run.parent, seed, lr)}))
        return True, ""

    monkeypatch.setattr(bench, "run_one", fake)
    run_suite(suite, out, app=tmp_path)
    assert ran == [("fedpipe", 1, 0.01, False)]
    assert json.loads((out / "longer" / "lr.json").read_text())["fedpipe/a"]["chosen"] == 0.01
    assert "| fedpipe | a | 1 | 0.01 |" in (out / "report" / "longer.md").read_text()


def test_a_configuration_that_already_ran_in_another_suite_is_linked_not_run_again(tmp_path):
    suites = tmp_path / "suites.yaml"
    row = "  strategies: [fedpipe]\n  supernodes: 2\n  seeds: [1]\n  run-config: {train.local-steps: 4}\n"
    suites.write_text(
        "main:\n" + row + "  settings: {hetero: {}}\n"
        "ablation:\n" + row + "  settings: {same: {train.lr: 0.001}, other: {train.lr: 0.003}}\n  runs: [[fedpipe, same]]\n"
    )
    loaded, out = load_suites(suites), tmp_path / "bench"
    first = _fake_run(run_dir(out / "main", "fedpipe", "hetero", 1), [3.0, 2.0, 1.5], [0.0, 1.0, 2.0], 4.0, 30.0)
    config = RunConfig.from_mapping(loaded["main"].config_of("fedpipe", "hetero", first.parent, 1)).to_mapping()
    del config["data.prompt-field"]  # a run from before that option: it ran at the default
    (first / "config.json").write_text(json.dumps({**config, "run-id": 1, "checkpoint": "/x"}))
    known = finished_identities(out)
    ablation = loaded["ablation"]
    assert reuse(ablation, "fedpipe", "other", 1, out / "ablation", known) is None  # another lr: it runs
    assert reuse(replace(ablation, supernodes=3), "fedpipe", "same", 1, out / "ablation", known) is None  # other clients
    run_suite(ablation, out, app=tmp_path)  # would fail on flwr run if it ran anything
    linked = run_dir(out / "ablation", "fedpipe", "same", 1)
    assert (linked / "1").resolve() == first.resolve() and not os.readlink(linked / "1").startswith("/")  # relative
    assert (linked / json.loads((linked / "reused.json").read_text())["reused"]).resolve() == first.resolve()
    row = json.loads((out / "report" / "results.json").read_text())["ablation"]["fedpipe/same"]
    assert row["bleu"] == 30.0 and row["run_dirs"] == ["ablation/runs/fedpipe--same--seed1/1"]  # relative to the output
    assert set(finished_identities(out).values()) == {first}  # a link is never itself a source
    summary = json.loads((first / "summary.json").read_text())
    (first / "summary.json").write_text(json.dumps({**summary, "results_version": RESULTS_VERSION - 1}))
    assert finished_identities(out) == {}  # a run of code that gave other numbers is never reused


def test_a_row_whose_runs_are_gone_is_carried_from_the_report_and_not_run_again(tmp_path, monkeypatch):
    suite, out = _suite(
        tmp_path,
        "main:\n  strategies: [fedpipe, lora-fedavg]\n  supernodes: 2\n  seeds: [1, 2]\n  target-eval-loss: 2.0\n"
        "  settings: {hetero: {}}\n",
        "main",
    )
    started: list[tuple[str, str, int]] = []

    def record(suite, strategy, setting, seed, suite_dir, app, timeout_s, lr=None, trial=False):
        started.append((strategy, setting, seed))
        return False, "not run"

    monkeypatch.setattr(bench, "run_one", record)
    for seed in (1, 2):
        _fake_run(run_dir(out / "main", "fedpipe", "hetero", seed), [3.0, 2.0, 1.5], [0.0, 1.0, 2.0], 4.0, 30.0)
        _fake_run(run_dir(out / "main", "lora-fedavg", "hetero", seed), [3.0, 2.5, 2.0], [0.0, 3.0, 6.0], 2.0, 20.0)
    run_suite(suite, out, app=tmp_path)
    results = out / "report" / "results.json"
    before = json.loads(results.read_text())["main"]["lora-fedavg/hetero"]
    assert before["eval_loss_at_equal_time"] == pytest.approx(2.5 + 0.5 / 3) and before["time_to_target_vs_fedpipe"] == 6.0
    shutil.rmtree(out / "main" / "runs")  # the run records are lost; FedPipe runs again, ending sooner
    for seed in (1, 2):
        _fake_run(run_dir(out / "main", "fedpipe", "hetero", seed), [3.0, 2.0, 1.5], [0.0, 0.5, 1.0], 4.0, 30.0)
    run_suite(suite, out, app=tmp_path)
    assert started == []  # the report holds every seed of lora-fedavg: carried, not run
    row = json.loads(results.read_text())["main"]["lora-fedavg/hetero"]
    assert row["carried"] is True and row["bleu"] == 20.0 and row["seeds"] == 2
    assert row["time_to_target_vs_fedpipe"] == pytest.approx(12.0)  # recomputed against the fresh FedPipe row
    assert row["eval_loss_at_equal_time"] is None  # the equal time moved to 1.0 s: not re-readable without its curve
    assert row["eval_loss_at_equal_steps"] == before["eval_loss_at_equal_steps"]  # equal steps did not move
    table = (out / "report" / "main.md").read_text()
    assert "| lora-fedavg | hetero | 2† |" in table and "| fedpipe | hetero | 2 |" in table and "† carried" in table
    stored = json.loads(results.read_text())
    stored["main"]["lora-fedavg/hetero"]["seeds"] = 1  # a row with a seed to go is run, every seed of it
    results.write_text(json.dumps(stored))
    run_suite(suite, out, app=tmp_path)
    assert started == [("lora-fedavg", "hetero", 1), ("lora-fedavg", "hetero", 2)]


def test_ablation_suites_are_gathered_in_one_table_with_the_largest_client_peak(tmp_path):
    run = _fake_run(tmp_path / "a", [3.0, 2.0, 1.5], [0.0, 1.0, 2.0], 4.0, 30.0)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    memory = {"7": {"measured_peak_bytes": 3e8}, "8": {"measured_peak_bytes": 5e8}}
    rows[1]["node_memory"], rows[2]["node_memory"] = memory, {"7": {"measured_peak_bytes": 4e8}}
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    other = _fake_run(tmp_path / "b", [3.0, 2.5, 2.0], [0.0, 3.0, 6.0], 2.0, 20.0)
    out = tmp_path / "report"
    write_report("e2e", {("fedpipe", "hetero"): run}, out, target=2.0)
    assert not (out / "ablations.md").exists()  # no ablation suite yet
    write_report("ablation-precision", {("fedpipe", "nf4"): run}, out, target=2.0)
    write_report("ablation-lr", {("lora-fedavg", "lr-3e-3"): other}, out, target=2.0)
    table = (out / "ablations.md").read_text()
    assert "| lr | lora-fedavg | lr-3e-3 | 1 | 20.00 | 2.0000 |" in table
    assert "| precision | fedpipe | nf4 | 1 | 30.00 | 1.5000 |" in table and table.count("\n| ") == 3  # header + 2 rows
    assert json.loads((out / "results.json").read_text())["ablation-precision"]["fedpipe/nf4"]["peak_memory_bytes"] == 5e8
    (precision,) = [line for line in table.splitlines() if line.startswith("| precision ")]
    assert precision.endswith("| 500 |")  # MB, the largest client in any round; "—" where no peak was recorded


def test_seeds_runs_a_subset_now_and_refuses_a_seed_the_suite_lacks(tmp_path, monkeypatch, capsys):
    suites = tmp_path / "suites.yaml"
    suites.write_text("s:\n  strategies: [fedpipe, lora-fedavg]\n  seeds: [1, 2, 3]\n  settings: {hetero: {}}\n")
    out = tmp_path / "bench"
    _fake_run(run_dir(out / "s", "fedpipe", "hetero", 1), [3.0, 2.0], [0.0, 1.0], 4.0, 30.0)
    ran: list[tuple[str, str, int]] = []

    def record(suite, strategy, setting, seed, suite_dir, app, timeout_s, lr=None, trial=False):
        ran.append((strategy, setting, seed))
        return False, "not run"

    monkeypatch.setattr(bench, "run_one", record)
    (tmp_path / "pyproject.toml").write_text("")
    args = ["--suite", "s", "--suites-file", str(suites), "--out", str(out), "--app", str(tmp_path)]
    assert bench.main([*args, "--seeds", "1,2"]) == 1  # the runs it attempted "failed" (not run)
    assert ran == [("fedpipe", "hetero", 2), ("lora-fedavg", "hetero", 1), ("lora-fedavg", "hetero", 2)]
    assert json.loads((out / "report" / "results.json").read_text())["s"]["fedpipe/hetero"]["seeds"] == 1
    ran.clear()
    for bad in ("4", "1,x"):
        assert bench.main([*args, "--seeds", bad]) == 2
        assert "--seeds" in capsys.readouterr().out
    assert ran == []


def test_an_lr_grid_picks_each_row_s_rate_on_the_first_seed_and_runs_the_rest_at_it(tmp_path, monkeypatch):
    suite, out = _suite(
        tmp_path,
        "s:\n  strategies: [fedpipe, lora-fedavg]\n  seeds: [1, 2]\n  lr-grid: [0.001, 0.003, 0.01]\n"
        "  run-config: {train.local-steps: 4}\n  settings: {hetero: {}}\n",
        "s",
    )
    best = {"fedpipe": 0.003, "lora-fedavg": 0.01}
    ran: list[tuple[str, int, float | None, bool]] = []

    def fake(suite, strategy, setting, seed, suite_dir, app, timeout_s, lr=None, trial=False):
        ran.append((strategy, seed, lr, trial))
        directory = run_dir(suite_dir, strategy, setting, seed, lr if trial else None)
        shutil.rmtree(directory, ignore_errors=True)  # as run_one does with a partial or stale run
        loss = 1.5 + abs(math.log10(lr / best[strategy]))  # lowest at the strategy's best rate
        run = _fake_run(directory, [3.0, loss], [0.0, 1.0], 4.0, 30.0)
        config = {**suite.config_of(strategy, setting, run.parent, seed, lr), "run-id": 1}
        (run / "config.json").write_text(json.dumps(config))
        (run / "plans.jsonl").write_text(json.dumps({"round": 1, "node_id": 1}) + "\n" + json.dumps({"round": 1, "node_id": 2}))
        return True, ""

    monkeypatch.setattr(bench, "run_one", fake)
    (out / "s").mkdir(parents=True)  # a row a narrower suites file ran earlier keeps its choice
    (out / "s" / "lr.json").write_text(json.dumps({"rule": "r", "legend/hetero": {"chosen": 0.01, "final_eval_loss": {}}}))
    stale = _fake_run(run_dir(out / "s", "lora-fedavg", "hetero", 2), [3.0, 1.0], [0.0, 1.0], 4.0, 30.0)
    (stale / "config.json").write_text(json.dumps({"train.lr": 0.001}))  # from before the grid: another rate
    elsewhere = _fake_run(run_dir(out / "ablation", "fedpipe", "x", 1), [3.0, 1.5 + math.log10(3)], [0.0, 1.0], 4.0, 30.0)
    (elsewhere / "config.json").write_text(json.dumps(suite.config_of("fedpipe", "hetero", elsewhere.parent, 1, 0.001)))
    (elsewhere / "plans.jsonl").write_text(json.dumps({"round": 1, "node_id": 1}) + "\n" + json.dumps({"round": 1, "node_id": 2}))
    run_suite(suite, out, app=tmp_path)
    trials = [(s, seed, lr) for s, seed, lr, trial in ran if trial]
    # fedpipe's trial at 1e-3 already ran in another suite (the same configuration): linked, not run again
    assert trials == [("fedpipe", 1, 0.003), ("fedpipe", 1, 0.01)] + [("lora-fedavg", 1, lr) for lr in (0.001, 0.003, 0.01)]
    assert (run_dir(out / "s", "fedpipe", "hetero", 1, 0.001) / "1").resolve() == elsewhere.resolve()
    assert [(s, seed, lr) for s, seed, lr, trial in ran if not trial] == [("fedpipe", 2, 0.003), ("lora-fedavg", 2, 0.01)]
    chosen = json.loads((out / "s" / "lr.json").read_text())
    assert chosen["fedpipe/hetero"]["chosen"] == 0.003 and chosen["lora-fedavg/hetero"]["chosen"] == 0.01
    assert chosen["legend/hetero"]["chosen"] == 0.01 and chosen["rule"] == "lowest final eval loss on seed 1"
    assert chosen["fedpipe/hetero"]["final_eval_loss"]["0.001"] == pytest.approx(1.5 + math.log10(3))
    seed1 = run_dir(out / "s", "fedpipe", "hetero", 1)
    assert (seed1 / "1").resolve() == (run_dir(out / "s", "fedpipe", "hetero", 1, 0.003) / "1").resolve()  # the trial
    row = json.loads((out / "report" / "results.json").read_text())["s"]["lora-fedavg/hetero"]
    assert row["lr"] == 0.01 and row["seeds"] == 2
    assert "| lora-fedavg | hetero | 2 | 0.01 |" in (out / "report" / "s.md").read_text()


def test_list_of_one_suite_names_every_run_and_which_are_done(tmp_path, capsys):
    trial = run_dir(tmp_path / "binding", "fedpipe", "binding", 1, 0.003) / "7"
    trial.mkdir(parents=True)
    (trial / "summary.json").write_text("{}")
    assert bench.main(["--list", "--suite", "binding", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    suite = load_suites()["binding"]
    assert len(lines) == len(suite.runs) * (len(suite.lr_grid) + len(suite.seeds) - 1)  # trials on seed 1, then the others
    assert "fedpipe / binding / seed 1 lr 0.003 (trial): done" in lines
    assert (
        "fedpipe / binding / seed 1 lr 0.001 (trial): to run" in lines
        and "fedpipe / binding / seed 2 at the chosen lr: to run" in lines
    )
