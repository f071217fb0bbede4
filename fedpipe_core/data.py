"""Task data: E2E NLG and Alpaca instruction tuning, split by group, partitioned per client.

An example is a prompt and a target; the loss is taken on the target tokens only. Splits are
made by *group* (the E2E meaning representation, the Alpaca task) so that no group leaks from
train into validation or test. Client partitions come from flwr-datasets partitioners.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import datasets
import pandas as pd
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner
from transformers import PreTrainedTokenizerBase

from fedpipe_core.config import ConfigError

BUILTIN_DATA = {
    "e2e": Path(__file__).parent / "datasets" / "e2e" / "devset.jsonl",
    "alpaca": Path(__file__).parent / "datasets" / "alpaca-seed" / "seed_tasks.jsonl",
}
SPLIT_BUCKETS = {"train": range(80), "validation": range(80, 90), "test": range(90, 100)}
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One training/evaluation pair. ``group`` is the split unit, ``key`` the non-IID unit."""

    prompt: str
    target: str
    group: str
    key: str


def e2e_prompt(mr: str) -> str:
    """The E2E prompt: the meaning representation, then the reference to generate."""
    return f"Meaning representation: {mr}\nReference:"


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """The Alpaca prompt template (with or without an input)."""
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def task_prompt(task: str, text: str) -> str:
    """The training prompt of ``task`` around one input: an E2E meaning representation or an Alpaca instruction."""
    return e2e_prompt(text) if task == "e2e" else alpaca_prompt(text, "")


@dataclass(frozen=True)
class Fields:
    """Which fields of a user's rows hold the prompt input and the response (``data.prompt-field``,
    ``data.response-field``); empty: the task's own format (E2E ``mr,ref``, Alpaca records)."""

    prompt: str = ""
    response: str = ""

    def __bool__(self) -> bool:
        return bool(self.prompt or self.response)


def load_examples(
    task: str, data_path: str = "", where: str = "run config 'data.path'", fields: Fields = Fields()
) -> list[Example]:
    """Load every example of ``task`` from ``data_path`` (built-in sample when empty).

    With ``fields``, the file is rows of a JSONL or CSV file, or a dataset saved with ``datasets``'
    ``save_to_disk`` (a directory), read through the task's prompt template. ``where`` names the
    setting the path came from in error messages.
    """
    path = Path(data_path).expanduser() if data_path else BUILTIN_DATA[task]
    if fields:
        examples = _load_fields(task, path, where, fields)
    elif not path.is_file():
        raise ConfigError(f"{where}: {str(path)!r} does not exist or is not a file")
    else:
        examples = _load_e2e(path, where) if task == "e2e" else _load_alpaca(path, where)
    if not examples:
        raise ConfigError(f"{where}: {str(path)!r} holds no usable {task} example")
    return examples


def _read_rows(path: Path, where: str) -> list[dict]:
    """Rows of a JSONL or CSV file, or of a ``save_to_disk`` dataset directory (its ``train`` split if it has several)."""
    if path.is_dir():
        try:
            saved = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"{where}: {str(path)!r} is a directory but not a dataset saved with save_to_disk ({exc})") from exc
        if isinstance(saved, datasets.DatasetDict):
            if "train" not in saved:
                raise ConfigError(f"{where}: {str(path)!r} has splits {sorted(saved)}, none named 'train'")
            saved = saved["train"]
        return [dict(row) for row in saved]
    if not path.is_file():
        raise ConfigError(f"{where}: {str(path)!r} does not exist or is not a file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{where}: {str(path)!r} line {line}: not UTF-8 text ({exc.reason})") from exc
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{where}: {str(path)!r} line {number}: not a JSON object ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: {str(path)!r} line {number}: not a JSON object")
            rows.append(row)
        return rows
    if path.suffix == ".csv":
        return list(csv.DictReader(io.StringIO(text)))
    raise ConfigError(
        f"{where}: {str(path)!r}: with data.prompt-field / data.response-field the data is .jsonl, .csv or a save_to_disk dir"
    )


def _load_fields(task: str, path: Path, where: str, fields: Fields) -> list[Example]:
    """Examples from rows with a prompt field and a response field; any row that cannot be used stops the load."""
    if not (fields.prompt and fields.response):
        raise ConfigError(
            f"{where}: {str(path)!r}: data.prompt-field and data.response-field go together "
            f"(got {fields.prompt!r}, {fields.response!r})"
        )
    examples = []
    for number, row in enumerate(_read_rows(path, where), start=1):
        missing = [f for f in (fields.prompt, fields.response) if f not in row]
        if missing:
            raise ConfigError(f"{where}: {str(path)!r} row {number}: no field {missing[0]!r} (it has {sorted(row)[:6]})")
        text, response = str(row[fields.prompt] or "").strip(), str(row[fields.response] or "").strip()
        if not text or not response:
            empty = fields.prompt if not text else fields.response
            raise ConfigError(f"{where}: {str(path)!r} row {number}: field {empty!r} is empty")
        target = " " + response if task == "e2e" else response  # E2E references follow "Reference:" after a space
        examples.append(Example(task_prompt(task, text), target, text, text))
    return examples


def _load_e2e(path: Path, where: str) -> list[Example]:
    """E2E pairs from an ``mr,ref`` CSV (optionally gzipped) or a ``{mr, refs}`` JSONL; an empty file, a row with an
    empty meaning representation or reference, or a malformed line stops the load, naming file and row."""
    if path.suffix == ".jsonl":
        pairs = _e2e_jsonl(path, where)
    else:
        try:
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        except pd.errors.EmptyDataError:
            raise ConfigError(f"{where}: {str(path)!r} is empty (an E2E file is a CSV with columns mr,ref)") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
            raise ConfigError(f"{where}: {str(path)!r} is not a readable E2E file ({exc})") from exc
        missing = {"mr", "ref"} - set(frame.columns)
        if missing:
            raise ConfigError(
                f"{where}: {str(path)!r} lacks column(s) {', '.join(sorted(missing))} (E2E format is a CSV with columns mr,ref)"
            )
        pairs = [(row + 2, mr, ref) for row, (mr, ref) in enumerate(zip(frame["mr"], frame["ref"]))]  # row 1: the header
    for row, mr, ref in pairs:
        if not mr.strip() or not ref.strip():
            field = "mr" if not mr.strip() else "ref"
            raise ConfigError(f"{where}: {str(path)!r} row {row}: {field!r} is empty")
    return [Example(e2e_prompt(mr.strip()), " " + ref.strip(), mr.strip(), _restaurant(mr)) for _, mr, ref in pairs]


def _e2e_jsonl(path: Path, where: str) -> list[tuple[int, str, str]]:
    """(line, mr, reference) of every reference in a ``{"mr": ..., "refs": [...]}`` JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"{where}: {str(path)!r} is not a readable E2E file ({exc})") from exc
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{where}: {str(path)!r} line {number}: not a JSON object ({exc.msg})") from exc
        if not isinstance(record, dict) or not isinstance(record.get("mr"), str) or not isinstance(record.get("refs"), list):
            raise ConfigError(f'{where}: {str(path)!r} line {number}: expected {{"mr": text, "refs": [text, ...]}}')
        pairs += [(number, record["mr"], str(ref)) for ref in record["refs"]]
    return pairs


def _restaurant(mr: str) -> str:
    match = re.search(r"name\[([^\]]*)\]", mr)
    return match.group(1) if match else mr


def _load_alpaca(path: Path, where: str) -> list[Example]:
    """Alpaca records from a seed-task JSONL (``instances``) or an ``alpaca_data.json`` list."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: {str(path)!r} is not valid Alpaca JSON/JSONL ({exc})") from exc
    if not isinstance(rows, list):
        raise ConfigError(f"{where}: {str(path)!r} must hold a JSON list of records")
    examples: list[Example] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "instruction" not in row:
            raise ConfigError(f"{where}: record {i} of {str(path)!r} has no 'instruction'")
        instances = row.get("instances", [row])
        task = str(row.get("id") or row.get("name") or row["instruction"])
        for inst in instances:
            output = str(inst.get("output", "")).strip()
            if output:
                prompt = alpaca_prompt(row["instruction"].strip(), str(inst.get("input", "")).strip())
                examples.append(Example(prompt, output, task, task))
    return examples


def split_of(group: str) -> str:
    """Deterministic split of a group: a stable hash into 100 buckets (80/10/10)."""
    bucket = int(hashlib.sha256(group.encode("utf-8")).hexdigest(), 16) % 100
    return next(name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets)


def split_examples(examples: list[Example]) -> dict[str, list[Example]]:
    """train / validation / test, split by group so that no group is on two sides."""
    splits: dict[str, list[Example]] = {name: [] for name in SPLIT_BUCKETS}
    for example in examples:
        splits[split_of(example.group)].append(example)
    return splits


def make_partitioner(kind: str, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    """IID, or non-IID by Dirichlet over the example key (E2E restaurant name, Alpaca task)."""
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="key",
        alpha=alpha,
        min_partition_size=1,
        self_balancing=True,
        shuffle=True,
        seed=seed,
    )


def partition(
    examples: list[Example], num_partitions: int, partition_id: int, kind: str, alpha: float, seed: int
) -> list[Example]:
    """The examples of client ``partition_id`` out of ``num_partitions``."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id {partition_id} is outside 0..{num_partitions - 1}")
    if len(examples) < num_partitions:
        raise ConfigError(f"{len(examples)} training examples cannot be split over {num_partitions} clients")
    table = datasets.Dataset.from_dict(
        {
            "prompt": [e.prompt for e in examples],
            "target": [e.target for e in examples],
            "group": [e.group for e in examples],
            "key": [e.key for e in examples],
        }
    ).shuffle(seed=seed)  # IidPartitioner shards contiguously; the files are ordered by MR
    partitioner = make_partitioner(kind, num_partitions, alpha, seed)
    partitioner.dataset = table
    part = partitioner.load_partition(partition_id)
    return [Example(r["prompt"], r["target"], r["group"], r["key"]) for r in part]


def encode(tokenizer: PreTrainedTokenizerBase, example: Example, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are IGNORE_INDEX on the prompt (loss on the target only)."""
    prompt_ids = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(example.target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_ids = prompt_ids[: max(1, max_len - 1)]
    target_ids = target_ids[: max_len - len(prompt_ids)]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def collate(tokenizer: PreTrainedTokenizerBase, examples: list[Example], max_len: int) -> dict[str, torch.Tensor]:
    """A right-padded batch with input_ids, attention_mask and labels."""
    encoded = [encode(tokenizer, e, max_len) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def references_by_group(examples: list[Example]) -> dict[str, list[str]]:
    """Multi-reference view: group (E2E meaning representation) -> all its references."""
    refs: dict[str, list[str]] = {}
    for example in examples:
        refs.setdefault(example.group, []).append(example.target.strip())
    return refs
