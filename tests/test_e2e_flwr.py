"""End to end: a real `flwr run .` simulation (local SuperLink, Ray) on the embedded default."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_processes_mentioning(marker: str) -> None:
    """Stop the local SuperLink (and its children) that this test's FLWR_HOME started."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline and "flower-" in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGTERM)
            except ProcessLookupError:
                pass


@pytest.fixture(scope="module")
def flwr_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("flwr-home")
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
    }
    yield env
    _stop_processes_mentioning(str(home))
    time.sleep(1)


def flwr_run(env: dict[str, str], run_config: str, supernodes: int = 3, timeout: int = 900) -> str:
    cmd = [
        "flwr",
        "run",
        ".",
        "--stream",
        "--federation-config",
        f"num-supernodes={supernodes} client-resources-num-cpus=1",
        "--run-config",
        run_config,
    ]
    done = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    return done.stdout + done.stderr


SMALL = (
    "train.local-steps=3 train.batch-size=4 eval.examples=16 eval.test-groups=3 eval.max-new-tokens=24"
    " data.max-train-examples=240 eval.base-generation=false"
)


@pytest.fixture(scope="module")
def two_rounds(flwr_env, tmp_path_factory):
    """A real two-round federation of 3 simulated SuperNodes: (run directory, log)."""
    out_dir = tmp_path_factory.mktemp("runs")
    log = flwr_run(flwr_env, f'num-server-rounds=2 {SMALL} output-dir="{out_dir}"')
    runs = list(out_dir.iterdir())
    assert len(runs) == 1, log[-3000:]
    return runs[0], log


def test_federation_trains_and_writes_the_results_contract(two_rounds, flwr_env, tmp_path):
    run, log = two_rounds
    for name in ("config.json", "metrics.jsonl", "summary.json", "delta.safetensors", "plans.jsonl"):
        assert (run / name).is_file(), (name, log[-3000:])
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"]
    assert all(r["clients"] >= 1 and r["clients"] + r["left_out"] + r["rejected"] == 3 and r["bytes_up"] > 0 for r in rows[1:])
    assert rows[1]["bytes_down"] == 0 < rows[2]["bytes_down"]  # round 1 has no ΔW yet
    assert 0 < rows[1]["sim_time_s"] < rows[2]["sim_time_s"]
    plans = [json.loads(line) for line in (run / "plans.jsonl").read_text().splitlines()]
    assert sorted({p["round"] for p in plans}) == [1, 2] and len(plans) == 6
    assert rows[0]["examples"] == 0
    for row in rows[1:]:  # examples processed: each node that replied did the same steps at its own batch
        batches = [p["batch_size"] for p in plans if p["round"] == row["round"] and not p["left_out"]]
        assert row["rejected"] or row["examples"] == sum(batches) * row["client_steps"] // row["clients"] > 0
    assert len({p["profile"]["memory_bytes"] for p in plans}) == 3  # heterogeneous simulated profiles
    for plan in plans:
        assert isinstance(plan["over_budget"], bool)
        assert plan["left_out"] or (
            plan["precision"] in ("fp32", "fp16", "nf8", "nf4") and plan["ranks"] and 2 <= plan["batch_size"] <= 4
        )
    summary = json.loads((run / "summary.json").read_text())
    for key in ("bleu", "nist", "meteor", "rouge_l", "cider", "ppl", "trainable_params", "total_bytes", "wall_s"):
        assert isinstance(summary[key], (int, float)), key
    assert 0 < summary["trainable_params"] <= 60 * 8 * (576 + 576)  # at most rank 8 on all 60 q/v projections
    import torch

    from fedpipe_core.metrics import scorer

    assert summary["scorer"] == scorer() and summary["rounds"] == 2
    assert summary["host"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()  # the floats' provenance
    best = json.loads((run / "best" / "round.json").read_text())  # the best round's model, kept beside the last
    assert best["round"] == summary["best_round"] and best["loss"] == min(r["eval_loss"] for r in rows[1:])
    config = json.loads((run / "config.json").read_text())
    assert config["strategy.name"] == "fedpipe"
    for row in rows[1:]:  # each node's own timing: its training, and the state restore around it
        assert row["client_train_s"] > 0 and row["client_setup_s"] > 0
        ratio = max((row["client_setup_s"] + row["client_startup_s"]) / row["client_train_s"], 0.0)
        assert row["client_overhead_ratio"] >= ratio * (1 - 1e-9)  # the worst node's, at least the mean node's
    from fedpipe_core.model import default_cache_dir

    assert not (default_cache_dir() / "node-state" / str(config["run-id"])).exists()  # removed when the run ended
    checkpoint = json.loads((run / "checkpoint" / "state.json").read_text())
    assert checkpoint["round"] == 2
    assert sorted(checkpoint["state"]["places"].values()) == [0, 1, 2]  # every node's partition id reached the server

    assert "FedPipe round 2/2 | eval loss" in log

    csv = tmp_path / "mine.csv"
    csv.write_text(
        'mr,ref\n"name[The Eagle], eatType[pub]",The Eagle is a pub.\n"name[The Eagle], eatType[pub]",A pub called The Eagle.\n'
    )
    done = subprocess.run(
        ["fedpipe-eval", str(run), "--data", str(csv), "--limit", "1"],
        check=False,
        env=flwr_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(scores) >= {"bleu", "nist", "meteor", "rouge_l", "cider", "ppl"} and scores["scored_groups"] == 1


def test_a_stopped_run_resumes_from_its_checkpoint(flwr_env, two_rounds, tmp_path):
    first, _ = two_rounds
    log = flwr_run(flwr_env, f'num-server-rounds=3 {SMALL} output-dir="{tmp_path}" resume-from="{first}"')
    runs = list(tmp_path.iterdir())
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file(), log[-3000:]
    before = [json.loads(line) for line in (first / "metrics.jsonl").read_text().splitlines()]
    after = [json.loads(line) for line in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in after] == [0, 1, 2, 3]
    assert after[:3] == before  # the history is carried over, round 3 is new
    assert after[3]["clients"] >= 1 and after[3]["sim_time_s"] > before[2]["sim_time_s"]
    assert after[3]["bytes_down"] > 0  # the new nodes receive the ΔW of rounds 1-2
    plans = [json.loads(line) for line in (runs[0] / "plans.jsonl").read_text().splitlines()]
    assert sorted({p["round"] for p in plans}) == [1, 2, 3]
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["total_bytes_up"] > sum(r["bytes_up"] for r in before)


def test_invalid_run_config_stops_before_training(flwr_env, tmp_path):
    log = flwr_run(flwr_env, f'lora.target-modules="q_proj,c_fc" output-dir="{tmp_path}"', supernodes=2, timeout=300)
    assert "run config 'lora.target-modules': 'c_fc' matches no linear module" in log
    assert not list(tmp_path.iterdir())
