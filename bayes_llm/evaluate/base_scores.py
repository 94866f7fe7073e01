"""The base's greedy scores on every domain's test split, saved beside the base weights.

The base stage scores the test splits once; every expert (and the objective study) pairs its own
scores with these, rather than re-scoring the same base on 1,500 items in each stage. Each domain's
entry names the split it scored (a hash of its prompts and answers) and the generation budget, so a
changed split or budget is a clear error, not a silent mismatch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from bayes_llm.errors import UserError
from bayes_llm.io import read_json
from bayes_llm.model.greedy import greedy_scores

FILE = "test_scores.json"
HINT = "re-run the base stage (`dvc repro base`)"


class BaseScoresError(UserError):
    pass


def split_digest(rows: Sequence[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['prompt']}\x00{row['answer']}\x01".encode())
    return digest.hexdigest()


def score_test_splits(
    model,
    tokenizer,
    splits: Mapping[str, tuple[str, Sequence[dict]]],
    max_new_tokens: Mapping[str, int],
    batch_size: int,
) -> dict:
    """{domain: {kind, max_new_tokens, digest, scores}} for splits given as {domain: (answer kind, rows)}."""
    scores = {}
    for domain, (kind, rows) in splits.items():
        tokens = max_new_tokens[kind]
        scores[domain] = {
            "answer_kind": kind,
            "max_new_tokens": tokens,
            "digest": split_digest(rows),
            "scores": greedy_scores(model, tokenizer, kind, rows, tokens, batch_size),
        }
    return {"domains": scores}


def base_test_scores(base_dir: Path, domain: str, rows: Sequence[dict], max_new_tokens: int) -> list[float]:
    """The saved base scores of `domain`'s test split, checked against the rows and budget in use."""
    saved = read_json(Path(base_dir) / FILE, BaseScoresError, HINT).get("domains")
    if not isinstance(saved, dict) or domain not in saved:
        raise BaseScoresError(f"{base_dir}/{FILE} has no scores for {domain!r}: {HINT}")
    entry = saved[domain]
    if not isinstance(entry, dict) or not {"digest", "scores", "max_new_tokens"} <= set(entry):
        raise BaseScoresError(f"{base_dir}/{FILE}: {domain}'s entry is malformed: {HINT}")
    if entry["digest"] != split_digest(rows) or len(entry["scores"]) != len(rows):
        raise BaseScoresError(f"{base_dir}/{FILE}: {domain}'s test split changed since the base was scored: {HINT}")
    if entry["max_new_tokens"] != max_new_tokens:
        raise BaseScoresError(
            f"{base_dir}/{FILE}: {domain} was scored with max_new_tokens {entry['max_new_tokens']}, "
            f"now {max_new_tokens}: {HINT}"
        )
    return [float(score) for score in entry["scores"]]
