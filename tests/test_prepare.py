from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from bayes_llm.cli import main
from bayes_llm.data.sources import SourceError
from bayes_llm.stages.prepare import DataValidationError, prepare
from tests.conftest import smoke_params, write_jsonl

PREPARED = Path("data/prepared")
REPORT = Path("reports/data/validation.json")


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.parquet"))
    }


def test_prepare_writes_parquet_summary_and_is_reproducible(workdir):
    summary = prepare(smoke_params(), progress=False)
    assert summary["validation"] == "passed"
    assert summary["domains"]["math"]["rows"] == {"train": 48, "val": 12, "test": 12}
    assert summary["domains"]["transfer"]["rows"] == {"test": 12}
    assert json.loads(Path("reports/data/summary.json").read_text()) == summary
    frame = pd.read_parquet(PREPARED / "code" / "train.parquet")
    assert list(frame.columns) == ["id", "domain", "subtask", "prompt", "answer", "tests"]
    first = _hashes(PREPARED)
    assert len(first) == 10
    prepare(smoke_params(), progress=False)
    assert _hashes(PREPARED) == first
    assert not [p for p in Path("data").iterdir() if p.name.startswith(".")], "staging dirs left behind"


def _math_rows(split: str, n: int) -> list[dict]:
    return [
        {"id": f"m-{split}-{i}", "domain": "math", "question": f"What is {i} + {i} in {split}?", "answer": str(i)}
        for i in range(n)
    ]


def _local_math(tmp: Path, splits: dict[str, list[dict]]) -> dict:
    files = {split: write_jsonl(tmp / "src" / f"{split}.jsonl", rows) for split, rows in splits.items()}
    return {
        "math": {
            "type": "local",
            "answer_kind": "number",
            "files": files,
            "fields": {"prompt": "question", "answer": "answer", "id": "id", "domain": "domain"},
        }
    }


def _defect_null_answer(splits):
    splits["train"][3]["answer"] = None
    return "'answer' must not be null", "m-train-3"


def _defect_duplicate_id(splits):
    splits["val"][1]["id"] = "m-train-2"
    return "ids must be unique", "m-train-2"


def _defect_cross_split(splits):
    splits["test"][0]["question"] = splits["train"][5]["question"]
    rule = ("a prompt (whitespace and case aside) must not appear in two splits, nor twice with two answers, "
            "nor in val or test when another domain trains on it")
    return rule, "m-train-5"


def _defect_wrong_label(splits):
    splits["test"][2]["domain"] = "maths"
    return "domain label must be 'math'", "m-test-2"


def _defect_bad_number(splits):
    splits["train"][0]["answer"] = "forty"
    return "answer must be a number", "m-train-0"


@pytest.mark.parametrize(
    "inject", [_defect_null_answer, _defect_duplicate_id, _defect_cross_split, _defect_wrong_label, _defect_bad_number]
)
def test_injected_defects_fail_the_gate_and_leave_no_output(workdir, inject):
    splits = {"train": _math_rows("train", 10), "val": _math_rows("val", 4), "test": _math_rows("test", 4)}
    rule, example_id = inject(splits)
    with pytest.raises(DataValidationError) as caught:
        prepare(smoke_params(sources=_local_math(workdir, splits)), progress=False)
    message = str(caught.value)
    assert rule in message and example_id in message, message
    assert "math (all splits)" in message
    assert not PREPARED.exists()
    assert not [p for p in Path("data").iterdir()], "staging dirs left behind"
    report = json.loads(REPORT.read_text())
    assert report["success"] is False
    assert any(f["rule"] == rule and f["unexpected"] >= 1 for f in report["failures"])
    assert json.loads(Path("reports/data/summary.json").read_text())["validation"] == "failed"


def test_code_item_whose_reference_fails_its_tests_is_caught(workdir):
    good = {
        "id": "c1",
        "question": "Write `inc(n)` that adds one.",
        "solution": "def inc(n):\n    return n + 1\n",
        "tests": ["assert inc(1) == 2"],
    }
    bad = {
        "id": "c2",
        "question": "Write `dec(n)` that subtracts one.",
        "solution": "def dec(n):\n    return n\n",
        "tests": ["assert dec(3) == 2"],
    }
    hang = {
        "id": "c3",
        "question": "Write `spin(n)` that never returns.",
        "solution": "def spin(n):\n    while True: pass\n",
        "tests": ["assert spin(1) == 1"],
    }
    files = {
        "train": write_jsonl(workdir / "c" / "train.jsonl", [good, bad, hang]),
        "val": write_jsonl(workdir / "c" / "val.jsonl", [{**good, "id": "c4", "question": "val " + good["question"]}]),
        "test": write_jsonl(
            workdir / "c" / "test.jsonl", [{**good, "id": "c5", "question": "test " + good["question"]}]
        ),
    }
    source = {
        "code": {
            "type": "local",
            "answer_kind": "code",
            "files": files,
            "fields": {"prompt": "question", "answer": "solution", "id": "id", "tests": "tests"},
        }
    }
    with pytest.raises(DataValidationError) as caught:
        prepare(smoke_params(sources=source), progress=False)
    message = str(caught.value)
    assert "the reference solution must pass its own tests" in message
    assert "2 of 5 rows" in message and "id=c2" in message and "AssertionError" in message
    assert "TimeoutError" in json.dumps(json.loads(REPORT.read_text()))
    assert not PREPARED.exists()


def test_local_source_replaces_a_domain(workdir):
    splits = {"train": _math_rows("train", 10), "val": _math_rows("val", 4), "test": _math_rows("test", 4)}
    for rows in splits.values():
        for row in rows:
            del row["id"], row["domain"]
    source = _local_math(workdir, splits)
    source["math"]["fields"] = {"prompt": "question", "answer": "answer"}
    summary = prepare(smoke_params(sources=source), progress=False)
    assert summary["domains"]["math"] == {
        "answer_kind": "number",
        "source": "local",
        "test_only": False,
        "rows": {"train": 10, "val": 4, "test": 4},
        "total": 18,
    }
    frame = pd.read_parquet(PREPARED / "math" / "train.parquet")
    assert set(frame["domain"]) == {"math"} and frame["id"].str.startswith("math-").all()


def test_a_test_item_another_domain_trains_on_fails_the_gate(workdir):
    """The base pretrains on every train split: a test-only domain's item that is a train prompt of
    another domain (whitespace and case aside) would be scored on what the model was trained on."""
    splits = {"train": _math_rows("train", 10), "val": _math_rows("val", 4), "test": _math_rows("test", 4)}
    drill = [{"q": f"What is {i} - {i}?", "a": "0"} for i in range(4)]
    drill[2]["q"] = "  what is 7 + 7 in TRAIN? "  # math's train row m-train-7
    source = _local_math(workdir, splits) | {
        "drill": {"type": "local", "answer_kind": "number", "test_only": True,
                  "files": {"test": write_jsonl(workdir / "drill.jsonl", drill)},
                  "fields": {"prompt": "q", "answer": "a"}},
    }  # fmt: skip
    with pytest.raises(DataValidationError) as caught:
        prepare(smoke_params(sources=source), progress=False)
    message = str(caught.value)
    assert "drill" in message and "nor in val or test when another domain trains on it" in message
    assert "what is 7 + 7 in TRAIN? ' (a train prompt of math)" in message and not PREPARED.exists()

    drill[2]["q"] = "What is 7 + 7 in drill?"
    source["drill"]["files"]["test"] = write_jsonl(workdir / "drill.jsonl", drill)
    assert prepare(smoke_params(sources=source), progress=False)["domains"]["drill"]["rows"] == {"test": 4}

    # A domain with splits of its own: a train prompt two domains share is no leak, a val one is.
    files = {split: write_jsonl(workdir / f"drill-{split}.jsonl", [{"q": f"What is {i} - {i} in {split}?", "a": "0"}
                                                                  for i in range(6)]) for split in ("val", "test")}
    shared = [{"q": "What is 3 + 3 in train?", "a": "6"}, *({"q": f"What is {i} - {i}?", "a": "0"} for i in range(9))]
    files["train"] = write_jsonl(workdir / "drill-train.jsonl", shared)
    source["drill"] = {**source["drill"], "test_only": False, "files": files}
    assert prepare(smoke_params(sources=source), progress=False)["domains"]["drill"]["rows"]["train"] == 10
    leaked = [{"q": "what is 5 + 5 in train?", "a": "10"}, *({"q": f"What is {i} - {i} in val?", "a": "0"}
                                                            for i in range(5))]  # fmt: skip
    source["drill"]["files"]["val"] = write_jsonl(workdir / "drill-val.jsonl", leaked)
    with pytest.raises(DataValidationError, match=r"(?s)drill \(all splits\).*what is 5 \+ 5 in train\?"):
        prepare(smoke_params(sources=source), progress=False)


def test_local_parquet_and_a_new_letter_domain(workdir):
    rows = [{"q": f"Is {i} even?", "opts": ["yes", "no"], "label": "A" if i % 2 == 0 else "B"} for i in range(12)]
    files = {}
    for split, part in {"train": rows[:6], "val": rows[6:9], "test": rows[9:]}.items():
        files[split] = str(workdir / f"{split}.parquet")
        pd.DataFrame(part).to_parquet(files[split])
    source = {
        "parity": {
            "type": "local",
            "answer_kind": "letter",
            "files": files,
            "fields": {"prompt": "q", "answer": "label", "choices": "opts"},
        }
    }
    summary = prepare(smoke_params(sources=source), progress=False)
    assert summary["domains"]["parity"]["rows"] == {"train": 6, "val": 3, "test": 3}
    first = pd.read_parquet(PREPARED / "parity" / "train.parquet").iloc[0]
    assert first["prompt"] == "Is 0 even?\nA) yes\nB) no" and first["answer"] == "A"


def test_missing_corrupt_and_unmapped_source_files(workdir):
    splits = {"train": _math_rows("train", 3), "val": _math_rows("val", 3), "test": _math_rows("test", 3)}
    source = _local_math(workdir, splits)
    source["math"]["files"]["val"] = str(workdir / "missing.jsonl")
    with pytest.raises(SourceError, match=r"files\.val: file not found"):
        prepare(smoke_params(sources=source), progress=False)
    corrupt = workdir / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 this is not parquet")
    source["math"]["files"]["val"] = str(corrupt)
    with pytest.raises(SourceError, match="cannot read"):
        prepare(smoke_params(sources=source), progress=False)
    source = _local_math(workdir, splits)
    source["math"]["fields"]["prompt"] = "text"
    with pytest.raises(SourceError, match=r"no column for prompt -> 'text'.*set data\.sources\.math\.fields"):
        prepare(smoke_params(sources=source), progress=False)
    assert not PREPARED.exists()


def test_failed_prepare_keeps_nothing_and_cli_exits_non_zero(workdir, capsys):
    import yaml

    from tests.conftest import raw_params

    splits = {"train": _math_rows("train", 5), "val": _math_rows("val", 2), "test": _math_rows("test", 2)}
    Path("params.yaml").write_text(yaml.safe_dump(raw_params(sources=_local_math(workdir, splits))))
    assert main(["prepare", "--quiet"]) == 0 and PREPARED.exists()  # an earlier run's data...
    splits["train"][0]["answer"] = None
    Path("params.yaml").write_text(yaml.safe_dump(raw_params(sources=_local_math(workdir, splits))))
    assert main(["prepare", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "data validation FAILED" in err and "'answer' must not be null" in err and "Traceback" not in err
    assert "lie outside data/raw/, the directory `dvc repro` watches" in err
    assert not PREPARED.exists() and not Path("data/routing").exists()  # ...is not left looking valid


def test_a_worked_solution_must_end_with_its_answer(workdir):
    splits = {"train": _math_rows("train", 10), "val": _math_rows("val", 4), "test": _math_rows("test", 4)}
    for rows in splits.values():
        for row in rows:
            row["working"] = f"{row['answer']} = {row['answer']}.\n#### {row['answer']}"
    splits["train"][4]["working"] = "4 + 4 = 8.\n#### 8"  # the answer says 4
    source = _local_math(workdir, splits)
    source["math"]["fields"]["solution"] = "working"
    with pytest.raises(DataValidationError) as caught:
        prepare(smoke_params(sources=source), progress=False)
    assert "a worked solution must end with '#### <answer>'" in str(caught.value)
    assert "m-train-4" in str(caught.value)


def test_an_edited_local_file_is_read_afresh(workdir):
    """`datasets` caches a file by path, size and mtime: an edit that keeps all three (cp -p, rsync -a)."""
    import os

    splits = {"train": _math_rows("train", 6), "val": _math_rows("val", 3), "test": _math_rows("test", 3)}
    source = _local_math(workdir, splits)
    prepare(smoke_params(sources=source), progress=False)
    train = Path(source["math"]["files"]["train"])
    first = pd.read_parquet(PREPARED / "math/train.parquet")["answer"][0]
    stat = train.stat()
    edited = train.read_text().replace(f'"answer": "{first}"', f'"answer": "{(int(first) + 1) % 10}"', 1)
    assert len(edited) == len(train.read_text()) and edited != train.read_text()
    train.write_text(edited)
    os.utime(train, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    prepare(smoke_params(sources=source), progress=False)
    assert pd.read_parquet(PREPARED / "math/train.parquet")["answer"][0] == str((int(first) + 1) % 10)


def test_source_values_that_are_not_text_get_a_clear_error(workdir):
    splits = {"train": _math_rows("train", 3), "val": _math_rows("val", 3), "test": _math_rows("test", 3)}
    splits["train"][1]["question"] = [{"role": "user", "content": "What is 1 + 1?"}]  # a chat `messages` column
    with pytest.raises(SourceError, match=r"fields\.prompt \('question'\) holds a list, not text \(row m-train-1\)"):
        prepare(smoke_params(sources=_local_math(workdir, splits)), progress=False)
    source = _local_math(workdir, {**splits, "train": _math_rows("train", 3)})
    latin = Path(source["math"]["files"]["val"])
    latin.write_bytes(latin.read_text().replace("What", "Qu\u00e9").encode("latin-1"))
    with pytest.raises(SourceError, match=r"files\.val: .*val\.jsonl is not UTF-8 text .*re-encode it as UTF-8"):
        prepare(smoke_params(sources=source), progress=False)
    latin.write_text("")
    with pytest.raises(SourceError, match=r"files\.val: cannot read .*val\.jsonl: \S"):  # a reason, never blank
        prepare(smoke_params(sources=source), progress=False)
    assert not PREPARED.exists()


def test_code_items_whose_tests_assert_nothing_fail_the_gate(workdir):
    rows = [{"id": str(i), "text": f"Write a function inc_{i}(n) that adds {i} to n.",
             "code": f"def inc_{i}(n):\n    return n + {i}", "tests": [f"assert inc_{i}(1) == {i + 1}"]}
            for i in range(12)]  # fmt: skip
    rows[2]["tests"] = [None, "", "  "]  # null and blank tests are dropped: none left
    rows[3]["tests"] = [f"inc_3(1) == {99}"]  # compares, asserts nothing: every program would pass it
    files = {s: write_jsonl(workdir / "code" / f"{s}.jsonl", part)
             for s, part in {"train": rows[:6], "val": rows[6:9], "test": rows[9:]}.items()}  # fmt: skip
    source = {"code": {"type": "local", "answer_kind": "code", "files": files,
                       "fields": {"id": "id", "prompt": "text", "answer": "code", "tests": "tests"}}}  # fmt: skip
    with pytest.raises(DataValidationError) as caught:
        prepare(smoke_params(sources=source), progress=False)
    assert "code items need at least one test that asserts" in str(caught.value)
    assert "id=2 " in str(caught.value) and "id=3 " in str(caught.value)


def test_an_integer_letter_answer_is_always_an_index(workdir):
    # numeric labels, integer answers: 0 must mean A (a label match would read 1 as A, 2 as B, 0 as itself)
    rows = [{"q": f"Which is {i}?", "options": {"text": ["no", str(i), "maybe"], "label": ["1", "2", "3"]},
             "key": i % 3} for i in range(12)]  # fmt: skip
    files = {s: write_jsonl(workdir / "mc" / f"{s}.jsonl", part)
             for s, part in {"train": rows[:6], "val": rows[6:9], "test": rows[9:]}.items()}  # fmt: skip
    source = {"mc": {"type": "local", "answer_kind": "letter", "files": files,
                     "fields": {"prompt": "q", "answer": "key", "choices": "options"}}}  # fmt: skip
    prepare(smoke_params(sources=source), progress=False)
    answers = list(pd.read_parquet(PREPARED / "mc/train.parquet")["answer"])
    assert answers == ["ABC"[i % 3] for i in range(6)]  # ARC's text labels: test_sources


def test_a_source_name_must_fit_the_pipeline(workdir):
    from bayes_llm.config import ParamsError

    files = {"train": "a.jsonl", "val": "b.jsonl", "test": "c.jsonl"}
    local = {"type": "local", "answer_kind": "number", "files": files}
    for name, message in (
        ("other", "other than 'transfer' and 'other'"),
        ("math_gen", "not ending in _loglik"),
        ("reasoning", "answers by number, the synthetic 'reasoning' it replaces by letter"),
    ):
        with pytest.raises(ParamsError, match=message):
            smoke_params(sources={name: local})
    with pytest.raises(ParamsError, match="answers by number, the synthetic 'code'"):
        smoke_params(sources={"code": {"type": "hub", "preset": "gsm8k"}})
    smoke_params(sources={"math": local, "mine": {**local, "answer_kind": "letter"}})  # a kind of its own: fine


def test_near_duplicate_prompts_and_bad_choices_fail_the_gate(workdir):
    rows = [{"q": f"Which number is {i}?", "options": ["no", str(i), "maybe"], "key": 1} for i in range(12)]
    rows[9].update(q="  which NUMBER is 2? ", options=rows[2]["options"])  # test: train's row 2, spaced, cased
    rows[4].update(q=rows[3]["q"], options=rows[3]["options"], key=2)  # twice in train, with two answers
    rows[5]["options"] = ["no", None, "maybe"]  # shown as `B) None`
    rows[6]["options"] = ["6", "6", "maybe"]  # two right letters
    rows[7]["options"] = [str(n) for n in range(27)]  # past Z
    files = {s: write_jsonl(workdir / "mc" / f"{s}.jsonl", part)
             for s, part in {"train": rows[:8], "val": rows[8:9], "test": rows[9:]}.items()}  # fmt: skip
    source = {"mc": {"type": "local", "answer_kind": "letter", "files": files,
                     "fields": {"prompt": "q", "answer": "key", "choices": "options"}}}  # fmt: skip
    with pytest.raises(DataValidationError) as caught:
        prepare(smoke_params(sources=source), progress=False)
    message = str(caught.value)
    assert "must not appear in two splits, nor twice with two answers" in message and "4 of 12 rows" in message
    assert "at least two choices, none blank or repeated, at most 26" in message and "3 of 12 rows" in message
    assert "choices=['no', None, 'maybe']" in message
