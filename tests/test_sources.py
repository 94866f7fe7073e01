"""Hub presets map real dataset rows onto ours (rows shaped like the hub's; no network)."""

from __future__ import annotations

from bayes_llm.config import HubSource
from bayes_llm.data.sources import convert_hub_split


def test_gsm8k_takes_the_number_after_the_marker():
    rows = [{"question": "Natalia sold 48 clips ... How many?", "answer": "48/2 = <<48/2=24>>24\n#### 1,072"}]
    (row,) = convert_hub_split("math", HubSource(type="hub", preset="gsm8k"), "test", rows)
    assert row["answer"] == "1072" and row["domain"] == "math" and row["subtask"] == "gsm8k"


def test_mbpp_keeps_tests_and_reference():
    rows = [
        {
            "text": "Write a function to add.",
            "code": "def add(a, b):\n    return a + b",
            "test_list": ["assert add(1, 2) == 3", "assert add(0, 0) == 0"],
            "test_setup_code": "",
        }
    ]
    (row,) = convert_hub_split("code", HubSource(type="hub", preset="mbpp"), "train", rows)
    assert row["tests"] == rows[0]["test_list"] and "assert add(1, 2) == 3" in row["prompt"]
    assert row["answer"].startswith("def add")


def test_arc_maps_numeric_labels_to_letters():
    rows = [
        {
            "question": "Which is a metal?",
            "choices": {"text": ["wood", "iron", "glass"], "label": ["1", "2", "3"]},
            "answerKey": "2",
        }
    ]
    (row,) = convert_hub_split("reasoning", HubSource(type="hub", preset="arc_easy"), "val", rows)
    assert row["answer"] == "B" and row["choices"] == ["wood", "iron", "glass"]
    assert row["prompt"] == "Which is a metal?\nA) wood\nB) iron\nC) glass"


def test_custom_hub_mapping_uses_fields():
    source = HubSource(
        type="hub",
        path="someone/qa",
        answer_kind="number",
        splits={"train": "train", "val": "validation", "test": "test"},
        fields={"prompt": "q", "answer": "a"},
    )
    (row,) = convert_hub_split("qa", source, "train", [{"q": "What is 2 + 2?", "a": 4}])
    assert row == {"id": row["id"], "domain": "qa", "subtask": "someone_qa", "prompt": "What is 2 + 2?", "answer": "4"}
