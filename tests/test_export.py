"""fedpipe-export: a run's ΔW as a peft adapter and as a merged model, loaded offline by peft and transformers."""

from __future__ import annotations

import json

import pytest
import torch
from fakes import finished_run
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedpipe_core.lora import lora_factors, merge_delta
from fedpipe_tools.export import main as export_main


def _logits(model, task) -> torch.Tensor:
    ids = task.tokenizer("name[The Eagle], food[French] ->", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def _reference(task, delta) -> torch.Tensor:
    model = task.base_model()
    merge_delta(model, delta)
    return _logits(model, task)


def test_merged_export_loads_with_transformers_and_matches_base_plus_delta(task, tmp_path, capsys):
    run, delta = finished_run(task, tmp_path)
    out = tmp_path / "merged"
    assert export_main([str(run), "--format", "merged", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == task.tokenizer("hello")["input_ids"]
    assert next(model.parameters()).dtype == torch.float32  # the base checkpoint's dtype
    torch.testing.assert_close(_logits(model, task), _reference(task, delta), rtol=1e-5, atol=1e-4)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["modules"] == 3


PEFT_LOAD = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"  # peft 0.21 on transformers 5, not ours


@pytest.mark.filterwarnings(PEFT_LOAD)
def test_peft_export_is_exact_at_the_delta_rank(task, tmp_path, capsys):
    run, delta = finished_run(task, tmp_path, rank=3)
    out = tmp_path / "adapter"
    assert export_main([str(run), "--format", "peft", "--out", str(out)]) == 0
    report = json.loads((out / "fedpipe_export.json").read_text())["modules"]
    assert [(m["rank"], m["delta_rank"]) for m in report] == [(3, 3)] * 3 and max(m["rel_error"] for m in report) < 1e-6
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    model = PeftModel.from_pretrained(task.base_model(), out)
    torch.testing.assert_close(_logits(model, task), _reference(task, delta), rtol=1e-4, atol=1e-3)
    assert "largest relative error" in capsys.readouterr().out


@pytest.mark.filterwarnings(PEFT_LOAD)
def test_a_truncated_peft_export_keeps_the_error_it_reports(task, tmp_path, capsys):
    run, delta = finished_run(task, tmp_path, rank=3)
    out = tmp_path / "rank1"
    assert export_main([str(run), "--format", "peft", "--out", str(out), "--rank", "1"]) == 0
    report = {m["module"]: m for m in json.loads((out / "fedpipe_export.json").read_text())["modules"]}
    model = PeftModel.from_pretrained(task.base_model(), out)
    for name, lowrank in lora_factors(model).items():
        achieved = float((delta[name] - lowrank.dense()).norm() / delta[name].norm())
        assert report[name]["rank"] == 1 and achieved == pytest.approx(report[name]["rel_error"], rel=1e-4)
        assert 0.05 < achieved < 1.0
    reference, base = _reference(task, delta), _logits(task.base_model(), task)
    assert (_logits(model, task) - reference).abs().max() < (base - reference).abs().max()  # closer than the base
    capsys.readouterr()


def test_bad_exports_stop_with_the_reason(task, tmp_path, capsys):
    run, _ = finished_run(task, tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(SystemExit):
        export_main([str(run), "--format", "peft", "--out", str(tmp_path / "full")])
    assert "is not an empty directory" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep me"
    assert export_main([str(tmp_path), "--format", "merged", "--out", str(tmp_path / "m")]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert export_main([str(run), "--format", "peft", "--out", str(tmp_path / "p"), "--rank", "0"]) == 2
    assert "rank must be >= 1" in capsys.readouterr().err
