"""``fedpipe-report RUN_DIR [--out DIR]``: one run as a markdown page with PNG plots.

Reads the run's results contract (``metrics.jsonl``, ``plans.jsonl``, ``summary.json``) and writes
``report.md`` with: eval loss per round and against simulated time (the server's, the federated mean and
each site's), each site's base / local-only / federated scores, bytes up and down per round,
each node's plan per round (precision, batch, the rank of every module as a heatmap) and each
round's node timing (training, setup, process start-up). The benchmark's report
(:mod:`fedpipe_tools.report`) writes one of these for each of its rows.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file, or of its gzip copy ``<path>.gz`` (how the committed benchmark records keep
    their plans); [] when there is neither."""
    packed = path.with_name(path.name + ".gz")
    if path.is_file():
        text = path.read_text()
    elif packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode()
    else:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def loss_curves(rows: list[dict[str, Any]]) -> dict[str, list[tuple[dict[str, Any], float]]]:
    """The eval-loss curves a run has, by label: the server's, the sites' weighted mean, and each site's."""
    curves: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for row in rows:
        if row.get("eval_loss") is not None:
            curves.setdefault("server (its validation split)", []).append((row, row["eval_loss"]))
        if row.get("federated_eval_loss") is not None:
            curves.setdefault("federated (sites' mean)", []).append((row, row["federated_eval_loss"]))
        for node, value in (row.get("site_eval") or {}).items():
            curves.setdefault(_node(node), []).append((row, value["loss"]))
    return curves


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the file-only Agg backend, imported when a figure is drawn (a command's --help stays fast)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Eval loss per round and against simulated time (round 0: the base model): the server's, the federated
    mean and each site's (dashed) where the sites evaluate."""
    plt = pyplot()
    fig, (by_round, by_time) = plt.subplots(1, 2, figsize=(9, 3.8))
    for label, points in loss_curves(rows).items():
        style = {"linestyle": "--", "alpha": 0.7} if label.startswith("node") else {"linewidth": 2}
        losses = [loss for _, loss in points]
        by_round.plot([r["round"] for r, _ in points], losses, marker="o", label=label, **style)
        by_time.plot([r.get("sim_time_s") or 0.0 for r, _ in points], losses, marker="o", **style)
    by_round.set(xlabel="round (0: the base model)", ylabel="eval loss (nats per target token)")
    by_round.legend(fontsize=7)
    by_time.set(xlabel="simulated time (s)")
    fig.suptitle(f"{title}: eval loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def site_table(summary: dict[str, Any]) -> list[str]:
    """Per site: base, local-only and federated scores on its own test share (what joining bought it)."""
    sites = summary.get("sites") or {}
    if not sites:
        return []
    metrics = [m for m in ("ppl", "bleu", "nist", "meteor", "rouge_l", "cider") if any(m in s for s in sites.values())]
    lines = ["Per site, on its own test share: the base model, the site's model fine-tuned alone, the federated one.", ""]
    lines += ["| site | test examples | model | " + " | ".join(metrics) + " |", "|" + "---|" * (3 + len(metrics))]
    for node, site in sites.items():
        for label, scores in (("base", site.get("base")), ("local only", site.get("local_only")), ("federated", site)):
            if scores:
                values = " | ".join(_fmt(scores.get(m)) for m in metrics)
                lines.append(f"| {_node(node)} | {site.get('examples', 0)} | {label} | {values} |")
        if site.get("note"):
            lines.append(f"| {_node(node)} | 0 | — | {site['note']} |")
    return [*lines, ""]


def plot_bytes(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """MB sent to the nodes and received from them, per round."""
    plt = pyplot()
    trained = [r for r in rows if r["round"] > 0]
    rounds = [r["round"] for r in trained]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.bar([x - 0.2 for x in rounds], [r["bytes_down"] / 1e6 for r in trained], width=0.4, label="down (to nodes)")
    ax.bar([x + 0.2 for x in rounds], [r["bytes_up"] / 1e6 for r in trained], width=0.4, label="up (from nodes)")
    ax.set(xlabel="round", ylabel="MB", title=f"{title}: bytes per round", xticks=rounds)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_plans(plans: list[dict[str, Any]], path: Path, title: str) -> None:
    """Per node, the rank of every module (rows, labelled layer.name) in every round (columns), one colour per rank
    (a discrete legend; grey: not trained), with the node's base precision and batch as labelled rows on top."""
    plt = pyplot()
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    nodes = sorted({p["node_id"] for p in plans})
    modules = sorted({m for p in plans for m in p["ranks"]}, key=_module_order)
    rounds = sorted({p["round"] for p in plans})
    ranks = sorted({0} | {r for p in plans for r in p["ranks"].values()})
    colours = ["#d9d9d9", *plt.get_cmap("viridis", max(2, len(ranks) - 1)).colors[: len(ranks) - 1]]
    cmap, norm = ListedColormap(colours), BoundaryNorm([*ranks, ranks[-1] + 1], len(ranks))
    heads = 2  # the precision and batch rows above the modules
    fig, axes = plt.subplots(1, len(nodes), figsize=(1.2 * len(rounds) * len(nodes) + 3, 0.16 * (len(modules) + heads) + 2))
    axes = list(axes) if len(nodes) > 1 else [axes]
    for ax, node in zip(axes, nodes):
        mine = {p["round"]: p for p in plans if p["node_id"] == node}
        grid = [[mine[r]["ranks"].get(m, 0) if r in mine else 0 for r in rounds] for m in modules]
        ax.imshow(grid, aspect="auto", cmap=cmap, norm=norm, extent=(-0.5, len(rounds) - 0.5, len(modules) - 0.5, -0.5))
        for j, r in enumerate(rounds):
            plan = mine.get(r, {})
            ax.text(j, -0.5 - 1.5, str(plan.get("precision", "—")), ha="center", va="center", fontsize=7)
            ax.text(j, -0.5 - 0.6, str(plan.get("batch_size", "—")), ha="center", va="center", fontsize=7)
        ax.set_ylim(len(modules) - 0.5, -0.5 - heads)
        ax.set_xticks(range(len(rounds)), [str(r) for r in rounds], fontsize=7)
        ax.set_xlabel("round", fontsize=7)
        flops = (next(iter(mine.values()))["profile"]["flops"] / 1e12) if mine else 0.0
        ax.set_title(f"{_node(node)}\n{flops:.1f} TFLOPS", fontsize=8)
        ax.set_yticks([])
    labels = ["precision", "batch", *(_short(m) for m in modules)]
    axes[0].set_yticks([-0.5 - 1.5, -0.5 - 0.6, *range(len(modules))], labels, fontsize=6)
    legend = [Patch(color=c, label="not trained" if r == 0 else f"rank {r}") for r, c in zip(ranks, colours)]
    fig.legend(handles=legend, loc="upper right", fontsize=7, title="adapter", title_fontsize=7)
    fig.suptitle(f"{title}: each node's plan per round", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_timing(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Mean seconds per node and round: local training, setup, process start-up (stacked)."""
    plt = pyplot()
    timed = [r for r in rows if r["round"] > 0 and "client_train_s" in r]
    rounds = [r["round"] for r in timed]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    bottom = [0.0] * len(timed)
    for key, label in (("client_train_s", "training"), ("client_setup_s", "setup"), ("client_startup_s", "process start-up")):
        values = [r.get(key) or 0.0 for r in timed]
        ax.bar(rounds, values, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set(xlabel="round", ylabel="s per node (mean)", title=f"{title}: node time", xticks=rounds)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _module_order(name: str) -> tuple[int, str]:
    digits = [int(part) for part in name.split(".") if part.isdigit()]
    return (digits[0] if digits else -1, name)


def _node(node_id: int | str) -> str:
    """A node as the report names it: the last four digits of its id."""
    return f"node …{str(node_id)[-4:]}"


def _short(name: str) -> str:
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), "")
    return f"{layer}.{parts[-1]}" if layer else parts[-1]


def write_run_report(run: Path, out: Path) -> Path:
    """``out/report.md`` and its plots for the run in ``run``; returns the markdown file."""
    rows = sorted(read_jsonl(run / "metrics.jsonl"), key=lambda r: r["round"])
    if not rows:
        raise ValueError(f"{str(run)!r} has no metrics.jsonl rows (not a run directory, or it has not evaluated a round)")
    plans = [p for p in read_jsonl(run / "plans.jsonl") if p.get("ranks")]  # a node left out trains no module
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    title = f"run {config.get('run-id', run.name)} ({config.get('strategy.name', '?')})"
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(rows, out / "eval-loss.png", title)
    plot_bytes(rows, out / "bytes.png", title)
    plot_timing(rows, out / "node-time.png", title)
    if plans:
        plot_plans(plans, out / "plans.png", title)
    where = Path(os.path.relpath(run.resolve(), out.resolve())).as_posix()  # a link that travels with the page
    lines = [f"# {title}", "", f"Run directory: [`{where}`]({where})", ""]
    if summary:
        lines += summary_table(summary)
    else:
        lines += ["No summary.json yet: the run has not finished.", ""]
    lines += site_table(summary)
    federated = any(r.get("federated_eval_loss") is not None for r in rows)
    loss_columns = "eval loss (server) | federated eval loss" if federated else "eval loss"
    lines += [f"| round | {loss_columns} | clients | MB up | MB down | sim s | node train s | node setup s | node start-up s |"]
    lines += ["|" + "---|" * (10 if federated else 9)]
    for r in rows:
        losses = _loss(r.get("eval_loss")) + (f" | {_loss(r.get('federated_eval_loss'))}" if federated else "")
        lines.append(
            f"| {r['round'] or '0 (base model)'} | {losses} | {r.get('clients', 0)} "
            f"| {r.get('bytes_up', 0) / 1e6:.2f} "
            f"| {r.get('bytes_down', 0) / 1e6:.2f} | {_fmt(r.get('sim_time_s'))} | {_fmt(r.get('client_train_s'))} "
            f"| {_fmt(r.get('client_setup_s'))} | {_fmt(r.get('client_startup_s'))} |"
        )
    lines += ["", "![eval loss](eval-loss.png)", "", "![bytes](bytes.png)", "", "![node time](node-time.png)", ""]
    if plans:
        lines += ["Each node's plan per round: the rank of every module (0: not trained), its base precision and batch.", ""]
        lines += ["![plans](plans.png)", "", *plan_table(plans)]
        over = [f"round {p['round']} {_node(p['node_id'])}" for p in plans if p.get("over_budget")]
        lines += [
            "Plans over the node's FLOPS budget (not one step of the cheapest adapter fit; it did one and stretched the "
            "round): " + ("; ".join(over) if over else "none") + ".",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


SCORES = (
    ("bleu", "BLEU", "0–100, higher is better"),
    ("nist", "NIST", "higher is better"),
    ("meteor", "METEOR", "0–1, higher is better"),
    ("rouge_l", "ROUGE-L", "0–1, higher is better"),
    ("cider", "CIDEr", "0–10, higher is better"),
    ("ppl", "perplexity", "lower is better"),
)
"""(summary key, name, scale) of every score a run reports."""


def summary_table(summary: dict[str, Any]) -> list[str]:
    """The final scores beside the base model's (on the server's test split and, where the sites scored, their mean),
    then the run's size and cost with units."""
    federated = summary.get("federated") or {}
    columns = [("fine-tuned (server test split)", summary), ("base (server test split)", summary.get("base") or {})]
    if federated:
        columns += [("fine-tuned (sites' mean)", federated), ("base (sites' mean)", federated.get("base") or {})]
    columns = [(name, scores) for name, scores in columns if any(isinstance(scores.get(k), (int, float)) for k, _, _ in SCORES)]
    lines = []
    if columns:
        lines += ["| score | scale | " + " | ".join(name for name, _ in columns) + " |", "|" + "---|" * (len(columns) + 2)]
        lines += [
            f"| {name} | {scale} | " + " | ".join(_fmt(s.get(key)) for _, s in columns) + " |" for key, name, scale in SCORES
        ]
        lines.append("")
    cost = (
        ("trainable parameters per node", summary.get("trainable_params"), 1),
        ("MB up (from the nodes, all rounds)", summary.get("total_bytes_up"), 1e6),
        ("MB down (to the nodes, all rounds)", summary.get("total_bytes_down"), 1e6),
        ("simulated seconds", summary.get("sim_time_s"), 1),
        ("wall seconds", summary.get("wall_s"), 1),
        ("rounds", summary.get("rounds"), 1),
    )
    shown = [(name, value / scale) for name, value, scale in cost if isinstance(value, (int, float))]
    shown = [(name, int(value) if float(value).is_integer() else value) for name, value in shown]
    if shown:
        lines += ["| run | value |", "|---|---|", *(f"| {name} | {_fmt(value)} |" for name, value in shown), ""]
    return lines


def plan_table(plans: list[dict[str, Any]]) -> list[str]:
    """Per round and node: base precision, batch, local steps, how many weights it trained at each rank, the lowest
    block the backward pass reached, and the predicted round time."""
    lines = ["| round | node | precision | batch | local steps | weights × rank | lowest block | predicted round s |"]
    lines.append("|" + "---|" * 8)
    for p in sorted(plans, key=lambda p: (p["round"], str(p["node_id"]))):
        ranks = list(p["ranks"].values())
        by_rank = ", ".join(f"{ranks.count(r)} × {r}" for r in sorted(set(ranks), reverse=True))
        lowest = min(_module_order(m)[0] for m in p["ranks"])
        lines.append(
            f"| {p['round']} | {_node(p['node_id'])} | {p.get('precision', '—')} | {p.get('batch_size', '—')} "
            f"| {p.get('local_steps', '—')} "
            f"| {by_rank} | {lowest} | {_fmt(p.get('predicted_round_s'))} |"
        )
    return [*lines, ""]


def _loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fedpipe-report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run's directory (<output-dir>/<run-id>), finished or not")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        path = write_run_report(args.run_dir, args.out or args.run_dir / "report")
    except (OSError, ValueError) as exc:
        print(f"fedpipe-report: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
