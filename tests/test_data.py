"""Data: group-wise splits, partitions that cover without overlap, target-only labels, loaders."""

import json
import re

import pandas as pd
import pytest

from fedpipe_core.config import ConfigError
from fedpipe_core.data import (
    BUILTIN_DATA,
    IGNORE_INDEX,
    Example,
    encode,
    load_examples,
    partition,
    references_by_group,
    split_examples,
)


@pytest.fixture(scope="module")
def e2e():
    return load_examples("e2e")


def test_builtin_e2e_is_the_full_devset(e2e):
    assert len(e2e) == 4672
    assert len({e.group for e in e2e}) == 547


def test_splits_are_by_group_and_deterministic(e2e):
    splits = split_examples(e2e)
    groups = {name: {e.group for e in part} for name, part in splits.items()}
    assert not groups["train"] & groups["validation"]
    assert not groups["train"] & groups["test"]
    assert not groups["validation"] & groups["test"]
    assert sum(len(p) for p in splits.values()) == len(e2e)
    assert 0.7 < len(groups["train"]) / 547 < 0.9
    assert split_examples(list(reversed(e2e)))["test"] == list(reversed(splits["test"]))


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_cover_the_train_split_without_overlap(e2e, kind):
    train = split_examples(e2e)["train"][:600]
    parts = [partition(train, 4, pid, kind, alpha=0.5, seed=7) for pid in range(4)]
    assert all(parts)
    seen = [(e.prompt, e.target) for p in parts for e in p]
    assert sorted(seen) == sorted((e.prompt, e.target) for e in train)
    with pytest.raises(ValueError, match="outside"):
        partition(train, 4, 4, kind, 0.5, 7)


def _mean_tv_distance(parts):
    from collections import Counter

    keys = sorted({e.key for p in parts for e in p})
    dists = [[Counter(e.key for e in p)[k] / len(p) for k in keys] for p in parts]
    pairs = [(a, b) for i, a in enumerate(dists) for b in dists[i + 1 :]]
    return sum(0.5 * sum(abs(x - y) for x, y in zip(a, b)) for a, b in pairs) / len(pairs)


def test_dirichlet_partitions_are_skewed_by_restaurant(e2e):
    train = split_examples(e2e)["train"]
    iid = [partition(train, 4, pid, "iid", 0.5, 7) for pid in range(4)]
    skewed = [partition(train, 4, pid, "dirichlet", 0.3, 7) for pid in range(4)]
    assert _mean_tv_distance(iid) < 0.15
    assert _mean_tv_distance(skewed) > _mean_tv_distance(iid) + 0.3


def test_labels_cover_only_the_target(task):
    example = Example("Meaning representation: name[X]\nReference:", " X is a pub.", "g", "X")
    ids, labels = encode(task.tokenizer, example, 64)
    prompt_len = len(task.tokenizer(example.prompt, add_special_tokens=False)["input_ids"])
    assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert ids[-1] == task.tokenizer.eos_token_id
    short_ids, short_labels = encode(task.tokenizer, example, 8)
    assert len(short_ids) == 8 and short_labels[-1] != IGNORE_INDEX


def test_user_csv_loads_like_the_builtin_file(tmp_path, e2e):
    rows = [json.loads(line) for line in BUILTIN_DATA["e2e"].read_text().splitlines()[:5]]
    frame = pd.DataFrame([(r["mr"], ref) for r in rows for ref in r["refs"]], columns=["mr", "ref"])
    path = tmp_path / "mine.csv"
    frame.to_csv(path, index=False)
    mine = load_examples("e2e", str(path))
    assert mine == e2e[: len(frame)]
    refs = references_by_group(mine)
    assert refs[rows[0]["mr"]] == rows[0]["refs"]


def test_alpaca_seed_and_full_formats(tmp_path):
    seed = load_examples("alpaca")
    assert len({e.group for e in seed}) == 175 and all("### Response:" in e.prompt for e in seed)
    full = tmp_path / "alpaca_data.json"
    full.write_text(
        json.dumps(
            [{"instruction": "Add.", "input": "1+1", "output": "2"}, {"instruction": "Hi", "input": "", "output": "Hello"}]
        )
    )
    loaded = load_examples("alpaca", str(full))
    assert [e.target for e in loaded] == ["2", "Hello"] and "### Input:\n1+1" in loaded[0].prompt


@pytest.mark.parametrize(
    ("task_name", "content", "name", "fragment"),
    [
        ("e2e", "a,b\n1,2\n", "bad.csv", "lacks column(s) mr, ref"),
        ("e2e", "mr,ref\n", "empty.csv", "holds no usable e2e example"),
        ("alpaca", "{not json", "bad.json", "not valid Alpaca JSON"),
        ("alpaca", json.dumps([{"input": "x"}]), "noinst.json", "has no 'instruction'"),
        ("e2e", '{"mr": "x", "refs": ["y"]}\n{"mr": "x"}\n', "bad.jsonl", 'line 2: expected {"mr": text, "refs": [text, ...]}'),
        ("e2e", '{"mr": "x", "refs": ["y"]}\n{"mr": "x", "refs": ["y"]\n', "bad.jsonl", "line 2: not a JSON object"),
        ("e2e", "", "zero.csv", "is empty (an E2E file is a CSV with columns mr,ref)"),
        ("e2e", 'mr,ref\n"name[A]",A.\n"name[B]", \n', "blank.csv", "row 3: 'ref' is empty"),
        ("e2e", '{"mr": "name[A]", "refs": ["A.", ""]}\n', "blank.jsonl", "row 1: 'ref' is empty"),
    ],
)
def test_bad_data_files_give_clear_errors(tmp_path, task_name, content, name, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as error:
        load_examples(task_name, str(path))
    assert str(path) in str(error.value)  # every data error names the file
    with pytest.raises(ConfigError, match="does not exist"):
        load_examples(task_name, str(tmp_path / "missing.csv"))


def test_a_site_trains_on_its_own_file_named_in_node_config(task, tmp_path):
    from types import SimpleNamespace

    from fedpipe_core.node.round import _partition, node_data
    from fedpipe_core.task import client_examples

    def _examples(task, context):
        shares = node_data(task, context)
        return shares.train + shares.validation + shares.test

    own = tmp_path / "site.csv"
    own.write_text(
        'mr,ref\n"name[A], food[Thai]",A serves Thai food.\n"name[B], food[Thai]",B is Thai.\n"name[B], food[Thai]",Thai at B.\n'
    )
    site = SimpleNamespace(node_config={"data-path": str(own)})
    examples = _examples(task, site)
    assert [e.target.strip() for e in examples] == ["A serves Thai food.", "B is Thai.", "Thai at B."]
    assert _partition(site) == (0, 1)
    shared = SimpleNamespace(node_config={"partition-id": 1, "num-partitions": 2})
    assert node_data(task, shared).train == client_examples(task, 1, 2)  # the same training share as without site eval
    with pytest.raises(ConfigError, match="node config 'data-path'.*does not exist"):
        _examples(task, SimpleNamespace(node_config={"data-path": str(tmp_path / "missing.csv")}))
    broken = tmp_path / "broken.csv"
    broken.write_text("meaning,text\nx,y\n")
    with pytest.raises(ConfigError, match="node config 'data-path'.*lacks column"):
        _examples(task, SimpleNamespace(node_config={"data-path": str(broken)}))
    with pytest.raises(ValueError, match="node config needs"):
        _partition(SimpleNamespace(node_config={}))


def test_own_data_with_named_fields_in_jsonl_csv_and_save_to_disk(tmp_path):
    import datasets

    from fedpipe_core.data import Fields, alpaca_prompt, e2e_prompt

    rows = [
        {"q": "name[Aromi], food[Thai]", "a": "Aromi serves Thai food.", "id": 1},
        {"q": "name[Aromi], food[Thai]", "a": "Thai food at Aromi.", "id": 2},
        {"q": "name[Cotto]", "a": "Cotto.", "id": 3},
    ]
    jsonl = tmp_path / "mine.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("q,a,id\n" + "".join(f'"{r["q"]}","{r["a"]}",{r["id"]}\n' for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved-dict"))
    fields = Fields("q", "a")
    for source in (jsonl, csv_file, tmp_path / "saved", tmp_path / "saved-dict"):
        examples = load_examples("e2e", str(source), fields=fields)
        assert [e.prompt for e in examples] == [e2e_prompt(r["q"]) for r in rows], source
        assert [e.target for e in examples] == [" " + r["a"] for r in rows] and examples[0].group == examples[1].group
    alpaca = load_examples("alpaca", str(jsonl), fields=fields)
    assert alpaca[2].prompt == alpaca_prompt("name[Cotto]", "") and alpaca[2].target == "Cotto."


@pytest.mark.parametrize(
    ("name", "content", "fields", "fragment"),
    [
        ("a.jsonl", '{"q": "x", "a": "y"}\n{"q": "x"}\n', ("q", "a"), "row 2: no field 'a'"),
        ("a.jsonl", '{"q": "x", "a": "y"}\n{"q": "", "a": "y"}\n', ("q", "a"), "row 2: field 'q' is empty"),
        ("a.jsonl", '{"q": "x", "a": "y"}\nnot json\n', ("q", "a"), "line 2: not a JSON object"),
        ("a.csv", b"q,a\nx,y\n\xff\xfe,z\n", ("q", "a"), "line 3: not UTF-8 text"),
        ("a.csv", "q,a\nx,y\n", ("q", ""), "go together"),
        ("a.txt", "x\n", ("q", "a"), ".jsonl, .csv or a save_to_disk dir"),
    ],
)
def test_own_data_that_cannot_be_read_whole_stops_with_file_row_and_problem(tmp_path, name, content, fields, fragment):
    from fedpipe_core.data import Fields

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ConfigError, match=re.escape(fragment)) as error:
        load_examples("e2e", str(path), fields=Fields(*fields))
    assert str(path) in str(error.value)


def test_a_site_names_its_own_fields_in_its_node_config(task, tmp_path):
    from fedpipe_core.task import site_examples

    path = tmp_path / "site.jsonl"
    path.write_text(json.dumps({"question": "name[Zizzi]", "answer": "Zizzi is a place."}) + "\n")
    (example,) = site_examples(task, str(path), "question", "answer")
    assert example.group == "name[Zizzi]" and example.target == " Zizzi is a place."
