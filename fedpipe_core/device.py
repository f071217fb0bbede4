"""Where a node computes (node config ``device``) and what its round really took in memory.

``auto`` is the first CUDA device when there is one, else the CPU. The compute dtype is BF16 on
a GPU that supports it, else FP16 (with loss scaling), and FP32 on the CPU; adapters and their
optimizer state stay FP32 everywhere.

Peak memory of a round is measured, not modelled: the model's bytes as it is held plus the peak,
above its level when the round began, of the bytes allocated and not yet freed: on CUDA the
allocator's (``max_memory_allocated``), on the CPU glibc's (``mallinfo2``), sampled every 20 ms
while the round runs. Resident memory would overstate it: the
C heap keeps freed temporaries (the FP16/NF8 layers dequantize one weight per call) and a first
call maps library code in. Without glibc, non-file-backed resident memory is sampled instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import platform
import threading
import time
from pathlib import Path
from types import TracebackType

import psutil
import torch

from fedpipe_core.profile import ClientProfile

DEVICES_HELP = "'auto' (CUDA when present, else CPU), 'cpu', 'cuda' or 'cuda:N'"


def resolve_device(spec: str = "auto") -> torch.device:
    """The device a node config's ``device`` names; ValueError naming the value when it cannot be used."""
    text = str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"node config 'device': {spec!r} is not {DEVICES_HELP}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"node config 'device': {spec!r} is not {DEVICES_HELP}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"node config 'device': {spec!r} but this machine has no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"node config 'device': {spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def compute_dtype(device: torch.device) -> torch.dtype:
    """BF16 on a GPU that supports it, else FP16; FP32 on the CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision in the device's compute dtype on a GPU; nothing on the CPU (FP32 throughout)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=compute_dtype(device))
    return contextlib.nullcontext()


def host_facts() -> dict[str, object]:
    """The machine the floats came from: CPU model, the instruction set torch dispatches to, threads, torch and CUDA.

    CPU kernels sum in an order that depends on the instruction set (AVX512 or AVX2), so the same run on another CPU
    gives losses that differ in the sixth digit; a run record names its host so a reader can tell."""
    facts: dict[str, object] = {
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        facts["cuda"] = torch.cuda.get_device_name()
    return facts


def _cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else what ``platform`` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def trim_heap() -> None:
    """glibc ``malloc_trim``: return the heap's free pages to the OS (a no-op without glibc)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()
_MALLINFO2 = getattr(_LIBC, "mallinfo2", None)
if _MALLINFO2 is not None:
    _MALLINFO2.restype = _MallInfo2


def _live_bytes(process: psutil.Process) -> int:
    """Bytes the process has allocated and not freed: glibc's ``mallinfo2`` (heap chunks in use + mmapped
    blocks), which, unlike resident memory, neither keeps freed temporaries that the heap holds on to
    nor counts the code pages a first call maps in; resident memory that is not file-backed without it."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return int(info.uordblks + info.hblkhd)
    memory = process.memory_info()
    return int(memory.rss - getattr(memory, "shared", 0))


class PeakMemory:
    """Measures the peak memory of the code it wraps: ``with PeakMemory(device) as peak: ...; peak.increase_bytes``."""

    def __init__(self, device: torch.device, interval_s: float = 0.02, max_share: float = 0.15) -> None:
        self.device = device
        self.interval_s = interval_s
        self.max_share = max_share
        """The CPU sampler waits at least ``interval_s`` and at least 1 / ``max_share`` times one sample's duration, so
        that it costs at most that share of a core however large the heap (``mallinfo2`` walks it under the malloc
        lock: ~2.3 ms for a 135M node's heap, about 11% of a core at 20 ms). 20 ms is as coarse as it can sample:
        at ~46 ms it misses the NF8/NF4 backward's dequantized transients (measured peaks fell to 0.76-0.78 × the
        cost model's, tests/test_device.py)."""
        self.samples = 0
        self.increase_bytes = 0
        """Peak above the level at entry (CUDA and CPU: allocated bytes)."""
        self._start = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        process = psutil.Process()
        self._start = self._peak = _live_bytes(process)
        self._thread = threading.Thread(target=self._sample, args=(process,), daemon=True)
        self._thread.start()
        return self

    def _sample(self, process: psutil.Process) -> None:
        wait = self.interval_s
        while not self._stop.wait(wait):
            started = time.perf_counter()
            self._peak = max(self._peak, _live_bytes(process))
            self.samples += 1
            wait = max(self.interval_s, (time.perf_counter() - started) / self.max_share)

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, trace: TracebackType | None) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.increase_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._peak = max(self._peak, _live_bytes(psutil.Process()))
        self.increase_bytes = max(0, self._peak - self._start)

    def peak_bytes(self, model_bytes: int) -> int:
        """The round's peak in the cost model's terms: the model's bytes plus the increase above the level at entry
        (on CUDA too, so that what else the process holds on the GPU is not counted as the round's)."""
        return model_bytes + self.increase_bytes


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
    """Profile this machine (FedPipe step 1): free CUDA memory and FP16 matmul FLOPS when it trains on CUDA (by
    ``device``), else available RAM and FP32 matmul FLOPS."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return ClientProfile(float(free), matmul_flops(dev, torch.float16, size=4096), "cuda", compute_bytes=2)
    return ClientProfile(float(psutil.virtual_memory().available), matmul_flops(dev, torch.float32), "cpu")
