"""FedPipe's round start: a node continues its adapters and AdamW moments while its effective weights stay the
global model W0 + ΣΔW (eqs 9-12), or restarts them (the paper's eq 12)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from fedpipe_core.codec import encode_delta, encode_factors
from fedpipe_core.local import adapter_scaling
from fedpipe_core.lowrank import LowRank
from fedpipe_core.node.state import node_base, node_state_dir
from fedpipe_core.protocol import TrainInstruction
from fedpipe_core.qlinear import effective_weight
from fedpipe_core.round_start import OPTIMIZER_FILE, change, fitted, load_adapters, products


def _factors(task, ranks, seed, std=0.05, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m, r in ranks.items():
        (o, i) = task.shapes[m]
        out[m] = LowRank(torch.randn(r, i, generator=g) * std, torch.randn(o, r, generator=g) * std, scale)
    return out


@pytest.mark.parametrize(("precision", "tolerance"), [("fp32", 1e-5), ("nf4", 0.25)])
def test_a_continued_node_s_effective_weights_are_the_global_model(task, tmp_path, precision, tolerance):
    modules = list(task.targets[:2])
    s = adapter_scaling(task.config)
    saved = _factors(task, {modules[0]: 4, modules[1]: 2}, seed=1, scale=s)  # a node's adapters, at the run's scale
    increment = _factors(task, {m: 3 for m in modules}, seed=2)  # a round's ΔW, its scale folded (1)
    ranks = {modules[0]: 4, modules[1]: 2}
    before = fitted(saved, ranks)
    model, _ = node_base(task, tmp_path, encode_delta(increment), 0, 1, precision, products(before))
    base = task.base_model()
    for module in modules:
        A, B = before[module].A, before[module].B
        effective = effective_weight(model.get_submodule(module)) + s * B @ A
        expected = base.get_submodule(module).weight.detach() + increment[module].B @ increment[module].A
        scale = float(expected.abs().mean())
        assert float((effective - expected).abs().mean()) < tolerance * scale  # W0 + ΣΔW, to quantization tolerance
        assert float((s * B @ A).abs().mean()) > 0  # while the adapter is not zero


def test_plans_that_change_keep_the_product_or_fold_the_rest_into_the_base(task):
    module, other = task.targets[0], task.targets[1]
    saved = _factors(task, {module: 4, other: 2}, seed=3, scale=2.0)
    lower = fitted(saved, {module: 2})
    assert set(lower) == {module} and lower[module].rank == 2  # the unplanned module loses its adapter
    assert lower[module].scale == 2.0  # refitted at the adapters' own scale
    full = saved[module].dense()
    U, S, Vh = torch.linalg.svd(full.double())
    assert torch.allclose(lower[module].dense().double(), (U[:, :2] * S[:2]) @ Vh[:2], atol=1e-5)
    assert fitted(saved, {module: 8})[module].rank == 4  # a higher rank: the saved components go first
    grown = change({}, {module: saved[module]})
    assert grown[module] is saved[module]
    step = change({module: lower[module]}, {module: saved[module]})
    assert step[module].scale == 2.0 and torch.allclose(step[module].dense(), full - lower[module].dense(), atol=1e-5)
    with pytest.raises(ValueError, match="changed from ones of scale"):
        change({module: LowRank(lower[module].A, lower[module].B, 1.0)}, {module: saved[module]})


def test_adapters_and_adamw_moments_survive_the_next_message(task, tmp_path):
    from fedpipe_core.local import RoundSeeds
    from fedpipe_core.node.round import ROUTINES, LocalJob
    from fedpipe_core.task import NodeData

    local = replace(task, config=replace(task.config, cache_dir=str(tmp_path), round_start="continue"))
    context = SimpleNamespace(run_id=5, node_id=9, node_config={"device": "cpu"})
    data = NodeData(task.splits["train"][:16], [], [], "h")
    module = task.targets[0]
    first = TrainInstruction(1, "fedpipe", {module: 4}, 2, 2, "fp32", 0, 0)
    out1, _ = ROUTINES["fedpipe"](LocalJob(local, context, first, {}, data, RoundSeeds(1, 1), None))
    directory = node_state_dir(local, 5, 9)
    adapters1, moments1 = load_adapters(directory, adapter_scaling(local.config))
    assert out1.arrays[f"{module}::A"].shape[0] == 4  # a fresh adapter's change is the adapter itself
    steps = {n: float(m["step"]) for n, m in moments1.items()}
    assert steps and set(steps.values()) == {2.0}
    half = {module: LowRank(torch.from_numpy(out1.arrays[f"{module}::A"]), 0.5 * torch.from_numpy(out1.arrays[f"{module}::B"]))}
    second = TrainInstruction(2, "fedpipe", {module: 4}, 2, 2, "fp32", 0, 1)
    out2, _ = ROUTINES["fedpipe"](LocalJob(local, context, second, encode_factors(half), data, RoundSeeds(2, 2), None))
    assert out2.arrays[f"{module}::A"].shape[0] == out2.arrays[f"{module}::A0"].shape[0] == 4  # after, and started from
    from fedpipe_core.strategies import FedPipe

    update = FedPipe(local).decode_update(out2.arrays, {module: 4}, 4)
    A, B = update.factors[module].A, update.factors[module].B
    A0, B0 = torch.from_numpy(out2.arrays[f"{module}::A0"]), torch.from_numpy(out2.arrays[f"{module}::B0"])
    after = torch.from_numpy(out2.arrays[f"{module}::B"]) @ torch.from_numpy(out2.arrays[f"{module}::A"])
    assert A.shape[0] == 8 and torch.allclose(B @ A, after - B0 @ A0, atol=1e-6)  # the server averages the change
    from fedpipe_core.protocol import UpdateError

    wide = {**out2.arrays, f"{module}::A0": torch.zeros(6, task.shapes[module][1]).numpy()}
    wide[f"{module}::B0"] = torch.zeros(task.shapes[module][0], 6).numpy()
    with pytest.raises(UpdateError, match="starting adapters of rank 6 do not fit its assigned rank"):
        FedPipe(local).decode_update(wide, {module: 4}, 4)
    _, moments2 = load_adapters(directory, adapter_scaling(local.config))
    assert {float(m["step"]) for m in moments2.values()} == {4.0}  # AdamW's moments continued, not reset
    assert any(not torch.equal(moments1[n]["exp_avg"], moments2[n]["exp_avg"]) for n in moments1)
    assert OPTIMIZER_FILE in {p.name for p in directory.iterdir()} and load_file(str(directory / OPTIMIZER_FILE))
    restart = replace(local, config=replace(local.config, round_start="restart"))
    out3, _ = ROUTINES["fedpipe"](
        LocalJob(restart, SimpleNamespace(run_id=6, node_id=9, node_config={}), first, {}, data, RoundSeeds(1, 1), None)
    )
    assert out3.arrays[f"{module}::A"].shape[0] == 4 and adapters1  # the paper's restart: fresh adapters, nothing carried


def test_keep_moments_false_continues_the_adapters_with_a_fresh_adamw(task, tmp_path):
    from fedpipe_core.config import ConfigError, RunConfig
    from fedpipe_core.local import RoundSeeds
    from fedpipe_core.node.round import ROUTINES, LocalJob
    from fedpipe_core.task import NodeData

    config = replace(task.config, cache_dir=str(tmp_path), round_start="continue", keep_moments=False)
    local = replace(task, config=config)
    context = SimpleNamespace(run_id=7, node_id=3, node_config={"device": "cpu"})
    data = NodeData(task.splits["train"][:16], [], [], "h")
    module = task.targets[0]
    first = TrainInstruction(1, "fedpipe", {module: 4}, 2, 2, "fp32", 0, 0)
    out1, _ = ROUTINES["fedpipe"](LocalJob(local, context, first, {}, data, RoundSeeds(1, 1)))
    adapters1, _ = load_adapters(node_state_dir(local, 7, 3), adapter_scaling(local.config))
    second = TrainInstruction(2, "fedpipe", {module: 4}, 2, 2, "fp32", 0, 0)
    out2, _ = ROUTINES["fedpipe"](LocalJob(local, context, second, {}, data, RoundSeeds(2, 2)))
    assert torch.equal(torch.from_numpy(out2.arrays[f"{module}::A0"]), adapters1[module].A)  # the adapters went on
    _, moments = load_adapters(node_state_dir(local, 7, 3), adapter_scaling(local.config))
    assert {float(m["step"]) for m in moments.values()} == {2.0}  # AdamW restarted: 2 steps, not 4
    with pytest.raises(ConfigError, match="'fedpipe.keep-moments' = false needs 'fedpipe.round-start' = 'continue'"):
        RunConfig.from_mapping({"fedpipe.keep-moments": False, "fedpipe.round-start": "restart"})


def test_one_round_start_policy_decides_where_adapters_start_and_what_is_sent(task, tmp_path):
    from fedpipe_core.codec import decode_factors
    from fedpipe_core.round_start import ADAPTERS_FILE, RoundStart

    module, other = task.targets[0], task.targets[1]
    ranks = {module: 4, other: 2}
    s = adapter_scaling(task.config)
    sent = encode_factors(_factors(task, ranks, seed=5))
    trained = encode_factors(_factors(task, ranks, seed=6))
    cfg = task.config

    peers = RoundStart.of(cfg, "factors", task.shapes, task.targets, s)  # every peer starts from the server's factors
    begun = peers.begin(tmp_path / "peer", ranks, sent, task.shapes)
    assert begun.initial == sent and peers.held(begun) == {} and begun.moments == {}
    assert peers.end(tmp_path / "peer", begun, trained, {}, task.shapes) is trained
    assert not (tmp_path / "peer").exists()  # a peer keeps nothing on its disk

    restart = RoundStart.of(replace(cfg, round_start="restart"), "fedpipe", task.shapes, task.targets, s)
    begun = restart.begin(tmp_path / "restart", ranks, {}, task.shapes)
    assert begun.initial is None and restart.held(begun) == {}  # fresh adapters (B = 0), the base holds all of ΣΔW
    assert restart.end(tmp_path / "restart", begun, trained, {}, task.shapes) is trained
    assert not (tmp_path / "restart" / ADAPTERS_FILE).exists()

    carried = RoundStart.of(cfg, "fedpipe", task.shapes, task.targets, s)
    first = carried.begin(tmp_path / "node", ranks, {}, task.shapes)
    assert first.initial is None  # nothing saved yet: fresh adapters
    assert set(carried.end(tmp_path / "node", first, trained, {}, task.shapes)) == set(trained)  # nothing to subtract
    second = carried.begin(tmp_path / "node", {module: 4}, {}, task.shapes)  # the next round plans one module
    kept = decode_factors(trained, task.shapes, s)[module]
    assert torch.equal(second.before[module].B, kept.B) and set(second.before) == {module}
    assert second.before[module].scale == s and torch.allclose(carried.held(second)[module], s * kept.B @ kept.A)
    reply = carried.end(tmp_path / "node", second, encode_factors({module: kept}), {}, task.shapes)
    assert set(reply) == {f"{module}::A", f"{module}::B", f"{module}::A0", f"{module}::B0"}  # the change's two ends

    frozen = RoundStart.of(replace(cfg, privacy_frozen_a=True), "fedpipe", task.shapes, task.targets, s)
    begun = frozen.begin(tmp_path / "frozen", ranks, {}, task.shapes)
    top = max(cfg.rank_candidates())
    start = decode_factors(begun.initial, task.shapes, s)
    assert torch.equal(start[module].A, frozen.frozen_a[module][:4]) and not start[module].B.any()  # shared A, B = 0
    out = frozen.end(tmp_path / "frozen", begun, encode_factors(start), {}, task.shapes)
    assert set(out) == {f"{module}::B", f"{other}::B"} and out[f"{other}::B"].shape == (task.shapes[other][0], top)  # B alone
