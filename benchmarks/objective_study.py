"""Does RL beat next-token training here? The same domain's z trained with each objective and RL
algorithm, from the same base and seed, scored on the domain's test split against the base.

`bayes-llm compare-objectives DOMAIN` writes `reports/objective_study/DOMAIN.{json,md}`. Each
variant starts from `experts.DOMAIN` in params.yaml and changes only what names it; nothing here is
chosen on the test split (each run keeps its best z on val, as the stage does).

A study, not a stage: it lives outside `bayes_llm/experts` and `reports/experts` (inputs of the
`train_expert` and `evaluate` stages) so that running or editing it never makes them stale.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from bayes_llm import paths
from bayes_llm.config import ExpertParams, Params, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.evaluate.base_scores import base_test_scores
from bayes_llm.experts.trainer import Trainer
from bayes_llm.io import atomic_path, write_json
from bayes_llm.model.greedy import greedy_scores
from bayes_llm.model.load import load_base
from bayes_llm.stages.train_expert import expert_domains
from bayes_llm.stats import paired_bootstrap
from bayes_llm.svf.decompose import check_base, load_factors
from bayes_llm.svf.scaling import SVF, Composer

REPORT_DIR = paths.REPORTS / "objective_study"
# Sampled-group settings for trl's algorithms (greedy rollouts give a group no variance to learn from).
SAMPLED = {"num_generations": 4, "temperature": 0.7, "rl_batch_size": 8, "rl_learning_rate": 3e-3}


def variants(cfg: ExpertParams, rl_steps: int) -> dict[str, dict]:
    """name → changes to the domain's params; RL-only runs get `rl_steps`, sft+rl keeps its own."""
    rl_only = {"objective": "rl", "rl_steps": rl_steps}
    return {
        "sft": {"objective": "sft"},
        "rl (reinforce, greedy ±1)": {**rl_only, "rl_algorithm": "reinforce"},
        "rl (trl grpo)": {**rl_only, "rl_algorithm": "grpo", **SAMPLED},
        "rl (trl rloo)": {**rl_only, "rl_algorithm": "rloo", **SAMPLED},
        f"sft+rl ({cfg.rl_algorithm}, the default)": {"objective": "sft+rl"},
        "sft+rl (trl rloo)": {"objective": "sft+rl", "rl_algorithm": "rloo", **SAMPLED},
    }


def compare_objectives(params: Params, domain: str, rl_steps: int = 60, progress: bool = True) -> dict:
    kind = expert_domains(params, domain)[domain]["answer_kind"]
    if rl_steps < 1:
        raise UserError(f"--rl-steps must be at least 1 (got {rl_steps})")
    base_cfg = params.experts[domain]
    tokens = params.base_eval.max_new_tokens[kind]
    train_rows, val_rows, test_rows = (
        prepared.read_split(paths.DATA, domain, split) for split in ("train", "val", "test")
    )
    model, tokenizer = load_base()
    factors, manifest = load_factors(paths.SVD)
    check_base(model, manifest, paths.SVD)

    base = base_test_scores(paths.BASE, domain, test_rows, tokens)
    runs = []
    for name, changes in variants(base_cfg, rl_steps).items():
        cfg = ExpertParams.model_validate({**base_cfg.model_dump(), **changes})
        svf = SVF(model, factors, mode=params.svf.mode, max_mult=params.svf.max_mult)
        with tempfile.TemporaryDirectory() as checkpoints:  # every variant trains from the start
            trainer = Trainer(svf, tokenizer, kind, train_rows, val_rows, cfg, params.seed, Path(checkpoints),
                              manifest["svd_fingerprint"], tokens, progress, log=lambda _: None)  # fmt: skip
            result = trainer.run()
        svf.load_z(result.best_z)
        scales = svf.scales()
        svf.detach()
        composer = Composer(model, factors)
        composer.merge(scales)
        scores = greedy_scores(model, tokenizer, kind, test_rows, tokens, base_cfg.eval_batch_size)
        composer.unmerge()
        runs.append({
            "variant": name,
            "changes": changes,
            "steps": dict(result.phases),
            "train_seconds": round(result.seconds, 1),
            "val_accuracy": {"base": result.base_val, "best": result.best_val, "sft": result.sft_val},
            "test_accuracy": round(sum(scores) / len(scores), 4),
            "gain": paired_bootstrap(base, scores, seed=params.seed),
        })  # fmt: skip
        if progress:
            print(f"{name}: test {runs[-1]['test_accuracy']:.3f} (base {sum(base) / len(base):.3f})", flush=True)
    report = {"domain": domain, "seed": params.seed, "base_test_accuracy": round(sum(base) / len(base), 4),
              "test_items": len(base), "runs": runs, "started_from": base_cfg.model_dump()}  # fmt: skip
    write_json(REPORT_DIR / f"{domain}.json", report)
    with atomic_path(REPORT_DIR / f"{domain}.md") as tmp:
        tmp.write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    lines = [
        f"# Objectives compared: {report['domain']} (seed {report['seed']}, {report['test_items']} test items)",
        "",
        f"Base test accuracy {100 * report['base_test_accuracy']:.1f} %. Each z keeps its best val step.",
        "",
        "| variant | steps | train s | best val % | test % | gain, points [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        gain = run["gain"]
        ci = f"{gain['gain_points']:+.1f} [{gain['ci_low']:+.1f}, {gain['ci_high']:+.1f}]"
        steps = " + ".join(f"{phase} {n}" for phase, n in run["steps"].items())
        lines.append(
            f"| {run['variant']} | {steps} | {run['train_seconds']:.0f} | {100 * run['val_accuracy']['best']:.1f} | "
            f"{100 * run['test_accuracy']:.1f} | {ci} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.objective_study",
        description="From experts.DOMAIN in params.yaml, trains z with sft, rl (greedy REINFORCE, trl GRPO, trl RLOO), "
        "sft+rl (the configured algorithm) and sft+rl with trl RLOO, on the same base and seed; each keeps its best "
        "val z. Scores each on DOMAIN's test split with a paired bootstrap CI of the gain over the base and writes "
        "reports/objective_study/DOMAIN.{json,md}. Needs `dvc repro decompose` first.",
    )
    parser.add_argument("domain", help="a domain with an `experts.<domain>` entry in params.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rl-steps", type=int, default=60, help="RL steps of the RL-only variants (default 60)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = compare_objectives(load_params(args.params), args.domain, args.rl_steps, progress=not args.quiet)
    except UserError as error:
        print(f"objective_study: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps({run["variant"]: run["gain"]["gain_points"] for run in report["runs"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
