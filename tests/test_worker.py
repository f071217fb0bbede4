"""The site's warm worker (``fedpipe-node-worker``): the same rounds as in the ClientApp's process, its base kept
between messages, another app version refused, and a worker that dies or is gone."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

import fedpipe_core.node.state as state_module
from client_app import client_app, local_round
from fedpipe_core.config import RunConfig
from fedpipe_core.node import wire as worker_wire
from fedpipe_core.node import worker
from fedpipe_core.protocol import TrainInstruction
from fedpipe_flower.messages import read_train_reply, to_record, train_message


def _context(run_id: int, cache: Path, socket_path: Path | None = None) -> Context:
    config = RunConfig(eval_examples=8, test_groups=2, local_steps=2, batch_size=2, max_seq_len=64, cache_dir=str(cache))
    node = {"partition-id": 0, "num-partitions": 2, "device": "cpu", "profile-changes": "false"}
    if socket_path is not None:
        node |= {"worker-socket": str(socket_path), "worker-timeout-s": 900}  # a loaded 2-core machine: a round may take minutes
    return Context(run_id=run_id, node_id=1, node_config=node, state=RecordDict(), run_config=config.to_mapping())


MODULES = ("model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj")


def _messages() -> list:
    """Round 1 of a FedPipe node at NF8, then round 2 with the server's ΔW of round 1 on one adapted and one other weight."""
    g = torch.Generator().manual_seed(0)
    delta = {}
    for module, (out, inp) in (("model.layers.0.self_attn.q_proj", (576, 576)), ("model.layers.5.self_attn.q_proj", (576, 576))):
        delta[f"{module}::A"] = (0.01 * torch.randn(4, inp, generator=g)).numpy()
        delta[f"{module}::B"] = (0.01 * torch.randn(out, 4, generator=g)).numpy()
    ranks = dict.fromkeys(MODULES, 4)
    orders = [
        (TrainInstruction(1, "fedpipe", ranks, 2, 2, "nf8", 0, 0), {}),
        (TrainInstruction(2, "fedpipe", ranks, 2, 2, "nf8", 0, 1), delta),
    ]
    return [train_message(1, to_record(arrays), order, ConfigRecord()) for order, arrays in orders]


def _serve(path: Path, jobs: int) -> tuple[threading.Thread, worker.Worker]:
    """A worker on ``path`` in a thread of this process (so the test sees the bases it holds), for ``jobs`` connections."""
    held = worker.Worker("cpu")
    thread = threading.Thread(target=worker.serve, args=(path, held, 0.0, jobs), daemon=True)
    thread.start()
    for _ in range(100):
        if path.exists():
            break
        time.sleep(0.05)
    return thread, held


def test_rounds_through_the_worker_equal_rounds_in_process_and_reuse_its_base(tmp_path, monkeypatch):
    builds, loads = [], []
    real_stream, real_load = state_module.stream_model, state_module.load_state
    monkeypatch.setattr(state_module, "stream_model", lambda *a, **k: builds.append(1) or real_stream(*a, **k))
    monkeypatch.setattr(state_module, "load_state", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    messages = _messages()
    here = _context(11, tmp_path / "here")
    in_process = [read_train_reply(local_round.train(m, here, time.perf_counter(), 0.0)) for m in messages]
    assert len(builds) == 2 and len(loads) == 2  # a fresh base and the state read from disk each message

    path = tmp_path / "worker.sock"
    thread, held = _serve(path, jobs=2)
    assert path.stat().st_mode & 0o777 == 0o600
    there = _context(12, tmp_path / "there", path)
    through = [client_app.through_worker(m, there, time.perf_counter(), 0.0) for m in messages]
    thread.join(timeout=300)
    assert all(reply is not None and not reply.has_error() for reply in through)
    assert len(builds) == 3  # the worker built its base once: round 2 rebuilt only the weights its ΔW and adapters touch
    assert len(loads) == 3  # and read its state once: round 2 went on from the state it held
    for (arrays, report, _), reply in zip(in_process, through, strict=True):
        arrays_w, report_w, _ = read_train_reply(reply)
        assert sorted(arrays) == sorted(arrays_w) and all(np.array_equal(arrays[k], arrays_w[k]) for k in arrays)
        assert report_w.train_loss == report.train_loss and report_w.steps == report.steps
        assert report_w.data_examples == report.data_examples > report.num_examples == 2 * 2  # its share; batch × steps
    warm = held.warm[(12, 1)]
    assert warm.version == 1 and warm.precision == "nf8" and warm.model is not None
    assert not any("lora" in name for name, _ in warm.model.named_modules())  # kept without the round's adapters


def test_a_held_state_stands_for_the_disk_only_while_the_disk_holds_what_it_wrote(tmp_path):
    directory = tmp_path / "node"
    state = state_module.NodeState()
    state.add({"m": torch.ones(2, 3)}, 1, {"m::dW": np.ones((2, 3), dtype=np.float32)})
    state_module.save_state(directory, state)
    warm = state_module.WarmBase()
    warm.keep(torch.nn.Linear(3, 2), directory, state)
    assert warm.take_state(directory) is state
    assert warm.take_state(directory) is None  # handed over: a round that fails part-way leaves nothing behind
    warm.keep(torch.nn.Linear(3, 2), directory, state)
    assert warm.take_state(tmp_path / "another-node") is None
    warm.keep(torch.nn.Linear(3, 2), directory, state)
    other = state_module.load_state(directory)  # another process (the in-process fallback) goes on from the disk
    other.add({"m": torch.ones(2, 3)}, 2, {"m::dW": np.ones((2, 3), dtype=np.float32)})
    state_module.save_state(directory, other)
    assert warm.take_state(directory) is None
    resumed = state_module.resume_state(directory, 2, warm)
    assert resumed.version == 2 and torch.equal(resumed.delta["m"], torch.full((2, 3), 2.0))


def test_a_worker_of_another_app_version_is_refused_and_the_round_falls_back(tmp_path, monkeypatch):
    path = tmp_path / "worker.sock"
    thread, _ = _serve(path, jobs=1)
    monkeypatch.setattr(worker_wire, "app_version", lambda: "0000000000000000")  # the ClientApp of another version
    with pytest.raises(worker_wire.WorkerRefused, match=r"runs app version [0-9a-f]{16}, the ClientApp 0000000000000000"):
        worker_wire.ask(str(path), {"kind": "train"}, {}, 30)
    thread.join(timeout=30)
    assert client_app.through_worker(_messages()[0], _context(13, tmp_path, path), time.perf_counter(), 0.0) is None


def test_the_socket_appears_only_once_it_listens_and_only_its_user_may_connect(tmp_path):
    path = tmp_path / "worker.sock"
    path.write_text("a stale file")  # a worker that died left its path behind
    server = worker.listen(path)
    with server:
        assert path.stat().st_mode & 0o777 == 0o600 and sorted(p.name for p in tmp_path.iterdir()) == ["worker.sock"]
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with client:
            client.connect(str(path))  # connectable as soon as it exists: no window between bind and listen
            conn, _ = server.accept()
            with conn:
                client.sendall(b"x")
                assert conn.recv(1) == b"x"


def test_a_worker_that_dies_mid_round_gives_an_error_reply_and_the_next_round_runs_without_it(tmp_path):
    path = tmp_path / "worker.sock"
    server = worker.listen(path)

    def die_after_the_job_arrives() -> None:
        conn, _ = server.accept()
        with conn:
            worker_wire.receive(conn)
            worker_wire.send(conn, {"ok": True})
            worker_wire.receive(conn)  # the job: then the process dies
        server.close()

    thread = threading.Thread(target=die_after_the_job_arrives, daemon=True)
    thread.start()
    message = _messages()[0]
    reply = client_app.through_worker(message, _context(14, tmp_path, path), time.perf_counter(), 0.0)
    thread.join(timeout=30)
    assert reply.has_error() and "stopped during the job" in reply.error.reason
    assert client_app.through_worker(message, _context(14, tmp_path, path), time.perf_counter(), 0.0) is None  # gone
    with pytest.raises(worker_wire.WorkerUnavailable):
        worker_wire.ask(str(tmp_path / "nothing.sock"), {}, {}, 5)


def test_frames_carry_arrays_and_a_header_and_a_short_frame_is_an_error():
    left, right = socket.socketpair()
    with left, right:
        arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.zeros(0, dtype=np.int64)}
        worker_wire.send(left, {"kind": "train", "n": 3}, arrays)
        header, got = worker_wire.receive(right)
        assert header == {"kind": "train", "n": 3} and np.array_equal(got["x"], arrays["x"]) and got["y"].shape == (0,)
        left.sendall(worker_wire.LENGTH.pack(100) + b"short")
        left.close()
        with pytest.raises(EOFError, match="95 of 100 bytes unsent"):
            worker_wire.receive(right)
