"""DVC stage `train_lora`: models/base + train splits → models/lora/, reports/lora/{metrics,timing}.json."""

from __future__ import annotations

import argparse
import json
import time

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.io import write_json

REPORT = paths.LORA_REPORTS / "metrics.json"
TIMING = paths.LORA_REPORTS / paths.TIMING


def build_lora(params: Params, progress: bool = True) -> dict:
    """An adapter for every prepared domain with a train split."""
    from bayes_llm.baselines.lora import train_adapters

    started = time.perf_counter()
    cfg = params.evaluate.lora
    domains = [d["name"] for d in prepared.domains() if not d["test_only"]]
    train = {domain: prepared.read_split(paths.DATA, domain, "train") for domain in domains}
    report = train_adapters(paths.BASE, train, rank=cfg.rank, alpha=cfg.alpha, targets=cfg.targets,
                            steps=cfg.steps, learning_rate=cfg.learning_rate, batch_size=cfg.batch_size,
                            seed=params.seed, progress=progress)  # fmt: skip
    timing = {"train_seconds": {d: r.pop("train_seconds") for d, r in report["domains"].items()},
              "stage_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    write_json(REPORT, report)
    write_json(TIMING, timing)
    return report | timing


def _command(args: argparse.Namespace) -> int:
    report = build_lora(load_params(args.params), progress=not args.quiet)
    print(json.dumps({d: r["last_loss"] for d, r in report["domains"].items()} | {"seconds": report["stage_seconds"]}))
    return 0


STAGE = Stage(
    name="train-lora",
    dvc_name="train_lora",
    help="the LoRA baseline: one PEFT adapter per expert domain (DVC stage `train_lora`)",
    description="Trains a LoRA adapter (params evaluate.lora: rank, alpha, target modules, steps) per domain that "
    "has an expert, with the experts' SFT objective on its train split, and saves models/lora/<domain>/ (PEFT "
    "safetensors) plus reports/lora/metrics.json (and its seconds in timing.json).",
    run=_command,
    sandboxed=False,  # runs no model-written code
    deps=(paths.BASE, paths.DATA),
    outs=(paths.LORA, REPORT, TIMING),
)
