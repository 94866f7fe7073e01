"""The Great Expectations gate of `prepare`: per-domain suites over the files as written.

Row-level facts GX cannot see by itself (is a prompt in another split? does the reference code
pass its own tests? is the letter one of the choices?) are computed into check columns first, so
every rule, and every failure report, goes through GX.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import pandas as pd

from bayes_llm.config import DataParams
from bayes_llm.data.domains import Domain
from bayes_llm.data.rows import ANSWER_PATTERNS, LETTERS, SOLUTION_COLUMN, columns_for, solution_final
from bayes_llm.rewards.code import check_solutions

MAX_EXAMPLES = 3
TRAINED_ELSEWHERE = "trained_by_other_domains"  # derived: the domains whose train split holds this val/test prompt
# A derived check column is shown through the field it was computed from: a reader wants the
# prompt that repeats, not `True`.
_SHOWN_AS = {
    "prompt_in_other_split": "prompt",
    "prompt_in_train": "prompt",
    "wording_in_train": "prompt",
    "answer_ok": "answer",
    "answer_in_choices": "answer",
    "choice_count": "choices",
    "test_count": "tests",
    "solution_matches_answer": "solution",
}


@dataclass
class Failure:
    domain: str
    scope: str  # "all splits" or a split name
    rule: str
    expectation: str
    column: str | None
    unexpected: int | None
    rows: int | None
    examples: list[str] = field(default_factory=list)

    def line(self) -> str:
        where = f"{self.domain} ({self.scope})"
        count = f": {self.unexpected} of {self.rows} rows" if self.unexpected is not None else ""
        shown = f"; e.g. {'; '.join(self.examples)}" if self.examples else ""
        column = f"({self.column})" if self.column else "()"
        return f"  {where}: {self.rule} [{self.expectation}{column}]{count}{shown}"


@dataclass
class ValidationReport:
    success: bool
    expectations: int
    failures: list[Failure]

    def text(self) -> str:
        if self.success:
            return f"data validation passed ({self.expectations} expectations)"
        lines = [f"data validation FAILED: {len(self.failures)} of {self.expectations} expectations"]
        return "\n".join(lines + [failure.line() for failure in self.failures])

    def merged(self, other: ValidationReport) -> ValidationReport:
        return ValidationReport(self.success and other.success, self.expectations + other.expectations,
                                self.failures + other.failures)  # fmt: skip

    def to_json(self) -> dict:
        return {
            "success": self.success,
            "expectations": self.expectations,
            "failures": [asdict(failure) for failure in self.failures],
        }


def _solution_ok(solution: object, answer: object, choices: object) -> bool:
    """A worked solution ends '#### <answer>'; a multiple-choice one may be the right choice's text."""
    if solution is None:
        return True
    if not isinstance(solution, str):
        return False
    if solution_final(solution) == answer:
        return True
    return _letter_ok(answer, choices) and solution == str(choices[LETTERS.index(answer)])


def _letter_ok(answer: object, choices: object) -> bool:
    if not isinstance(answer, str) or len(answer) != 1 or answer not in LETTERS or choices is None:
        return False
    return LETTERS.index(answer) < len(choices)


def _distinct_choices(choices) -> int:
    """How many choices, or 0 where one is blank or repeated (`B) None`, two right letters)."""
    if choices is None:
        return 0
    texts = [None if c is None else str(c).strip() for c in choices]
    return len(texts) if all(texts) and len(set(texts)) == len(texts) else 0


def _asserts(test: str) -> bool:
    """A test that can fail: Python with an `assert` in it (`inc(1) == 2` alone checks nothing)."""
    try:
        return any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(test)))
    except (SyntaxError, ValueError):
        return False


def prompt_key(prompt: object) -> str | None:
    """Whitespace and case aside: "What is 2 + 2? " in test is the train prompt "what is 2 + 2?"."""
    return " ".join(prompt.split()).casefold() if isinstance(prompt, str) else None


def check_frame(domain: Domain, splits: dict[str, pd.DataFrame], progress: bool = True,
                trained_by: Mapping[str, Sequence[str]] | None = None) -> pd.DataFrame:  # fmt: skip
    """All splits of a domain in one frame, plus the derived check columns. `trained_by`: every domain's
    train prompt keys, each with the domains that train on it (the base pretrains on all of them, the
    classifier too)."""
    frame = pd.concat([df.assign(split=name) for name, df in splits.items()], ignore_index=True)
    if "prompt" in frame:
        key = frame["prompt"].map(prompt_key)
        owners = frame.assign(key=key).groupby("key", dropna=True)["split"].nunique()
        leaked = key.map(owners).fillna(1).gt(1)
        # a val/test prompt another domain trains on (a test-only domain's too); a failure names that domain
        def others(prompt_key: object) -> str | None:
            return ", ".join(d for d in (trained_by or {}).get(prompt_key, ()) if d != domain.name) or None

        frame[TRAINED_ELSEWHERE] = key.where(frame["split"].ne("train")).map(others)
        leaked |= frame[TRAINED_ELSEWHERE].notna()
        if domain.answer_kind != "code" and "answer" in frame:  # two programs may both be right; two answers not
            # a letter by its choice's text: asked alone (choice_answer: text), one question may list its
            # choices in two orders
            choices = frame["choices"] if "choices" in frame else [None] * len(frame)
            said = [str(c[LETTERS.index(a)]) if _letter_ok(a, c) else str(a)
                    for a, c in zip(frame["answer"], choices, strict=True)]  # fmt: skip
            answers = frame.assign(key=key, said=said).groupby(["key", "split"])["said"]
            leaked |= answers.transform("nunique").gt(1)
        frame["prompt_in_other_split"] = leaked
    if SOLUTION_COLUMN in frame:
        choices = frame["choices"] if "choices" in frame else [None] * len(frame)
        frame["solution_matches_answer"] = [
            _solution_ok(s, a, c) for s, a, c in zip(frame[SOLUTION_COLUMN], frame["answer"], choices, strict=True)
        ]
    if domain.answer_kind == "letter" and {"answer", "choices"} <= set(frame):
        frame["choice_count"] = frame["choices"].map(_distinct_choices)
        frame["answer_in_choices"] = [_letter_ok(a, c) for a, c in zip(frame["answer"], frame["choices"], strict=True)]
    if domain.answer_kind == "code" and {"answer", "tests"} <= set(frame):
        frame["test_count"] = frame["tests"].map(lambda t: 0 if t is None else sum(map(_asserts, t)))
        pairs = [
            (a or "", list(t) if t is not None else []) for a, t in zip(frame["answer"], frame["tests"], strict=True)
        ]
        verdicts = check_solutions(pairs, progress=progress)
        # A reference with no tests has nothing to pass; `test_count` reports that case.
        frame["reference_failure"] = [v if n else None for v, n in zip(verdicts, frame["test_count"], strict=True)]
    return frame


def _domain_rules(domain: Domain, data: DataParams, frame: pd.DataFrame) -> list[tuple[str, object]]:
    import great_expectations.expectations as gxe

    rules: list[tuple[str, object]] = []
    for column in columns_for(domain.answer_kind):
        rules.append((f"required column '{column}'", gxe.ExpectColumnToExist(column=column)))
        rules.append((f"'{column}' must not be null", gxe.ExpectColumnValuesToNotBeNull(column=column)))
    rules += [
        (
            f"domain label must be '{domain.name}'",
            gxe.ExpectColumnValuesToBeInSet(column="domain", value_set=[domain.name]),
        ),
        ("ids must be unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        (
            f"prompt length must be {data.prompt.min_chars}..{data.prompt.max_chars} chars",
            gxe.ExpectColumnValueLengthsToBeBetween(
                column="prompt", min_value=data.prompt.min_chars, max_value=data.prompt.max_chars
            ),
        ),
        (
            "a prompt (whitespace and case aside) must not appear in two splits, nor twice with two answers, "
            "nor in val or test when another domain trains on it",
            gxe.ExpectColumnValuesToBeInSet(column="prompt_in_other_split", value_set=[False]),
        ),
    ]
    if domain.answer_kind in ANSWER_PATTERNS:
        rules.append(
            (
                f"answer must be a {domain.answer_kind}",
                gxe.ExpectColumnValuesToMatchRegex(column="answer", regex=ANSWER_PATTERNS[domain.answer_kind]),
            )
        )
    if SOLUTION_COLUMN in frame:
        rules.append(
            (
                "a worked solution must end with '#### <answer>'",
                gxe.ExpectColumnValuesToBeInSet(column="solution_matches_answer", value_set=[True]),
            )
        )
    if domain.answer_kind == "letter":
        rules += [
            (
                "at least two choices, none blank or repeated, at most 26",
                gxe.ExpectColumnValuesToBeBetween(column="choice_count", min_value=2, max_value=len(LETTERS)),
            ),
            (
                "the answer letter must name one of the choices",
                gxe.ExpectColumnValuesToBeInSet(column="answer_in_choices", value_set=[True]),
            ),
        ]
    if domain.answer_kind == "code":
        rules += [
            (
                "code items need at least one test that asserts",
                gxe.ExpectColumnValuesToBeBetween(column="test_count", min_value=1),
            ),
            (
                "the reference solution must pass its own tests",
                gxe.ExpectColumnValuesToBeNull(column="reference_failure"),
            ),
        ]
    return rules


def _row_count_rule(domain: Domain, split: str, data: DataParams) -> tuple[str, object]:
    import great_expectations.expectations as gxe

    if domain.expected_rows:
        n = domain.expected_rows[split]
        return f"{split} must have {n} rows", gxe.ExpectTableRowCountToEqual(value=n)
    return (
        f"{split} must have at least {data.min_rows} rows",
        gxe.ExpectTableRowCountToBeBetween(min_value=data.min_rows),
    )


def _examples(frame: pd.DataFrame, result: dict, column: str | None) -> list[str]:
    out = []
    checked, column = column, _SHOWN_AS.get(column, column)
    for index in (result.get("unexpected_index_list") or [])[:MAX_EXAMPLES]:
        row = frame.loc[index]
        value = row.get(column) if column else None
        value = value.tolist() if hasattr(value, "tolist") else value
        shown = "null" if value is None or (isinstance(value, float) and pd.isna(value)) else repr(value)
        if isinstance(value, str) and len(shown) > 80:
            shown = shown[:77] + "...'"
        elsewhere = row.get(TRAINED_ELSEWHERE) if checked == "prompt_in_other_split" else None
        trained = f" (a train prompt of {elsewhere})" if isinstance(elsewhere, str) else ""
        out.append(f"id={row.get('id')!s} {row.get('split')}: {column}={shown}{trained}")
    return out


class _Gate:
    """One ephemeral GX context; each `run` validates one frame against one list of rules."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self.gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.source = self.context.data_sources.add_pandas("prepared")
        self.expectations = 0

    def run(
        self, name: str, frame: pd.DataFrame, rules: list[tuple[str, object]], domain: str, scope: str
    ) -> list[Failure]:
        gx = self.gx
        batch = self.source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("all")
        suite = self.context.suites.add(gx.ExpectationSuite(name=name))
        rule_of = {suite.add_expectation(expectation).id: rule for rule, expectation in rules}
        definition = self.context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite)
        )
        results = definition.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
        self.expectations += len(rules)
        failures = []
        for outcome in results.results:
            if outcome.success:
                continue
            config, result = outcome.expectation_config, outcome.result or {}
            column = config.kwargs.get("column")
            failures.append(
                Failure(
                    domain,
                    scope,
                    rule_of[config.id],
                    config.type,
                    column,
                    result.get("unexpected_count"),
                    result.get("element_count"),
                    _examples(frame, result, column),
                )
            )
        return failures


def validate(
    frames: dict[str, tuple[Domain, dict[str, pd.DataFrame]]], data: DataParams, progress: bool = True
) -> ValidationReport:
    """`frames`: domain name -> (domain, {split: frame read back from the written parquet})."""
    gate, failures = _Gate(), []
    trained_by: dict[str, list[str]] = {}  # train prompt key -> the domains that train on it
    for name, (_, splits) in frames.items():
        if "prompt" in splits.get("train", pd.DataFrame()):
            for key in set(splits["train"]["prompt"].map(prompt_key).dropna()):
                trained_by.setdefault(key, []).append(name)
    for name, (domain, splits) in frames.items():
        frame = check_frame(domain, splits, progress=progress, trained_by=trained_by)
        failures += gate.run(name, frame, _domain_rules(domain, data, frame), name, "all splits")
        for split, split_frame in splits.items():
            failures += gate.run(f"{name}-{split}", split_frame, [_row_count_rule(domain, split, data)], name, split)
    return ValidationReport(not failures, gate.expectations, failures)


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _routing_answer_ok(row: dict, verdict: str | None) -> bool:
    kind = row["answer_kind"]
    if _missing(kind):
        return row["kind"] == "other" and _missing(row["answer"])
    if kind == "code":
        return verdict is None and row["tests"] is not None and len(row["tests"]) > 0
    if kind == "letter":
        return _letter_ok(row["answer"], row["choices"])
    return isinstance(row["answer"], str) and re.fullmatch(ANSWER_PATTERNS[kind], row["answer"]) is not None


def routing_frame(parts: dict[str, pd.DataFrame], train_texts: list[str], generated_texts: list[str],
                  progress: bool = True) -> pd.DataFrame:  # fmt: skip
    """All parts in one frame, plus check columns: is a prompt trained on? in two parts? does a val/test
    wording leak (its text in any generated training text)? is the answer sound? `train_texts`: every
    text a model trains on (the domains' train prompts, answers and solutions); `generated_texts`: those
    of them this project generates (synthetic domains), where a wording could leak from our own
    templates. A real benchmark's natural text shares common phrases with them ('How much is') by
    chance, which says nothing of what a model learned from us. The benchmark's own train part is
    added here."""
    from bayes_llm.data import routing

    frame = pd.concat([df.assign(split=name) for name, df in parts.items()], ignore_index=True)
    trained = set(train_texts)
    frame["prompt_in_train"] = frame["prompt"].isin(trained)
    owners = frame.groupby("prompt")["split"].nunique()
    frame["prompt_in_other_split"] = frame["prompt"].map(owners).gt(1)
    corpus = "\n".join([*generated_texts, *(parts["train"]["prompt"] if "train" in parts else [])])
    # The train part's wordings are trained on anyway; val's and test's must be new to every model.
    leaks = {part: [p for p in routing.wording_phrases(part) if p in corpus] for part in parts if part != "train"}
    frame["wording_in_train"] = [bool(leaks.get(s)) and k != "mixed" for s, k in zip(frame["split"], frame["kind"],
                                                                                     strict=True)]  # fmt: skip
    code = frame.index[frame["answer_kind"] == "code"]
    verdicts = check_solutions([(frame.at[i, "answer"], list(frame.at[i, "tests"])) for i in code], progress=progress)
    verdict_of = dict(zip(code, verdicts, strict=True))
    records = frame.to_dict(orient="records")
    frame["answer_ok"] = [_routing_answer_ok(row, verdict_of.get(i)) for i, row in zip(frame.index, records,
                                                                                       strict=True)]  # fmt: skip
    return frame


def _routing_rules(frame: pd.DataFrame, labels: list[str], data: DataParams) -> list[tuple[str, object]]:
    import great_expectations.expectations as gxe

    from bayes_llm.data.routing import KINDS

    rules: list[tuple[str, object]] = []
    for column in ("id", "kind", "subtask", "prompt", "target", "mix"):
        rules.append((f"'{column}' must not be null", gxe.ExpectColumnValuesToNotBeNull(column=column)))
    rules += [
        ("ids must be unique", gxe.ExpectColumnValuesToBeUnique(column="id")),
        (f"kind must be one of {', '.join(KINDS)}", gxe.ExpectColumnValuesToBeInSet(column="kind", value_set=KINDS)),
        (f"target must be an expert domain or 'other' ({', '.join(labels)})",
         gxe.ExpectColumnValuesToBeInSet(column="target", value_set=labels)),
        (f"prompt length must be {data.prompt.min_chars}..{data.prompt.max_chars} chars",
         gxe.ExpectColumnValueLengthsToBeBetween(column="prompt", min_value=data.prompt.min_chars,
                                                 max_value=data.prompt.max_chars)),
        ("a routing prompt must not be a train prompt",
         gxe.ExpectColumnValuesToBeInSet(column="prompt_in_train", value_set=[False])),
        ("a prompt must not appear in both parts",
         gxe.ExpectColumnValuesToBeInSet(column="prompt_in_other_split", value_set=[False])),
        ("a val/test wording (wrapper, rewording, off-domain template) must not occur in any training text "
         "generated here",
         gxe.ExpectColumnValuesToBeInSet(column="wording_in_train", value_set=[False])),
        ("the answer must fit its kind (a number, a letter among the choices, code passing its tests; none for "
         "'other')", gxe.ExpectColumnValuesToBeInSet(column="answer_ok", value_set=[True])),
    ]  # fmt: skip
    return rules


def validate_routing(
    parts: dict[str, pd.DataFrame], train_texts: list[str], generated_texts: list[str], labels: list[str],
    data: DataParams, expect_mixed: bool, progress: bool = True,
) -> ValidationReport:  # fmt: skip
    """The routing benchmark's gate (parts read back from the written parquet). `expect_mixed`: the
    domains allow mixed rows (a number domain and a letter or code one), so val and test need them."""
    import great_expectations.expectations as gxe

    from bayes_llm.data.routing import OTHER

    frame = routing_frame(parts, train_texts, generated_texts, progress)
    gate = _Gate()
    failures = gate.run("routing", frame, _routing_rules(frame, labels, data), "routing", "all parts")
    for part, part_frame in parts.items():
        kinds = ["heldout", OTHER] + (["mixed"] if expect_mixed and part != "train" else [])
        rule = (f"{part} must have every kind it is made with ({', '.join(kinds)})",
                gxe.ExpectColumnDistinctValuesToContainSet(column="kind", value_set=kinds))  # fmt: skip
        failures += gate.run(f"routing-{part}", part_frame, [rule], "routing", part)
    return ValidationReport(not failures, gate.expectations, failures)
