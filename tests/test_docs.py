"""The docs check: every command and flag a guide shows exists, every file a guide links to exists, and the README's
two commands are the ones CI runs."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).parents[1]
GUIDES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
GUIDES = [g for g in GUIDES if "benchmark/rerun" not in g.as_posix() and "benchmark/trials" not in g.as_posix()]
SCRIPTS: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
TOP_LEVEL = {p.name for p in ROOT.iterdir() if not p.name.startswith(".")}


@functools.cache
def help_text(script: str) -> str:
    module, _, function = SCRIPTS[script].partition(":")
    code = (
        f"import sys; sys.argv = [{script!r}, '--help']; from {module} import {function} as main\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
        "print('TORCH-LOADED' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, f"{script} --help failed: {done.stderr[-800:]}"
    return done.stdout


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_command_s_help_works_without_loading_torch(script):
    text = help_text(script)
    assert "usage:" in text and text.rstrip().endswith("NO-TORCH"), text[-300:]
    flags = re.findall(r"^\s+(--[a-z][a-z0-9-]*)(?: [A-Z_]+)?\s*$|^\s+(--[a-z][a-z0-9-]*)[ ,]", text, re.M)
    for flag in {a or b for a, b in flags} - {"--help"}:  # a flag alone on its line has its help on the next
        line = next(i for i, row in enumerate(text.splitlines()) if re.match(rf"\s+{flag}\b", row))
        following = text.splitlines()[line : line + 2]
        assert len(" ".join(following).split()) > 2, f"{script} {flag} has no help line"


def _commands(text: str) -> list[tuple[str, set[str]]]:
    """(command, flags) of every fedpipe-* command line a guide shows (a code block's line or an inline code span that
    starts with it)."""
    spans = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    out = []
    for span in spans:
        for line in span.replace("\\\n", " ").splitlines():
            match = re.match(r"\s*(?:\$ )?(fedpipe-[a-z]+(?:-[a-z]+)*)\b([^|;&]*)", line)
            if match:
                out.append((match.group(1), set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2)))))
    return out


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_and_flag_a_guide_shows_exists(guide):
    for command, flags in _commands(guide.read_text(encoding="utf-8")):
        assert command in SCRIPTS, f"{guide.name}: `{command}` is not a console script of pyproject.toml"
        missing = sorted(f for f in flags if f not in help_text(command))
        assert not missing, f"{guide.name}: `{command}` has no flag {missing}"


def _linked(text: str) -> list[str]:
    """Relative targets of markdown links and images, and repository paths in inline code."""
    links = [t for t in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    kinds = "md|py|png|svg|yaml|yml|toml|json|sh|conf|template"
    paths = [p for p in re.findall(rf"`([\w.\-/]+/[\w.\-]+\.(?:{kinds}))`", text) if p.split("/")[0] in TOP_LEVEL]
    return [t.split("#")[0] for t in links] + paths


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_a_guide_links_to_exists(guide):
    text = guide.read_text(encoding="utf-8")
    missing = [t for t in _linked(text) if t and not (guide.parent / t).exists() and not (ROOT / t).exists()]
    assert not missing, f"{guide.relative_to(ROOT)} links to missing files: {missing}"


def test_the_readme_s_two_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    run, test = re.findall(r"```bash\n(.*?)```", readme, re.S)[:2]
    assert "flwr run ." in run
    installs = ci.replace("pip install -q ", "pip install ").replace('-e ".[test]"', "-e .")
    for step in re.findall(r"pip install [^&\n]+", run):
        assert step.strip() in installs, f"README's {step.strip()!r} is not what .ci/run installs"
    command = re.search(r"python -m pytest -q[^\n`]*", test).group(0).strip()
    assert command in ci, f"README's test command {command!r} is not in .ci/run"
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in run and "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in ci


def test_every_generated_block_is_what_its_source_makes_now(tmp_path):
    from fedpipe_tools import docs

    assert docs.stale() == [], "run `python -m fedpipe_tools.docs` to rewrite the generated blocks"
    run = tmp_path / "runs" / "1"
    run.mkdir(parents=True)
    rows = [{"round": 0, "eval_loss": 2.5}, {"round": 1, "eval_loss": 2.0, "clients": 2, "bytes_up": 2e6, "bytes_down": 1e6}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"bleu": 40.0, "base": {"bleu": 1.0}}))
    page = "x\n<!-- generated: run-rounds runs -->\nstale\n<!-- end generated -->\ny\n"
    fresh = docs.render(page, tmp_path)
    assert "| 1 | 2.000000 | — | 2 | 2.000 | 1.000 |" in fresh and "stale" not in fresh and docs.render(fresh, tmp_path) == fresh
    summary = docs.render("<!-- generated: run-summary runs/1 -->\n<!-- end generated -->\n", tmp_path)
    assert "| BLEU | 0–100, higher is better | 40 | 1 |" in summary
    with pytest.raises(ValueError, match="unknown generated block 'figures'"):
        docs.render("<!-- generated: figures x -->\n<!-- end generated -->", tmp_path)


def test_the_model_sizes_block_is_what_a_reply_and_a_base_weigh():
    from dataclasses import replace

    import torch

    from fedpipe_core.codec import encode_factors
    from fedpipe_core.config import RunConfig
    from fedpipe_core.lora import fresh_factors
    from fedpipe_core.quantize import quantize
    from fedpipe_core.task import load_task
    from fedpipe_tools import docs

    table = docs.model_sizes("smollm2-135m")
    task = load_task(replace(RunConfig(), model="smollm2-135m"))
    reply = encode_factors(fresh_factors(task.shapes, dict.fromkeys(task.targets, 8), seed=0, scale=1.0))
    assert f"a dispatch of ΔW at rank 8) | {sum(a.nbytes for a in reply.values()) / 1e6:.2f} |" in table
    name = task.targets[0]
    weight = torch.randn(task.shapes[name])
    ratio = quantize(weight, "nf4").nbytes() / weight.numel()  # what the NF4 row charges per base parameter
    nf4 = next(line for line in table.splitlines() if "at NF4" in line)
    assert f"| {task.spec.linear_params * ratio / 1e6:.0f};" in nf4
    with pytest.raises(ValueError, match="no suite 'no-such-suite'"):
        docs.suite_targets("no-such-suite")
    assert "- fedpipe/binding − fedpipe/binding-random final_eval_loss <= -0.02" in docs.suite_targets("binding")
