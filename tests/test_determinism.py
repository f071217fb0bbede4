"""Same seeds, same numbers: two FedPipe rounds with real local training give the same global ΔW.

Two rounds make the second one merge the first's ΔW into each node's base, so the node-state path is covered as
well. Tolerance: the order the CPU's kernels sum in. On one AVX512 Xeon two runs came back bitwise equal; one thread
against two moves the losses by up to 5e-7 (relative), ΔW by 5e-4 (Frobenius, relative) and importance by 5e-5, and
a 2-core CI host once gave 7e-6 on a loss within one process (AdamW's first step, lr · sign(g), turns a gradient's
last bits into a whole step). Other local seeds move the losses by 2e-2 or more and ΔW by about 1.5 × its norm: the
tolerances below sit far from both.
"""

import pytest

from fedpipe_core.local import run_client_round
from fedpipe_core.node.state import node_base
from fedpipe_core.profile import ClientProfile
from fedpipe_core.protocol import TrainReply
from fedpipe_core.strategies import FedPipe
from fedpipe_core.task import client_examples

GIB = 2**30


def _two_rounds(task, directory, seed=0):
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
                seed=seed + 100 * server_round + node,
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


def _distance(run_a: tuple, run_b: tuple) -> tuple[float, float, float]:
    """Largest relative difference of two runs' losses, ΔW (Frobenius, per module) and importance scores."""
    (delta_a, losses_a, importance_a), (delta_b, losses_b, importance_b) = run_a, run_b
    assert delta_a.keys() == delta_b.keys() and delta_a and importance_a.keys() == importance_b.keys()
    losses = max(abs(a - b) / abs(a) for a, b in zip(losses_a, losses_b, strict=True))
    delta = max(float((delta_a[m] - delta_b[m]).norm() / delta_a[m].norm()) for m in delta_a)
    importance = max(abs(importance_a[w] - importance_b[w]) / abs(importance_a[w]) for w in importance_a)
    return losses, delta, importance


@pytest.mark.slow
def test_two_runs_with_the_same_seeds_give_the_same_model_and_losses(task, tmp_path):
    run = _two_rounds(task, tmp_path / "a")
    assert all(float(d.norm()) > 0 for d in run[0].values())
    losses, delta, importance = _distance(run, _two_rounds(task, tmp_path / "b"))
    assert losses <= 1e-4 and delta <= 5e-2 and importance <= 1e-2, (losses, delta, importance)
    losses, delta, importance = _distance(run, _two_rounds(task, tmp_path / "c", seed=1000))
    assert losses >= 1e-2 and delta >= 0.5 and importance >= 0.5, (losses, delta, importance)
