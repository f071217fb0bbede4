"""Same seeds, same numbers: two FedPipe rounds with real local training give the same global ΔW.

Tolerance: none on the CPU (bitwise equal). Two rounds make the second one merge the first's ΔW
into each node's base, so the node-state path is covered as well.
"""

import pytest
import torch

from fedpipe_core.local import run_client_round
from fedpipe_core.node.state import node_base
from fedpipe_core.profile import ClientProfile
from fedpipe_core.protocol import TrainReply
from fedpipe_core.strategies import FedPipe
from fedpipe_core.task import client_examples

GIB = 2**30


def _two_rounds(task, directory):
    strategy = FedPipe(task)
    strategy.profiles = {1: ClientProfile(64 * GIB, 35e12, "declared"), 2: ClientProfile(64 * GIB, 20e12, "declared")}
    losses = []
    for server_round in (1, 2):
        updates = {}
        for node, (arrays, order) in strategy.payloads(server_round, strategy.plan_round(server_round, [1, 2])).items():
            model, _ = node_base(task, directory / str(node), arrays, order.state_from, order.state_to, order.precision)
            out = run_client_round(
                task,
                model=model,
                examples=client_examples(task, node - 1, 2)[:8],
                ranks=order.ranks,
                initial_factors=None,
                seed=100 * server_round + node,
                batch_size=order.batch_size,
                local_steps=2,
            )
            reply = TrainReply(
                out.num_examples, out.result.mean_loss, steps=2, state_version=order.state_to, importance=out.importance
            )
            updates[node] = (strategy.read_update(out.arrays, reply, order.ranks), reply)
            losses.append(out.result.mean_loss)
        strategy.combine(server_round, updates)
    return strategy.global_delta(), losses, strategy.importance


@pytest.mark.slow
def test_two_runs_with_the_same_seeds_give_the_same_model_and_losses(task, tmp_path):
    delta_a, losses_a, importance_a = _two_rounds(task, tmp_path / "a")
    delta_b, losses_b, importance_b = _two_rounds(task, tmp_path / "b")
    assert losses_a == losses_b and importance_a == importance_b
    assert delta_a.keys() == delta_b.keys() and delta_a
    assert all(torch.equal(delta_a[m], delta_b[m]) for m in delta_a)
    assert any(float(d.abs().sum()) > 0 for d in delta_a.values())
