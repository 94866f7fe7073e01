"""One map of the pipeline's artifact paths, relative to the project root (where stages run).

Components take these as defaults and stages declare their inputs and outputs from them;
`tests/test_layout.py` checks that `dvc.yaml`'s deps and outs say the same.
"""

from __future__ import annotations

import os
from pathlib import Path

PARAMS = Path("params.yaml")

# Local inputs (`bayes-llm fetch` writes here; put a local source's files and a local model.source here
# too): a dep of `prepare` and `base`, so an edited file reruns them.
RAW = Path("data/raw")


def in_raw(path: str | Path) -> bool:
    """Whether DVC sees `path` change as part of data/raw: named under it (a linked file is hashed by its
    content), and not through a linked directory below it (which DVC does not walk)."""
    named, raw = Path(os.path.abspath(Path(path).expanduser())), RAW.resolve()
    below: list[Path] = []  # what lies between data/raw and the file, the file included
    for candidate in (named, *named.parents):
        if candidate.resolve() == raw:  # data/raw itself, under whatever name (DVC follows a linked data/raw)
            return not any(p.is_symlink() and p.is_dir() for p in below)
        below.append(candidate)
    return False


DATA = Path("data/prepared")
DATA_MANIFEST = DATA / "domains.json"
ROUTING = Path("data/routing")  # the dispatcher's benchmark off the training distribution

MODELS = Path("models")
BASE = MODELS / "base"
BASE_TEST_SCORES = BASE / "test_scores.json"
SVD = MODELS / "svd"
EXPERTS = MODELS / "experts"
CHECKPOINTS = MODELS / "checkpoints"  # a killed expert run resumes here; not a DVC output
DISPATCHER = MODELS / "dispatcher"
LORA = MODELS / "lora"

BUNDLES = Path("bundles")

REPORTS = Path("reports")
REPORTS_README = REPORTS / "README.md"
DATA_REPORTS = REPORTS / "data"
BASE_REPORTS = REPORTS / "base"
SVF_REPORTS = REPORTS / "svf"
EXPERT_REPORTS = REPORTS / "experts"
DISPATCH_REPORTS = REPORTS / "dispatch"
LORA_REPORTS = REPORTS / "lora"
EVAL_REPORTS = REPORTS / "eval"
# Seconds go to each stage's own timing file, never into a metrics file: `dvc exp show` and
# `dvc metrics diff` then compare scores only, and two runs of the same params show no difference.
TIMING = "timing.json"


def expert_file(domain: str) -> Path:
    return EXPERTS / f"{domain}.safetensors"


def expert_checkpoint(domain: str) -> Path:
    return CHECKPOINTS / domain


def expert_report(domain: str, suffix: str = ".json") -> Path:
    """reports/experts/<domain><suffix>: `.json`, `.png`, `_timing.json`."""
    return EXPERT_REPORTS / f"{domain}{suffix}"


def expert_live(domain: str) -> Path:
    """reports/experts/live/<domain>: the expert's training curves as DVCLive writes them."""
    return EXPERT_REPORTS / "live" / domain


def bundle_dir(name: str) -> Path:
    return BUNDLES / name
