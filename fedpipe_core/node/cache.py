"""What a node works out once per run and keeps on its own disk: its data's shares and its profile.

Flower starts a fresh ClientApp process for every message, so an in-process cache does not outlive a round.
A node's shares (:class:`~fedpipe_core.task.NodeData`) are stored under ``<cache>/node-data/`` keyed by what
shapes them (the data file's hash, the task, the fields, the partition settings and the split rule), so a
file is parsed, split and partitioned once, and parsed again only when it or a setting changes. A node's
profile is measured once per run (``<node state>/profile.json``) unless its node config says it changes
(``profile-changes = true``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from fedpipe_core.data import Example
from fedpipe_core.profile import ClientProfile

CACHE_VERSION = 1
"""Part of every key: bumped when the split or partition rule changes."""


def cache_key(**shaping: object) -> str:
    """A stable key of everything that shapes a node's data."""
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **shaping}, sort_keys=True, default=str).encode()).hexdigest()


Shares = tuple[dict[str, list[Example]], str, str]
"""A node's data shares by split, its data hash and a note on how they were made."""


def cached_shares(directory: Path, key: str, build: Callable[[], Shares]) -> Shares:
    """The (shares, data hash, note) stored under ``key``, or built by ``build`` and stored (atomically)."""
    path = directory / f"{key}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            shares = {name: [Example(*row) for row in rows] for name, rows in stored["shares"].items()}
            return shares, stored["data_hash"], stored["note"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged entry is rebuilt
    shares, data_hash, note = build()
    directory.mkdir(parents=True, exist_ok=True)
    rows = {name: [[e.prompt, e.target, e.group, e.key] for e in examples] for name, examples in shares.items()}
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"shares": rows, "data_hash": data_hash, "note": note}))
    os.replace(tmp, path)
    return shares, data_hash, note


def cached_profile(directory: Path, measure: Callable[[], ClientProfile], changes: bool) -> ClientProfile:
    """The node's profile of this run: measured once and kept in ``directory`` (every time when ``changes``)."""
    path = directory / "profile.json"
    if not changes and path.is_file():
        try:
            return ClientProfile(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            pass
    profile = measure()
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile.to_dict()))
    return profile
