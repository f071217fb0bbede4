"""The instruction-tuning task runs through the same round code and is scored by perplexity."""

import dataclasses

import pytest

from fedpipe_core.evaluate import score_test
from fedpipe_core.local import run_client_round
from fedpipe_core.qlinear import stored_bytes
from fedpipe_core.task import client_examples, load_task


def test_alpaca_round_and_perplexity(task):
    alpaca = load_task(dataclasses.replace(task.config, task="alpaca", eval_examples=4))
    assert {e.group for e in alpaca.splits["train"]}.isdisjoint({e.group for e in alpaca.splits["test"]})
    examples = client_examples(alpaca, 1, 3)
    model = alpaca.base_model()
    model_bytes = stored_bytes(model)
    out = run_client_round(
        alpaca,
        model=model,
        examples=examples,
        ranks={m: 2 for m in alpaca.targets[:4]},
        initial_factors=None,
        seed=0,
    )
    processed = alpaca.config.local_steps * min(alpaca.config.batch_size, len(examples))  # batch × steps done
    assert out.num_examples == processed and out.result.steps == alpaca.config.local_steps and out.train_s > 0
    assert out.model_bytes == model_bytes and out.peak_bytes > model_bytes  # measured: the model plus what training took
    assert set(out.importance_history) == set(out.importance) and all(
        s > 0 and u >= 0 for s, u in out.importance_history.values()
    )
    assert len(out.arrays) == 8 and all(a.shape[0] == 2 for k, a in out.arrays.items() if k.endswith("::A"))
    scores = score_test(alpaca, {})
    assert set(scores) == {"ppl", "scored_examples"} and scores["scored_examples"] == 4 and 1.0 < scores["ppl"] < 1e4
    assert scores["ppl"] == pytest.approx(score_test(alpaca, {})["ppl"])
