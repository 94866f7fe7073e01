"""DVC stage `decompose`: models/base + params svf.targets → models/svd/, reports/svf/decompose.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import load_params
from bayes_llm.io import write_json

REPORT = paths.SVF_REPORTS / "decompose.json"
TIMING = paths.SVF_REPORTS / paths.TIMING


def decompose_base(targets: str | list[str], base_dir: Path = paths.BASE, progress: bool = True) -> dict:
    """SVD of the base's targets → models/svd/, reports/svf/{decompose,timing}.json."""
    from bayes_llm.model.load import load_base
    from bayes_llm.svf.decompose import decompose

    model, _ = load_base(base_dir)
    report = decompose(model, targets, paths.SVD, progress=progress)
    timing = {"stage_seconds": report.pop("seconds")}
    write_json(REPORT, report)
    write_json(TIMING, timing)
    return report | timing


def _command(args: argparse.Namespace) -> int:
    report = decompose_base(load_params(args.params).svf.targets, progress=not args.quiet)
    print(json.dumps({k: report[k] for k in ("matrices", "singular_values", "stage_seconds", "max_relative_error")}))
    return 0


STAGE = Stage(
    name="decompose",
    dvc_name="decompose",
    help="SVD of the base's target matrices (DVC stage `decompose`)",
    description="Thin fp32 SVD, layer by layer, of every matrix svf.targets selects in models/base/ (presets mlp | "
    "attn | mamba | all, or module-name regexes). Writes models/svd/ (safetensors U, S, Vh + svd.json with the base "
    "and SVD fingerprints), reports/svf/decompose.json (matrices, max relative reconstruction error) and "
    "reports/svf/timing.json.",
    run=_command,
    sandboxed=False,  # runs no model-written code
    deps=(paths.BASE,),
    outs=(paths.SVD, REPORT, TIMING),
)
