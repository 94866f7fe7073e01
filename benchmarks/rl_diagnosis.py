"""Why does the RL phase not move val? Two checks from the stage's expert z (the z it kept,
already past SFT):

1. **Can it raise reward at all?** Each RL algorithm trains on a fixed handful of train prompts
   (`--memorize` of them) and is validated on those same prompts. A rising reward and greedy accuracy
   there show that the loss reaches z and the update follows the reward (trl's loss included).
2. **Does that carry to unseen prompts?** The same algorithms on the whole train split, validated on
   the domain's val split, at each `--learning-rates`.

`python -m benchmarks.rl_diagnosis DOMAIN` writes `reports/objective_study/DOMAIN_rl_diagnosis.json`
and two charts beside it (`..._reward.png`: reward per step in check 1; `..._val.png`: val accuracy
in check 2); `--tag T` names them `DOMAIN_rl_diagnosis_T...` instead, so a pilot keeps the report.
`--algorithms reinforce --memorize 0` runs one algorithm and check 2 only (a long-budget run);
`--test-gain` also scores each check-2 run's kept z on the test split (greedy) against the start z,
with a paired bootstrap CI, since val also chose the kept step.
Needs the stage's outputs (`dvc repro train_expert@DOMAIN`). A study, not a stage.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from bayes_llm import paths
from bayes_llm.config import ExpertParams, load_params, validation_problems
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.experts.trainer import Trainer, TrainingError
from bayes_llm.io import write_json
from bayes_llm.model.load import load_base
from bayes_llm.plots import line_plot
from bayes_llm.stages.train_expert import expert_domains
from bayes_llm.stats import paired_bootstrap
from bayes_llm.svf.decompose import check_base, load_factors
from bayes_llm.svf.expert import load_expert
from bayes_llm.svf.scaling import SVF
from benchmarks import provenance
from benchmarks.objective_study import check_tag, composed_scores, curve_mean

REPORT_DIR = paths.REPORTS / "objective_study"
# Sampled groups for every algorithm (the default of --num-generations and --temperature). They still
# differ in more than the loss: our REINFORCE draws each step's prompts with replacement, trl's
# samplers without, each with its own seed.
SAMPLED = {"num_generations": 8, "temperature": 1.0}
# --algorithms NAME: (the report's label, the expert params that select it)
ALGORITHMS = {
    "reinforce": ("reinforce (group baseline)", {"rl_algorithm": "reinforce", "baseline": True}),
    "grpo": ("trl grpo (dapo loss)", {"rl_algorithm": "grpo"}),
    "rloo": ("trl rloo", {"rl_algorithm": "rloo"}),
}


class _Runs:
    """The base, its factors and the start z, loaded once; `run` trains a copy of the start z."""

    def __init__(self, params, domain: str, kind: str) -> None:
        self.params, self.kind = params, kind
        self.tokens = params.base_eval.max_new_tokens[self.kind]
        self.model, self.tokenizer = load_base()
        self.factors, self.manifest = load_factors(paths.SVD)
        check_base(self.model, self.manifest, paths.SVD)
        self.start_z = load_expert(paths.expert_file(domain), self.manifest).z

    def test_hits(self, z: dict[str, torch.Tensor], test: list[dict], batch_size: int) -> list[float]:
        """Greedy correctness of z on the test rows (the weights composed once, as the stage does)."""
        svf = SVF(self.model, self.factors, mode=self.params.svf.mode, max_mult=self.params.svf.max_mult)
        return composed_scores(svf, z, self.factors, self.tokenizer, self.kind, test, self.tokens, batch_size)

    def run(self, train: list[dict], val: list[dict], cfg: ExpertParams, test: Tested | None = None) -> dict:
        svf = SVF(self.model, self.factors, mode=self.params.svf.mode, max_mult=self.params.svf.max_mult)
        svf.load_z(self.start_z)
        started = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory() as checkpoints:
                result = Trainer(svf, self.tokenizer, self.kind, train, val, cfg, self.params.seed,
                                 Path(checkpoints), self.manifest["svd_fingerprint"], self.tokens, progress=False,
                                 log=lambda _: None).run()  # fmt: skip
        except TrainingError as error:  # a diverging run is a finding, not the end of the study
            return {"error": str(error), "reward": [], "val_curve": []}
        finally:
            svf.detach()
        seconds = round(time.perf_counter() - started, 1)  # training and val passes, not the test pass
        rl = [r for r in result.curve if "reward" in r]
        tested = {"test": test.gain(self.test_hits(result.best_z, test.rows, cfg.eval_batch_size))} if test else {}
        return {
            "seconds": seconds,
            "val_start": round(result.base_val, 4),
            "val_best": round(result.best_val, 4),
            "val_curve": [[r["step"], round(r["val_accuracy"], 4)] for r in result.curve if "val_accuracy" in r],
            "reward": [round(r["reward"], 4) for r in rl],
            "grad_norm_mean": curve_mean(rl, "grad_norm", 6),
            "zero_std_groups_mean": curve_mean(rl, "zero_std_groups", 4),
            **tested,
        }


@dataclass(frozen=True)
class Tested:
    """The test rows and the start z's greedy scores on them, the pair every kept z is measured against."""

    rows: list[dict]
    start: list[float]
    seed: int

    def gain(self, kept: list[float]) -> dict:
        return {"start": round(statistics.fmean(self.start), 4), "kept": round(statistics.fmean(kept), 4),
                "items": len(self.rows), "gain": paired_bootstrap(self.start, kept, seed=self.seed)}  # fmt: skip


def _quarters(rewards: list[float]) -> dict:
    """Mean reward of the first and the last quarter of the steps (one step each for short runs)."""
    quarter = max(1, len(rewards) // 4)
    first, last = rewards[:quarter], rewards[-quarter:]
    return {"reward_first_quarter": round(statistics.fmean(first), 4) if first else None,
            "reward_last_quarter": round(statistics.fmean(last), 4) if last else None}  # fmt: skip


def diagnose(params_path: Path, domain: str, memorize: int, steps: int, learning_rates: list[float],
             rl_batch_size: int, tag: str | None = None, algorithms: list[str] | None = None,
             eval_every: int | None = None, test_gain: bool = False, sampling: dict | None = None,
             origin: dict | None = None) -> dict:  # fmt: skip
    sampling = {**SAMPLED, **(sampling or {})}
    params = load_params(params_path)
    kind = expert_domains(params, domain)[domain]["answer_kind"]
    if eval_every is not None and eval_every < 1:
        raise UserError(f"--eval-every must be at least 1 (got {eval_every})")
    if steps < 2 or rl_batch_size < 1:
        raise UserError(f"--steps must be at least 2 and --rl-batch-size at least 1 (got {steps}, {rl_batch_size})")
    if any(not 0 < lr <= 10 for lr in learning_rates) or len(set(learning_rates)) < len(learning_rates):
        raise UserError(f"--learning-rates must be distinct values in (0, 10] (got {learning_rates})")
    check_tag(tag)
    unknown = sorted(set(algorithms or []) - set(ALGORITHMS))
    if unknown or algorithms == []:
        raise UserError(f"--algorithms: unknown {', '.join(unknown) or '(none given)'}; choose from "
                        f"{', '.join(ALGORITHMS)}")  # fmt: skip
    chosen = [a for a in ALGORITHMS if algorithms is None or a in algorithms]
    train = prepared.read_split(paths.DATA, domain, "train")
    val = prepared.read_split(paths.DATA, domain, "val")
    # trl's sampler drops a batch it cannot fill: fewer prompts than a batch would train nothing
    if memorize != 0 and not rl_batch_size <= memorize <= len(train):
        raise UserError(f"--memorize must be 0 (skip check 1) or between --rl-batch-size ({rl_batch_size}) and "
                        f"the train split's {len(train)} rows (got {memorize})")  # fmt: skip
    base_cfg = params.experts[domain].model_dump()
    every = eval_every or max(1, steps // 3)
    # every config is checked before minutes of training
    try:
        configs = {(name, lr): ExpertParams.model_validate({
            **base_cfg, "objective": "rl", "rl_steps": steps, "rl_learning_rate": lr, "rl_batch_size": rl_batch_size,
            "eval_every": every, **sampling, **ALGORITHMS[name][1]}) for name in chosen for lr in learning_rates}
    except ValidationError as error:
        raise UserError(f"--num-generations {sampling['num_generations']} --temperature {sampling['temperature']}: "
                        f"{validation_problems(error)}") from None  # fmt: skip
    runs = _Runs(params, domain, kind)  # fmt: skip
    test = None
    if test_gain:  # the start z first: a broken test split fails before minutes of training
        rows = prepared.read_split(paths.DATA, domain, "test")
        test = Tested(rows, runs.test_hits(runs.start_z, rows, params.experts[domain].eval_batch_size), params.seed)

    fixed = train[:memorize]
    memorized, general = {}, {}
    for name in chosen:
        label = ALGORITHMS[name][0]
        if memorize:
            run = runs.run(fixed, fixed, configs[name, max(learning_rates)])
            memorized[label] = {**run, **_quarters(run["reward"])}
            print(f"memorize {label}: reward {memorized[label]['reward_first_quarter']} -> "
                  f"{memorized[label]['reward_last_quarter']}, greedy {run.get('val_start')} -> {run.get('val_best')}",
                  flush=True)  # fmt: skip
        for lr in learning_rates:
            run = runs.run(train, val, configs[name, lr], test)
            general[f"{label}, lr {lr:g}"] = {**run, **_quarters(run["reward"])}
            print(f"generalize {label} lr {lr:g}: val {run['val_curve'] or run.get('error')}", flush=True)
    report = {
        "domain": domain,
        "run": origin,
        "start": f"the stage's expert z ({paths.expert_file(domain).name})",
        "seed": params.seed,
        "steps": steps,
        "rl_batch_size": rl_batch_size,
        "sampling": sampling,
        "eval_every": every,
        "memorize": {"prompts": memorize, "learning_rate": max(learning_rates) if memorize else None,
                     "runs": memorized},
        "generalize": {"train_prompts": len(train), "val_items": min(len(val), params.experts[domain].val_items),
                       "runs": general},
    }  # fmt: skip
    stem = f"{domain}_rl_diagnosis" + (f"_{tag}" if tag else "")
    write_json(REPORT_DIR / f"{stem}.json", report)
    if memorized:
        title = f"{domain}: RL on {memorize} fixed prompts (reward, mean of 5 steps)"
        line_plot({name: _smoothed(run["reward"]) for name, run in memorized.items()},
                  REPORT_DIR / f"{stem}_reward.png", title, "step", "reward")  # fmt: skip
    line_plot({name: [tuple(p) for p in run["val_curve"]] for name, run in general.items()},
              REPORT_DIR / f"{stem}_val.png", f"{domain}: RL on the train split", "step",
              "val accuracy (greedy)")  # fmt: skip
    return report


def _smoothed(values: list[float], window: int = 5) -> list[tuple[int, float]]:
    """(step, trailing mean over up to `window` steps)."""
    return [(i + 1, statistics.fmean(values[max(0, i - window + 1) : i + 1])) for i in range(len(values))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.rl_diagnosis",
        description="From the stage's expert z of DOMAIN: does each RL algorithm (our REINFORCE with a group "
        "baseline, trl GRPO, trl RLOO; sampled groups) raise the reward on a few fixed prompts, and does it "
        "raise val accuracy when trained on the whole train split? Writes "
        "reports/objective_study/DOMAIN_rl_diagnosis{.json,_reward.png,_val.png}.",
    )
    parser.add_argument("domain")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--memorize", type=int, default=16, help="fixed train prompts of check 1 (0: skip check 1)")
    parser.add_argument("--steps", type=int, default=30, help="RL steps of every run")
    parser.add_argument("--learning-rates", type=float, nargs="+", default=[1e-3, 1e-2],
                        help="check 2's learning rates; check 1 uses the largest")  # fmt: skip
    parser.add_argument("--rl-batch-size", type=int, default=16, help="prompts per step")
    parser.add_argument("--eval-every", type=int, help="steps between val passes (default: a third of --steps)")
    parser.add_argument("--algorithms", nargs="+", metavar="NAME",
                        help=f"the RL algorithms to run ({', '.join(ALGORITHMS)}; default: all)")  # fmt: skip
    parser.add_argument("--num-generations", type=int, default=SAMPLED["num_generations"],
                        help="completions per prompt (the group)")  # fmt: skip
    parser.add_argument("--temperature", type=float, default=SAMPLED["temperature"],
                        help="sampling temperature of the rollouts")  # fmt: skip
    parser.add_argument("--test-gain", action="store_true",
                        help="score each check-2 run's kept z on the test split against the start z")  # fmt: skip
    parser.add_argument("--tag", help="a pilot's name: writes DOMAIN_rl_diagnosis_TAG... beside the report")
    args = parser.parse_args(argv)
    try:
        report = diagnose(args.params, args.domain, args.memorize, args.steps, args.learning_rates,
                          args.rl_batch_size, args.tag, args.algorithms,
                          args.eval_every, args.test_gain,
                          {"num_generations": args.num_generations, "temperature": args.temperature},
                          provenance.run_record(parser.prog, argv))  # fmt: skip
    except UserError as error:
        print(f"rl_diagnosis: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps({name: [run.get("val_start"), run.get("val_best")]
                      for name, run in report["generalize"]["runs"].items()}))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
