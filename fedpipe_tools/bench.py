"""``fedpipe-bench``: run a named suite of strategies × settings as real simulations, then report.

Each run is ``flwr run <app> --run-config ...`` with the suite's settings, once per training seed
(``seeds``; the testbed, ``sim.testbed-seed``, stays fixed); its results land in
``<out>/<suite>/runs/<strategy>--<setting>--seed<seed>/<run-id>/``. A run whose
``summary.json`` exists is skipped, so a stopped benchmark resumes where it was. A row with no run
here keeps its figures from the last report (``<out>/report/results.json``), marked carried; one
carried with every seed is not run again (remove it from results.json to run it). A run whose whole
configuration (run config and number of clients) already ran under ``<out>`` in another suite is
linked from there (``reused.json`` names it) rather than run again: the same seeds give the same
numbers. When every run has finished (or failed, logged in ``<out>/<suite>/failures.json``) the
report is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from fedpipe_core.config import ConfigError, RunConfig, key_of
from fedpipe_core.results import RESULTS_VERSION, RUN_EXTRAS
from fedpipe_tools.report import Budgets, Target, write_report
from fedpipe_tools.run_report import read_jsonl

console = Console()


@dataclass(frozen=True)
class Suite:
    """A named set of runs (see suites.yaml)."""

    name: str
    supernodes: int
    runs: list[tuple[str, str]]
    settings: dict[str, dict[str, Any]]
    run_config: dict[str, Any]
    target_eval_loss: float | None = None
    description: str = ""
    seeds: tuple[int, ...] = (42,)
    """Training seeds: every run is repeated once per seed."""
    targets: tuple[Target, ...] = ()
    """Fixed before the runs: bounds on fedpipe's figures ÷ a peer's, judged in the report."""
    lr_grid: tuple[float, ...] = ()
    """``lr-grid``: every row's ``train.lr``, chosen from these by the final eval loss of one run each on the first seed
    (the same rule for every strategy, fixed before the runs); empty: the run config's."""
    lr_from: str | None = None
    """``lr-from``: another suite whose ``lr.json`` gives each row its rate (the row of the same strategy and setting
    name there), for a suite that reads the same rows further (e.g. to a time budget)."""
    budgets: Budgets | None = None
    """``budgets``: where every row is also read (:class:`~fedpipe_tools.report.Budgets`)."""

    def supernodes_of(self, setting: str) -> int:
        """Simulated clients of a setting: its own ``supernodes`` (e.g. 1 for the centralized reference) or the suite's."""
        return int(self.settings[setting].get("supernodes", self.supernodes))

    def config_of(
        self, strategy: str, setting: str, output_dir: Path, seed: int | None = None, lr: float | None = None
    ) -> dict[str, Any]:
        """The run config of one run (at learning rate ``lr`` when given), validated."""
        values = {
            **self.run_config,
            **{k: v for k, v in self.settings[setting].items() if k != "supernodes"},
            key_of("strategy"): strategy,
            key_of("output_dir"): str(output_dir),
        }
        if seed is not None:
            values[key_of("seed")] = seed
        if lr is not None:
            values[key_of("lr")] = lr
        RunConfig.from_mapping(values)  # a typo in a suite (a key, a strategy) fails here, before any run starts
        return values


def load_suites(path: Path | None = None) -> dict[str, Suite]:
    """Suites from a YAML file (the packaged suites.yaml by default)."""
    text = path.read_text() if path else resources.files("fedpipe_tools").joinpath("suites.yaml").read_text()
    raw = yaml.safe_load(text) or {}
    suites = {}
    for name, spec in raw.items():
        try:
            settings = {str(k): dict(v or {}) for k, v in spec["settings"].items()}
            runs = [tuple(pair) for pair in spec.get("runs", [])] or [(s, t) for s in spec["strategies"] for t in settings]
            suites[name] = Suite(
                name=name,
                supernodes=int(spec.get("supernodes", 2)),
                runs=[(str(s), str(t)) for s, t in runs],
                settings=settings,
                run_config=dict(spec.get("run-config", {})),
                target_eval_loss=spec.get("target-eval-loss"),
                description=str(spec.get("description", "")),
                seeds=tuple(int(s) for s in spec.get("seeds", [42])),
                targets=tuple(Target.parse(t) for t in spec.get("targets", [])),
                lr_grid=tuple(float(v) for v in spec.get("lr-grid", [])),
                lr_from=spec.get("lr-from"),
                budgets=Budgets.parse(spec["budgets"]) if "budgets" in spec else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"suite {name!r}: malformed ({exc!r}); needs 'settings' and 'strategies' or 'runs'") from exc
        unknown = sorted({t for _, t in suites[name].runs} - set(settings))
        if unknown:
            raise ConfigError(f"suite {name!r}: runs name unknown settings {unknown}")
        for target in suites[name].targets:
            if any(row not in suites[name].runs for row in target.rows):
                raise ConfigError(f"suite {name!r}: target '{target}' compares rows the suite does not run")
        budgets = suites[name].budgets
        if budgets and budgets.reference not in suites[name].runs:
            raise ConfigError(f"suite {name!r}: budgets' reference {'/'.join(budgets.reference)} is not a row it runs")
    for name, suite in suites.items():
        if suite.lr_from is not None and (suite.lr_from not in suites or suite.lr_grid):
            why = "has its own lr-grid" if suite.lr_grid else f"names no suite of this file ({suite.lr_from!r})"
            raise ConfigError(f"suite {name!r}: lr-from {why}")
    return suites


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def run_dir(suite_dir: Path, strategy: str, setting: str, seed: int, lr: float | None = None) -> Path:
    """Where one run's records go; a learning-rate trial (``lr``) is named by its rate."""
    rate = "" if lr is None else f"--lr{lr:g}"
    return suite_dir / "runs" / f"{strategy}--{setting}{rate}--seed{seed}"


def finished_row(suite_dir: Path, strategy: str, setting: str, seed: int, lr: float | None) -> Path | None:
    """The row's finished run of this seed, if it ran at ``lr`` (any rate when None): a run of another rate (from before
    the suite had an ``lr-grid``) does not count and is run again."""
    run = finished(run_dir(suite_dir, strategy, setting, seed))
    if run is None or lr is None:
        return run
    try:
        ran_at = json.loads((run / "config.json").read_text()).get(key_of("lr"))
    except (OSError, ValueError):
        return None
    return run if ran_at is not None and float(ran_at) == lr else None


def chosen_lr(suite: Suite, suite_dir: Path, strategy: str, setting: str) -> tuple[float | None, dict[str, float | None]]:
    """The row's learning rate: the ``lr-grid`` value whose trial on the first seed ended at the lowest final eval
    loss (None until every trial has finished), and each trial's loss by rate."""
    losses: dict[float, float | None] = {}
    for lr in suite.lr_grid:
        run = finished(run_dir(suite_dir, strategy, setting, suite.seeds[0], lr))
        rows = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["round"]) if run else []
        losses[lr] = rows[-1].get("eval_loss") if rows else None
    known = {lr: loss for lr, loss in losses.items() if loss is not None}
    chosen = min(known, key=known.__getitem__) if len(known) == len(suite.lr_grid) else None
    return chosen, {f"{lr:g}": loss for lr, loss in losses.items()}


def finished(directory: Path) -> Path | None:
    """The run directory with a summary.json under ``directory``, if any."""
    done = sorted(directory.glob("*/summary.json"))
    return done[-1].parent if done else None


RUN_SPECIFIC = ("output-dir", *RUN_EXTRAS)
"""config.json entries that name a run rather than decide its numbers."""


def run_identity(config: dict[str, Any], supernodes: int) -> str:
    """What decides a run's numbers: its whole run config but the entries that name it, and its number of clients."""
    decisive = {k: v for k, v in config.items() if k not in RUN_SPECIFIC}
    return json.dumps({**decisive, "supernodes": supernodes}, sort_keys=True, default=str)


def finished_identities(out_root: Path) -> dict[str, Path]:
    """Every finished run under ``out_root`` (any suite) by :func:`run_identity`; its clients are those it planned for.
    An option a run predates counts at its default (an option is added with the default that keeps earlier behaviour);
    a run of another results version (:data:`~fedpipe_core.results.RESULTS_VERSION`: the code gave other numbers) is not
    reused."""
    found: dict[str, Path] = {}
    defaults = RunConfig().to_mapping()
    for summary in sorted(out_root.glob("*/runs/*/*/summary.json")):
        run = summary.parent
        if run.is_symlink():  # a linked run: its source is found under its own suite
            continue
        try:
            if json.loads(summary.read_text()).get("results_version") != RESULTS_VERSION:
                continue
            config = {**defaults, **json.loads((run / "config.json").read_text())}
            nodes = {p["node_id"] for p in read_jsonl(run / "plans.jsonl") if p.get("round") == 1}
        except (OSError, ValueError, KeyError):
            continue  # a run this version cannot read is run again, not reused
        found.setdefault(run_identity(config, len(nodes)), run)
    return found


def reuse(
    suite: Suite,
    strategy: str,
    setting: str,
    seed: int,
    suite_dir: Path,
    known: dict[str, Path],
    lr: float | None = None,
    trial: bool = False,
) -> Path | None:
    """Link a finished run of the same configuration (another suite's row, or the learning-rate trial that chose this
    row's rate; same seeds give the same numbers up to the order float sums run in, tests/test_determinism.py) as
    this one's, instead of running it again (a learning-rate ``trial`` into its own directory); None where there is
    none."""
    out = run_dir(suite_dir, strategy, setting, seed, lr if trial else None)
    config = RunConfig.from_mapping(suite.config_of(strategy, setting, out.resolve(), seed, lr)).to_mapping()
    source = known.get(run_identity(config, suite.supernodes_of(setting)))
    if source is None:
        return None
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    target = os.path.relpath(source.resolve(), out.resolve())  # relative: the link survives a move or a fresh clone
    (out / source.name).symlink_to(target, target_is_directory=True)
    (out / "reused.json").write_text(json.dumps({"reused": target}, indent=2) + "\n")
    return source


def run_one(
    suite: Suite,
    strategy: str,
    setting: str,
    seed: int,
    suite_dir: Path,
    app: Path,
    timeout_s: float,
    lr: float | None = None,
    trial: bool = False,
) -> tuple[bool, str]:
    """One ``flwr run`` (at ``lr`` when given; a learning-rate ``trial`` has a directory of its own); returns (finished,
    log tail)."""
    out = run_dir(suite_dir, strategy, setting, seed, lr if trial else None)
    if out.exists():
        shutil.rmtree(out)  # a partial run from an interrupted benchmark
    out.mkdir(parents=True)
    values = suite.config_of(strategy, setting, out.resolve(), seed, lr)
    cmd = [
        "flwr",
        "run",
        str(app),
        "--stream",
        "--federation-config",
        f"num-supernodes={suite.supernodes_of(setting)} client-resources-num-cpus=1",
        "--run-config",
        " ".join(f"{k}={_toml_value(v)}" for k, v in values.items()),
    ]
    env = {
        **os.environ,
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        log = done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        log = f"timed out after {timeout_s:.0f} s\n{exc.stdout or ''}{exc.stderr or ''}"
    (out / "flwr.log").write_text(log if isinstance(log, str) else log.decode(errors="replace"))
    return finished(out) is not None, log[-2000:] if isinstance(log, str) else ""


def run_suite(
    suite: Suite,
    out_root: Path,
    app: Path,
    timeout_s: float = 3600.0,
    report_only: bool = False,
    seeds: tuple[int, ...] | None = None,
) -> Path:
    """Link what is missing of ``suite`` and already ran elsewhere, run the rest of ``seeds`` (every seed of the
    suite by default; nothing with ``report_only``), then write its report over every seed finished so far."""
    suite_dir = out_root / suite.name
    suite_dir.mkdir(parents=True, exist_ok=True)
    failures: dict[str, str] = {}
    rates = (
        rates_from(out_root, suite)
        if suite.lr_from
        else lr_trials(suite, suite_dir, app, timeout_s, failures, run=not report_only)
    )
    reported = reported_rows(out_root / "report" / "results.json", suite)
    every = [(s, t, seed) for s, t in suite.runs for seed in suite.seeds if not suite.lr_grid or rates.get((s, t))]
    missing = [(s, t, seed) for s, t, seed in every if finished_row(suite_dir, s, t, seed, rates.get((s, t))) is None]
    console.print(f"[bold]{suite.name}[/]: {len(every)} runs, {len(every) - len(missing)} already finished")
    known = finished_identities(out_root) if missing else {}
    unlinked = []
    for strategy, setting, seed in missing:
        source = reuse(suite, strategy, setting, seed, suite_dir, known, rates.get((strategy, setting)))
        if source is None:
            unlinked.append((strategy, setting, seed))
        else:
            console.print(f"{strategy} / {setting} / seed {seed}: the same configuration already ran, reused {source}")
    carried = {key: row for key, row in reported.items() if all((*key, n) in unlinked for n in suite.seeds)}  # no run here
    complete = {key for key, row in carried.items() if int(row.get("seeds", 0)) >= len(suite.seeds)}
    for (strategy, setting), row in sorted(carried.items()):
        console.print(f"{strategy} / {setting}: no run here, its {row.get('seeds')} seed(s) carried from the report")
    todo = [] if report_only else [run for run in unlinked if (seeds is None or run[2] in seeds) and run[:2] not in complete]
    run_all(suite, [(s, t, seed, rates.get((s, t))) for s, t, seed in todo], suite_dir, app, timeout_s, failures)
    (suite_dir / "failures.json").write_text(json.dumps(failures, indent=2) + "\n")
    runs = {(s, t): [finished_row(suite_dir, s, t, seed, rates.get((s, t))) for seed in suite.seeds] for s, t in suite.runs}
    done = {key: [p for p in paths if p is not None] for key, paths in runs.items() if any(paths)}
    write_report(suite.name, done, out_root / "report", suite.target_eval_loss, suite.targets, carried, suite.budgets)
    return suite_dir


def run_all(
    suite: Suite,
    todo: list[tuple[str, str, int, float | None]],
    suite_dir: Path,
    app: Path,
    timeout_s: float,
    failures: dict[str, str],
    trial: bool = False,
) -> None:
    """Run each (strategy, setting, seed, lr) with a progress bar; a failed one is logged in ``failures``."""
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        bar = progress.add_task(suite.name, total=len(todo))
        for strategy, setting, seed, lr in todo:
            label = f"{strategy} / {setting} / seed {seed}" + (f" / lr {lr:g}" if lr is not None else "")
            progress.update(bar, description=f"{suite.name}: {label}")
            started = time.time()
            ok, tail = run_one(suite, strategy, setting, seed, suite_dir, app, timeout_s, lr, trial)
            if not ok:
                out = run_dir(suite_dir, strategy, setting, seed, lr if trial else None)
                failures[out.name] = tail
                progress.console.print(f"[red]{label} failed[/] (log: {out / 'flwr.log'})")
            else:
                progress.console.print(f"{label}: done in {time.time() - started:.0f} s")
            progress.advance(bar)


def lr_trials(
    suite: Suite, suite_dir: Path, app: Path, timeout_s: float, failures: dict[str, str], run: bool = True
) -> dict[tuple[str, str], float | None]:
    """With an ``lr-grid``: one run per rate and row on the first seed (with ``run``, those not finished yet), then each
    row's rate (:func:`chosen_lr`), written with every trial's loss to ``<suite>/lr.json``; empty without a grid."""
    if not suite.lr_grid:
        return {}
    seed = suite.seeds[0]
    todo = [
        (s, t, seed, lr) for s, t in suite.runs for lr in suite.lr_grid if finished(run_dir(suite_dir, s, t, seed, lr)) is None
    ]
    if run and todo:
        known = finished_identities(suite_dir.parent)
        linked = [row for row in todo if reuse(suite, *row[:3], suite_dir, known, row[3], trial=True) is not None]
        for s, t, _, lr in linked:
            console.print(f"{s} / {t} / lr {lr:g} (trial): the same configuration already ran, reused")
        todo = [row for row in todo if row not in linked]
    run_all(suite, todo if run else [], suite_dir, app, timeout_s, failures, trial=True)
    chosen = {row: chosen_lr(suite, suite_dir, *row) for row in suite.runs}
    record = {"/".join(row): {"chosen": lr, "final_eval_loss": losses} for row, (lr, losses) in chosen.items()}
    path = suite_dir / "lr.json"
    kept = json.loads(path.read_text()) if path.is_file() else {}  # rows a narrower --suites-file left out stay
    merged = {**kept, "rule": "lowest final eval loss on seed " + str(seed), **record}
    path.write_text(json.dumps(merged, indent=2))
    return {row: lr for row, (lr, _) in chosen.items()}


def rates_from(out_root: Path, suite: Suite) -> dict[tuple[str, str], float | None]:
    """``lr-from``: each row's rate as suite ``suite.lr_from`` chose it (``<out>/<that suite>/lr.json``), written to this
    suite's ``lr.json`` too; refused, naming what is missing, before that suite's trials have chosen it."""
    path = out_root / str(suite.lr_from) / "lr.json"
    try:
        chosen = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"suite {suite.name!r}: lr-from {suite.lr_from!r} needs {path} (run that suite's lr trials first)"
        ) from exc
    rates = {row: (chosen.get("/".join(row)) or {}).get("chosen") for row in suite.runs}
    unknown = sorted("/".join(row) for row, lr in rates.items() if lr is None)
    if unknown:
        raise ConfigError(f"suite {suite.name!r}: {path} has chosen no rate for {', '.join(unknown)}")
    record = {"rule": f"the rates suite {suite.lr_from} chose ({path.name})"}
    record |= {"/".join(row): {"chosen": lr} for row, lr in rates.items()}
    (out_root / suite.name).mkdir(parents=True, exist_ok=True)
    (out_root / suite.name / "lr.json").write_text(json.dumps(record, indent=2))
    return rates


def reported_rows(path: Path, suite: Suite) -> dict[tuple[str, str], dict[str, Any]]:
    """The suite's rows in an earlier report (``results.json``), for carrying a row whose runs are not on this machine
    (a fresh clone holds the runs committed with the report; a row whose run records were lost keeps its figures)."""
    try:
        stored = json.loads(path.read_text()).get(suite.name, {}) if path.is_file() else {}
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); move it aside to write a fresh report") from exc
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for key, row in stored.items():
        strategy, _, setting = key.partition("/")
        if (strategy, setting) in suite.runs:
            rows[(strategy, setting)] = row
    return rows


def _seeds(text: str, suite: Suite) -> tuple[int, ...]:
    """``--seeds``: a comma-separated subset of the suite's training seeds."""
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"--seeds {text!r}: not comma-separated integers") from exc
    unknown = sorted(set(seeds) - set(suite.seeds))
    if unknown:
        raise ConfigError(f"--seeds {text!r}: suite {suite.name!r} has no seed {unknown} (its seeds: {list(suite.seeds)})")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--suite", help="suite name (see --list)")
    parser.add_argument(
        "--list", action="store_true", help="list the suites and exit; with --suite, every run it would do and which are done"
    )
    parser.add_argument("--suites-file", type=Path, help="a suites YAML file instead of the packaged one")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="where runs and report/ go (default: ./bench)")
    parser.add_argument("--app", type=Path, default=Path("."), help="the Flower app directory (default: .)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="limit per run")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the report from the runs finished so far (and those of the same configuration in other suites)",
    )
    parser.add_argument(
        "--seeds",
        help="run only these of the suite's training seeds now, comma-separated (e.g. 1: a first seed of every row "
        "before the rest); the report covers every seed finished so far",
    )
    args = parser.parse_args(argv)
    try:
        suites = load_suites(args.suites_file)
        if args.list and args.suite in suites:  # one suite: every run it would do, and which have finished under --out
            suite = suites[args.suite]
            for strategy, setting in suite.runs:
                rates = suite.lr_grid or (None,)
                for seed in suite.seeds:
                    for lr in rates if seed == suite.seeds[0] else (None,):
                        done = finished(run_dir(args.out / suite.name, strategy, setting, seed, lr)) is not None
                        chosen = (
                            " at the chosen lr"
                            if suite.lr_grid
                            else (f" at the lr {suite.lr_from} chose" if suite.lr_from else "")
                        )
                        rate = f" lr {lr:g} (trial)" if lr is not None else chosen
                        console.print(f"{strategy} / {setting} / seed {seed}{rate}: {'done' if done else 'to run'}")
            return 0
        if args.list:
            for name, suite in suites.items():
                more = len(suite.runs) * (len(suite.lr_grid) - 1)  # the trial at the chosen rate is the first seed's run
                trials = f" + {more} more to pick each row's lr from {list(suite.lr_grid)}" if suite.lr_grid else ""
                console.print(
                    f"{name}: {len(suite.runs)} rows × seeds {list(suite.seeds)} = {len(suite.runs) * len(suite.seeds)} runs"
                    f"{trials}, {suite.supernodes} clients. {suite.description}"
                )
            return 0
        if args.suite is None:
            raise ConfigError("name a suite with --suite (see --list)")
        if args.suite not in suites:
            raise ConfigError(f"unknown suite {args.suite!r} (known: {', '.join(suites)})")
        suite = suites[args.suite]
        seeds = _seeds(args.seeds, suite) if args.seeds is not None else None
        for strategy, setting in suite.runs:
            suite.config_of(strategy, setting, args.out)
        if not (args.app / "pyproject.toml").is_file():
            raise ConfigError(f"--app {str(args.app)!r} is not a Flower app directory (no pyproject.toml)")
    except ConfigError as exc:
        console.print(f"[red]fedpipe-bench: {exc}[/]")
        return 2
    suite_dir = run_suite(suite, args.out.resolve(), args.app.resolve(), args.timeout_s, args.report_only, seeds)
    failures = json.loads((suite_dir / "failures.json").read_text())
    console.print(f"report: {args.out / 'report'}" + (f"  ([red]{len(failures)} failed runs[/])" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
