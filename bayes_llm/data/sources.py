"""External data: local JSONL/parquet files or Hugging Face hub datasets, mapped onto the row contract.

Local files and hub datasets both go through `datasets.load_dataset`; presets turn GSM8K, MBPP and
ARC-Easy rows into ours. Hub loading needs network access and is never used by the default params.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bayes_llm import paths
from bayes_llm.config import PRESET_KINDS, FieldMap, HubSource, LocalSource, split_cap
from bayes_llm.data.fetch import CATALOGUE, RAW
from bayes_llm.data.rows import LETTERS, SPLITS, format_choices, make_id
from bayes_llm.errors import UserError
from bayes_llm.prompts import FINAL_MARK


class SourceError(UserError, ValueError):
    """A source that cannot be read or mapped; the message names the domain and the fix."""


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [line for line in value.splitlines() if line.strip()]
    return [str(item) for item in value]


def normalise_number(text: str) -> str:
    """'$1,234.' → '1234': how real datasets write numbers, as the number gate reads them."""
    return text.strip().replace(",", "").replace("$", "").rstrip(".").strip()


def _choices(value: Any) -> tuple[list[str] | None, list[str] | None]:
    """(texts, labels): a list of choices, or ARC's `{text: [...], label: [...]}`."""
    if isinstance(value, dict) and "text" in value:
        texts = [str(t) for t in value["text"]]
        return texts, [str(label) for label in value.get("label") or LETTERS[: len(texts)]]
    if value is None or isinstance(value, str):
        return _as_list(value), None
    return [None if c is None else str(c) for c in value], None  # a null choice stays null: the gate names it


def _letter(answer: Any, labels: list[str] | None) -> Any:
    """A letter answer given as the source writes it: a choice label as text (ARC's `answerKey`, 'B' or
    '2'), or an integer: always the 0-based index of the right choice, even where labels are numbers
    (read as a label when it matched one, 0-based answers would mean two things in one dataset)."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        return LETTERS[answer] if 0 <= answer < len(LETTERS) else answer
    if labels and str(answer).strip() in labels and labels.index(str(answer).strip()) < len(LETTERS):
        return LETTERS[labels.index(str(answer).strip())]
    return answer  # the gate names what it cannot read


def with_tests(prompt: str, tests: list[str]) -> str:
    """MBPP's prompt: the task, then the tests the function must pass (they name it)."""
    return f"{prompt}\nYour code should pass {'this test' if len(tests) == 1 else 'these tests'}:\n" + "\n".join(tests)


def map_row(domain: str, raw: dict[str, Any], fields: FieldMap, answer_kind: str, subtask: str,
            local: LocalSource | None = None) -> dict:  # fmt: skip
    """One source row → our row. Ids and domain labels from the source are kept (and validated);
    `local` says how a local source writes answers and prompts."""
    answer = raw.get(fields.answer)
    solution = raw.get(fields.solution) if fields.solution else None
    # A row without the marker keeps its whole answer, and the gate names it.
    if local and local.answer_from == "after_marker" and isinstance(answer, str) and local.answer_marker in answer:
        working, answer = answer.rsplit(local.answer_marker, 1)
        if answer_kind == "number":
            solution = solution or f"{working.rstrip()}\n{FINAL_MARK} {normalise_number(answer)}"
    row = {
        "id": None if not fields.id or raw.get(fields.id) is None else str(raw[fields.id]),
        "domain": raw.get(fields.domain) if fields.domain else domain,
        "subtask": subtask,
        "prompt": raw.get(fields.prompt),
    }
    if row["prompt"] is not None and not isinstance(row["prompt"], str):  # a chat `messages` list, say
        kind = type(row["prompt"]).__name__
        raise SourceError(f"data.sources.{domain}: fields.prompt ({fields.prompt!r}) holds a {kind}, not text "
                          f"(row {row['id'] or '?'}): name a text column")  # fmt: skip
    if answer_kind == "letter":
        row["choices"], labels = _choices(raw.get(fields.choices)) if fields.choices else (None, None)
        answer = _letter(answer, labels)
        by_text = local is not None and local.choice_answer == "text"
        # Answered by text, the question is asked alone (lm-eval's arc_easy, the cloze form): measured on
        # SmolLM2-135M, listing the choices in it drops choice-text accuracy from 0.43 to 0.29 (chance 0.25).
        if row["prompt"] is not None and row["choices"] and not by_text:
            row["prompt"] = format_choices(str(row["prompt"]), row["choices"])
        letters = list(LETTERS[: len(row["choices"] or [])])
        if by_text and answer in letters:
            solution = row["choices"][letters.index(answer)]  # the reply an expert learns to write
    row["answer"] = None if answer is None else str(answer).strip()
    if answer_kind == "number" and row["answer"] is not None:
        row["answer"] = normalise_number(row["answer"])
    if answer_kind == "code":
        _code(row, raw, fields, local, answer)
    if fields.solution or solution:
        row["solution"] = solution
    if row["id"] is None and row["prompt"] is not None:
        row["id"] = make_id(domain, str(row["prompt"]))
    return row


def _code(row: dict, raw: dict[str, Any], fields: FieldMap, local: LocalSource | None, answer: Any) -> None:
    """A code row's reference program, tests and prompt, as the source writes them (MBPP, HumanEval)."""
    if local and local.answer_continues_prompt and row["prompt"] is not None and answer is not None:
        row["answer"] = str(row["prompt"]) + str(answer)
    tests = raw.get(fields.tests) if fields.tests else None
    if fields.entry_point and isinstance(tests, str) and row["prompt"] is not None:
        row["tests"] = check_tests(str(row["prompt"]), tests, str(raw.get(fields.entry_point)))
    elif tests is None or isinstance(tests, str):
        row["tests"] = _as_list(tests)
    else:  # a null or blank test tests nothing
        row["tests"] = [str(t) for t in tests if t is not None and str(t).strip()]
    if local and local.prompt_tests and row["prompt"] is not None and row["tests"]:
        row["prompt"] = with_tests(str(row["prompt"]), row["tests"][: local.prompt_tests])
    setup = raw.get(fields.test_setup) if fields.test_setup else None
    if setup and row["tests"]:
        row["tests"] = [f"{setup}\n{test}" for test in row["tests"]]


def _check_fields(domain: str, split: str, columns: list[str], fields: FieldMap) -> None:
    wanted = {name: column for name, column in fields.model_dump().items() if column is not None}
    missing = {name: column for name, column in wanted.items() if column not in columns}
    if missing:
        pairs = ", ".join(f"{name} -> {column!r}" for name, column in missing.items())
        raise SourceError(
            f"data.sources.{domain}: {split} has no column for {pairs}; its columns are {sorted(columns)}"
            f" (set data.sources.{domain}.fields)"
        )


def untracked_files(source: LocalSource) -> list[Path]:
    """A local source's files outside data/raw/ (prepare's dependency): `dvc repro` does not see
    them change."""
    files = [Path(f) for f in source.files.model_dump(exclude_none=True).values()]
    return [f for f in files if not paths.in_raw(f)]


def load_local(domain: str, source: LocalSource) -> dict[str, list[dict]]:
    from datasets import load_dataset

    out: dict[str, list[dict]] = {}
    wanted, skipped = {str(i) for i in source.skip_ids}, set()
    for split, file in source.files.model_dump(exclude_none=True).items():
        path = Path(file)
        if not path.is_file():
            fetched = path.parent.parent == RAW and path.parent.name in CATALOGUE  # `bayes-llm fetch NAME` writes it
            hint = f" (run `bayes-llm fetch {path.parent.name}` first)" if fetched else ""
            raise SourceError(f"data.sources.{domain}.files.{split}: file not found: {path}{hint}")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise SourceError(f"data.sources.{domain}.files.{split}: {path} must be .jsonl, .json or .parquet")
        # A cache of its own: `datasets` keys its shared one by path and mtime, so a file edited with
        # its mtime kept (cp -p, rsync -a, an unpacked archive) would be read as it was.
        with tempfile.TemporaryDirectory(prefix="bayes-llm-source-") as cache:
            try:
                data = load_dataset(kind, data_files=str(path), split="train", cache_dir=cache)
                columns, rows = data.column_names, data.to_list()  # decoding can fail here too
            except UnicodeDecodeError as error:
                raise SourceError(f"data.sources.{domain}.files.{split}: {path} is not UTF-8 text ({error.reason} "
                                  f"at byte {error.start}): re-encode it as UTF-8") from None  # fmt: skip
            except Exception as error:
                reason = str(error) or f"{type(error).__name__} (an empty file?)"
                raise SourceError(f"data.sources.{domain}.files.{split}: cannot read {path}: {reason}") from None
        _check_fields(domain, split, columns, source.fields)
        if source.skip_ids:
            skipped.update(str(row[source.fields.id]) for row in rows if str(row[source.fields.id]) in wanted)
            rows = [row for row in rows if str(row[source.fields.id]) not in wanted]
        rows = rows[: split_cap(source.max_rows, split)]
        out[split] = [map_row(domain, raw, source.fields, source.answer_kind, "local", source) for raw in rows]
    if unmatched := sorted(wanted - skipped):  # a typo would otherwise keep the row it meant to drop
        raise SourceError(f"data.sources.{domain}.skip_ids: no row has id {', '.join(unmatched)}")
    return out


# --- hub presets -------------------------------------------------------------------------------


def check_tests(prompt: str, test: str, entry_point: str) -> list[str]:
    """HumanEval's shape (`def check(candidate)` in `test`, helpers such as `poly` in the prompt) as a row's
    tests: the prompt's helpers go into the test itself, so the check uses the dataset's own and a program
    that redefines them cannot change what its answers are judged by."""
    import ast

    try:
        tree = ast.parse(prompt)
    except SyntaxError:
        return [f"{test}\ncheck({entry_point})\n"]
    helpers = [node for node in tree.body if not (isinstance(node, ast.FunctionDef) and node.name == entry_point)]
    trusted = "\n".join(ast.get_source_segment(prompt, node) or "" for node in helpers)
    return [f"{trusted}\n\n{test}\ncheck({entry_point})\n"]


def _gsm8k(raw: dict) -> dict:
    # GSM8K answers end with '#### 1,234'.
    final = raw["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
    working = raw["answer"].rsplit("####", 1)[0].strip()
    return {"prompt": raw["question"], "answer": final, "solution": f"{working}\n#### {final}"}


def _mbpp(raw: dict) -> dict:
    tests = list(raw["test_list"])
    setup = raw.get("test_setup_code") or ""
    prompt = with_tests(raw["text"], tests[:1])
    return {"prompt": prompt, "answer": raw["code"], "tests": [setup + "\n" + t if setup else t for t in tests]}


def _arc(raw: dict) -> dict:
    labels = list(raw["choices"]["label"])
    key = raw["answerKey"]
    return {"prompt": raw["question"], "choices": list(raw["choices"]["text"]), "answer": LETTERS[labels.index(key)]}


PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "path": "openai/gsm8k",
        "name": "main",
        "convert": _gsm8k,
        "splits": {"train": "train[200:]", "val": "train[:200]", "test": "test"},
    },
    "mbpp": {
        "path": "google-research-datasets/mbpp",
        "name": "full",
        "convert": _mbpp,
        "splits": {"train": "train", "val": "validation", "test": "test"},
    },
    "arc_easy": {
        "path": "allenai/ai2_arc",
        "name": "ARC-Easy",
        "convert": _arc,
        "splits": {"train": "train", "val": "validation", "test": "test"},
    },
}
_PRESET_FIELDS = FieldMap(prompt="prompt", answer="answer", choices="choices", tests="tests", solution="solution")


def hub_answer_kind(source: HubSource) -> str:
    return PRESET_KINDS[source.preset] if source.preset else source.answer_kind


def convert_hub_split(domain: str, source: HubSource, split: str, rows: list[dict]) -> list[dict]:
    """Map rows of one hub split (already loaded) onto ours: the testable half of `load_hub`."""
    kind = hub_answer_kind(source)
    if source.preset:
        convert: Callable[[dict], dict] = PRESETS[source.preset]["convert"]
        return [map_row(domain, convert(raw), _PRESET_FIELDS, kind, source.preset) for raw in rows]
    if rows:
        _check_fields(domain, split, list(rows[0]), source.fields)
    name = re.sub(r"\W+", "_", source.path or "hub")
    return [map_row(domain, raw, source.fields, kind, name) for raw in rows]


def load_hub(domain: str, source: HubSource) -> dict[str, list[dict]]:
    from datasets import load_dataset

    preset = PRESETS.get(source.preset or "", {})
    path, name = source.path or preset["path"], source.name or preset.get("name")
    splits = source.splits.model_dump() if source.splits else preset["splits"]
    out = {}
    for split in SPLITS:
        try:
            data = load_dataset(path, name, split=splits[split])
        except Exception as error:
            raise SourceError(f"data.sources.{domain}: cannot load {path} ({splits[split]}): {error}") from None
        out[split] = convert_hub_split(domain, source, split, data.to_list()[: split_cap(source.max_rows, split)])
    return out
