"""Start-up cost of a ClientApp message: Flower starts a fresh ClientApp process for every message.

Two measurements, for the app in ``--app`` (a checkout, e.g. a git worktree of an older commit, to
compare before and after):

- **QUERY**: ``--repeats`` fresh processes each import Flower and the ClientApp module and answer a
  QUERY for a declared profile, as ``flwr-clientapp`` does; wall seconds from process start to the
  reply and the process's CPU seconds (user + system: what it cost the machine, whatever else runs),
  and whether torch was imported.
- **TRAIN** (``--deployment WORKDIR``): a real local deployment (``scripts/local_deployment.py``, 2
  SuperNodes, 1 round, the default run config otherwise); the nodes' reported process start-up and
  setup against their local training, from the run's ``metrics.jsonl``.

Targets, fixed before the runs: QUERY ≤ 3 CPU seconds per process on the 2-core development machine;
a TRAIN message's start-up + setup ≤ 10% of its local training at the default settings. Prints the
figures, the ratios against the targets, and as its last line one JSON object.

    python benchmarks/message_startup.py [--app .] [--repeats 5] [--deployment /tmp/startup-deploy]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"query_cpu_s": 3.0, "train_overhead_ratio": 0.10}

QUERY_CHILD = """
import json, sys, time
import psutil
process = psutil.Process()
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
import client_app.client_app as clientapp
from fedpipe_flower.messages import profile_query
node = {"memory-gb": 2.0, "tflops": 9.0, "device": "cpu", "partition-id": 0, "num-partitions": 2}
context = Context(1, 1, node, RecordDict(), {})
reply = clientapp.query(profile_query(1), context)
assert not reply.has_error()
cpu = process.cpu_times()
print(json.dumps({"wall_s": time.time() - process.create_time(), "cpu_s": cpu.user + cpu.system,
                  "torch": "torch" in sys.modules}))
"""


def measure_query(app: Path, repeats: int) -> dict[str, float]:
    """Fresh processes answering a QUERY with the ClientApp in ``app``: mean and std of wall and CPU seconds."""
    env = {**os.environ, "PYTHONPATH": str(app), "HF_HUB_OFFLINE": "1"}
    runs = []
    for _ in range(repeats):
        done = subprocess.run(
            [sys.executable, "-c", QUERY_CHILD], cwd=app, env=env, capture_output=True, text=True, timeout=600
        )  # cwd too: ``python -c`` puts the working directory first on sys.path
        if done.returncode != 0:
            raise RuntimeError(f"QUERY process failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    out = {"repeats": repeats, "torch_imported": any(r["torch"] for r in runs)}
    for key in ("wall_s", "cpu_s"):
        values = [r[key] for r in runs]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def measure_train(app: Path, workdir: Path) -> dict[str, float]:
    """One round of a local deployment with the default run config: the nodes' start-up, setup and training."""
    script = app / "scripts" / "local_deployment.py"
    cmd = [
        sys.executable,
        str(script),
        "--workdir",
        str(workdir),
        "--supernodes",
        "2",
        "--rounds",
        "1",
        "--insecure",
        "--run-config",
        "eval.base-generation=false eval.test-groups=2",
    ]
    env = {**os.environ, "PYTHONPATH": str(app)}
    done = subprocess.run(cmd, cwd=app, env=env, capture_output=True, text=True, timeout=3000)
    if done.returncode != 0:
        raise RuntimeError(f"deployment failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    run_dir = Path(json.loads(done.stdout[done.stdout.index("{") :])["run_dir"])
    row = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1]
    keys = ("client_query_s", "client_startup_s", "client_setup_s", "client_train_s", "client_overhead_ratio")
    return {k: row[k] for k in keys if k in row}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", type=Path, default=ROOT, help="the checkout whose ClientApp is measured (default: this one)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--deployment", type=Path, help="also measure TRAIN in a local deployment in this directory")
    args = parser.parse_args()
    result: dict[str, object] = {"app": str(args.app.resolve()), "query": measure_query(args.app.resolve(), args.repeats)}
    query = result["query"]
    print(
        f"QUERY: {query['wall_s']:.2f} ± {query['wall_s_std']:.2f} s wall, {query['cpu_s']:.2f} ± {query['cpu_s_std']:.2f} "
        f"CPU s per process ({args.repeats} processes; torch imported: {query['torch_imported']})"
    )
    print(f"  CPU s / target {TARGETS['query_cpu_s']:.0f} s: {query['cpu_s'] / TARGETS['query_cpu_s']:.2f}")
    if args.deployment:
        train = measure_train(args.app.resolve(), args.deployment)
        result["train"] = train
        ratio = (train["client_startup_s"] + train["client_setup_s"]) / train["client_train_s"]
        print(
            f"TRAIN: start-up {train['client_startup_s']:.2f} s + setup {train['client_setup_s']:.2f} s vs "
            f"training {train['client_train_s']:.2f} s (means over the nodes) = {ratio:.3f}; "
            f"worst node {train['client_overhead_ratio']:.3f}"
        )
        print(f"  ratio / target {TARGETS['train_overhead_ratio']:.2f}: {ratio / TARGETS['train_overhead_ratio']:.2f}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
