"""The local socket between a node's ClientApp and its warm worker (``fedpipe-node-worker``).

A frame is an 8-byte big-endian length and a safetensors blob: the arrays, and a JSON header in its metadata (no
pickle: a frame carries tensors and plain values only). A connection is one job: the ClientApp says which app version
it runs (:func:`app_version`), the worker answers ``ok`` or refuses a version not its own, then the job and its
result. Only Flower-free, torch-free modules are imported here, so the ClientApp stays light on this path.
"""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_arrays
from safetensors.numpy import save as save_arrays

Arrays = dict[str, np.ndarray]
LENGTH = struct.Struct(">Q")
PACKAGES = ("client_app", "fedpipe_core", "fedpipe_flower")
"""The packages whose code decides a round's numbers on a node: the version a worker must share with its ClientApp."""


class WorkerUnavailable(ConnectionError):
    """No worker answers on the socket (none started, or it exited): the round runs in the ClientApp's process."""


class WorkerRefused(ConnectionError):
    """The worker runs another version of the app: the round runs in the ClientApp's process."""


class WorkerFailed(RuntimeError):
    """The worker took the job and failed it: died, timed out or raised; the round's reply is an error."""


@cache
def app_version() -> str:
    """SHA-256 (first 16 hex digits) over the app's Python sources, by path: two processes of the same app agree."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def send(sock: socket.socket, header: dict[str, Any], arrays: Arrays | None = None) -> None:
    """One frame: ``arrays`` with ``header`` (JSON) in the blob's metadata."""
    blob = save_arrays({k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}, metadata={"header": json.dumps(header)})
    sock.sendall(LENGTH.pack(len(blob)))
    sock.sendall(blob)


def receive(sock: socket.socket) -> tuple[dict[str, Any], Arrays]:
    """One frame's header and arrays; EOFError when the peer closed before a whole frame."""
    (size,) = LENGTH.unpack(_exactly(sock, LENGTH.size))
    blob = _exactly(sock, size)
    (length,) = struct.unpack("<Q", blob[:8])  # safetensors: its JSON header's length, then the header
    metadata = json.loads(blob[8 : 8 + length]).get("__metadata__") or {}
    return json.loads(metadata.get("header", "{}")), load_arrays(blob)


def _exactly(sock: socket.socket, size: int) -> bytes:
    parts, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 22))
        if not chunk:
            raise EOFError(f"the peer closed the socket with {left} of {size} bytes unsent")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def ask(path: str, job: dict[str, Any], arrays: Arrays, timeout_s: float) -> tuple[dict[str, Any], Arrays]:
    """Hand the worker on ``path`` one job and wait at most ``timeout_s`` for its result (header, arrays).

    WorkerUnavailable when nothing listens there, WorkerRefused when it runs another app version, WorkerFailed when
    it took the job and did not return a result (its error, a closed socket, the timeout)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    with sock:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise WorkerUnavailable(f"no worker listens on {path} ({exc.strerror or exc})") from None
        try:
            send(sock, {"version": app_version()})
            hello, _ = receive(sock)
        except (OSError, EOFError) as exc:
            raise WorkerUnavailable(f"the worker on {path} closed the handshake ({exc})") from None
        if "refused" in hello:
            raise WorkerRefused(str(hello["refused"]))
        try:
            send(sock, job, arrays)
            header, out = receive(sock)
        except TimeoutError:
            raise WorkerFailed(f"the worker on {path} gave no result within {timeout_s:g} s") from None
        except (OSError, EOFError) as exc:
            raise WorkerFailed(f"the worker on {path} stopped during the job ({exc})") from None
    if "error" in header:
        raise WorkerFailed(f"the worker on {path} failed the job: {header['error']}")
    return header, out
