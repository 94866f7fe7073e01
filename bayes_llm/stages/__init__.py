"""One module per `dvc.yaml` stage, in DAG order: each declares its command, inputs and outputs
(`STAGE`) and runs its components. Components never import a stage."""

from __future__ import annotations

import importlib

from bayes_llm.command import Stage

# The DAG's order; the thin entry points in the project's top-level stages/ carry the same names.
NAMES = ("prepare", "base", "decompose", "train_expert", "calibrate", "train_lora", "evaluate", "bundle")


def all_stages() -> list[Stage]:
    return [importlib.import_module(f"bayes_llm.stages.{name}").STAGE for name in NAMES]
