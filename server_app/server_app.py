"""FedPipe ServerApp: config → task → strategy → federate → summary."""

from __future__ import annotations

from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedpipe_core.config import ConfigError, RunConfig
from fedpipe_core.evaluate import score_test
from fedpipe_core.metrics import meteor_missing, scorer
from fedpipe_core.model import default_cache_dir
from fedpipe_core.node.state import remove_run_states
from fedpipe_core.results import RunWriter, output_root
from fedpipe_core.strategies import strategy_class
from fedpipe_core.task import load_task
from fedpipe_flower.messages import to_record
from server_app.recorder import RunRecorder, site_summary
from server_app.strategy import FlowerAdapter, RunEnds

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the run config, federate, and leave ``<output-dir>/<run-id>/`` behind."""
    try:
        config = RunConfig.from_mapping(context.run_config)
        cls = strategy_class(config.strategy)
        task = load_task(config)
        if config.server_evaluates:
            task.splits  # noqa: B018 (read and checked now, before any round: the server evaluates on them)
        writer = RunWriter(output_root(config.output_dir), str(context.run_id))
        adapter = FlowerAdapter(cls(task), plan_log=writer.dir / "plans.jsonl")
        recorder = RunRecorder(writer, adapter)
        if config.resume_from:
            recorder.resume(Path(config.resume_from).expanduser())
    except ConfigError as exc:
        log(ERROR, "FedPipe: %s", exc)
        raise SystemExit(f"FedPipe: {exc}") from None
    if config.server_evaluates and config.task == "e2e" and meteor_missing():
        log(WARNING, "FedPipe: %s; the final scores will lack it", meteor_missing())
    writer.write_config(
        config, **{"run-id": context.run_id, "checkpoint": str(task.checkpoint), "target-modules": list(task.targets)}
    )
    log(
        INFO,
        "FedPipe: run %s, strategy %s, model %s, task %s; results in %s",
        context.run_id,
        config.strategy,
        config.model,
        config.task,
        writer.dir,
    )

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord:
        row = recorder.round_done(flower_round)
        return MetricRecord({k: row[k] for k in ("eval_loss", "ppl") if row[k] is not None})

    try:
        adapter.start(
            grid,
            to_record(adapter.strategy.global_arrays()),
            num_rounds=config.num_server_rounds - adapter.round_offset,
            timeout=config.round_timeout_s,
            evaluate_fn=evaluate_fn,
        )
    except RunEnds as spent:
        log(INFO, "FedPipe: %s", spent)
    final_delta = adapter.strategy.final_delta()
    writer.save_delta(final_delta)
    summary: dict[str, object] = {}
    if config.sites_evaluate:
        log(INFO, "FedPipe: the sites score the final model on their own test shares")
        final = adapter.final_scores(grid, final_delta, recorder.last_round)
        recorder.finish(final)
        summary |= site_summary(final)
    removed = remove_run_states(default_cache_dir(config.cache_dir), context.run_id)
    if removed:
        log(INFO, "FedPipe: removed the node state of this run on this machine (%s)", removed)
    if config.server_evaluates:
        log(INFO, "FedPipe: scoring the final model on the test split")
        summary |= score_test(task, final_delta)
        if config.eval_base_generation:
            log(INFO, "FedPipe: scoring the base model on the test split")
            summary["base"] = score_test(task, {})
    summary.update(recorder.summary())
    if config.task == "e2e":
        summary["scorer"] = scorer()
    writer.write_summary(summary)
    shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items() if k not in ("base", "sites")}
    log(INFO, "FedPipe: summary %s", shown)
    log(INFO, "FedPipe: run %s finished; its results are in %s", context.run_id, writer.dir)
