"""Shared fixtures: the embedded model is loaded once per test session (offline)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(scope="session")
def task():
    """The embedded default task (SmolLM2-135M, E2E), small caps for speed."""
    from fedpipe_core.config import RunConfig
    from fedpipe_core.task import load_task

    return load_task(RunConfig(eval_examples=8, test_groups=2, local_steps=2, batch_size=2, max_seq_len=64))


@pytest.fixture(autouse=True)
def run_identity():
    """Messages need the run id a real ServerApp process has; set it as Flower's runtime does.

    fedpipe_core's tests need no Flower: where it is not installed (a bare GPU machine), nothing is set."""
    try:
        from flwr.supercore.task_identity import TaskIdentity
    except ImportError:
        yield
        return
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 0
    TaskIdentity.task_id = 1
    yield
