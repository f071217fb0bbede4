"""Client profiles: free memory and achievable FLOPS (FedPipe step 1).

Measured on the device (CUDA: free memory from the driver, FLOPS from a timed matmul in the
training dtype; CPU: available RAM and a timed FP32 matmul), declared in a node's config
(``memory-gb``, ``tflops``: a declared value overrides measurement), or drawn for simulation
like the paper's testbed: memory budgets uniform over a range, compute spread like mixed
RTX 3090-class cards, both scaled to the model being run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import psutil
import torch

from fedpipe_core.cost import peak_memory
from fedpipe_core.device import compute_dtype, resolve_device

if TYPE_CHECKING:
    from fedpipe_core.task import Task

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


def matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, repeats: int = 5) -> float:
    """Achieved FLOPS of a square matmul (2 · n³ per product), best of ``repeats``."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first run warms up kernels and caches
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def measure(device: str = "auto") -> ClientProfile:
    """Profile this machine: CUDA when available (or asked for), else CPU."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return ClientProfile(float(free), matmul_flops(dev, torch.float16, size=4096), "cuda", compute_bytes=2)
    return ClientProfile(float(psutil.virtual_memory().available), matmul_flops(dev, torch.float32), "cpu")


def declared(node_config: Mapping[str, Any]) -> ClientProfile | None:
    """A profile from node config keys ``memory-gb`` and ``tflops`` (both needed), else None."""
    if "memory-gb" not in node_config and "tflops" not in node_config:
        return None
    try:
        memory_gb, tflops = float(node_config["memory-gb"]), float(node_config["tflops"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"node config needs numeric 'memory-gb' and 'tflops' together ({exc})") from exc
    if memory_gb <= 0 or tflops <= 0:
        raise ValueError(f"node config 'memory-gb'={memory_gb} and 'tflops'={tflops} must be > 0")
    return ClientProfile(memory_gb * 2**30, tflops * 1e12, "declared")


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


def node_profile(task: Task, node_config: Mapping[str, object], partition_id: int) -> ClientProfile:
    """Declared in node config, else simulated (run config ``sim.profile``), else measured here (on its ``device``)."""
    profile = declared(node_config)
    if profile is not None:
        device = resolve_device(str(node_config.get("device", "auto")))
        return replace(profile, compute_bytes=compute_dtype(device).itemsize)
    cfg = task.config
    if cfg.profile == "simulated":
        weights = 4.0 * (task.spec.linear_params + task.spec.other_params)
        training = peak_memory(task.spec, task.uniform_ranks(), cfg.batch_size, cfg.max_seq_len, "fp32") - weights
        memory_range = (cfg.memory_scale * MEMORY_RANGE[0], cfg.memory_scale * MEMORY_RANGE[1])
        return simulated(partition_id, cfg.testbed_seed, weights, training, memory_range, ideal=cfg.heterogeneity == "ideal")
    return measure(str(node_config.get("device", "auto")))
