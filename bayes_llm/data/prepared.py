"""Reading `prepare`'s output: the domain manifest and the split files. Later stages use only this."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bayes_llm import paths
from bayes_llm.errors import UserError
from bayes_llm.io import read_json

MANIFEST = paths.DATA_MANIFEST.name


class PreparedDataError(UserError):
    """`prepare`'s output is missing or unreadable."""


def split_path(root: Path, domain: str, split: str) -> Path:
    return Path(root) / domain / f"{split}.parquet"


def domains(root: Path = paths.DATA) -> list[dict]:
    """[{name, answer_kind, source, test_only, expected_rows}, ...] in the prepared order."""
    manifest = read_json(Path(root) / MANIFEST, PreparedDataError, "run `dvc repro prepare`")
    if not isinstance(manifest.get("domains"), list):
        raise PreparedDataError(f"{Path(root) / MANIFEST}: no `domains` list: run `dvc repro prepare`")
    return manifest["domains"]


def scored_by_choice_text(info: dict) -> bool:
    """A manifest domain asked in the cloze form (`choice_answer: text`): its test task, its expert's
    validation and its few-shot search score each choice's text, not a written answer."""
    return info.get("choice_answer") == "text"


def read_split(root: Path, domain: str, split: str) -> list[dict]:
    path = split_path(root, domain, split)
    if not path.is_file():
        raise PreparedDataError(f"{path} not found: run `dvc repro prepare` first")
    try:
        frame = pd.read_parquet(path)
    except Exception as error:  # truncated or overwritten file
        raise PreparedDataError(
            f"{path}: cannot read it ({type(error).__name__}); restore it with `dvc checkout data/prepared`"
            " or re-run `dvc repro prepare`"
        ) from None
    rows = frame.to_dict(orient="records")
    for row in rows:  # parquet lists come back as numpy arrays
        for key in ("choices", "tests"):
            if key in row and row[key] is not None:
                row[key] = [str(item) for item in row[key]]
    return rows
