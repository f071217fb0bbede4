"""Scale benchmark: what a node's message costs besides training, on a real deployment, with and without a warm worker.

A local deployment on 127.0.0.1 (``scripts/local_deployment.py``, plain HTTP): 2 SuperNodes × ``--rounds`` rounds of
FedPipe on ``--model`` (default: the ~1.1B random LLaMA the memory benchmark writes, TinyLlama-1.1B's architecture),
run twice: ``in-process`` (Flower's fresh ClientApp process trains each message) and ``worker`` (each node's TRAIN
messages go to its own ``fedpipe-node-worker`` over a Unix socket, node config ``worker-socket``). Per message it
prints the node's process start-up (and of it Flower's part: its own start-up, its pull of the message and its
install of the app, until it loaded the app; beside a bare process's import of Flower's ClientApp runtime, measured
once), the training stack's import, data (task and data), base (built, or updated in the
worker), training, the rest of the handler (adapters, reply encoding, state writes) in seconds, and the bytes of node
state the message wrote.

Targets, fixed before the runs: with the worker, (start-up + setup) ÷ training ≤ 0.10 over the run's messages; in both
modes the state bytes a message writes ≤ 1% of the model's bytes (the first message of a quantized node also writes
Q(W0) once; it is shown apart). The last line is one JSON object ``{mode: {"overhead_ratio", "state_bytes_per_message",
"first_message_state_bytes", "model_bytes", "train_s", "eval_loss"}}``.

Each mode also prints its plan's precision and the nodes' measured peak against the prediction and the declared
memory: at LLaMA-2-7B's shapes (``--model llama2-7b --device cuda --memory-gb 12 --batch 8 --seq 512``) the plan is
NF4 and the peak stays under the declared 12 GB.

    python benchmarks/scale.py [--model tinyllama-1.1b] [--rounds 3] [--steps 2] [--batch 1] [--seq 64] [--memory-gb 3]
        [--device cpu] [--workdir /tmp/fedpipe-scale] [--modes in-process,worker]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from local_deployment import Deployment, run_app  # noqa: E402

from fedpipe_tools.run_report import read_jsonl  # noqa: E402

TARGETS = {"worker_overhead_ratio": 0.10, "state_bytes_share": 0.01}
MODES = ("in-process", "worker")


def checkpoint(model: str) -> str:
    """The run config's ``model.name``: a random LLaMA written once (``tinyllama-1.1b``, ``llama2-7b`` at BF16, drawn
    on the GPU where there is one, or ``tiny`` for tests)."""
    import torch
    from transformers import LlamaConfig

    from fedpipe_core.model import default_cache_dir
    from fedpipe_tools.checkpoints import LLAMA2_7B, TINYLLAMA_1B, builtin_vocab_size, write_random_checkpoint

    shapes = {
        "tinyllama-1.1b": TINYLLAMA_1B,
        "llama2-7b": LLAMA2_7B,
        "tiny": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
        },
    }
    if model not in shapes:
        raise SystemExit(f"--model {model!r}: one of {', '.join(shapes)}")
    target = default_cache_dir() / "models" / f"{model}-random"
    config = LlamaConfig(vocab_size=builtin_vocab_size(), **shapes[model])
    if model != "llama2-7b":
        return str(write_random_checkpoint(target, config))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return str(write_random_checkpoint(target, config, shard_size="4GB", dtype=torch.bfloat16, device=device))


class Shape(NamedTuple):
    """What each mode's run is: rounds, local steps, batch, sequence cap, the nodes' declared memory and device."""

    rounds: int = 3
    steps: int = 2
    batch: int = 1
    seq: int = 64
    memory_gb: float = 3.0
    device: str = "cpu"
    eval_where: str = "server"


def run_mode(mode: str, workdir: Path, model: str, shape: Shape, timeout_s: float) -> Path:
    """One deployment in ``mode``; the run's directory."""
    workdir.mkdir(parents=True, exist_ok=True)
    deployment = Deployment(workdir, tls=False)
    runs = workdir / "runs"
    try:
        deployment.start_superlink()
        for index in range(2):
            config = (
                f"partition-id={index} num-partitions=2 memory-gb={shape.memory_gb:g} tflops={9 + 8 * index} "
                f'device="{shape.device}"'
            )
            if mode == "worker":
                sock = workdir / f"worker-{index}.sock"
                command = ["fedpipe-node-worker", "--socket", str(sock), "--device", shape.device]
                worker = deployment.start(f"worker-{index}", command)
                _wait_for(sock, worker, workdir / f"worker-{index}.log", 300.0)
                config += f' worker-socket="{sock}"'
            deployment.join(index, config)
        run_config = (
            f'num-server-rounds={shape.rounds} output-dir="{runs}" strategy.min-train-nodes=2 model.name="{model}" '
            f"train.local-steps={shape.steps} train.batch-size={shape.batch} fedpipe.batch-min=1 "
            f'train.max-seq-len={shape.seq} eval.examples=4 eval.every={shape.rounds} eval.where="{shape.eval_where}" '
            "eval.test-groups=1 eval.max-new-tokens=4 eval.base-generation=false"
        )
        done = run_app(deployment, run_config, timeout_s)
    finally:
        deployment.stop()
    summaries = sorted(runs.glob("*/summary.json"))
    if done.returncode != 0 or not summaries:
        raise RuntimeError(f"{mode}: the run failed\n{(done.stdout + done.stderr)[-3000:]}")
    return summaries[-1].parent


def _wait_for(path: Path, worker: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Until the worker listens on ``path``; a worker that exits first is reported with the end of its log."""
    deadline = time.time() + timeout_s
    while not path.exists():
        if worker.poll() is not None:
            raise RuntimeError(f"the worker exited ({worker.returncode}) before listening on {path}:\n{log.read_text()[-1500:]}")
        if time.time() > deadline:
            raise RuntimeError(f"no worker socket at {path} after {timeout_s:.0f} s")
        time.sleep(0.2)


def messages(run: Path) -> list[dict[str, float]]:
    """Every TRAIN message of the run: round, node and its reported phases and timing."""
    return phases_of(read_jsonl(run / "metrics.jsonl"))


def phases_of(rows: list[dict]) -> list[dict[str, float]]:
    """The TRAIN messages of these metrics rows (:func:`messages`)."""
    out = []
    for row in rows:
        for node, phases in sorted(row.get("client_phases", {}).items()):
            out.append({"round": row["round"], "node": node, **phases})
    return out


def summarise(run: Path) -> dict[str, float]:
    """The mode's figures from its run (see the module's last-line JSON)."""
    rows = read_jsonl(run / "metrics.jsonl")
    found = phases_of(rows)
    first = {m["node"]: m for m in sorted(found, key=lambda m: m["round"], reverse=True)}  # each node's first message
    later = [m["state-bytes"] for m in found if m not in first.values()]
    memory = [v for row in rows for v in row.get("node_memory", {}).values()]
    model_bytes = max(int(v.get("model_bytes", 0)) for v in memory)
    train = sum(m["train-s"] for m in found)
    return {
        "overhead_ratio": sum(m["startup-s"] + m["setup-s"] for m in found) / train,
        "state_bytes_per_message": statistics.fmean(later) if later else 0.0,
        "first_message_state_bytes": max(m["state-bytes"] for m in first.values()),
        "model_bytes": model_bytes,
        "train_s": train,
        "eval_loss": rows[-1]["eval_loss"],
        "precisions": sorted({str(v["precision"]) for v in memory if "precision" in v}),
        "peak_bytes": max(int(v.get("measured_peak_bytes", 0)) for v in memory),
        "predicted_peak_bytes": max(int(v.get("predicted_peak_bytes", 0)) for v in memory),
    }


def bare_flower_start() -> float:
    """Seconds a fresh Python process takes to import Flower's ClientApp runtime (no message, no app): what of a
    ClientApp's Flower part is not its pull of the message and install of the app."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import flwr.supernode.runtime.run_clientapp"], check=True)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tinyllama-1.1b", help="tinyllama-1.1b, llama2-7b (random weights, written once) or tiny"
    )
    parser.add_argument("--rounds", type=int, default=3, help="server rounds per mode")
    parser.add_argument("--steps", type=int, default=2, help="local steps per round")
    parser.add_argument("--batch", type=int, default=1, help="each node's batch size")
    parser.add_argument("--seq", type=int, default=64, help="the sequence cap")
    parser.add_argument("--memory-gb", type=float, default=3.0, help="each node's declared memory (its plan's precision)")
    parser.add_argument("--device", default="cpu", help="where the nodes train: cpu, cuda or cuda:N")
    parser.add_argument(
        "--eval-where", default="server", choices=("server", "sites"),
        help="who scores the global model (sites: the nodes, on their quantized bases, instead of the server at FP32)",
    )  # fmt: skip
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fedpipe-scale"), help="where the deployments run")
    parser.add_argument("--timeout-s", type=float, default=5400.0, help="limit per mode")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes {args.modes!r}: comma-separated, of {', '.join(MODES)}")
    model = checkpoint(args.model)
    print(f"a bare process importing Flower's ClientApp runtime: {bare_flower_start():.2f} s")
    results = {}
    shape = Shape(args.rounds, args.steps, args.batch, args.seq, args.memory_gb, args.device, args.eval_where)
    for mode in modes:
        run = run_mode(mode, args.workdir / mode, model, shape, args.timeout_s)
        print(f"{mode}: {run}")
        print("  round node  start-up s  of it Flower s  import s  data s  base s  train s  rest s  state bytes")
        for m in messages(run):
            rest = m["setup-s"] - m.get("import-s", 0.0) - m.get("data-s", 0.0) - m.get("base-s", 0.0)
            print(
                f"  {m['round']:5d} {m['node'][-4:]:>4}  {m['startup-s']:10.2f}  {m.get('flower-s', math.nan):14.2f}  "
                f"{m.get('import-s', 0.0):8.2f}  "
                f"{m.get('data-s', 0.0):6.2f}  "
                f"{m.get('base-s', 0.0):6.2f}  {m['train-s']:7.2f}  {rest:6.2f}  {int(m.get('state-bytes', 0)):11d}"
            )
        results[mode] = summarise(run)
        share = results[mode]["state_bytes_per_message"] / results[mode]["model_bytes"]
        print(
            f"  (start-up + setup) / training = {results[mode]['overhead_ratio']:.3f}; state bytes per message after the "
            f"first = {share:.2e} of the model's {results[mode]['model_bytes'] / 1e9:.2f} GB "
            f"(target ≤ {TARGETS['state_bytes_share']:g}: ratio {share / TARGETS['state_bytes_share']:.2f})"
        )
        print(
            f"  plan precision {', '.join(results[mode]['precisions'])}; measured peak "
            f"{results[mode]['peak_bytes'] / 2**30:.2f} GiB (predicted {results[mode]['predicted_peak_bytes'] / 2**30:.2f} GiB; "
            f"declared {args.memory_gb:g} GB)"
        )
    if "worker" in results:
        ratio = results["worker"]["overhead_ratio"] / TARGETS["worker_overhead_ratio"]
        print(f"worker overhead ratio ÷ target {TARGETS['worker_overhead_ratio']:g}: {ratio:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
