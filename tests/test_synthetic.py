from __future__ import annotations

import re

import pytest

from bayes_llm.data.domains import GenerationError, build, resolve
from bayes_llm.data.rows import ANSWER_PATTERNS, LETTERS
from bayes_llm.rewards.code import check_solutions
from tests.conftest import smoke_params


def _all(params, seed):
    return {d.name: build(d, params.data, seed) for d in resolve(params.data)}


def test_same_seed_same_rows_other_seed_other_rows():
    params = smoke_params()
    assert _all(params, 1) == _all(params, 1)
    first, second = _all(params, 1), _all(params, 2)
    for name in first:
        assert first[name]["test"] != second[name]["test"], name


def test_domains_splits_and_row_contract():
    params = smoke_params()
    built = _all(params, params.data.seed)
    assert list(built) == ["math", "code", "reasoning", "transfer"]
    assert list(built["transfer"]) == ["test"]  # test-only
    for name, splits in built.items():
        prompts = [row["prompt"] for rows in splits.values() for row in rows]
        assert len(prompts) == len(set(prompts)), f"{name}: a prompt repeats across or within splits"
        for rows in splits.values():
            for row in rows:
                assert row["domain"] == name and row["id"].startswith(name + "-")
                assert {"id", "domain", "subtask", "prompt", "answer"} <= set(row)
    for row in built["math"]["train"]:
        assert re.match(ANSWER_PATTERNS["number"], row["answer"])
    for row in built["reasoning"]["train"] + built["transfer"]["test"]:
        assert LETTERS.index(row["answer"]) < len(row["choices"])
        assert f"{row['answer']}) {row['choices'][LETTERS.index(row['answer'])]}" in row["prompt"]


def test_test_split_is_stable_when_train_grows():
    small = smoke_params()
    domains = small.data.model_dump()["domains"]
    domains["math"]["sizes"]["train"] *= 3  # only the train size changes; every knob stays
    bigger = smoke_params(domains=domains)
    math = next(d for d in resolve(small.data) if d.name == "math")
    bigger_math = next(d for d in resolve(bigger.data) if d.name == "math")
    assert bigger_math.expected_rows["train"] == 3 * math.expected_rows["train"]
    assert build(math, small.data, 5)["test"] == build(bigger_math, bigger.data, 5)["test"]


def test_every_reference_solution_passes_its_own_tests():
    params = smoke_params(domains={"code": {"sizes": {"train": 120, "val": 20, "test": 20}}})
    code = next(d for d in resolve(params.data) if d.name == "code")
    rows = [row for rows in build(code, params.data, 11).values() for row in rows]
    subtasks = {row["subtask"] for row in rows}
    assert {"int", "int_two_step", "list", "string"} <= subtasks
    verdicts = check_solutions([(row["answer"], row["tests"]) for row in rows], progress=False)
    assert verdicts == [None] * len(rows)
    # And the check can fail: a wrong solution to the same tests is caught.
    wrong = [(row["answer"].replace("return ", "return None and "), row["tests"]) for row in rows[:20]]
    assert all(v is not None for v in check_solutions(wrong, progress=False))


def test_math_difficulty_knobs_are_honoured():
    params = smoke_params(
        domains={
            "math": {
                "sizes": {"train": 200, "val": 10, "test": 10},
                "operands": {"min": 3, "max": 3},
                "ops": ["*"],
                "word_problem_share": 0.0,
            }
        }
    )
    math = next(d for d in resolve(params.data) if d.name == "math")
    for row in build(math, params.data, 0)["train"]:
        assert row["prompt"].count("*") == 2 and "+" not in row["prompt"]


def test_too_many_rows_for_the_knobs_is_a_clear_error():
    params = smoke_params(
        domains={
            "math": {
                "sizes": {"train": 500, "val": 10, "test": 10},
                "operands": {"min": 2, "max": 2},
                "max_value": 3,
                "word_problem_share": 0.0,
            }
        }
    )
    math = next(d for d in resolve(params.data) if d.name == "math")
    with pytest.raises(GenerationError, match=r"lower data\.domains\.math\.sizes"):
        build(math, params.data, 0)


def test_math_solutions_work_each_step_and_end_with_the_answer():
    sizes = {"train": 300, "val": 10, "test": 10}
    params = smoke_params(domains={"math": {"sizes": sizes, "ops": ["+", "-", "*"], "word_problem_share": 0.5}})
    math = next(d for d in resolve(params.data) if d.name == "math")
    for row in build(math, params.data, 0)["train"]:
        working, final = row["solution"].split("\n#### ")
        assert final == row["answer"]
        steps = [s for s in working.split(". ") if s]
        for step in steps:
            left, right = step.rstrip(".").split(" = ")
            assert eval(left) == int(right), row  # `a op b`: two integer literals
        assert steps[-1].rstrip(".").split(" = ")[1] == row["answer"]


def test_answers_are_read_after_the_final_marker():
    from bayes_llm.rewards.answers import exact_match, extract_letter, extract_number

    assert extract_number("5 + 11 = 16. 16 + 10 = 26.\n#### 26") == "26"
    assert extract_number("26") == "26" and extract_number("#### ") is None
    assert extract_letter("The largest is 12.\n#### B") == "B"
    assert exact_match("number", "3 + 4 = 7.\n#### 7", "7") and not exact_match("number", "7 + 1 = 8.\n#### 8", "7")


def test_reasoning_solutions_scan_the_choices_forward_and_end_with_the_letter():
    params = smoke_params(domains={"reasoning": {"sizes": {"train": 200, "val": 10, "test": 10}}})
    reasoning = next(d for d in resolve(params.data) if d.name == "reasoning")
    seen = set()
    for row in build(reasoning, params.data, 0)["train"]:
        working, letter = row["solution"].split("\n#### ")
        choices, subtask = row["choices"], row["subtask"]
        seen.add(subtask)
        assert letter == row["answer"]
        assert choices[ord(letter) - ord("A")] in working
        if subtask in ("largest", "smallest"):
            # One step per choice after the first, each keeping the running best: `B 7 max A 8: A 8.`
            steps = working.rstrip(".").split(". ")
            assert steps[0] == f"Scan: A {choices[0]}" and len(steps) == len(choices)
            pick = max if subtask == "largest" else min
            for i, step in enumerate(steps[1:], start=1):
                best = pick(range(i + 1), key=lambda j: int(choices[j]))
                word = "max" if subtask == "largest" else "min"
                assert step.startswith(f"{LETTERS[i]} {choices[i]} {word} "), step
                assert step.endswith(f": {LETTERS[best]} {choices[best]}"), step
            assert steps[-1].endswith(f": {letter} {choices[ord(letter) - ord('A')]}")
        elif subtask == "syllogism":
            # The verdict, then the choices read forward up to the one that says it.
            answer = ord(letter) - ord("A")
            reads = [f"{LETTERS[i]}: {c}" for i, c in enumerate(choices[: answer + 1])]
            assert working == " ".join([f"The answer is: {choices[answer]}.", *(r + "." for r in reads)])
        # lm-eval scores the letter right after `Answer:`: a solution must not open with one.
        assert not re.match(r"[A-Z]\b", working), working
    assert seen == {"largest", "smallest", "sorted", "syllogism"}
