"""benchmarks/throughput.py at tiny size on the CPU: every run trains the same batches, and the ratios are read off."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def _throughput():
    return load_script("benchmarks/throughput.py")


@pytest.mark.slow
def test_fedpipe_and_the_plain_peft_loop_train_the_same_tokens_and_their_ratios_are_printed(capsys):
    throughput = _throughput()
    runs = "fedpipe-nf4,peft-nf4,fedpipe-fp16,peft-bf16,fedpipe-nf8"
    assert throughput.main(["--model", "tiny", "--batch", "2", "--seq", "64", "--steps", "2", "--rank", "4", "--runs", runs]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    results = json.loads(out[-1])
    assert list(results) == runs.split(",")
    assert len({r["tokens"] for r in results.values()}) == 1  # the same batches for every run
    for row in results.values():
        assert row["tokens"] > 0 and row["tokens_per_s"] == pytest.approx(row["tokens"] / (2 * row["step_s"]))
        assert row["peak_bytes"] > 0
    ratio = results["fedpipe-nf4"]["tokens_per_s"] / results["peft-nf4"]["tokens_per_s"]
    assert f"nf4: fedpipe-nf4 tokens/s ÷ peft-nf4 = {ratio:.3f} (target ≥ 0.95" in "\n".join(out)
    assert any(line.startswith("NF8 step s ÷ NF4 step s = ") for line in out)


def test_an_unknown_run_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        _throughput().main(["--runs", "fedpipe-nf4,deepspeed"])
    assert exit_.value.code == 2 and "--runs 'fedpipe-nf4,deepspeed'" in capsys.readouterr().err
