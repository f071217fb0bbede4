"""Stand-ins for Flower's Grid and node replies, for driving strategies inside one process, and a finished run."""

from pathlib import Path
from types import SimpleNamespace

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from peft import PeftModel

from fedpipe_core.aggregate import ClientUpdate, aggregate_padded
from fedpipe_core.lora import lora_layers
from fedpipe_core.lowrank import Factors, LowRank
from fedpipe_core.results import RunWriter
from fedpipe_flower.messages import to_record


class FakeGrid:
    """Answers profile queries like the ClientApp does: every node declares the same profile,
    or its own from ``profiles`` ({node: (memory bytes, flops)}), and its place from ``places`` when given."""

    def __init__(self, nodes, memory=64 * 2**30, flops=35e12, profiles=None, places=None):
        self.nodes = nodes
        self.profiles = profiles or {}
        self.places = places or {}
        self.default = (memory, flops)
        self.queries = 0

    def _profile(self, node):
        memory, flops = self.profiles.get(node, self.default)
        place = {"place": self.places[node]} if node in self.places else {}
        return ConfigRecord({"memory-bytes": float(memory), "flops": float(flops), "source": "declared", **place})

    def get_node_ids(self):
        return list(self.nodes)

    def send_and_receive(self, messages, timeout=None):
        self.queries += len(messages)
        return [
            SimpleNamespace(
                metadata=SimpleNamespace(src_node_id=m.metadata.dst_node_id),
                has_error=lambda: False,
                content=RecordDict({"profile": self._profile(m.metadata.dst_node_id)}),
            )
            for m in messages
        ]


def reply(node_id, arrays, metrics, error=None):
    content = RecordDict({"arrays": to_record(arrays), "metrics": MetricRecord(metrics)})
    return SimpleNamespace(
        metadata=SimpleNamespace(src_node_id=node_id),
        has_error=lambda: error is not None,
        error=SimpleNamespace(reason=error),
        content=content,
    )


def factors(rank: int, out: int, fan_in: int, seed: int, scale: float = 1.0) -> LowRank:
    """Random LoRA factors (A: rank × fan_in, B: out × rank) for one module, seeded, of the given scale."""
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(rank, fan_in, generator=g), torch.randn(out, rank, generator=g), scale)


def client_factors(task, ranks, seed, scale: float = 1.0) -> Factors:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for module, r in ranks.items():
        o, i = task.shapes[module]
        out[module] = LowRank(torch.randn(r, i, generator=g) * 0.01, torch.randn(o, r, generator=g) * 0.01, scale)
    return out


def client_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW_k = s_k · B_k · A_k (FedPipe eq 9), the reference the aggregation is checked against."""
    return scale * (B.double() @ A.double()).float()


def fedavg_factors(updates: list[ClientUpdate]) -> Factors:
    """LoRA-FedAvg: average A and B *separately*, weighted by examples (fixed rank per module)."""
    ranks: dict[str, int] = {}
    for module in sorted({m for u in updates for m in u.factors}):
        found = {u.factors[module].rank for u in updates if module in u.factors}
        if len(found) != 1:
            raise ValueError(f"lora-fedavg needs one rank per module; {module} has ranks {sorted(found)}")
        ranks[module] = found.pop()
    return aggregate_padded(updates, ranks)


def lora_scaling(peft_model: PeftModel) -> dict[str, float]:
    """alpha / r of every adapted module."""
    return {name: float(layer.scaling["default"]) for name, layer in lora_layers(peft_model).items()}


def finished_run(task, root: Path, rank: int = 3, modules: int = 3) -> tuple[Path, dict[str, torch.Tensor]]:
    """A finished run's directory (config.json, delta.safetensors) whose ΔW has rank ``rank`` on the first
    ``modules`` targets, each 5% of its weight's norm."""
    generator = torch.Generator().manual_seed(0)
    base = task.base_model()
    delta = {}
    for name in task.targets[:modules]:
        weight = base.get_submodule(name).weight.detach()
        out_features, in_features = weight.shape
        change = torch.randn(out_features, rank, generator=generator) @ torch.randn(rank, in_features, generator=generator)
        delta[name] = change * (0.05 * weight.norm() / change.norm())
    writer = RunWriter(root / "runs", "1")
    writer.write_config(task.config)
    writer.save_delta(delta)
    return writer.dir, delta
