"""Why does the RL phase not move val? Two checks from the stage's expert z (the z the RL phase continues):

1. **Can it raise reward at all?** Each RL algorithm trains on a fixed handful of train prompts
   (`--memorize` of them) and is validated on those same prompts. A rising reward and greedy accuracy
   there show that the loss reaches z and the update follows the reward (trl's loss included).
2. **Does that carry to unseen prompts?** The same algorithms on the whole train split, validated on
   the domain's val split, at each `--learning-rates`.

`python -m benchmarks.rl_diagnosis DOMAIN` writes `reports/objective_study/DOMAIN_rl_diagnosis.json`
and two charts beside it (`..._reward.png`: reward per step in check 1; `..._val.png`: val accuracy
in check 2). Needs the stage's outputs (`dvc repro train_expert@DOMAIN`). A study, not a stage.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bayes_llm import paths
from bayes_llm.config import ExpertParams, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.experts.trainer import Trainer
from bayes_llm.io import write_json
from bayes_llm.model.load import load_base
from bayes_llm.plots import line_plot
from bayes_llm.stages.train_expert import expert_domains
from bayes_llm.svf.decompose import check_base, load_factors
from bayes_llm.svf.expert import load_expert
from bayes_llm.svf.scaling import SVF

REPORT_DIR = paths.REPORTS / "objective_study"
# Sampled groups for every algorithm, so they differ only in how a group becomes a loss.
SAMPLED = {"num_generations": 8, "temperature": 1.0}
ALGORITHMS = {
    "reinforce (group baseline)": {"rl_algorithm": "reinforce", "baseline": True},
    "trl grpo (dapo loss)": {"rl_algorithm": "grpo"},
    "trl rloo": {"rl_algorithm": "rloo"},
}


class _Runs:
    """The base, its factors and the start z, loaded once; `run` trains a copy of the start z."""

    def __init__(self, params, domain: str) -> None:
        self.params = params
        self.kind = expert_domains(params, domain)[domain]["answer_kind"]
        self.tokens = params.base_eval.max_new_tokens[self.kind]
        self.model, self.tokenizer = load_base()
        self.factors, self.manifest = load_factors(paths.SVD)
        check_base(self.model, self.manifest, paths.SVD)
        self.start_z = load_expert(paths.expert_file(domain), self.manifest).z

    def run(self, train: list[dict], val: list[dict], cfg: ExpertParams) -> dict:
        svf = SVF(self.model, self.factors, mode=self.params.svf.mode, max_mult=self.params.svf.max_mult)
        svf.load_z(self.start_z)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as checkpoints:
            result = Trainer(svf, self.tokenizer, self.kind, train, val, cfg, self.params.seed, Path(checkpoints),
                             self.manifest["svd_fingerprint"], self.tokens, progress=False,
                             log=lambda _: None).run()  # fmt: skip
        svf.detach()
        rl = [r for r in result.curve if "reward" in r]
        return {
            "seconds": round(time.perf_counter() - started, 1),
            "val_start": round(result.base_val, 4),
            "val_best": round(result.best_val, 4),
            "val_curve": [[r["step"], round(r["val_accuracy"], 4)] for r in result.curve if "val_accuracy" in r],
            "reward": [round(r["reward"], 4) for r in rl],
            "grad_norm_mean": round(sum(r.get("grad_norm", 0.0) for r in rl) / max(len(rl), 1), 5),
        }


def _mean_of(values: list[float], part: slice) -> float:
    chosen = values[part]
    return round(sum(chosen) / max(len(chosen), 1), 4)


def diagnose(params_path: Path, domain: str, memorize: int, steps: int, learning_rates: list[float],
             rl_batch_size: int) -> dict:  # fmt: skip
    params = load_params(params_path)
    if domain not in params.experts:
        raise UserError(f"no experts.{domain} in {params_path}")
    if memorize < 1 or steps < 2:
        raise UserError("--memorize must be at least 1 and --steps at least 2")
    train = prepared.read_split(paths.DATA, domain, "train")
    val = prepared.read_split(paths.DATA, domain, "val")
    runs = _Runs(params, domain)
    base_cfg = params.experts[domain].model_dump()
    every = max(1, steps // 3)

    def cfg(changes: dict, lr: float) -> ExpertParams:
        return ExpertParams.model_validate({**base_cfg, "objective": "rl", "rl_steps": steps, "rl_learning_rate": lr,
                                            "rl_batch_size": rl_batch_size, "eval_every": every, **SAMPLED,
                                            **changes})  # fmt: skip

    fixed = train[:memorize]
    memorized, general = {}, {}
    for name, changes in ALGORITHMS.items():
        run = runs.run(fixed, fixed, cfg(changes, max(learning_rates)))
        memorized[name] = {**run, "reward_first_quarter": _mean_of(run["reward"], slice(0, steps // 4)),
                           "reward_last_quarter": _mean_of(run["reward"], slice(-(steps // 4), None))}  # fmt: skip
        print(f"memorize {name}: reward {memorized[name]['reward_first_quarter']} -> "
              f"{memorized[name]['reward_last_quarter']}, greedy {run['val_start']} -> {run['val_best']}", flush=True)
        for lr in learning_rates:
            run = runs.run(train, val, cfg(changes, lr))
            general[f"{name}, lr {lr:g}"] = run
            print(f"generalize {name} lr {lr:g}: val {run['val_curve']}", flush=True)
    report = {
        "domain": domain,
        "start": f"the stage's expert z ({paths.expert_file(domain).name})",
        "steps": steps,
        "rl_batch_size": rl_batch_size,
        "sampling": SAMPLED,
        "memorize": {"prompts": memorize, "learning_rate": max(learning_rates), "runs": memorized},
        "generalize": {"train_prompts": len(train), "val_items": min(len(val), params.experts[domain].val_items),
                       "runs": general},
    }  # fmt: skip
    write_json(REPORT_DIR / f"{domain}_rl_diagnosis.json", report)
    line_plot({name: _smoothed(run["reward"]) for name, run in memorized.items()},
              REPORT_DIR / f"{domain}_rl_diagnosis_reward.png",
              f"{domain}: RL on {memorize} fixed prompts (reward, mean of 5 steps)", "step", "reward")  # fmt: skip
    line_plot({name: [tuple(p) for p in run["val_curve"]] for name, run in general.items()},
              REPORT_DIR / f"{domain}_rl_diagnosis_val.png", f"{domain}: RL on the train split", "step",
              "val accuracy (greedy)")  # fmt: skip
    return report


def _smoothed(values: list[float], window: int = 5) -> list[tuple[int, float]]:
    return [(i + 1, sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1]))
            for i in range(len(values))]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rl_diagnosis",
        description="From the stage's expert z of DOMAIN: does each RL algorithm (our REINFORCE with a group "
        "baseline, trl GRPO, trl RLOO; sampled groups) raise the reward on a few fixed prompts, and does it "
        "raise val accuracy when trained on the whole train split? Writes "
        "reports/objective_study/DOMAIN_rl_diagnosis.{json,_reward.png,_val.png}.",
    )
    parser.add_argument("domain")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--memorize", type=int, default=16, help="fixed train prompts of check 1")
    parser.add_argument("--steps", type=int, default=30, help="RL steps of every run")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 1e-2],
                        help="check 2's learning rates; check 1 uses the largest")  # fmt: skip
    parser.add_argument("--rl-batch-size", type=int, default=16, help="prompts per step")
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.params, args.domain, args.memorize, args.steps, args.learning_rates,
                          args.rl_batch_size)  # fmt: skip
    except UserError as error:
        print(f"rl_diagnosis: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps({name: [run["val_start"], run["val_best"]] for name, run in report["generalize"]["runs"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
