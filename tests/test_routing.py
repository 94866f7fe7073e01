"""The routing benchmark (bayes_llm/data/routing.py) and the dispatcher's metrics on it
(bayes_llm/dispatch/heldout.py); the calibrate stage's use of them is tested in test_dispatch."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from bayes_llm.config import RoutingBenchmark, load_params
from bayes_llm.data import routing
from bayes_llm.data.validate import validate_routing
from bayes_llm.dispatch import heldout
from bayes_llm.dispatch.controller import Controller

LABELS = ["code", "math", "reasoning", "other"]


def _splits() -> dict:
    def rows(domain: str, split: str, n: int, make) -> list[dict]:
        return [{"id": f"{domain}-{split}-{i}", **make(i, split)} for i in range(n)]

    def math_row(i, split):
        a = i + (100 if split == "test" else 50 if split == "val" else 0)
        return {"prompt": f"What is {a} + 1?", "answer": str(a + 1)}

    def code_row(i, split):
        name = f"add_{i}_{split}"
        return {"prompt": f"Write a Python function `{name}(n)` that adds {i} to n and returns it.",
                "answer": f"def {name}(n):\n    return n + {i}\n", "tests": [f"assert {name}(1) == {i + 1}"]}

    def letter_row(i, split):
        return {"prompt": f"Which number is the largest ({split} {i})?\nA) {i}\nB) {i + 9}", "answer": "B",
                "choices": [str(i), str(i + 9)]}

    return {
        name: (kind, {s: rows(name, s, 12, make) for s in routing.PARTS})
        for name, kind, make in (("math", "number", math_row), ("code", "code", code_row),
                                 ("reasoning", "letter", letter_row))
    }


SIZES = RoutingBenchmark.model_validate({"train": {"heldout": 5, "other": 6}, "val": {"heldout": 4, "mixed": 3,
                                         "other": 5}, "test": {"heldout": 4, "mixed": 3, "other": 5}})


def test_the_benchmark_is_deterministic_and_its_parts_share_no_wrapper_or_prompt():
    parts = routing.build(_splits(), SIZES, seed=7)
    assert parts == routing.build(_splits(), SIZES, seed=7)
    assert parts != routing.build(_splits(), SIZES, seed=8)
    count = {part: {k: sum(r["kind"] == k for r in rows) for k in routing.KINDS} for part, rows in parts.items()}
    assert count["train"] == {"heldout": 15, "mixed": 0, "other": 6}  # no mixed rows to train on
    assert count["val"] == count["test"] == {"heldout": 12, "mixed": 6, "other": 5}
    for part in ("val", "test"):
        for row in parts[part]:
            others = [p for p in routing.PARTS if p != part]
            if row["kind"] == "heldout":  # wrapped in this part's wrappers only
                pieces = [piece for w in routing.WRAPPERS[part] for piece in w.split("{p}") if piece]
                assert any(piece in row["prompt"] for piece in pieces)
                wrappers = [piece.strip() for p in others for w in routing.WRAPPERS[p] for piece in w.split("{p}")]
                assert not any(piece in row["prompt"] for piece in wrappers if piece)
            if row["kind"] == "other":
                assert row["target"] == "other" and row["mix"] == "{}" and row["answer"] is None
    prompts = {part: {r["prompt"] for r in rows} for part, rows in parts.items()}
    assert not prompts["val"] & prompts["test"] and not prompts["train"] & (prompts["val"] | prompts["test"])


def test_mixed_prompts_know_their_mix_and_their_answer():
    rows = [r for r in routing.build(_splits(), SIZES, seed=1)["test"] if r["kind"] == "mixed"]
    as_choice = [r for r in rows if r["subtask"] == "number_as_choice"]
    as_function = [r for r in rows if r["subtask"] == "number_as_function"]
    assert len(as_choice) == len(as_function) == 3
    for row in as_choice:
        number = row["prompt"].split("What is ")[1].split(" + ")[0]
        assert row["choices"][ord(row["answer"]) - ord("A")] == str(int(number) + 1)
        assert row["mix"] == '{"math": 0.5, "reasoning": 0.5}' and row["answer_kind"] == "letter"
    for row in as_function:
        assert row["tests"] == [f"assert solve() == {row['answer'].split('return ')[1].strip()}"]
        assert row["mix"] == '{"code": 0.5, "math": 0.5}' and row["answer_kind"] == "code"


def test_rewording_changes_only_the_question_line_and_differs_by_part():
    assert routing.reword("What is 3 + 4?") == "Work out 3 + 4."
    assert routing.reword("Calculate 3 + 4.", "val") == "Give me the result of 3 + 4."
    assert len({routing.reword("3 + 4 = ?", part) for part in routing.PARTS}) == 3
    choices = "\nA) 1, 2\nB) 2, 1"
    assert routing.reword("Which list is sorted?" + choices) == "Tell me which list is sorted." + choices
    assert routing.reword("Sol has 4 beads.") == "Sol has 4 beads."


def _frames(parts: dict) -> dict[str, pd.DataFrame]:
    return {part: pd.DataFrame(rows) for part, rows in parts.items()}


def test_the_gate_passes_the_benchmark_and_names_a_leaking_wording_or_a_wrong_answer():
    data = load_params().data
    parts = routing.build(_splits(), SIZES, seed=3)
    train = [r["prompt"] for _, splits in _splits().values() for r in splits["train"]]

    def gate(frames, texts, mixed=True, generated=None):
        return validate_routing(frames, texts, texts if generated is None else generated, LABELS, data, mixed,
                                progress=False)  # fmt: skip

    assert gate(_frames(parts), train).success
    for seen in ("Quick question: is this seen?", "Tell me which one you like.", "Describe the smell of x."):
        leaked = gate(_frames(parts), [*train, seen])  # a val/test wrapper, rewording or template trained on
        assert not leaked.success and "must not occur in any training text generated here" in leaked.text(), seen
        # the same phrase in a real benchmark's natural text (not generated here) is a chance collision
        assert gate(_frames(parts), [*train, seen], generated=train).success, seen
    broken = {part: [dict(r) for r in rows] for part, rows in parts.items()}
    mixed = next(r for r in broken["test"] if r["subtask"] == "number_as_function")
    mixed["answer"] = "def solve():\n    return -1\n"
    report = gate(_frames(broken), train)
    assert not report.success and "answer must fit its kind" in report.text() and mixed["id"] in report.text()
    no_other = {part: [r for r in rows if r["kind"] != "other" or part != "val"] for part, rows in parts.items()}
    report = gate(_frames(no_other), train)
    assert not report.success and "val must have every kind" in report.text()


def test_kinds_follow_the_domains_and_odd_answers_do_not_break_the_build():
    only_math = {"math": _splits()["math"]}
    parts = routing.build(only_math, SIZES, seed=3)
    assert not routing.mixable({"number"}) and not any(r["kind"] == "mixed" for r in parts["test"])
    frames = _frames(parts)
    assert validate_routing(frames, [], [], ["math", "other"], load_params().data, False, progress=False).success
    def negative_rows(part):
        return [{"id": f"m{part}{i}", "prompt": f"What is 0 - {i + 3}?", "answer": str(-i - 3)} for i in range(12)]

    negative = {"math": ("number", {p: negative_rows(p) for p in routing.PARTS}), "reasoning": _splits()["reasoning"]}
    rows = [r for r in routing.build(negative, SIZES, seed=3)["test"] if r["subtask"] == "number_as_choice"]
    assert rows and all(len(set(r["choices"])) == 4 for r in rows)
    too_many = RoutingBenchmark.model_validate({"test": {"other": 2000}})
    with pytest.raises(Exception, match="distinct off-domain prompts"):
        routing.build(_splits(), too_many, seed=3)


def test_read_gives_none_for_missing_answers(tmp_path):
    rows = routing.build(_splits(), SIZES, seed=3)["val"]
    pd.DataFrame(rows).to_parquet(routing.path(tmp_path, "val"), index=False)
    back = routing.read(tmp_path, "val")
    other = next(r for r in back if r["kind"] == "other")
    assert other["answer"] is None and other["answer_kind"] is None and other["mix"] == {}
    assert next(r for r in back if r["answer_kind"] == "code")["tests"][0].startswith("assert")
    with pytest.raises(Exception, match="dvc repro prepare"):
        routing.read(tmp_path, "test")
    routing.path(tmp_path, "test").write_text("not parquet")
    with pytest.raises(Exception, match=r"test\.parquet: cannot read it .*dvc checkout"):
        routing.read(tmp_path, "test")


def _controller() -> Controller:
    return Controller.with_prior(["code", "math"])


def test_the_other_threshold_buys_recall_at_the_asked_precision():
    controller = _controller()
    # Confident in-domain rows, and off-domain rows the first pass is unsure about.
    logliks = torch.log(torch.tensor([[0.9, 0.05, 0.05]] * 6 + [[0.4, 0.35, 0.25]] * 4 + [[0.5, 0.45, 0.05]],
                                     dtype=torch.float64))
    is_other = [False] * 6 + [True] * 4 + [False]
    tuned = heldout.fit_other_threshold(controller, logliks, is_other, min_precision=0.8)
    scores = heldout.other_scores(tuned, tuned.posterior(logliks), is_other)
    assert scores["recall"] == 1.0 and scores["precision"] >= 0.8
    assert all(tuned.route(p) != "other" for p in tuned.posterior(logliks[:6]))  # confident rows keep their expert
    assert heldout.fit_other_threshold(controller, logliks, [False] * 11, 0.9) is None  # no off-domain rows
    mixed_up = [True] * 6 + [False] * 5  # confident rows are the off-domain ones: no threshold is precise
    assert heldout.fit_other_threshold(controller, logliks, mixed_up, 0.99) is None


def test_routing_report_and_the_system_comparison():
    controller = _controller()
    rows = [{"kind": "heldout", "target": "code", "mix": {"code": 1.0}},
            {"kind": "heldout", "target": "math", "mix": {"math": 1.0}},
            {"kind": "mixed", "target": "code", "mix": {"code": 0.5, "math": 0.5}},
            {"kind": "other", "target": "other", "mix": {}}]
    logliks = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]],
                                     dtype=torch.float64))
    report = heldout.routing_report(controller, controller, logliks, rows)
    assert report["routing_accuracy"] == 0.5 and report["routing_accuracy_per_domain"] == {"code": 1.0, "math": 0.0}
    assert report["other_precision"] == 1.0 and report["other_recall"] == 1.0
    assert report["items"] == {"heldout": 2, "mixed": 1, "other": 1}
    assert report["confusion"]["matrix"][1] == [1, 0, 0]  # the math row went to code
    blends = heldout.systems(controller, controller.posterior(logliks), rows, top_k=2)
    assert blends["oracle"][2] == {"code": 0.5, "math": 0.5} and blends["base"][0] == {}
    assert list(blends["hard"][2]) == ["code"] and math.isclose(sum(blends["soft"][2].values()), 1.0)
    scores = {"base": [0, 0, 0, 0], "hard": [1, 0, 0, 0], "soft": [1, 1, 1, 0], "oracle": [1, 1, 0, 0]}
    out = heldout.compare(scores, rows, resamples=50, seed=0)
    assert out["heldout"]["accuracy"]["soft"] == 100.0 and out["mixed"]["soft_minus_hard"]["gain_points"] == 100.0
    assert out["adaptive_over_oracle"] == 1.0 and out["heldout_mean"]["hard"] == 50.0
