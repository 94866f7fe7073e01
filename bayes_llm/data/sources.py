"""External data: local JSONL/parquet files or Hugging Face hub datasets, mapped onto the row contract.

Local files and hub datasets both go through `datasets.load_dataset`; presets turn GSM8K, MBPP and
ARC-Easy rows into ours. Hub loading needs network access and is never used by the default params.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bayes_llm.config import FieldMap, HubSource, LocalSource
from bayes_llm.data.rows import LETTERS, SPLITS, format_choices, make_id
from bayes_llm.errors import UserError


class SourceError(UserError, ValueError):
    """A source that cannot be read or mapped; the message names the domain and the fix."""


def _as_list(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [line for line in value.splitlines() if line.strip()]
    return [str(item) for item in value]


def map_row(domain: str, raw: dict[str, Any], fields: FieldMap, answer_kind: str, subtask: str) -> dict:
    """One source row → our row. Ids and domain labels from the source are kept (and validated)."""
    answer = raw.get(fields.answer)
    row = {
        "id": raw.get(fields.id) if fields.id else None,
        "domain": raw.get(fields.domain) if fields.domain else domain,
        "subtask": subtask,
        "prompt": raw.get(fields.prompt),
        "answer": None if answer is None else str(answer).strip(),
    }
    if answer_kind == "letter":
        row["choices"] = _as_list(raw.get(fields.choices)) if fields.choices else None
        if row["prompt"] is not None and row["choices"]:
            row["prompt"] = format_choices(str(row["prompt"]), row["choices"])
    if answer_kind == "code":
        row["tests"] = _as_list(raw.get(fields.tests)) if fields.tests else None
    if fields.solution:
        row["solution"] = raw.get(fields.solution)
    if row["id"] is None and row["prompt"] is not None:
        row["id"] = make_id(domain, str(row["prompt"]))
    return row


def _check_fields(domain: str, split: str, columns: list[str], fields: FieldMap) -> None:
    wanted = {name: column for name, column in fields.model_dump().items() if column is not None}
    missing = {name: column for name, column in wanted.items() if column not in columns}
    if missing:
        pairs = ", ".join(f"{name} -> {column!r}" for name, column in missing.items())
        raise SourceError(
            f"data.sources.{domain}: {split} has no column for {pairs}; its columns are {sorted(columns)}"
            f" (set data.sources.{domain}.fields)"
        )


def load_local(domain: str, source: LocalSource) -> dict[str, list[dict]]:
    from datasets import load_dataset

    out: dict[str, list[dict]] = {}
    for split, file in source.files.model_dump().items():
        path = Path(file)
        if not path.is_file():
            raise SourceError(f"data.sources.{domain}.files.{split}: file not found: {path}")
        kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(path.suffix)
        if kind is None:
            raise SourceError(f"data.sources.{domain}.files.{split}: {path} must be .jsonl, .json or .parquet")
        try:
            data = load_dataset(kind, data_files=str(path), split="train")
        except Exception as error:
            raise SourceError(f"data.sources.{domain}.files.{split}: cannot read {path}: {error}") from None
        _check_fields(domain, split, data.column_names, source.fields)
        rows = data.to_list()[: source.max_rows]
        out[split] = [map_row(domain, raw, source.fields, source.answer_kind, "local") for raw in rows]
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
    prompt = f"{raw['text']}\nYour code should pass this test:\n{tests[0]}"
    return {"prompt": prompt, "answer": raw["code"], "tests": [setup + "\n" + t if setup else t for t in tests]}


def _arc(raw: dict) -> dict:
    labels = list(raw["choices"]["label"])
    key = raw["answerKey"]
    return {"prompt": raw["question"], "choices": list(raw["choices"]["text"]), "answer": LETTERS[labels.index(key)]}


PRESETS: dict[str, dict[str, Any]] = {
    "gsm8k": {
        "path": "openai/gsm8k",
        "name": "main",
        "answer_kind": "number",
        "convert": _gsm8k,
        "splits": {"train": "train[200:]", "val": "train[:200]", "test": "test"},
    },
    "mbpp": {
        "path": "google-research-datasets/mbpp",
        "name": "full",
        "answer_kind": "code",
        "convert": _mbpp,
        "splits": {"train": "train", "val": "validation", "test": "test"},
    },
    "arc_easy": {
        "path": "allenai/ai2_arc",
        "name": "ARC-Easy",
        "answer_kind": "letter",
        "convert": _arc,
        "splits": {"train": "train", "val": "validation", "test": "test"},
    },
}
_PRESET_FIELDS = FieldMap(prompt="prompt", answer="answer", choices="choices", tests="tests", solution="solution")


def hub_answer_kind(source: HubSource) -> str:
    return PRESETS[source.preset]["answer_kind"] if source.preset else source.answer_kind


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
        out[split] = convert_hub_split(domain, source, split, data.to_list()[: source.max_rows])
    return out
