"""The benchmark report: ``results.json``, a markdown table per suite, and PNG plots.

Each row is a strategy × setting over its training seeds: every figure is the mean over the
seeds with its sample standard deviation beside it (``<figure>_std``; 0 with one seed), time and
bytes to target over the seeds that reached it (``reached_target`` counts them).

Time and bytes to target: the eval loss is followed round by round (round 0 is the base model
at simulated time 0 and no bytes); the target is crossed between two rounds, and the simulated
time and cumulative bytes are interpolated linearly at the crossing. A run that never reaches
the target has null there.

Quality at equal cost: within a setting, the eval loss of every run at the simulated time (and at
the total client steps) where the shortest run of the setting ended, interpolated linearly between
rounds the same way.

Targets: a suite may fix, before any run, bounds on FedPipe's figure ÷ (or −) a peer's in one setting
or another row's (means over the seeds, e.g. BLEU ≥ 1.0 × LoRA-FedAvg's, or eval loss − the random
ablation's ≤ −0.02); the report says of each whether it was
met, not met, or cannot be read yet (a row missing, or a figure no seed reached).
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import statistics
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

from fedpipe_core.metrics import SCORER
from fedpipe_tools.run_report import pyplot, read_jsonl, write_run_report

METRICS = ("bleu", "nist", "meteor", "rouge_l", "cider", "ppl")
CENTRALIZED = "centralized"
"""The setting of the reference row: one client with all the training data, the same total steps."""


class Point(NamedTuple):
    """A run after one round: simulated time, cumulative bytes up + down, client steps and examples processed (NaN
    in records from before metrics.jsonl kept them), eval loss, and the round."""

    time: float
    bytes: float
    steps: float
    loss: float
    examples: float = math.nan
    round: int = 0


def curve(rows: list[dict[str, Any]]) -> list[Point]:
    """The run after each round, round 0 (the base model: no time, bytes, steps or examples) first."""
    out, total, steps, examples = [], 0.0, 0.0, 0.0
    for row in sorted(rows, key=lambda r: r["round"]):
        total += (row.get("bytes_up") or 0) + (row.get("bytes_down") or 0)
        steps += row.get("client_steps") or 0
        examples += row["examples"] if "examples" in row else (0.0 if row["round"] == 0 else math.nan)
        out.append(Point(float(row.get("sim_time_s") or 0.0), total, steps, float(row["eval_loss"]), examples, int(row["round"])))
    return out


def to_target(points: list[Point], target: float) -> tuple[float | None, float | None]:
    """Simulated time and bytes at which the eval loss first reaches ``target`` (interpolated)."""
    if points[0].loss <= target:
        return points[0].time, points[0].bytes
    for p0, p1 in pairwise(points):
        if p1.loss <= target:
            frac = (p0.loss - target) / (p0.loss - p1.loss)
            return p0.time + frac * (p1.time - p0.time), p0.bytes + frac * (p1.bytes - p0.bytes)
    return None, None


def loss_at(points: list[Point], axis: str, x: float) -> float | None:
    """Eval loss when the run had spent ``x`` of ``axis`` (``time`` or ``steps``), interpolated; None past its end
    (or for a budget of 0, which says nothing)."""
    if x <= 0:
        return None
    for p0, p1 in pairwise(points):
        x0, x1 = getattr(p0, axis), getattr(p1, axis)
        if x0 <= x <= x1:
            return p1.loss if x1 == x0 else p0.loss + (x - x0) / (x1 - x0) * (p1.loss - p0.loss)
    return None


def _fits(value: float, budget: float) -> bool:
    """``value`` is within ``budget`` (up to float rounding of sums of round times)."""
    return value <= budget * (1 + 1e-9)


def within(points: list[Point], axis: str, budget: float) -> Point | None:
    """The last round end whose ``axis`` (``time`` or ``examples``) is within ``budget``: the model a run to that budget
    has (round ends only, no interpolation); None where the curve does not record the axis."""
    if any(math.isnan(getattr(p, axis)) for p in points):
        return None
    inside = [p for p in points if _fits(getattr(p, axis), budget)]
    return inside[-1] if inside else None


def stopped_short(points: list[Point], axis: str, budget: float) -> bool:
    """The run ended while one more round like its last would still have fit in ``budget``: it ran out of rounds, and
    its reading is its final model, not what the budget allows."""
    if len(points) < 2:
        return False
    last, before = points[-1], points[-2]
    return _fits(getattr(last, axis) + (getattr(last, axis) - getattr(before, axis)), budget)


class Budgets(NamedTuple):
    """A suite's ``budgets``, fixed before its runs: every row is read at ``factors`` × the simulated time and × the
    examples processed of the ``reference`` row (``strategy/setting``) after ``rounds`` rounds (means over its seeds)."""

    reference: tuple[str, str]
    rounds: int
    factors: tuple[float, ...]

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Budgets:
        """From ``{reference: strategy/setting, rounds, factors}``; a bad one is refused with what is wrong."""
        missing = sorted({"reference", "rounds", "factors"} - set(spec))
        if missing:
            raise ValueError(f"budgets {dict(spec)} lacks {missing}")
        strategy, _, setting = str(spec["reference"]).partition("/")
        factors = tuple(float(f) for f in spec["factors"])
        if not setting or int(spec["rounds"]) < 1 or not factors or min(factors) <= 0:
            raise ValueError(f"budgets {dict(spec)}: needs reference 'strategy/setting', rounds >= 1 and factors > 0")
        return cls((strategy, setting), int(spec["rounds"]), factors)

    def amounts(self, seeded: Mapping[tuple[str, str], list[dict[str, Any]]]) -> dict[str, float]:
        """``{key: budget}`` for each axis and factor (``time_0.5x`` …), from the reference's runs; empty until one of
        them has reached ``rounds`` rounds (or, on the examples axis, where its records lack examples)."""
        ends = [p for row in seeded.get(self.reference, []) for p in row["_curve"] if p.round == self.rounds]
        out = {}
        for axis in BUDGET_AXES:
            values = [getattr(p, axis) for p in ends]
            if values and not any(math.isnan(v) for v in values):
                out.update({budget_key(axis, f): f * statistics.fmean(values) for f in self.factors})
        return out


BUDGET_AXES = ("time", "examples")


def budget_key(axis: str, factor: float) -> str:
    """``time_0.5x``: one budget's name; a row's reading there is ``eval_loss_at_<name>``, its round ``round_at_<name>``."""
    return f"{axis}_{factor:g}x"


BUDGET_FIGURE = re.compile(r"^(eval_loss|round)_at_(time|examples)_[0-9.]+x$")
"""A row's reading at a budget (a target may name ``eval_loss_at_time_1x``)."""


def read_budgets(row: dict[str, Any], amounts: Mapping[str, float]) -> None:
    """A run's eval loss and round at each budget (:func:`within`), and ``short_at_<name>`` where it ran out of rounds
    before the budget (:func:`stopped_short`)."""
    for name, amount in amounts.items():
        axis = name.split("_", 1)[0]
        point = within(row["_curve"], axis, amount) if row["_curve"] else None
        row[f"eval_loss_at_{name}"] = point.loss if point else None
        row[f"round_at_{name}"] = point.round if point else None
        row[f"short_at_{name}"] = bool(row["_curve"]) and stopped_short(row["_curve"], axis, amount)


EQUAL_COST = {"time": "eval_loss_at_equal_time", "steps": "eval_loss_at_equal_steps"}
"""Axis of the curve -> the figure: eval loss where the setting's shortest run ended on that axis."""


SEEDED = (
    *METRICS,
    "trainable_params",
    "bytes_up",
    "bytes_down",
    "wall_s",
    "sim_time_s",
    "base_eval_loss",
    "final_eval_loss",
    "peak_memory_bytes",
    "epsilon_spent",
)
TO_TARGET = ("sim_time_to_target_s", "bytes_to_target", *EQUAL_COST.values())


COMPARISONS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


class Target(NamedTuple):
    """A target fixed in a suite before its runs: fedpipe's ``metric`` in ``setting`` against ``peer``'s, ``op`` ``bound``.

    ``peer`` is a strategy in the same setting, or ``strategy/setting`` (e.g. ``fedpipe/random``: an ablation's
    other arm). ``compare`` is ``ratio`` (fedpipe ÷ peer, the default) or ``difference`` (fedpipe − peer).
    """

    metric: str
    setting: str
    peer: str
    op: str
    bound: float
    compare: str = "ratio"

    @classmethod
    def parse(cls, spec: Mapping[str, Any]) -> Target:
        """From a suite's ``{metric, setting, peer, op, bound[, compare]}``; a bad one is refused with what is wrong."""
        missing = sorted({"metric", "setting", "peer", "op", "bound"} - set(spec))
        if missing:
            raise ValueError(f"target {dict(spec)} lacks {missing}")
        metric, op, compare = str(spec["metric"]), str(spec["op"]), str(spec.get("compare", "ratio"))
        if metric not in (*SEEDED, *TO_TARGET) and not BUDGET_FIGURE.match(metric):
            raise ValueError(f"target metric {metric!r} is not a report figure ({', '.join((*SEEDED, *TO_TARGET))})")
        if op not in COMPARISONS:
            raise ValueError(f"target op {op!r} is not one of {', '.join(COMPARISONS)}")
        if compare not in COMPARE:
            raise ValueError(f"target compare {compare!r} is not one of {', '.join(COMPARE)}")
        return cls(metric, str(spec["setting"]), str(spec["peer"]), op, float(spec["bound"]), compare)

    @property
    def peer_row(self) -> tuple[str, str]:
        """(strategy, setting) of the row fedpipe's is compared with."""
        strategy, _, setting = self.peer.partition("/")
        return strategy, setting or self.setting

    @property
    def rows(self) -> tuple[tuple[str, str], tuple[str, str]]:
        return ("fedpipe", self.setting), self.peer_row

    def __str__(self) -> str:
        sign = "÷" if self.compare == "ratio" else "−"
        if "/" in self.peer:  # another row: both named by strategy/setting
            return f"fedpipe/{self.setting} {sign} {self.peer} {self.metric} {self.op} {self.bound:g}"
        return f"fedpipe {sign} {self.peer} {self.metric} in {self.setting} {self.op} {self.bound:g}"


COMPARE = {"ratio": operator.truediv, "difference": operator.sub}
"""How a target sets fedpipe's figure against its peer's."""


def verdicts(results: dict[tuple[str, str], dict[str, Any]], targets: tuple[Target, ...]) -> list[dict[str, Any]]:
    """Each target with the measured ``value`` (ratio or difference) and ``met`` (None where it cannot be read yet, with
    the reason)."""
    out = []
    for target in targets:
        (_, setting), (peer_name, peer_setting) = target.rows
        mine, peer = results.get(("fedpipe", setting)), results.get(target.peer_row)
        verdict: dict[str, Any] = {"target": str(target), "compare": target.compare, "value": None, "met": None, "why": None}
        if mine is None or peer is None:
            who = f"fedpipe / {setting}" if mine is None else f"{peer_name} / {peer_setting}"
            verdict["why"] = f"no finished run of {who} yet"
        elif (
            mine.get(target.metric) is None
            or peer.get(target.metric) is None
            or (target.compare == "ratio" and not peer[target.metric])
        ):
            who = f"fedpipe / {setting}" if mine.get(target.metric) is None else f"{peer_name} / {peer_setting}"
            verdict["why"] = f"{target.metric} of {who} is unknown (no seed reached it) or 0"
        else:
            verdict["value"] = COMPARE[target.compare](mine[target.metric], peer[target.metric])
            verdict["met"] = COMPARISONS[target.op](verdict["value"], target.bound)
            verdict["why"] = f"seeds: fedpipe {mine['seeds']}, {peer_name} {peer['seeds']}"
            if target.metric in TO_TARGET:
                verdict["why"] += f"; reached the target: fedpipe {mine['reached_target']}, {peer_name} {peer['reached_target']}"
        out.append(verdict)
    return out


def untrained_reason(run: Path, summary: dict[str, Any]) -> str | None:
    """Why a run trained nothing (no client sent an update), or None when it trained."""
    if (summary.get("total_bytes_up") or 0) > 0:
        return None
    left_out = [p["left_out"] for p in read_jsonl(run / "plans.jsonl") if p.get("left_out")]
    return f"no client fits: {left_out[0]}" if left_out else "no client sent an update"


def summarize(run: Path) -> dict[str, Any]:
    """One run's figures from its results contract; a run that trained nothing has none (N/A and why)."""
    summary = json.loads((run / "summary.json").read_text())
    rows = read_jsonl(run / "metrics.jsonl")
    points = curve(rows)
    untrained = untrained_reason(run, summary)
    if untrained:
        return {
            **dict.fromkeys((*SEEDED, *TO_TARGET)),
            "base_eval_loss": points[0].loss if points else None,
            "wall_s": summary.get("wall_s"),
            "clients_per_round": [],
            "run_dir": str(run),
            "not_applicable": untrained,
            "_curve": [],
        }
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return {
        **{m: summary.get(m) for m in METRICS},
        "lr": config.get("train.lr"),
        "scorer": summary.get("scorer"),
        "trainable_params": summary.get("trainable_params"),
        "bytes_up": summary.get("total_bytes_up"),
        "bytes_down": summary.get("total_bytes_down"),
        "wall_s": summary.get("wall_s"),
        "sim_time_s": summary.get("sim_time_s"),
        "peak_memory_bytes": peak_memory(rows),
        "epsilon_spent": epsilon_spent(rows),
        "base_eval_loss": points[0].loss if points else None,
        "final_eval_loss": points[-1].loss if points else None,
        "clients_per_round": [r.get("clients", 0) for r in sorted(rows, key=lambda r: r["round"]) if r["round"] > 0],
        "run_dir": str(run),
        "_curve": points,
    }


def epsilon_spent(rows: list[dict[str, Any]]) -> float | None:
    """The largest ε any site reports spent by the run's end (``site_epsilon`` of metrics.jsonl); None without DP."""
    spent = [e for r in rows for e in (r.get("site_epsilon") or {}).values()]
    return max(spent) if spent else None


def peak_memory(rows: list[dict[str, Any]]) -> float | None:
    """The largest measured peak memory of any client in any round (``node_memory`` of metrics.jsonl)."""
    peaks = [
        n["measured_peak_bytes"] for r in rows for n in (r.get("node_memory") or {}).values() if n.get("measured_peak_bytes")
    ]
    return float(max(peaks)) if peaks else None


def over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from a run per seed: mean and sample standard deviation of every figure."""
    out = {"seeds": len(rows), "run_dirs": [r["run_dir"] for r in rows], "_curve": rows[0]["_curve"]}
    out["clients_per_round"] = rows[0]["clients_per_round"]
    out["lr"] = rows[0].get("lr") if all(r.get("lr") == rows[0].get("lr") for r in rows) else None
    out["scorer"] = rows[0].get("scorer") if all(r.get("scorer") == rows[0].get("scorer") for r in rows) else None
    budgeted = sorted({k for r in rows for k in r if BUDGET_FIGURE.match(k)})
    for key in (*SEEDED, *TO_TARGET, *budgeted):
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        out[key] = statistics.fmean(values) if values else None
        out[f"{key}_std"] = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    out["reached_target"] = sum(r.get("sim_time_to_target_s") is not None for r in rows)
    for key in sorted({k for r in rows for k in r if k.startswith("short_at_")}):
        out[key] = sum(bool(r.get(key)) for r in rows)
    out["not_applicable"] = next((r["not_applicable"] for r in rows if r.get("not_applicable")), None)
    out["target_eval_loss"] = rows[0].get("target_eval_loss")
    return out


def targets_by_setting(results: dict[tuple[str, str], dict[str, Any]], fixed: float | None) -> dict[str, float | None]:
    """Per setting: the fixed target, or the highest final eval loss among the competitive runs.

    A run is competitive when it closed at least half of the best run's eval-loss reduction from
    the base model; the target is then a loss every competitive run reached (a run that barely
    trained would otherwise make the target trivial).
    """
    out: dict[str, float | None] = {}
    for setting in sorted({s for _, s in results}):
        if fixed is not None:
            out[setting] = float(fixed)
            continue
        rows = [r for (_, s), r in results.items() if s == setting and r["final_eval_loss"] is not None]
        gains = [r["base_eval_loss"] - r["final_eval_loss"] for r in rows]
        best = max(gains, default=0.0)
        finals = [r["final_eval_loss"] for r, gain in zip(rows, gains) if best > 0 and gain >= 0.5 * best]
        out[setting] = max(finals) if finals else None
    return out


EQUAL_AT = {"time": "equal_time_s", "steps": "equal_steps"}
"""Where a report row records its setting's equal cost on each axis."""


def equal_costs(
    seeded: dict[tuple[str, str], list[dict[str, Any]]], carried: Mapping[tuple[str, str], dict[str, Any]] | None = None
) -> dict[str, dict[str, float]]:
    """Per setting: the simulated time and client steps at which its shortest trained run ended (a carried row
    counts with the equal cost its report recorded)."""
    ends = [(setting, end.time, end.steps) for (_, setting), rows in seeded.items() for row in rows if (end := _end(row))]
    ends += [
        (setting, row[EQUAL_AT["time"]], row[EQUAL_AT["steps"]])
        for (_, setting), row in (carried or {}).items()
        if row.get(EQUAL_AT["time"]) is not None and row.get(EQUAL_AT["steps"]) is not None
    ]
    out: dict[str, dict[str, float]] = {}
    for setting, time, steps in ends:
        mine = out.setdefault(setting, {"time": time, "steps": steps})
        mine["time"], mine["steps"] = min(mine["time"], time), min(mine["steps"], steps)
    return out


def _end(row: dict[str, Any]) -> Point | None:
    return row["_curve"][-1] if row["_curve"] else None


def over_seeded(seeded: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {key: over_seeds(rows) for key, rows in seeded.items()}


def _stored(row: dict[str, Any], root: Path) -> dict[str, Any]:
    """A row as results.json keeps it: no private entries, run directories relative to the benchmark's output."""
    kept = {k: v for k, v in row.items() if not k.startswith("_")}
    if not row.get("carried"):
        kept["run_dirs"] = [_relative(Path(p), root) for p in row["run_dirs"]]
    return kept


def _relative(path: Path, root: Path) -> str:
    try:
        return str(Path(os.path.abspath(path)).relative_to(os.path.abspath(root)))
    except ValueError:
        return str(path)


def write_report(
    suite: str,
    runs: dict[tuple[str, str], Path | list[Path]],
    out: Path,
    target: float | None = None,
    goals: tuple[Target, ...] = (),
    carried: Mapping[tuple[str, str], dict[str, Any]] | None = None,
    budgets: Budgets | None = None,
) -> dict[str, Any]:
    """Summarize finished runs (one or one per seed), merge them into ``out/results.json``, write the table, the
    verdict on each of ``goals`` (also ``out/<suite>-targets.json``) and the plots; with ``budgets``, every run's eval
    loss at each budget (:func:`read_budgets`) and their table.

    ``carried``: rows of an earlier report whose runs are not here, kept as they were (``carried: true``); the
    ratios and gaps are recomputed from their means, their eval loss at equal cost is dropped where a run here
    moves the setting's equal cost (it cannot be re-read without their curves)."""
    out.mkdir(parents=True, exist_ok=True)
    kept = {key: {**row, "carried": True} for key, row in (carried or {}).items() if key not in runs}
    seeded = {key: [summarize(p) for p in ([paths] if isinstance(paths, Path) else paths)] for key, paths in sorted(runs.items())}
    targets = targets_by_setting({**over_seeded(seeded), **kept}, target)
    for (_, setting), rows in seeded.items():
        for row in rows:
            row["target_eval_loss"] = targets[setting]
            known = targets[setting] is not None and row["_curve"]
            row["sim_time_to_target_s"], row["bytes_to_target"] = (
                to_target(row["_curve"], targets[setting]) if known else (None, None)
            )
    costs = equal_costs(seeded, kept)
    amounts = budgets.amounts(seeded) if budgets else {}
    for (_, setting), rows in seeded.items():
        for row in rows:
            for axis, key in EQUAL_COST.items():
                row[key] = loss_at(row["_curve"], axis, costs[setting][axis]) if row["_curve"] else None
            read_budgets(row, amounts)
    for (_, setting), row in kept.items():
        for axis, key in EQUAL_COST.items():
            if costs.get(setting, {}).get(axis) != row.get(EQUAL_AT[axis]):
                row[key] = row[f"{key}_std"] = None
    fresh = over_seeded(seeded)
    runs = {key: Path(row["run_dirs"][0]) for key, row in fresh.items()}
    results = dict(sorted({**fresh, **kept}.items()))
    for (_, setting), row in results.items():
        row["equal_time_s"] = costs.get(setting, {}).get("time")
        row["equal_steps"] = costs.get(setting, {}).get("steps")
        if budgets and not row.get("carried"):
            row["budgets"] = amounts
    for (_, setting), row in results.items():
        base = results.get(("fedpipe", setting))
        for key, ratio in (
            ("sim_time_to_target_s", "time_to_target_vs_fedpipe"),
            ("bytes_to_target", "bytes_to_target_vs_fedpipe"),
        ):
            mine, ref = row[key], base[key] if base else None
            row[ratio] = mine / ref if mine is not None and ref else None
    reference = next((row for (_, setting), row in results.items() if setting == CENTRALIZED), None)
    for row in results.values():
        for key in ("final_eval_loss", "bleu"):
            mine, ref = row.get(key), reference.get(key) if reference else None
            row[f"{key}_gap_to_centralized"] = mine - ref if mine is not None and ref is not None else None
    path = out / "results.json"
    merged = json.loads(path.read_text()) if path.is_file() else {}
    merged[suite] = {f"{s}/{t}": _stored(row, out.parent) for (s, t), row in results.items()}
    path.write_text(json.dumps(merged, indent=2) + "\n")
    ablations = {name: rows for name, rows in merged.items() if name.startswith(ABLATION)}
    if ablations:
        (out / "ablations.md").write_text(ablation_table(ablations))
    judged = verdicts(results, goals)
    if goals:
        (out / f"{suite}-targets.json").write_text(json.dumps(judged, indent=2) + "\n")
    (out / f"{suite}.md").write_text(
        markdown(suite, results, targets, judged) + (budget_table(results, budgets, amounts) if budgets else "")
    )
    if fresh:  # the plots show the rows whose runs are here (a carried row has no curve)
        plot_loss(suite, fresh, out / f"{suite}-eval-loss-vs-sim-time.png")
        plot_bytes(
            suite,
            {row: run for row, run in runs.items() if fresh.get(row, {}).get("_curve")},
            out / f"{suite}-bytes-per-round.png",
        )
    for (strategy, setting), path_ in runs.items():  # each row's first seed as a run report: plans, bytes, node time
        write_run_report(path_, out / "runs" / f"{suite}--{strategy}--{setting}")
    return merged[suite]


ABLATION = "ablation-"
"""Suites whose names start so are gathered in one table, ``ablations.md``."""


def ablation_table(suites: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Every ablation suite's rows (from results.json) in one table: quality, cost to the target, memory."""
    columns = (
        "ablation | strategy | setting | seeds | BLEU | eval loss | loss @ equal sim s | loss @ equal steps "
        "| sim s to target (reached) | MB to target | trainable params | peak MB (largest client)"
    )
    lines = ["# Ablations", "", f"| {columns} |", "|" + "---|" * len(columns.split("|"))]
    for suite, rows in sorted(suites.items()):
        for key, r in rows.items():
            head = [suite[len(ABLATION) :], *key.split("/", 1), _seeds(r)]
            if r.get("not_applicable"):
                lines.append("| " + " | ".join([*head, f"N/A ({r['not_applicable']})"]) + " |")
                continue
            cells = [
                _pm(r, "bleu", 2),
                *(_pm(r, k, 4) for k in ("final_eval_loss", "eval_loss_at_equal_time", "eval_loss_at_equal_steps")),
                _reached(r),
                _fmt(_mb(r["bytes_to_target"]), 2),
                _fmt(r["trainable_params"], 0),
                _fmt(_mb(r.get("peak_memory_bytes")), 0),
            ]
            lines.append("| " + " | ".join([*head, *cells]) + " |")
    lines += ["", "Mean ± sample standard deviation over the seeds; each suite's own table: `<suite>.md`."]
    if any(r.get("carried") for rows in suites.values() for r in rows.values()):
        lines.append(CARRIED_NOTE)
    lines.append("")
    return "\n".join(lines)


def _old_scorer(row: dict[str, Any]) -> bool:
    """A row with E2E generation scores from before the official-script scorer."""
    return row.get("bleu") is not None and row.get("scorer") != SCORER


def _mb(num_bytes: float | None) -> float | None:
    return None if num_bytes is None else num_bytes / 1e6


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _round(value: float | None) -> str:
    """A round read at, a mean over seeds: whole when the seeds agree."""
    return _fmt(value, 0 if value is not None and float(value).is_integer() else 1)


def _lr(row: dict[str, Any]) -> str:
    """The row's learning rate (— where its seeds ran at different ones)."""
    return "—" if row.get("lr") is None else f"{row['lr']:g}"


def _pm(row: dict[str, Any], key: str, digits: int = 3) -> str:
    """``mean ± std`` of a figure (the mean alone with one seed)."""
    mean, std = row.get(key), row.get(f"{key}_std")
    if mean is None or row.get("seeds", 1) < 2 or std is None:
        return _fmt(mean, digits)
    return f"{_fmt(mean, digits)} ± {_fmt(std, digits)}"


def _reached(row: dict[str, Any]) -> str:
    """Time to target with how many seeds reached it: ``mean ± std (reached/seeds)``."""
    return f"{_pm(row, 'sim_time_to_target_s', 4)} ({row['reached_target']}/{row['seeds']})"


def _seeds(row: dict[str, Any]) -> str:
    return f"{row['seeds']}{CARRIED_MARK if row.get('carried') else ''}"


CARRIED_MARK = "†"
CARRIED_NOTE = f"{CARRIED_MARK} carried from an earlier report: its runs are not in this benchmark's output."
OLD_SCORER_MARK = "‡"
OLD_SCORER_NOTE = (
    f"{OLD_SCORER_MARK} scored before the official-script scorer ({SCORER}): its NIST is nltk's (18% below the official "
    "figure on the official fixture) and its METEOR, ROUGE-L and CIDEr follow a 13a tokenisation (1-2% off); "
    "not comparable with the papers' until the suite is re-run."
)


def markdown(
    suite: str,
    results: dict[tuple[str, str], dict[str, Any]],
    targets: dict[str, float | None],
    judged: Sequence[dict[str, Any]] = (),
) -> str:
    """The suite's table (metrics, eval loss at equal cost, trainable params, bytes, time to target and ratios to
    fedpipe), the gaps to the centralized reference and the verdict on each fixed target."""
    lines = [f"# Benchmark `{suite}`", ""]
    for setting, target in targets.items():
        row = next(r for (_, s), r in results.items() if s == setting)
        lines.append(
            f"- setting `{setting}`: target eval loss {_fmt(target, 4)}; equal cost = where its shortest run ended: "
            f"{_fmt(row.get('equal_time_s'), 4)} simulated s, {_fmt(row.get('equal_steps'), 0)} client steps"
        )
    columns = (
        "strategy | setting | seeds | lr | BLEU | NIST | METEOR | ROUGE-L | CIDEr | PPL | eval loss | loss @ equal sim s "
        "| loss @ equal steps | trainable params | MB up | MB down | sim s to target (reached) | MB to target "
        "| time ÷ fedpipe | bytes ÷ fedpipe | wall s"
    )
    width = len(columns.split("|"))
    lines += ["", f"| {columns} |", "|" + "---|" * width]
    for (strategy, setting), r in results.items():
        if r["not_applicable"]:
            head = f"| {strategy} | {setting} | {_seeds(r)} | {_lr(r)} |"
            lines.append(f"{head} N/A ({r['not_applicable']}) |" + " |" * (width - 5))
            continue
        old = OLD_SCORER_MARK if _old_scorer(r) else ""
        lines.append(
            f"| {strategy}{old} | {setting} | {_seeds(r)} | {_lr(r)} | {_pm(r, 'bleu', 2)} | {_pm(r, 'nist')} "
            f"| {_pm(r, 'meteor')} | {_pm(r, 'rouge_l')} | {_pm(r, 'cider')} | {_pm(r, 'ppl', 2)} "
            f"| {_pm(r, 'final_eval_loss', 4)} | {_pm(r, 'eval_loss_at_equal_time', 4)} "
            f"| {_pm(r, 'eval_loss_at_equal_steps', 4)} "
            f"| {_fmt(r['trainable_params'], 0)} | {_fmt(_mb(r['bytes_up']), 2)} | {_fmt(_mb(r['bytes_down']), 2)} "
            f"| {_reached(r)} | {_fmt(_mb(r['bytes_to_target']), 2)} "
            f"| {_fmt(r['time_to_target_vs_fedpipe'], 2)} | {_fmt(r['bytes_to_target_vs_fedpipe'], 2)} | {_fmt(r['wall_s'], 0)} |"
        )
    private = [(key, r) for key, r in results.items() if r.get("epsilon_spent") is not None]
    if private:
        lines += ["", "ε spent by the run's end (the largest over the sites, δ as each site set it):", ""]
        lines += [f"- {strategy} / {setting}: {_pm(r, 'epsilon_spent', 3)}" for (strategy, setting), r in private]
    gaps = [(key, r["final_eval_loss_gap_to_centralized"]) for key, r in results.items() if key[1] != CENTRALIZED]
    if any(gap is not None for _, gap in gaps):
        lines += ["", f"Eval loss above the `{CENTRALIZED}` reference (one client, all the data, the same total steps):", ""]
        lines += [f"- {strategy} / {setting}: {_fmt(gap, 4)}" for (strategy, setting), gap in gaps]
    from fedpipe_core.strategies import strategy_class  # the strategies (torch) only when a report is written

    omissions = {strategy: strategy_class(strategy).missing for strategy, _ in results}
    if any(omissions.values()):
        lines += ["", "Left out of a method's paper in this implementation:", ""]
        lines += [f"- {strategy}: {text}" for strategy, text in omissions.items() if text]
    if judged:
        lines += ["", "Targets, fixed in the suite before the runs (means over the seeds):", ""]
        for v in judged:
            state = "pending" if v["met"] is None else ("**met**" if v["met"] else "**not met**")
            lines.append(f"- {v['target']}: {_fmt(v['value'], 2 if v['compare'] == 'ratio' else 4)} → {state} ({v['why']})")
    lines += [
        "",
        f"Each row's first run in detail (plans, bytes, node time): `runs/{suite}--<strategy>--<setting>/report.md`.",
        "Mean ± sample standard deviation over the seeds; time and bytes to target over the seeds that reached it.",
        *([CARRIED_NOTE] if any(r.get("carried") for r in results.values()) else []),
        *([OLD_SCORER_NOTE] if any(_old_scorer(r) for r in results.values()) else []),
        "Ratios above 1: the peer needs more simulated time (or bytes) than fedpipe to reach the target.",
        "",
    ]
    return "\n".join(lines)


def budget_table(results: dict[tuple[str, str], dict[str, Any]], budgets: Budgets, amounts: Mapping[str, float]) -> str:
    """Every row's eval loss (mean ± std over its seeds) and the round it was read at, at each budget."""
    reference = "/".join(budgets.reference)
    lines = ["", "## At equal budgets", ""]
    if not amounts:
        return "\n".join([*lines, f"Pending: no run of `{reference}` has reached round {budgets.rounds} yet.", ""])
    for axis, unit in (("time", "simulated s"), ("examples", "examples processed")):
        names = [budget_key(axis, f) for f in budgets.factors if budget_key(axis, f) in amounts]
        if not names:
            lines += [f"Examples budgets: `{reference}`'s records do not count examples (runs from before they did).", ""]
            continue
        header = " | ".join(f"{n.split('_', 1)[1]} = {_fmt(amounts[n], 4 if axis == 'time' else 0)}" for n in names)
        lines += [f"| strategy | setting | seeds | {header} |", "|" + "---|" * (3 + len(names))]
        for (strategy, setting), r in results.items():
            if r.get("not_applicable") or r.get("carried"):
                continue
            cells = [
                f"{_pm(r, f'eval_loss_at_{n}', 4)} (round {_round(r.get(f'round_at_{n}'))})"
                + ("*" if r.get(f"short_at_{n}") else "")
                for n in names
            ]
            lines.append(f"| {strategy} | {setting} | {_seeds(r)} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Budgets in {unit}: the factor × `{reference}`'s after {budgets.rounds} rounds (its mean over seeds). A cell is "
            "the eval loss at the last round end within the budget (round ends only, no interpolation) and the round it "
            "was read at (mean over seeds); * a seed ran out of rounds while another round would have fit: its reading "
            "is its final model.",
            "",
        ]
    return "\n".join(lines)


def plot_loss(suite: str, results: dict[tuple[str, str], dict[str, Any]], path: Path) -> None:
    """Each row's eval loss against simulated time (its first seed's curve); an N/A row is named under the title."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (strategy, setting), r in results.items():
        points = r["_curve"]
        if points:
            ax.plot([p.time for p in points], [p.loss for p in points], marker="o", label=f"{strategy} / {setting}")
    title = f"{suite}: eval loss vs simulated time"
    untrained = [f"{strategy} / {setting}" for (strategy, setting), r in results.items() if not r["_curve"]]
    if untrained:
        title += "\nN/A (trained nothing, see the table): " + ", ".join(untrained)
    ax.set(xlabel="simulated time (s)", ylabel="eval loss", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bytes(suite: str, runs: dict[tuple[str, str], Path], path: Path) -> None:
    """MB up + down per round of each row's run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (strategy, setting), run in runs.items():
        rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["round"] > 0]
        ax.plot(
            [r["round"] for r in rows],
            [(r["bytes_up"] + r["bytes_down"]) / 1e6 for r in rows],
            marker="o",
            label=f"{strategy} / {setting}",
        )
    ax.set(xlabel="round", ylabel="MB up + down", title=f"{suite}: bytes per round", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
