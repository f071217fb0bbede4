"""Conversions between Flower's ArrayRecord and the flat ndarray dicts of fedpipe_core.codec."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord


def to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    """A flat ndarray dict as an ArrayRecord."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """An ArrayRecord as a flat ndarray dict."""
    return {k: v.numpy() for k, v in record.items()}
