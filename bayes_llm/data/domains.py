"""The domain registry: which domains exist under the current params, and how to build each."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from bayes_llm.config import DataParams, HubSource, LocalSource, SplitSizes
from bayes_llm.data import sources
from bayes_llm.data.rows import SPLITS, domain_rng, make_id
from bayes_llm.data.synthetic import arithmetic, code, reasoning, transfer
from bayes_llm.errors import UserError

# name -> (answer kind, generator); the synthetic domains a fresh project starts with.
SYNTHETIC: dict[str, tuple[str, Callable[[Any, Any], Iterator[dict]]]] = {
    "math": ("number", arithmetic.generate),
    "code": ("code", code.generate),
    "reasoning": ("letter", reasoning.generate),
}
TRANSFER = "transfer"


class GenerationError(UserError, ValueError):
    """The generator cannot produce enough distinct prompts for the requested sizes."""


@dataclass(frozen=True)
class Domain:
    name: str
    answer_kind: str
    source: str  # "synthetic", "local" or "hub"
    test_only: bool = False
    expected_rows: dict[str, int] | None = None  # exact counts for synthetic data
    choice_answer: str = "letter"  # multiple choice: answered by its letter or by the choice's text

    @property
    def splits(self) -> tuple[str, ...]:
        return ("test",) if self.test_only else SPLITS


def resolve(data: DataParams) -> list[Domain]:
    """Domains in a stable order: synthetic ones, then declared sources, then the transfer task."""
    out = []
    for name, (kind, _) in SYNTHETIC.items():
        cfg = getattr(data.domains, name)
        if cfg is not None and name not in data.sources:
            out.append(Domain(name, kind, "synthetic", expected_rows=cfg.sizes.model_dump()))
    for name in sorted(data.sources):
        source = data.sources[name]
        kind = source.answer_kind if isinstance(source, LocalSource) else sources.hub_answer_kind(source)
        out.append(Domain(name, kind, source.type, test_only=getattr(source, "test_only", False),
                          choice_answer=getattr(source, "choice_answer", "letter")))
    if data.transfer.enabled:
        out.append(Domain(TRANSFER, "letter", "synthetic", test_only=True, expected_rows={"test": data.transfer.test}))
    return out


def _unique(domain: str, generator: Iterator[dict], count: int) -> list[dict]:
    seen: dict[str, dict] = {}
    for row in itertools.islice(generator, count * 50):
        seen.setdefault(row["prompt"], row)
        if len(seen) == count:
            return list(seen.values())
    raise GenerationError(
        f"data: domain {domain!r} produced only {len(seen)} distinct prompts, {count} needed;"
        f" lower data.domains.{domain}.sizes or widen its difficulty knobs"
    )


def _synthetic_rows(name: str, generator: Iterator[dict], sizes: dict[str, int]) -> dict[str, list[dict]]:
    # Distinct prompts first, then cut into splits: no prompt can be in two splits.
    pool = _unique(name, generator, sum(sizes.values()))
    rows = [{"id": make_id(name, row["prompt"]), "domain": name, **row} for row in pool]
    out, start = {}, 0
    for split in ("test", "val", "train"):  # test first: it stays put when train grows
        if split in sizes:
            out[split] = rows[start : start + sizes[split]]
            start += sizes[split]
    return {split: out[split] for split in SPLITS if split in out}


def build(domain: Domain, data: DataParams, seed: int) -> dict[str, list[dict]]:
    """All splits of one domain as row dicts (not yet validated)."""
    rng = domain_rng(seed, domain.name)
    if domain.name == TRANSFER:
        return _synthetic_rows(domain.name, transfer.generate(data.transfer, rng), {"test": data.transfer.test})
    if domain.source == "synthetic":
        cfg = getattr(data.domains, domain.name)
        sizes: SplitSizes = cfg.sizes
        return _synthetic_rows(domain.name, SYNTHETIC[domain.name][1](cfg, rng), sizes.model_dump())
    source = data.sources[domain.name]
    if isinstance(source, HubSource):
        return sources.load_hub(domain.name, source)
    return sources.load_local(domain.name, source)
