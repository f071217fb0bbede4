"""What the evaluation scores: every group before a second reference of any, evenly spaced test MRs,
and the seeds that make a node's fresh adapters per-client or shared."""

import dataclasses

import torch

from fedpipe_core.data import Example
from fedpipe_core.evaluate import pick_groups, score_test, spread
from fedpipe_core.local import round_seeds, run_client_round


def _examples(sizes: dict[str, int]) -> list[Example]:
    return [Example(f"p-{g}", f"t-{g}-{i}", g, g) for g, n in sizes.items() for i in range(n)]


def test_spread_takes_one_reference_of_every_group_first():
    examples = _examples({"a": 3, "b": 1, "c": 2})
    assert [e.target for e in spread(examples, 3)] == ["t-a-0", "t-b-0", "t-c-0"]
    assert [e.target for e in spread(examples, 5)] == ["t-a-0", "t-b-0", "t-c-0", "t-a-1", "t-c-1"]
    assert sorted(e.target for e in spread(examples, 0)) == sorted(e.target for e in examples)
    assert len(spread(examples, 100)) == len(examples)


def test_pick_groups_spreads_over_the_sorted_groups():
    groups = [f"g{i:02d}" for i in range(10)][::-1]
    assert pick_groups(groups, 0) == sorted(groups)
    assert pick_groups(groups, 20) == sorted(groups)
    assert pick_groups(groups, 5) == ["g00", "g02", "g04", "g06", "g08"]
    assert pick_groups(groups, 3) == ["g00", "g03", "g06"]


def test_the_validation_cap_covers_every_mr_of_the_split(task):
    validation = task.splits["validation"]
    groups = {e.group for e in validation}
    assert {e.group for e in spread(validation, len(groups))} == groups
    assert len({e.group for e in validation[: len(groups)]}) < len(groups) / 4  # what the first examples would cover


def test_score_test_counts_what_it_scored(task):
    scores = score_test(task, {}, max_examples=3, max_groups=2)
    assert scores["scored_examples"] == 3 and scores["scored_groups"] == 2
    everything = score_test(
        dataclasses.replace(task, config=dataclasses.replace(task.config, max_new_tokens=2)),
        {},
        examples=task.splits["test"][:20],
        max_examples=0,
        max_groups=0,
    )
    assert everything["scored_examples"] == 20
    assert everything["scored_groups"] == len({e.group for e in task.splits["test"][:20]})


def test_shared_init_gives_every_node_the_same_fresh_a(task):
    shared = dataclasses.replace(task.config, lora_init="shared")
    assert round_seeds(shared, 3, 0).init == round_seeds(shared, 3, 2).init
    assert round_seeds(shared, 3, 0).data != round_seeds(shared, 3, 2).data
    assert round_seeds(shared, 3, 0).init != round_seeds(shared, 4, 0).init
    assert round_seeds(task.config, 3, 0).init != round_seeds(task.config, 3, 2).init


def test_the_init_seed_alone_draws_a(task):
    one = task.splits["train"][:1]  # one example: every batch order is the same, only A's draw can differ

    def factors(seed: int, init_seed: int | None) -> dict[str, torch.Tensor]:
        out = run_client_round(
            task,
            model=task.base_model(),
            examples=one,
            ranks={task.targets[0]: 2},
            initial_factors=None,
            seed=seed,
            init_seed=init_seed,
            local_steps=1,
            batch_size=1,
        )
        return {k: torch.as_tensor(v) for k, v in out.arrays.items()}

    same_a, other_a = factors(1, 7), factors(2, 7)
    assert all(torch.equal(same_a[k], other_a[k]) for k in same_a)
    per_client = factors(2, None)
    assert not all(torch.equal(same_a[k], per_client[k]) for k in same_a)
