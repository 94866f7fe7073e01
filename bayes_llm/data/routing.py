"""The routing benchmark: prompts the first pass never saw, to calibrate and test the dispatcher on.

Three kinds of rows, made deterministically from the prepared val/test splits (val → `val`, test →
`test`, so no prompt is trained on):

- `heldout`: a domain's prompt re-asked in phrasings used nowhere in pretraining or expert training
  (a rewording of its first line, then a wrapper). The right route is its domain.
- `mixed`: a prompt that needs two experts by construction, with the known mix as the target: a
  number problem asked as multiple choice (number + letter experts) or as a function to write
  (number + code experts).
- `other`: text none of the experts covers (translation, poems, geography, …): the right route is
  `other`, i.e. the base weights.

A `train` part (train rows in its own rewordings and wrappers, off-domain text from its own
templates, no mixed rows) teaches the classification expert varied phrasings and the `other` label.
Each part has its own rewordings, wrappers and off-domain templates, so the test part measures
phrasings that neither training nor calibration saw (`prepare` checks that no val/test wording
occurs in any training text). The filler words of the off-domain templates are shared: the test is
of new sentence shapes, not of a new vocabulary. A mixed row's `target` is its number domain (the
first of its mix); what it needs is in `mix`.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from bayes_llm.config import RoutingBenchmark
from bayes_llm.data.rows import LETTERS, domain_rng, format_choices, make_id
from bayes_llm.errors import UserError

OTHER = "other"  # the controller's label for "no expert: the base weights"
KINDS = ("heldout", "mixed", OTHER)
PARTS = ("train", "val", "test")

# {p} is the domain's prompt. Disjoint between the parts.
WRAPPERS = {
    "train": (
        "Question for you: {p}",
        "{p}\nPlease answer.",
        "I have a task.\n{p}",
        "Solve this one.\n\n{p}",
        "Can you help me with this? {p}",
        "{p} Thank you!",
        "{p}\nI want to check my own answer.",
        "I am studying for a test.\n{p}",
        "{p}\nPlease keep it short.",
        "Hello!\n{p}",
        "{p}\n(I will compare it with mine.)",
        "Try this: {p}",
    ),
    "val": (
        "Quick question: {p}",
        "{p}\nThanks in advance!",
        "My friend asked me this and I am stuck.\n{p}",
        "Please help with the following.\n\n{p}",
    ),
    "test": (
        "Here is one for you. {p}",
        "{p}\nI need the answer soon.",
        "Homework time!\n{p}",
        "Could you take a look at this?\n\n{p}",
    ),
}
# Rewordings of a prompt's first line (its question); the rest (choices) stays as it is. Each part
# has its own, so the test part's are seen neither in training nor in calibration.
_QUESTION = {
    "what": re.compile(r"^What is (.+)\?$"),
    "compute": re.compile(r"^(?:Compute|Calculate) (.+)\.$"),
    "equals": re.compile(r"^(.+) = \?$"),
    "function": re.compile(r"^Write a Python function (`[^`]+`) that (.+)$"),
    "which": re.compile(r"^Which (.+)\?$"),
    "count": re.compile(r"^How many (.+)\?$"),
}
REWORDINGS = {
    "train": {
        "what": r"Please find the value of \1.",
        "compute": r"Determine \1.",
        "equals": r"Find \1.",
        "function": r"Define \1 in Python. It \2",
        "which": r"Choose which \1.",
        "count": r"Say how many \1.",
    },
    "val": {
        "what": r"Figure out \1.",
        "compute": r"Give me the result of \1.",
        "equals": r"What does \1 come to?",
        "function": r"Please code \1 in Python: it \2",
        "which": r"Point out which \1.",
        "count": r"Find out how many \1.",
    },
    "test": {
        "what": r"Work out \1.",
        "compute": r"Evaluate \1 for me.",
        "equals": r"How much is \1 altogether?",
        "function": r"I need a Python function \1. It \2",
        "which": r"Tell me which \1.",
        "count": r"Count how many \1.",
    },
}
# Off-domain prompts: none of the experts covers them. Disjoint templates between the parts.
OFF_DOMAIN = {
    "train": (
        "Write a haiku about {topic}.",
        "Tell me a bedtime story about a {animal}.",
        "What language do people speak in {country}?",
        "Spell the word '{word}' backwards in {language}.",
        "Why do {animal}s like {food}?",
        "Recommend a song to listen to while thinking of {topic}.",
        "Describe a typical breakfast in {country}.",
        "Say thank you to {name} in {language}.",
        "Is it safe for a {animal} to eat {food}?",
        "What is the weather usually like in {country} in spring?",
    ),
    "val": (
        "Translate the word '{word}' into {language}.",
        "Write a short poem about {topic}.",
        "What is the capital city of {country}?",
        "Tell me an interesting fact about {animal}s.",
        "Give me a recipe that uses {food}.",
    ),
    "test": (
        "How do you say '{word}' in {language}?",
        "Suggest a name for a pet {animal}.",
        "Describe the smell of {food} in one sentence.",
        "What should I pack for a trip to {country}?",
        "Write a friendly note inviting {name} to a picnic about {topic}.",
    ),
}
FILLERS = {
    "word": ("house", "river", "friend", "morning", "bread", "window", "garden", "music", "rain", "book", "chair",
             "forest", "letter", "summer", "bridge", "candle"),
    "language": ("French", "German", "Spanish", "Italian", "Dutch", "Swedish", "Polish", "Greek", "Turkish",
                 "Portuguese", "Finnish", "Czech"),
    "topic": ("the sea", "autumn leaves", "a quiet town", "the moon", "old trains", "spring rain", "mountains",
              "a busy market", "winter nights", "a lighthouse"),
    "country": ("France", "Japan", "Peru", "Kenya", "Norway", "Canada", "Egypt", "Chile", "Vietnam", "Iceland",
                "Morocco", "Ireland", "Mexico", "Nepal"),
    "animal": ("otter", "parrot", "fox", "turtle", "rabbit", "owl", "dolphin", "hedgehog", "penguin", "squirrel",
               "goat", "swan"),
    "food": ("lemons", "spinach", "honey", "mushrooms", "cinnamon", "rice", "fresh basil", "pears", "garlic",
             "oatmeal", "walnuts", "ginger"),
    "name": ("Maya", "Tom", "Aisha", "Lars", "Chen", "Rosa", "Idris", "Nina", "Omar", "Greta"),
}
MIXED = {
    # kind -> (answer kind it is asked in, the experts it needs besides the number one)
    "number_as_choice": "letter",
    "number_as_function": "code",
}
FUNCTION_NAME = "solve"


def reword(prompt: str, part: str = "test") -> str:
    """The first line in a phrasing of the part's REWORDINGS (unchanged when none applies)."""
    first, _, rest = prompt.partition("\n")
    for name, pattern in _QUESTION.items():
        if pattern.match(first):
            first = pattern.sub(REWORDINGS[part][name], first)
            break
    return first + ("\n" + rest if rest else "")


def wording_phrases(part: str) -> list[str]:
    """The fixed text of a part's wrappers, rewordings and off-domain templates: validation checks
    that none of val's or test's occurs in any training text."""
    pieces = [piece for wrapper in WRAPPERS[part] for piece in wrapper.split("{p}")]
    pieces += [piece for replacement in REWORDINGS[part].values() for piece in re.split(r"\\\d", replacement)]
    pieces += [piece for template in OFF_DOMAIN[part] for piece in re.split(r"\{\w+\}", template)]
    stripped = (piece.strip(" .,:;'?!\n") for piece in pieces)
    return [piece for piece in stripped if len(piece.split()) >= 2]  # not a bare "It"


def _heldout(domain: str, rows: Sequence[dict], count: int, part: str, rng: random.Random) -> list[dict]:
    out = []
    for row in rng.sample(list(rows), min(count, len(rows))):
        # Train rows: half keep their wording, so both kinds of first line are learnt.
        reworded = reword(row["prompt"], part) if part != "train" or rng.random() < 0.5 else row["prompt"]
        prompt = rng.choice(WRAPPERS[part]).format(p=reworded)
        out.append(_row("heldout", domain, prompt, {domain: 1.0}, row, source_id=row["id"]))
    return out


def _row(kind: str, subtask: str, prompt: str, mix: dict[str, float], row: dict | None, source_id: str = "",
         **fields) -> dict:  # fmt: skip
    answer_kind = fields.pop("answer_kind", None)
    if row is not None and answer_kind is None:
        answer_kind = row["answer_kind"]
    target = max(mix, key=mix.get) if mix else OTHER
    return {
        "id": make_id(f"routing-{kind}", prompt),
        "kind": kind,
        "subtask": subtask,
        "prompt": prompt,
        "target": target,
        "mix": json.dumps(mix, sort_keys=True),
        "answer_kind": answer_kind,
        "answer": fields.get("answer", row["answer"] if row else None),
        "choices": fields.get("choices", row.get("choices") if row else None),
        "tests": fields.get("tests", row.get("tests") if row else None),
        "source_id": source_id,
    }


def _as_choice(number: str, rng: random.Random) -> tuple[list[str], str]:
    value = int(float(number))
    # Near misses; negative ones only when the answer itself is negative.
    distractors = sorted({value + d for d in (-10, -2, -1, 1, 2, 10) if value < 0 or value + d >= 0})
    options = [value, *rng.sample(distractors, 3)]
    rng.shuffle(options)
    return [str(o) for o in options], LETTERS[options.index(value)]


def _mixed(by_kind: dict[str, str], rows: Sequence[dict], count: int, rng: random.Random) -> list[dict]:
    """Number problems asked in another domain's form; `by_kind`: answer kind -> its domain."""
    number = by_kind["number"]
    integer_rows = [r for r in rows if re.fullmatch(r"-?\d+", r["answer"])]
    out = []
    for kind, asked_as in MIXED.items():
        if asked_as not in by_kind:
            continue
        mix = {number: 0.5, by_kind[asked_as]: 0.5}
        for row in rng.sample(integer_rows, min(count, len(integer_rows))):
            if asked_as == "letter":
                choices, letter = _as_choice(row["answer"], rng)
                prompt = format_choices(row["prompt"], choices)
                out.append(_row("mixed", kind, prompt, mix, row, row["id"], answer_kind="letter", answer=letter,
                                choices=choices, tests=None))  # fmt: skip
            else:
                prompt = (f"Write a Python function `{FUNCTION_NAME}()` that returns the answer to this problem "
                          f"as an int: {row['prompt']}")  # fmt: skip
                answer = f"def {FUNCTION_NAME}():\n    return {row['answer']}\n"
                out.append(_row("mixed", kind, prompt, mix, row, row["id"], answer_kind="code", answer=answer,
                                choices=None, tests=[f"assert {FUNCTION_NAME}() == {row['answer']}"]))  # fmt: skip
    return out


def mixable(kinds: set[str]) -> bool:
    """Whether domains of these answer kinds make mixed rows (a number one, and a letter or code one)."""
    return "number" in kinds and any(asked_as in kinds for asked_as in MIXED.values())


def _off_domain(count: int, part: str, rng: random.Random) -> list[dict]:
    seen: dict[str, dict] = {}
    for _ in range(count * 50):
        if len(seen) == count:
            break
        template = rng.choice(OFF_DOMAIN[part])
        fields = {name: rng.choice(values) for name, values in FILLERS.items() if "{" + name + "}" in template}
        prompt = template.format(**fields)
        seen.setdefault(prompt, _row(OTHER, "off_domain", prompt, {}, None, answer_kind=None))
    if len(seen) < count:
        raise UserError(f"routing benchmark, {part}: only {len(seen)} distinct off-domain prompts can be made, "
                        f"{count} asked (params data.routing.{part}.other)")  # fmt: skip
    return list(seen.values())


def build(splits: dict[str, tuple[str, dict[str, list[dict]]]], cfg: RoutingBenchmark, seed: int) -> dict:
    """`splits`: domain -> (answer kind, {split: rows}) of the domains with experts; each part is made
    from the split of its name. → {part: rows}."""
    out = {}
    by_kind = {}
    for domain, (kind, _) in splits.items():
        by_kind.setdefault(kind, domain)
    for part in PARTS:
        rng = domain_rng(seed, f"routing-{part}")
        sizes = getattr(cfg, part)
        rows = []
        for domain, (kind, domain_splits) in splits.items():
            tagged = [r | {"answer_kind": kind} for r in domain_splits[part]]
            rows += _heldout(domain, tagged, sizes.heldout, part, rng)
        if mixable(set(by_kind)) and part != "train":
            number = by_kind["number"]
            tagged = [r | {"answer_kind": "number"} for r in splits[number][1][part]]
            rows += _mixed(by_kind, tagged, sizes.mixed, rng)
        rows += _off_domain(sizes.other, part, rng)
        out[part] = rows
    return out


def path(root: Path, part: str) -> Path:
    return Path(root) / f"{part}.parquet"


def read(root: Path, part: str) -> list[dict]:
    """A part's rows, `mix` decoded, lists as lists."""
    file = path(root, part)
    if not file.is_file():
        raise UserError(f"{file} not found: run `dvc repro prepare` (params data.routing.enabled: true)")
    try:
        rows = pd.read_parquet(file).to_dict(orient="records")
    except Exception as error:  # truncated or overwritten file
        raise UserError(f"{file}: cannot read it ({type(error).__name__}); restore it with `dvc checkout "
                        f"{Path(root)}` or re-run `dvc repro prepare`") from None  # fmt: skip
    for row in rows:
        row["mix"] = json.loads(row["mix"])
        for key in ("answer_kind", "answer"):  # parquet gives NaN for a missing string
            if not isinstance(row[key], str):
                row[key] = None
        for key in ("choices", "tests"):
            row[key] = None if row[key] is None else [str(item) for item in row[key]]
    return rows
