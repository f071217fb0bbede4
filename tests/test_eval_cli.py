"""fedpipe-eval: --limit caps perplexity and generation at a seeded sample of meaning representations."""

from __future__ import annotations

import json
import random

from fakes import finished_run

from fedpipe_core.data import load_examples
from fedpipe_tools.evaluate import main as eval_main
from fedpipe_tools.evaluate import sample_groups

NAMES = ["Alimentum", "Aromi", "Bibimbap House", "Blue Spice", "Clowns", "Cotto"]


def _data(tmp_path):
    rows = [f'"name[{n}], eatType[pub]",{n} is a pub.\n"name[{n}], eatType[pub]",A pub called {n}.' for n in NAMES]
    path = tmp_path / "test.csv"
    path.write_text("mr,ref\n" + "\n".join(rows) + "\n")
    return path


def test_the_limit_samples_whole_meaning_representations_with_a_seed(tmp_path):
    examples = load_examples("e2e", str(_data(tmp_path)))
    picked = sample_groups(examples, 2, seed=3)
    groups = sorted({e.group for e in examples})
    assert {e.group for e in picked} == set(random.Random(3).sample(groups, 2)) and len(picked) == 4  # both references
    assert sample_groups(examples, 2, seed=3) == picked and sample_groups(examples, None, seed=3) == examples
    assert {e.group for e in sample_groups(examples, 2, seed=4)} != {e.group for e in picked}


def test_limited_scoring_caps_perplexity_and_generation(task, tmp_path, capsys):
    run, _ = finished_run(task, tmp_path)
    assert eval_main([str(run), "--data", str(_data(tmp_path)), "--limit", "2", "--seed", "3"]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["scored_groups"] == 2 and scores["scored_examples"] == 4 and scores["seed"] == 3
    assert set(scores) >= {"bleu", "nist", "meteor", "rouge_l", "cider", "ppl"} and scores["ppl"] > 1
