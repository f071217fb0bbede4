"""Client profiles: free memory and achievable FLOPS (FedPipe step 1).

Measured on the device (CUDA: free memory from the driver, FLOPS from a timed matmul in the
training dtype; CPU: available RAM and a timed FP32 matmul), declared in a node's config
(``memory-gb``, ``tflops``: a declared value overrides measurement), or drawn for simulation
like the paper's testbed: memory budgets uniform over a range, compute spread like mixed
RTX 3090-class cards, both scaled to the model being run.

This module imports neither torch nor transformers, so that a node answers the server's QUERY with a
declared profile in the time it takes to start Python and Flower. Measuring, and choosing a node's
profile for a model (:func:`fedpipe_core.task.node_profile`), live with the device and task code.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

MEMORY_RANGE = (0.45, 0.9)
"""Simulated memory budgets: uniform over this range × the model's FP32 weights (``sim.memory-scale`` widens it)."""
RTX3090_TFLOPS = 35.6
"""FP16/FP32 non-tensor-core peak of an RTX 3090, the paper's reference card."""


@dataclass(frozen=True)
class ClientProfile:
    """What a client can spend: ``memory_bytes`` for training, ``flops`` per second achieved."""

    memory_bytes: float
    flops: float
    source: str
    compute_bytes: int = 4
    """Bytes per activation in the node's compute dtype: 2 on a GPU (BF16/FP16), 4 on the CPU."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cuda_present() -> bool:
    """Whether ``device = auto`` trains on CUDA, answered without importing torch: a CUDA build of torch
    (not a ``+cpu`` wheel) and a CUDA driver that reports at least one device."""
    try:
        if "+cpu" in importlib.metadata.version("torch"):
            return False
        driver = ctypes.CDLL("libcuda.so.1")
    except (importlib.metadata.PackageNotFoundError, OSError):
        return False
    count = ctypes.c_int(0)
    return driver.cuInit(0) == 0 and driver.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def device_compute_bytes(device: str) -> int:
    """Bytes per activation on the node config's ``device``: 2 on CUDA (BF16/FP16), 4 on the CPU (FP32)."""
    text = str(device).strip().lower()
    if text == "auto":
        return 2 if cuda_present() else 4
    if text == "cpu":
        return 4
    if text == "cuda" or (text.startswith("cuda:") and text[5:].isdigit()):
        return 2
    raise ValueError(f"node config 'device': {device!r} is not auto, cpu, cuda or cuda:N")


def node_number(node_config: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """A finite number from node config ``key`` (``default`` when the key is absent), or ValueError naming the key."""
    if key not in node_config and default is not None:
        return float(default)
    value = node_config.get(key)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"node config {key!r}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"node config {key!r}: must be a finite number, got {value!r}")
    return number


def declared(node_config: Mapping[str, Any]) -> ClientProfile | None:
    """A profile from node config keys ``memory-gb`` and ``tflops`` (both needed), else None."""
    if "memory-gb" not in node_config and "tflops" not in node_config:
        return None
    missing = [key for key in ("memory-gb", "tflops") if key not in node_config]
    if missing:
        raise ValueError(f"node config needs numeric 'memory-gb' and 'tflops' together (missing {missing[0]!r})")
    memory_gb, tflops = node_number(node_config, "memory-gb"), node_number(node_config, "tflops")
    if memory_gb <= 0 or tflops <= 0:
        raise ValueError(f"node config 'memory-gb'={memory_gb} and 'tflops'={tflops} must be > 0")
    return ClientProfile(memory_gb * 2**30, tflops * 1e12, "declared")


def declared_on_device(node_config: Mapping[str, Any]) -> ClientProfile | None:
    """The node config's declared profile (:func:`declared`) with the compute bytes of its ``device``, else None."""
    profile = declared(node_config)
    if profile is None:
        return None
    return replace(profile, compute_bytes=device_compute_bytes(str(node_config.get("device", "auto"))))


def simulated(
    partition_id: int,
    seed: int,
    weight_bytes: float,
    training_bytes: float = 0.0,
    memory_range: tuple[float, float] = MEMORY_RANGE,
    compute_range: tuple[float, float] = (0.25, 1.0),
    ideal: bool = False,
) -> ClientProfile:
    """A simulated client like the paper's (budgets 12-24 GB for LLaMA2-7B's 27 GB of FP32 weights).

    Memory is uniform over ``memory_range`` × ``weight_bytes`` (the model's FP32 weights, so that
    the budget decides the base precision as in the paper) plus ``training_bytes`` (adapters,
    optimizer state and activations of the default plan at the largest batch); compute is uniform over
    ``compute_range`` × an RTX 3090. ``ideal`` gives every client the middle of both ranges
    (the homogeneous testbed).
    """
    rng = random.Random(f"{seed}:{partition_id}")
    draw = (lambda low, high: (low + high) / 2) if ideal else rng.uniform
    memory = draw(*memory_range) * weight_bytes + training_bytes
    flops = draw(*compute_range) * RTX3090_TFLOPS * 1e12
    return ClientProfile(memory, flops, "simulated")
