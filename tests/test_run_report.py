"""fedpipe-report: one run's page, its table's numbers and its plots."""

from __future__ import annotations

import json

from fedpipe_tools.run_report import main as report_main


def _run(tmp_path, finished: bool = True):
    run = tmp_path / "123"
    run.mkdir()
    rows = [{"round": 0, "eval_loss": 2.9, "sim_time_s": 0.0, "bytes_up": 0, "bytes_down": 0, "clients": 0}]
    for r, loss in ((1, 2.4), (2, 2.1)):
        rows.append(
            {
                "round": r,
                "eval_loss": loss,
                "sim_time_s": 0.07 * r,
                "bytes_up": 3_000_000,
                "bytes_down": 1_500_000 * (r - 1),
                "clients": 2,
                "client_train_s": 10.0,
                "client_setup_s": 2.0,
                "client_startup_s": 4.0 if r == 1 else 0.0,
            }
        )
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    modules = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "qv"]
    plans = [
        {
            "round": r,
            "node_id": 1000 + n,
            "profile": {"flops": 9e12 * (n + 1)},
            "precision": "nf4" if n == 0 else "fp32",
            "batch_size": 3 + 5 * n,
            "ranks": {m: 2 * (n + 1) for m in modules[n * 2 :]},
            "over_budget": r == 2 and n == 0,
            "local_steps": 1 if r == 2 and n == 0 else 4,
            "predicted_round_s": 0.05,
        }
        for r in (1, 2)
        for n in (0, 1)
    ]
    (run / "plans.jsonl").write_text("".join(json.dumps(p) + "\n" for p in plans))
    (run / "config.json").write_text(json.dumps({"run-id": 123, "strategy.name": "fedpipe"}))
    if finished:
        (run / "summary.json").write_text(json.dumps({"bleu": 41.5, "ppl": 6.2, "base": {"bleu": 0.2}}))
    return run


def test_a_run_report_has_the_rounds_the_plans_and_the_plots(tmp_path, capsys):
    run = _run(tmp_path)
    assert report_main([str(run)]) == 0
    page = (run / "report" / "report.md").read_text()
    assert capsys.readouterr().out.strip() == str(run / "report" / "report.md")
    assert "Run directory: [`..`](..)" in page  # relative: the page names no machine's path
    assert (
        "# run 123 (fedpipe)" in page and "| score | scale | fine-tuned (server test split) | base (server test split) |" in page
    )
    assert "| BLEU | 0–100, higher is better | 41.5 | 0.2 |" in page and "| perplexity | lower is better | 6.2 | — |" in page
    assert "| 0 (base model) |" in page
    assert "| 1 | 2.4000 | 2 | 3.00 | 0.00 | 0.07 | 10 | 2 | 4 |" in page
    assert "| 2 | 2.1000 | 2 | 3.00 | 1.50 | 0.14 | 10 | 2 | 0 |" in page
    assert "stretched the round): round 2 node …1000." in page
    assert "| 1 | node …1000 | nf4 | 3 | 4 | 6 × 2 | 0 | 0.05 |" in page  # weights at each rank, the lowest block
    assert "| 2 | node …1001 | fp32 | 8 | 4 | 4 × 4 | 1 | 0.05 |" in page
    assert "| 2 | node …1000 | nf4 | 3 | 1 | 6 × 2 | 0 | 0.05 |" in page
    for name in ("eval-loss.png", "bytes.png", "node-time.png", "plans.png"):
        assert (run / "report" / name).stat().st_size > 5000, name


def test_an_unfinished_run_gets_a_report_and_a_non_run_an_error(tmp_path, capsys):
    run = _run(tmp_path, finished=False)
    assert report_main([str(run), "--out", str(tmp_path / "page")]) == 0
    page = (tmp_path / "page" / "report.md").read_text()
    assert "has not finished" in page and "Run directory: [`../123`](../123)" in page
    (tmp_path / "empty").mkdir()
    assert report_main([str(tmp_path / "empty")]) == 2
    assert "no metrics.jsonl rows" in capsys.readouterr().err


def test_a_committed_run_s_gzip_plans_read_as_the_plain_file(tmp_path, capsys):
    import gzip

    from fedpipe_tools.run_report import read_jsonl

    run = _run(tmp_path)
    plain = read_jsonl(run / "plans.jsonl")
    assert report_main([str(run)]) == 0
    page = (run / "report" / "report.md").read_text()
    (run / "plans.jsonl.gz").write_bytes(gzip.compress((run / "plans.jsonl").read_bytes()))
    (run / "plans.jsonl").unlink()
    assert read_jsonl(run / "plans.jsonl") == plain and len(plain) == 4
    assert report_main([str(run)]) == 0
    assert (run / "report" / "report.md").read_text() == page  # the same page: the plans' table is whole
    (run / "plans.jsonl.gz").unlink()
    assert read_jsonl(run / "plans.jsonl") == []
