"""fedpipe-generate: a saved run's model answers the user's inputs through the training prompt template."""

from __future__ import annotations

import json

import pytest
from fakes import finished_run

from fedpipe_core.data import e2e_prompt
from fedpipe_core.evaluate import generate, global_model
from fedpipe_tools.generate import main as generate_main

MRS = ["name[The Eagle], eatType[coffee shop], food[French]", "name[Alimentum], area[city centre]"]


def _printed(capsys) -> list[dict]:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generation_uses_the_run_model_and_the_training_template(task, tmp_path, capsys):
    run, delta = finished_run(task, tmp_path)
    (tmp_path / "inputs.txt").write_text(MRS[1] + "\n\n")
    assert generate_main([str(run), MRS[0], "--file", str(tmp_path / "inputs.txt"), "--max-new-tokens", "12"]) == 0
    printed = _printed(capsys)
    expected = generate(global_model(task, delta), task.tokenizer, [e2e_prompt(mr) for mr in MRS], 12)
    assert [p["input"] for p in printed] == MRS and [p["output"] for p in printed] == expected
    assert generate_main([str(run), MRS[0], "--max-new-tokens", "12", "--base"]) == 0
    assert _printed(capsys)[0]["output"] == generate(global_model(task, {}), task.tokenizer, [e2e_prompt(MRS[0])], 12)[0]


def test_generation_refuses_what_it_cannot_use(task, tmp_path, capsys):
    run, _ = finished_run(task, tmp_path)
    with pytest.raises(SystemExit):
        generate_main([str(run)])
    assert "at least one input" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main([str(run), "x", "--file", str(tmp_path / "missing.txt")])
    assert "missing.txt" in capsys.readouterr().err
    assert generate_main([str(tmp_path), "x"]) == 2
    assert "has no config.json" in capsys.readouterr().err
