"""``fedpipe-node-worker``: a site's long-lived process that keeps the training stack and the node's base warm.

Flower starts a fresh ClientApp process for every message, so without a worker every TRAIN message imports torch,
transformers and peft and builds the node's base again (on a GPU: loads it onto the accelerator again). A site
starts this worker beside its SuperNode, with the same app installed, and sets node config
``worker-socket=PATH``; the ClientApp then hands each TRAIN message to the worker over that Unix socket (mode 0600:
only the site's own user can connect) and returns its reply. The worker:

- refuses a ClientApp of another app version (:func:`~fedpipe_core.node.wire.app_version`), with one line saying so
  (the ClientApp then trains in its own process);
- runs one job at a time; a job's node base and state (:class:`~fedpipe_core.node.state.WarmBase`) are kept for that
  node's next message, which rewrites only the weights it changes and goes on from the held state instead of reading
  it back (Q(W0) and every ΔW increment) while the node's ``meta.json`` is still the one the worker wrote;
- lets every base go after ``--idle-release-s`` without a job (the accelerator's memory returns to the site).

The node's state on disk is written as without a worker, so a worker that dies loses nothing: the next message
builds the base from the state again (in the ClientApp when no worker answers).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from fedpipe_core.node.wire import Arrays, app_version, receive, send

log = logging.getLogger("fedpipe-node-worker")


class Worker:
    """The bases this worker holds, by (run, node), and the one job it runs at a time."""

    def __init__(self, device: str) -> None:
        import fedpipe_core.node.round  # noqa: F401 (the training stack, imported once for every job)
        from fedpipe_core import quiet

        quiet()
        self.device = device
        self.warm: dict[tuple[int, int], Any] = {}

    def run_job(self, job: dict[str, Any], payload: Arrays) -> tuple[dict[str, Any], Arrays]:
        """A TRAIN job: the local round on this worker's device; (header, arrays) of its result."""
        from fedpipe_core.node.round import RoundRefused, Site, train_round
        from fedpipe_core.node.state import WarmBase
        from fedpipe_core.protocol import TrainInstruction

        entered = time.perf_counter()
        if job.get("kind") != "train":
            return {"error": f"unknown job kind {job.get('kind')!r} (this worker runs 'train')"}, {}
        site = Site(job["run_config"], {**job["node_config"], "device": self.device}, int(job["run_id"]), int(job["node_id"]))
        key = (site.run_id, site.node_id)
        warm = self.warm.setdefault(key, WarmBase())
        try:
            arrays, report = train_round(site, TrainInstruction.from_config(job["config"]), payload, entered, 0.0, warm)
        except RoundRefused as refusal:
            return {"refused_round": str(refusal)}, {}
        except Exception as exc:  # the job's error goes back to the ClientApp; the worker serves the next job
            log.exception("job of node %d failed", site.node_id)
            self.warm.pop(key, None)  # a base a failed round may have left half-wrapped is not reused
            return {"error": f"{type(exc).__name__}: {exc}"}, {}
        return {"metrics": report.to_metrics()}, arrays

    def release(self) -> None:
        """Let every held base go and give the accelerator's cache back."""
        self.warm.clear()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("idle: every node base released")

    def serve_connection(self, conn: socket.socket) -> None:
        """One connection: the version handshake, then one job."""
        hello, _ = receive(conn)
        mine = app_version()
        if hello.get("version") != mine:
            reason = (
                f"fedpipe-node-worker runs app version {mine}, the ClientApp {hello.get('version')}: "
                "restart the worker from the app the SuperNode runs"
            )
            log.warning("%s", reason)
            send(conn, {"refused": reason})
            return
        send(conn, {"ok": True})
        job, payload = receive(conn)
        header, arrays = self.run_job(job, payload)
        send(conn, header, arrays)


def listen(path: Path) -> socket.socket:
    """A Unix socket at ``path`` that only this user may connect to (created 0600, never wider).

    It is bound and listening under a temporary name before it is renamed to ``path``, so a ClientApp that finds
    ``path`` can connect: between a bind and its listen a connection is refused, and the round would go to the
    ClientApp's process while the worker starts. The rename replaces a stale file a dead worker left at ``path``."""
    staging = path.with_name(f".{path.name}.{os.getpid()}")
    staging.unlink(missing_ok=True)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        server.bind(str(staging))
    finally:
        os.umask(old)
    os.chmod(staging, 0o600)
    server.listen(4)
    os.replace(staging, path)
    return server


def serve(path: Path, worker: Worker, idle_release_s: float, max_jobs: int = 0) -> None:
    """Serve jobs on ``path`` until interrupted (or after ``max_jobs`` connections, for tests)."""
    server = listen(path)
    log.info("app %s on %s, listening on %s", app_version(), worker.device, path)
    served = 0
    with server:
        while not max_jobs or served < max_jobs:
            server.settimeout(idle_release_s if worker.warm and idle_release_s > 0 else None)
            try:
                conn, _ = server.accept()
            except TimeoutError:
                worker.release()
                continue
            with conn:
                conn.settimeout(None)
                try:
                    worker.serve_connection(conn)
                except (OSError, EOFError) as exc:
                    log.warning("connection dropped: %s", exc)
            served += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-node-worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, type=Path, help="the Unix socket to listen on (node config worker-socket)")
    parser.add_argument("--device", default="auto", help="where the node trains: auto (CUDA when present), cpu, cuda:0, ...")
    parser.add_argument(
        "--idle-release-s", type=float, default=600.0, help="release the held bases after this many idle seconds (0: never)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        serve(args.socket, Worker(args.device), args.idle_release_s)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
