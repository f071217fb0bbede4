"""benchmarks/scale.py at tiny size: a real deployment in both modes, the same numbers, adapter-sized state writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]


def _scale():
    return load_script("benchmarks/scale.py")


@pytest.mark.deployment
def test_the_scale_benchmark_runs_both_modes_with_the_same_numbers_and_a_warm_worker(tmp_path, capsys):
    scale = _scale()
    assert scale.main(["--model", "tiny", "--rounds", "2", "--steps", "1", "--workdir", str(tmp_path), "--timeout-s", "900"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(results) == {"in-process", "worker"}
    # the worker trains the same rounds: equal up to the order the CPU's kernels sum in (tests/test_determinism.py)
    assert results["worker"]["eval_loss"] == pytest.approx(results["in-process"]["eval_loss"], rel=1e-4)
    assert results["worker"]["precisions"] == results["in-process"]["precisions"]  # the same plans
    for mode in results.values():
        assert 0 < mode["state_bytes_per_message"] <= 0.01 * mode["model_bytes"]
        assert set(mode["precisions"]) <= {"fp32", "fp16", "nf8", "nf4"} and mode["precisions"]
        assert mode["peak_bytes"] > mode["model_bytes"] and mode["predicted_peak_bytes"] > 0
    runs = {mode: next((tmp_path / mode / "runs").glob("*/summary.json")).parent for mode in results}
    imports = {mode: [m["import-s"] for m in scale.messages(run)] for mode, run in runs.items()}
    assert len(imports["worker"]) == len(imports["in-process"]) == 4  # 2 nodes × 2 rounds, each message's phases
    assert max(imports["worker"]) < 0.5 < min(imports["in-process"])  # the worker imported torch once, before any job
    for run in runs.values():  # every message is a fresh process's first: Flower's part of its start-up is reported
        assert all(0 < m["flower-s"] < m["startup-s"] for m in scale.messages(run))


def test_an_unknown_mode_is_refused_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        _scale().main(["--modes", "worker,gpu", "--workdir", str(tmp_path)])
    assert exit_.value.code == 2 and "--modes 'worker,gpu'" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no deployment started
