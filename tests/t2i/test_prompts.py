"""Prompt readers: formats, labels, and one-line FILE:LINE errors."""

from __future__ import annotations

import json

import pytest
from conftest import SHARED_DATA

from diffmem.common.t2i.prompts import PromptFileError, read_prompts, select_rows


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_caption_keys_labels_and_index(tmp_path):
    f = write(tmp_path / "p.jsonl", "\n".join([
        json.dumps({"caption": "a", "index": 7, "label": 1}),
        json.dumps({"prompt": "b", "memorized": False}),
        "",
        json.dumps({"text": "c"}),
        json.dumps({"Prompt": "d", "label": "true"}),
        json.dumps({"TEXT": "e", "type": "VM"}),
    ]) + "\n")
    recs = read_prompts(f)
    assert [r.prompt for r in recs] == ["a", "b", "c", "d", "e"]
    assert [r.row for r in recs] == [0, 1, 2, 3, 4]
    assert [r.label for r in recs] == [1, 0, None, 1, 1]
    assert recs[0].index == 7 and recs[1].index is None
    assert [r.line for r in recs] == [1, 2, 4, 5, 6]  # blank lines are skipped, line numbers kept
    assert [r.label for r in select_rows(recs, 1, 3, default_label=0)] == [0, 0]


def test_webster_csv(tmp_path):
    f = write(tmp_path / "m.csv", ";Caption;URL;type;Index\n0;First prompt;http://a;VM;11\n"
                                  '1;"Second; with semicolon";http://b;TM;12\n2;Third;http://c;N;13\n')
    recs = read_prompts(f)
    assert [r.prompt for r in recs] == ["First prompt", "Second; with semicolon", "Third"]
    assert [r.type for r in recs] == ["VM", "TM", "N"]
    assert [r.label for r in recs] == [1, 1, 0]
    assert [r.index for r in recs] == [11, 12, 13]


@pytest.mark.parametrize("name,text,where,expected", [
    ("bad.jsonl", '{"caption": "ok"}\n{"caption": "x"\n', "bad.jsonl:2:", "expected a JSON object"),
    ("bad.jsonl", '{"caption": "ok"}\n["a"]\n', "bad.jsonl:2:", "expected a JSON object, got list"),
    ("bad.jsonl", '{"caption": "ok"}\n\n{"url": "x"}\n', "bad.jsonl:3:", "expected a key 'caption'"),
    ("bad.jsonl", '{"caption": 5}\n', "bad.jsonl:1:", "caption to be a string"),
    ("bad.jsonl", '{"caption": "  "}\n', "bad.jsonl:1:", "empty caption"),
    ("bad.jsonl", '{"caption": "a", "label": 2}\n', "bad.jsonl:1:", "expected label 0/1"),
    ("bad.csv", "Caption;URL\nfine;u\ntoo;many;fields\n", "bad.csv:3:", "expected 2 ';'-separated fields"),
    ("bad.csv", "Title;URL\nfine;u\n", "bad.csv:1:", "'Caption'"),
    ("empty.jsonl", "\n\n", "empty.jsonl:", "at least one prompt"),
    ("p.parquet", "x", "p.parquet:", "expected a .jsonl or .csv"),
])
def test_bad_rows_give_one_line_with_file_and_line(tmp_path, name, text, where, expected):
    f = write(tmp_path / name, text)
    with pytest.raises(PromptFileError) as err:
        read_prompts(f)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(str(tmp_path / where.split(":")[0])) and where in msg
    assert expected in msg


def test_empty_caption_allowed_on_request(tmp_path):
    f = write(tmp_path / "e.jsonl", '{"caption": ""}\n')
    assert read_prompts(f, allow_empty=True)[0].prompt == ""


def test_missing_source_is_one_line(tmp_path):
    with pytest.raises(PromptFileError, match="no such file"):
        read_prompts(tmp_path / "nope.jsonl")


def test_hugging_face_dataset_folder(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    write(folder / "test.jsonl", '{"Prompt": "from a dataset", "label": 1}\n{"Prompt": "another"}\n')
    recs = read_prompts(str(folder), split="test", column="Prompt")  # split named by the file
    assert [r.prompt for r in recs] == ["from a dataset", "another"] and recs[0].label == 1
    with pytest.raises(PromptFileError, match="expected a caption column 'nope'"):
        read_prompts(str(folder), split="test", column="nope")


def test_unreachable_hub_dataset_is_one_line():
    with pytest.raises(PromptFileError) as err:
        read_prompts("no-such-owner/no-such-dataset-xyz")
    assert "\n" not in str(err.value) and "cannot load Hugging Face dataset" in str(err.value)


@pytest.mark.skipif(not (SHARED_DATA / "memorized_laion_prompts.csv").exists(), reason="shared data absent")
def test_shared_prompt_sets_read_cleanly():
    mem = read_prompts(SHARED_DATA / "memorized_laion_prompts.csv")
    assert len(mem) == 500 and {r.type for r in mem} == {"VM", "TM"} and all(r.label == 1 for r in mem)
    assert sum(r.type == "VM" for r in mem) == 112
    assert len(read_prompts(SHARED_DATA / "sdv1_500_memorized.jsonl")) == 500
    assert len(read_prompts(SHARED_DATA / "unmemorized_laion_prompts.csv")) == 500
