"""The E2E scorer against the official script's figures (tuetschek/e2e-metrics) on the same outputs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from fedpipe_core.metrics import SCORER, e2e_scores, normalise, scorer
from fedpipe_core.nist import BETA, brevity_penalty, corpus_nist

FIXTURE = json.loads((Path(__file__).parent / "data" / "e2e-official-scores.json").read_text())
TOLERANCE = {"bleu": 0.01, "nist": 0.01, "meteor": 0.001, "rouge_l": 0.001, "cider": 0.005}


@pytest.mark.skipif(shutil.which("java") is None, reason="the PTB tokenizer and METEOR need a Java runtime")
def test_scores_equal_the_official_scripts_on_its_fixture():
    rows = FIXTURE["rows"]
    scores = e2e_scores({r["mr"]: r["hyp"] for r in rows}, {r["mr"]: r["refs"] for r in rows})
    for metric, tolerance in TOLERANCE.items():
        assert abs(scores[metric] - FIXTURE["official"][metric]) <= tolerance, (metric, scores[metric], FIXTURE["official"])
    assert scorer() == SCORER


def test_nist_information_weights_and_brevity_penalty_by_hand():
    assert brevity_penalty(2, 3) == pytest.approx(0.5) and brevity_penalty(3, 3) == 1.0 == brevity_penalty(4, 3)
    assert BETA == pytest.approx(-math.log(0.5) / math.log(1.5) ** 2)
    refs = [[["the", "cat", "sat"], ["a", "cat", "sat"]]]
    # 6 reference words: info(the) = log2(6/1), info(cat) = log2(6/2), info(the cat) = log2(count(the)/count(the cat)) = 0,
    # info(cat sat) = log2(2/2) = 0, info(the cat sat) = 0; hypothesis 'the cat sat' earns log2 6 + 2 log2 3 at order 1
    expected = (math.log2(6) + 2 * math.log2(3)) / 3
    assert corpus_nist([["the", "cat", "sat"]], refs, order=3) == pytest.approx(expected)
    # a repeated word is clipped at its largest count in one reference; a short hypothesis pays the penalty
    short = corpus_nist([["cat", "cat"]], refs, order=1)
    assert short == pytest.approx(math.log2(3) / 2 * brevity_penalty(2, 3))
    with pytest.raises(ValueError, match="needs at least one reference"):
        corpus_nist([["a"]], [[]])


def test_tokenisation_is_mteval_s_lower_cased_13a():
    assert normalise("The Eagle, a pub near Burger King.") == "the eagle , a pub near burger king ."


def test_fedpipe_eval_writes_the_outputs_it_scored_and_names_its_scorer(task, tmp_path, capsys):
    import csv

    from fakes import finished_run

    from fedpipe_tools.evaluate import main as evaluate

    run, _ = finished_run(task, tmp_path)
    data = tmp_path / "mine.csv"
    data.write_text('mr,ref\n"name[The Eagle], eatType[pub]",The Eagle is a pub.\n"name[Cotto]",Cotto is here.\n')
    assert evaluate([str(run), "--data", str(data), "--outputs", str(tmp_path / "out.csv")]) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["scorer"] == scorer() and scores["scored_groups"] == 2
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["mr"] for r in rows] == ["name[Cotto]", "name[The Eagle], eatType[pub]"]  # the order scored
    assert all(set(r) == {"mr", "output"} for r in rows)
