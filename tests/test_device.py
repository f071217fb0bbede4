"""Where a node computes and what its round measured: device choice, peak memory, the GPU path."""

import json
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fedpipe_core import device as device_module
from fedpipe_core.cost import peak_memory
from fedpipe_core.device import PeakMemory, compute_dtype, host_facts, resolve_device
from fedpipe_core.qlinear import place, stored_linear
from fedpipe_core.quantize import quantize

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_device_choice_and_bad_values_named():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu") and compute_dtype(torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="node config 'device': 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_peak_memory_on_the_cpu_sees_an_allocation_that_is_gone_by_the_end():
    with PeakMemory(torch.device("cpu"), interval_s=0.001) as peak:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        total = float(block.sum())
        seen, deadline = peak.samples, time.monotonic() + 30
        while peak.samples < seen + 2 and time.monotonic() < deadline:  # alive across a whole sample (the sampler's
            time.sleep(0.002)  # interval grows with the heap it walks, so a fixed hold could fall between two samples)
        del block
        torch.ones(1).add_(total)
    assert 56 * 2**20 <= peak.increase_bytes <= 160 * 2**20
    assert peak.peak_bytes(1000) == 1000 + peak.increase_bytes


def test_the_cpu_peak_sampler_takes_a_bounded_share_of_a_core(monkeypatch):
    def slow(process):  # a heap walk of 10 ms
        time.sleep(0.01)
        return 0

    monkeypatch.setattr(device_module, "_live_bytes", slow)
    with PeakMemory(torch.device("cpu"), interval_s=0.001, max_share=0.05) as peak:
        time.sleep(1.0)
    assert 2 <= peak.samples <= 7  # every 0.2 s (10 ms / 5%), not every 1 ms


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "nf8", "nf4"])
def test_stored_layers_on_cuda_match_the_cpu_reference(precision):
    g = torch.Generator().manual_seed(0)
    weight, x = 0.05 * torch.randn(256, 192, generator=g), torch.randn(4, 192, generator=g)
    stored = quantize(weight, precision)  # a node quantizes on the CPU while it streams the checkpoint
    reference = F.linear(x, stored.dequantize())
    layer = place(stored_linear(stored, None), torch.device("cuda"))
    assert layer.compute_dtype == compute_dtype(torch.device("cuda"))
    torch.testing.assert_close(layer(x.cuda()).float().cpu(), reference, rtol=2e-2, atol=2e-2)  # BF16 rounding


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["nf8", "nf4"])
def test_codes_computed_on_cuda_come_back_to_the_cpu_and_agree_with_the_cpu_kernels(precision):
    weight = 0.05 * torch.randn(512, 384, generator=torch.Generator().manual_seed(1))
    on_cpu, on_cuda = quantize(weight, precision), quantize(weight, precision, torch.device("cuda"))
    assert on_cuda.data.device.type == "cpu" and on_cuda.state.absmax.device.type == "cpu"
    assert on_cuda.data.shape == on_cpu.data.shape and on_cuda.data.dtype == on_cpu.data.dtype
    torch.testing.assert_close(on_cuda.state.absmax, on_cpu.state.absmax)
    agree = (on_cuda.data == on_cpu.data).float().mean().item()
    assert agree >= 0.999, agree  # a value exactly between two levels may round either way
    torch.testing.assert_close(on_cuda.dequantize(), on_cpu.dequantize(), rtol=0, atol=float(on_cpu.state.absmax.max()) * 0.3)


@pytest.mark.gpu
@needs_cuda
def test_a_node_base_quantized_on_cuda_is_the_cpu_base(task, tmp_path):
    from fedpipe_core.node.state import node_base
    from fedpipe_core.qlinear import effective_weight

    on_cpu, _ = node_base(task, tmp_path / "cpu", {}, 0, 0, "nf4")
    on_cuda, state = node_base(task, tmp_path / "cuda", {}, 0, 0, "nf4", device=torch.device("cuda"))
    assert state.base and all(q.data.device.type == "cpu" for q in state.base.values())
    for name in task.targets[:4]:
        ours, reference = effective_weight(on_cuda.get_submodule(name)), effective_weight(on_cpu.get_submodule(name))
        assert (ours == reference).float().mean() >= 0.999


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "nf8", "nf4"])
def test_a_cuda_client_round_trains_and_reports_the_allocator_peak(task, tmp_path, precision, batch):
    from fedpipe_core.local import run_client_round
    from fedpipe_core.node.state import node_base

    model, _ = node_base(task, tmp_path, {}, 0, 0, precision)
    ranks = {m: 4 for m in task.targets}
    out = run_client_round(
        task,
        model=model,
        examples=[e for e in task.splits["train"] if len(e.prompt) + len(e.target) > 400][: 4 * batch],
        ranks=ranks,
        initial_factors=None,
        seed=0,
        batch_size=batch,
        local_steps=4,
        device=torch.device("cuda"),
    )
    assert out.result.steps == 4 and torch.isfinite(torch.tensor(out.result.mean_loss))
    assert out.peak_bytes > out.model_bytes > 0
    two_bytes = compute_dtype(torch.device("cuda")).itemsize
    predicted = peak_memory(task.spec, ranks, batch, task.config.max_seq_len, precision, two_bytes)
    assert 0.8 <= out.peak_bytes / predicted <= 1.2, (out.peak_bytes, predicted)


CPU_ROUND = """
import json, sys
from pathlib import Path
from fedpipe_core.config import RunConfig
from fedpipe_core.cost import peak_memory
from fedpipe_core.local import run_client_round
from fedpipe_core.node.state import node_base
from fedpipe_core.task import load_task
config, precision, batch, where = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
task = load_task(RunConfig.from_mapping(config))
ranks = task.uniform_ranks()
model, _ = node_base(task, where, {}, 0, 0, precision)
examples = [e for e in task.splits["train"] if len(e.prompt) + len(e.target) > 400][: 2 * batch]
out = run_client_round(task, model=model, examples=examples, ranks=ranks, initial_factors=None, seed=0, batch_size=batch,
                       local_steps=2)
print(json.dumps([out.peak_bytes, peak_memory(task.spec, ranks, batch, task.config.max_seq_len, precision)]))
"""


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("precision", ["fp32", "fp16", "nf8", "nf4"])
def test_the_cost_model_predicts_a_cpu_round_within_20_percent(task, tmp_path, precision, batch):
    # a fresh process, as a node's round runs: the heap an earlier test left behind shifts what the sampler sees
    args = [json.dumps(task.config.to_mapping()), precision, str(batch), str(tmp_path)]
    done = subprocess.run([sys.executable, "-c", CPU_ROUND, *args], capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    measured, predicted = json.loads(done.stdout.strip().splitlines()[-1])
    assert 0.8 <= measured / predicted <= 1.2, (measured, predicted)


def test_host_facts_name_the_kernels_this_process_dispatches_to():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        facts = host_facts()
    finally:
        torch.set_num_threads(threads)
    assert facts["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert facts["threads"] == 1
    assert facts["torch"] == torch.__version__
    assert isinstance(facts["cpu"], str) and facts["cpu"]
    assert ("cuda" in facts) == torch.cuda.is_available()
