"""benchmarks/round_overhead.py: a round's wall time against the work Ray can schedule in it."""

import json

import pytest
from script_modules import load_script

overhead = load_script("benchmarks/round_overhead.py")


def test_the_makespan_schedules_the_longest_jobs_first_on_the_workers():
    assert overhead.makespan([4.0, 3.0, 3.0, 2.0], 2) == 6.0  # 4+2 | 3+3
    assert overhead.makespan([5.0, 1.0], 4) == 5.0 and overhead.makespan([1.0, 2.0, 3.0], 1) == 6.0


def test_a_round_s_wall_time_is_split_into_planning_exchange_evaluation_and_the_rest(tmp_path):
    rows = [
        {"round": 0, "wall_s": 10.0},
        {
            "round": 1,
            "wall_s": 40.0,
            "server_plan_s": 1.0,
            "exchange_s": 20.0,
            "server_eval_s": 4.0,
            "client_handler_s": {"1": 8.0, "2": 6.0, "3": 5.0},
        },
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    [r] = overhead.rounds(tmp_path, workers=2)
    assert r["wall_s"] == 30.0 and r["node_makespan_s"] == 11.0  # 8 | 6+5
    assert r["rest_s"] == pytest.approx(5.0) and r["ratio"] == pytest.approx(30.0 / (11.0 + 1.0 + 4.0))
    del rows[1]["client_handler_s"]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="no client_handler_s"):
        overhead.rounds(tmp_path, workers=2)
