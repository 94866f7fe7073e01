"""Does RL beat next-token training here, at equal compute? The same domain's z trained with each
objective and RL algorithm, from the same base, over several seeds, scored on the domain's test split
against the base.

`python -m benchmarks.objective_study DOMAIN` writes `reports/objective_study/DOMAIN.{json,md}`.
Each variant starts from `experts.DOMAIN` in params.yaml and changes only what names it; nothing here
is chosen on the test split (each run keeps its best z on val, as the stage does).

Equal compute: with `--budget-seconds S` every variant gets S seconds of training steps. Its steps
are set from a timing run on this machine (the step time measured between a 2-step and a 6-step run,
which cancels validation and set-up), so `sft+rl` spends S/2 on each phase. The steps are recorded:
`--steps VARIANT=N` (repeatable) replays a report's steps exactly on any machine. Without a budget
the variants keep the configured steps (`--rl-steps` for the RL-only ones).

`--variants NAME ...` runs only those, `--set KEY=VALUE` changes an expert param in every run (after
the variant's own changes) and `--tag T` writes `DOMAIN_T.{json,md}` instead, so a pilot keeps the
study's report. Each `sft+rl` run also reports the RL phase's own test gain over its SFT z, for the z
val kept and for the RL phase's last z (what RL did before val chose).

A study, not a stage: it lives outside `bayes_llm/experts` and `reports/experts` (inputs of the
`train_expert` and `evaluate` stages) so that running or editing it never makes them stale.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml
from pydantic import ValidationError

from bayes_llm import paths
from bayes_llm.config import ExpertParams, Params, load_params, validation_problems
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
from benchmarks import provenance

REPORT_DIR = paths.REPORTS / "objective_study"
# Sampled-group settings for trl's algorithms (greedy rollouts give a group no variance to learn from).
SAMPLED = {"num_generations": 4, "temperature": 0.7, "rl_batch_size": 8, "rl_learning_rate": 3e-3}
# Our REINFORCE on sampled groups with the group-mean baseline, at the settings of the 400-step math
# runs (rl_diagnosis): 16 prompts x 8 completions at temperature 1.0, lr 0.01.
SAMPLED_REINFORCE = {"rl_algorithm": "reinforce", "num_generations": 8, "temperature": 1.0, "baseline": True,
                     "rl_batch_size": 16, "rl_learning_rate": 1e-2}  # fmt: skip
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
TIMING_STEPS = (2, 6)
MAX_STEPS = 5_000  # a budget that asks for more is a mistyped one (or a timing gone wrong)


def check_tag(tag: str | None) -> None:
    """A pilot's `--tag` names report files: letters, digits, - and _ only."""
    if tag is not None and not tag.replace("-", "").replace("_", "").isalnum():
        raise UserError(f"--tag must be letters, digits, - or _ (got {tag!r})")


def curve_mean(records: list[dict], key: str, digits: int) -> float | None:
    """Mean of `key` over RL curve records; None unless every record has it (a step that logged no
    gradient norm must not read as a zero gradient)."""
    if not records or not all(key in r for r in records):
        return None
    return round(statistics.fmean(r[key] for r in records), digits)


def variants(cfg: ExpertParams, rl_steps: int) -> dict[str, dict]:
    """name → changes to the domain's params; RL-only runs get `rl_steps`, sft+rl keeps its own."""
    rl_only = {"objective": "rl", "rl_steps": rl_steps}
    return {
        "sft": {"objective": "sft"},
        "rl (reinforce, greedy ±1)": {**rl_only, "rl_algorithm": "reinforce"},
        "rl (trl grpo, dapo loss)": {**rl_only, "rl_algorithm": "grpo", **SAMPLED},
        "rl (trl rloo)": {**rl_only, "rl_algorithm": "rloo", **SAMPLED},
        f"sft+rl ({cfg.rl_algorithm}, the default)": {"objective": "sft+rl"},
        "sft+rl (trl rloo)": {"objective": "sft+rl", "rl_algorithm": "rloo", **SAMPLED},
        "sft+rl (reinforce, sampled groups, baseline)": {"objective": "sft+rl", **SAMPLED_REINFORCE},
        "rl (reinforce, sampled groups, baseline)": {**rl_only, **SAMPLED_REINFORCE},
    }


def variant_params(base: ExpertParams, name: str, changes: dict, overrides: dict) -> ExpertParams:
    """The domain's params with a variant's changes, then `--set`'s; a clear error where they clash."""
    try:
        return ExpertParams.model_validate({**base.model_dump(), **changes, **overrides})
    except ValidationError as error:
        raise UserError(f"variant {name!r} with --set {overrides}: {validation_problems(error)}") from None


@contextmanager
def composed(svf: SVF, z: dict[str, torch.Tensor], factors) -> Iterator[None]:
    """The model's weights composed with z, as the stage scores an expert: z's scales from the attached
    `svf` (detached here), the weights composed once and restored when the block ends."""
    svf.load_z(z)
    scales = svf.scales()
    svf.detach()
    composer = Composer(svf.model, factors)
    composer.merge(scales)
    try:
        yield
    finally:
        composer.unmerge()


def composed_scores(svf: SVF, z: dict[str, torch.Tensor], factors, tokenizer, kind: str, rows: list[dict],
                    tokens: int, batch_size: int) -> list[float]:  # fmt: skip
    """Greedy correctness of z on `rows` with the weights composed (`composed`)."""
    with composed(svf, z, factors):
        return greedy_scores(svf.model, tokenizer, kind, rows, tokens, batch_size)


class _Study:
    """The base, its factors and the domain's splits, loaded once for every run."""

    def __init__(self, params: Params, domain: str, progress: bool) -> None:
        self.params, self.domain, self.progress = params, domain, progress
        self.kind = expert_domains(params, domain)[domain]["answer_kind"]
        self.tokens = params.base_eval.max_new_tokens[self.kind]
        self.train, self.val, self.test = (prepared.read_split(paths.DATA, domain, s) for s in ("train", "val", "test"))
        self.model, self.tokenizer = load_base()
        self.factors, self.manifest = load_factors(paths.SVD)
        check_base(self.model, self.manifest, paths.SVD)
        self.base = base_test_scores(paths.BASE, domain, self.test, self.tokens)

    def svf(self) -> SVF:
        return SVF(self.model, self.factors, mode=self.params.svf.mode, max_mult=self.params.svf.max_mult)

    def train_z(self, cfg: ExpertParams, seed: int):
        svf = self.svf()
        with tempfile.TemporaryDirectory() as checkpoints:  # every run trains from the start
            trainer = Trainer(svf, self.tokenizer, self.kind, self.train, self.val, cfg, seed, Path(checkpoints),
                              self.manifest["svd_fingerprint"], self.tokens, self.progress,
                              log=lambda _: None)  # fmt: skip
            result = trainer.run()
        return svf, result

    def test_scores(self, svf: SVF, z) -> list[float]:
        return composed_scores(svf, z, self.factors, self.tokenizer, self.kind, self.test, self.tokens,
                               self.params.experts[self.domain].eval_batch_size)  # fmt: skip

    def step_seconds(self, cfg: ExpertParams, phase: str, rounds: int = 3) -> float:
        """Seconds per training step of `phase` under `cfg`, from a 2-step and a 6-step run after a
        discarded 1-step one (imports, first-call warm-up): their difference cancels validation and
        set-up. On a busy machine the difference can come out at or below zero: the runs are timed again
        (up to `rounds` times), each run's fastest time kept. RL is timed from z = 1, not from an SFT z."""
        fastest = {steps: float("inf") for steps in TIMING_STEPS}
        for round_ in range(rounds):
            for steps in (1, *TIMING_STEPS) if round_ == 0 else TIMING_STEPS:
                timed = ExpertParams.model_validate({**cfg.model_dump(), "objective": phase, f"{phase}_steps": steps,
                                                     "eval_every": 10_000})  # fmt: skip
                started = time.perf_counter()
                svf, _ = self.train_z(timed, self.params.seed)
                elapsed = time.perf_counter() - started
                svf.detach()
                if steps in fastest:
                    fastest[steps] = min(fastest[steps], elapsed)
            per_step = (fastest[TIMING_STEPS[1]] - fastest[TIMING_STEPS[0]]) / (TIMING_STEPS[1] - TIMING_STEPS[0])
            if per_step > 0:
                return per_step
        raise UserError(f"timing {phase} steps gave {per_step:.3f} s per step in {rounds} rounds (a busy "
                        "machine?): rerun, or give the steps with --steps")  # fmt: skip


def _equal_compute(study: _Study, cfg: ExpertParams, budget: float) -> tuple[dict[str, int], dict[str, float]]:
    """Steps per phase so that the run trains for `budget` seconds (halved between sft and rl)."""
    phases = [p for p in ("sft", "rl") if p in cfg.objective]
    timing = {p: round(study.step_seconds(cfg, p), 3) for p in phases}
    steps = {p: max(1, round(budget / len(phases) / timing[p])) for p in phases}
    if max(steps.values()) > MAX_STEPS:
        raise UserError(f"{budget:g} s would be {steps} steps at {timing} s per step: more than {MAX_STEPS}")
    return steps, timing


def _aggregate(study: _Study, runs: list[dict]) -> dict:
    """Mean gain over seeds with a 95 % t-interval across seeds, and a paired bootstrap of the
    seed-averaged item scores against the base (the item-sampling CI)."""
    averaged = _seed_averaged(runs, "scores")
    return {
        "seeds": [run["seed"] for run in runs],
        **_across_seeds([run["gain"]["gain_points"] for run in runs]),
        "pooled": paired_bootstrap(study.base, averaged, seed=study.params.seed),
        "train_seconds_mean": round(statistics.fmean(run["train_seconds"] for run in runs), 1),
        **_rl_over_sft(runs, study.params.seed),
    }


def _seed_averaged(runs: list[dict], key: str) -> list[float]:
    """Each test item's score averaged over the seeds' runs."""
    return [statistics.fmean(scores) for scores in zip(*(run[key] for run in runs), strict=True)]


def _across_seeds(gains: list[float]) -> dict:
    """Per-seed gains, their mean and its 95 % t-interval across seeds (none for one seed)."""
    mean = statistics.fmean(gains)
    half = T_975.get(len(gains) - 1, 1.96) * statistics.stdev(gains) / len(gains) ** 0.5 if len(gains) > 1 else None
    return {
        "gain_points_per_seed": gains,
        "gain_points_mean": round(mean, 2),
        "seed_ci_low": None if half is None else round(mean - half, 2),
        "seed_ci_high": None if half is None else round(mean + half, 2),
    }


def _rl_over_sft(runs: list[dict], seed: int) -> dict:
    """The RL phase's test gain over the SFT z it started from (sft+rl runs), for the z kept and for the
    RL phase's last z: across seeds, and pooled (the seed-averaged item scores against those of the SFT
    z, paired bootstrap)."""
    runs = [run for run in runs if "rl_gain_over_sft" in run]
    if not runs:
        return {}
    sft = _seed_averaged(runs, "sft_scores")
    summary = {}
    for name, gain, scores in (("rl_over_sft", "rl_gain_over_sft", "scores"),
                               ("rl_last_over_sft", "rl_last_gain_over_sft", "last_scores")):
        summary[name] = {**_across_seeds([run[gain]["gain_points"] for run in runs]),
                         "pooled": paired_bootstrap(sft, _seed_averaged(runs, scores), seed=seed)}
    return summary


def compare_objectives(params: Params, domain: str, rl_steps: int = 60, seeds: list[int] | None = None,
                       budget_seconds: float | None = None, fixed_steps: dict[str, dict[str, int]] | None = None,
                       progress: bool = True, only: list[str] | None = None, overrides: dict | None = None,
                       tag: str | None = None, origin: dict | None = None) -> dict:  # fmt: skip
    if rl_steps < 1:
        raise UserError(f"--rl-steps must be at least 1 (got {rl_steps})")
    if budget_seconds is not None and budget_seconds <= 0:
        raise UserError(f"--budget-seconds must be positive (got {budget_seconds})")
    check_tag(tag)
    seeds, overrides = seeds or [params.seed], overrides or {}
    expert_domains(params, domain)  # an unknown domain fails here, before the base loads
    base_cfg = params.experts[domain]
    table = variants(base_cfg, rl_steps)
    unknown = sorted((set(fixed_steps or {}) | set(only or [])) - set(table))
    if unknown:
        raise UserError(f"--steps or --variants names no variant: {unknown} (variants: {list(table)})")
    table = {name: changes for name, changes in table.items() if not only or name in only}
    configs = {name: variant_params(base_cfg, name, changes, overrides) for name, changes in table.items()}
    study = _Study(params, domain, progress)
    results = []
    for name, changes in table.items():
        cfg = configs[name]
        step_seconds = None
        if fixed_steps and name in fixed_steps:
            steps = fixed_steps[name]
        elif budget_seconds is not None:
            steps, step_seconds = _equal_compute(study, cfg, budget_seconds)
        else:
            steps = None
        if steps:
            cfg = ExpertParams.model_validate({**cfg.model_dump(), **{f"{p}_steps": n for p, n in steps.items()}})
        runs = []
        for seed in seeds:
            svf, result = study.train_z(cfg, seed)
            last_z = svf.z()  # the last step's z, whether or not val kept it: before test_scores loads the best
            scores = study.test_scores(svf, result.best_z)
            rl = [r for r in result.curve if r["phase"] == "rl" and "reward" in r]
            over_sft = {}
            if result.sft_z is not None and "rl" in cfg.objective:  # the RL phase against the z it started from
                kept = result.best_z is not result.sft_z
                sft = study.test_scores(study.svf(), result.sft_z) if kept else scores
                # What RL did before val chose: its last z, scored unless it is the z kept.
                last_is_kept = all(torch.equal(last_z[n], result.best_z[n]) for n in last_z)
                last = scores if last_is_kept else study.test_scores(study.svf(), last_z)
                over_sft = {"rl_kept": kept,
                            "sft_test_accuracy": round(sum(sft) / len(sft), 4),
                            "rl_gain_over_sft": paired_bootstrap(sft, scores, seed=params.seed),
                            "rl_last_test_accuracy": round(sum(last) / len(last), 4),
                            "rl_last_gain_over_sft": paired_bootstrap(sft, last, seed=params.seed),
                            "sft_scores": sft, "last_scores": last}  # fmt: skip
            runs.append({
                "seed": seed,
                "steps": dict(result.phases),
                "train_seconds": round(result.seconds, 1),
                "train_precision": result.precision,  # bf16 falls back to fp32 without native bf16
                "val_accuracy": {"base": result.base_val, "best": result.best_val, "sft": result.sft_val},
                "test_accuracy": round(sum(scores) / len(scores), 4),
                "gain": paired_bootstrap(study.base, scores, seed=params.seed),
                "rl_reward_first_last": [rl[0]["reward"], rl[-1]["reward"]] if rl else None,
                "rl_grad_norm_mean": curve_mean(rl, "grad_norm", 6),
                "rl_zero_std_groups_mean": curve_mean(rl, "zero_std_groups", 4),
                **over_sft,
                "scores": scores,
            })  # fmt: skip
            if progress:
                print(f"{name}, seed {seed}: test {runs[-1]['test_accuracy']:.3f} "
                      f"(base {sum(study.base) / len(study.base):.3f})", flush=True)  # fmt: skip
        summary = _aggregate(study, runs)
        for run in runs:
            for key in ("scores", "sft_scores", "last_scores"):
                run.pop(key, None)
        results.append({"variant": name, "changes": changes, "steps": dict(runs[0]["steps"]),
                        "step_seconds": step_seconds, **summary, "runs": runs})  # fmt: skip
    report = {"domain": domain, "run": origin, "seeds": seeds, "budget_seconds": budget_seconds, "overrides": overrides,
              "base_test_accuracy": round(sum(study.base) / len(study.base), 4), "test_items": len(study.base),
              "variants": results, "started_from": base_cfg.model_dump()}  # fmt: skip
    stem = domain + (f"_{tag}" if tag else "")
    write_json(REPORT_DIR / f"{stem}.json", report)
    with atomic_path(REPORT_DIR / f"{stem}.md") as tmp:
        tmp.write_text(markdown(report))
    return report


def markdown(report: dict) -> str:
    budget = report["budget_seconds"]
    compute = f"equal compute: {budget:g} s of training steps each" if budget else "the configured steps"
    if report.get("overrides"):
        compute += f"; every run with {report['overrides']}"
    lines = [
        f"# Objectives compared: {report['domain']} (seeds {report['seeds']}, {report['test_items']} test items)",
        "",
        f"Base test accuracy {100 * report['base_test_accuracy']:.1f} %; {compute}. Each z keeps its best val "
        "step. Gain: mean over seeds with a 95 % t-interval across seeds; pooled: the seed-averaged item "
        "scores against the base (paired bootstrap). RL over SFT: an sft+rl run's test gain over its own SFT z "
        "(0 where RL never beat the SFT z on val), per seed, mean [seed CI] and pooled [95 % CI]; RL's last z "
        "over SFT: the same for the RL phase's last z, whether or not val kept it.",
        "",
        *provenance.markdown_lines(report.get("run")),
        "| variant | steps | train s | gain per seed | mean gain [seed CI] | pooled [95 % CI] | RL reward first→last "
        "| RL over SFT | RL's last z over SFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        steps = " + ".join(f"{phase} {n}" for phase, n in v["steps"].items())
        per_seed = ", ".join(f"{g:+.1f}" for g in v["gain_points_per_seed"])
        seed_ci = "" if v["seed_ci_low"] is None else f" [{v['seed_ci_low']:+.1f}, {v['seed_ci_high']:+.1f}]"
        pooled = v["pooled"]
        rewards = [r["rl_reward_first_last"] for r in v["runs"] if r["rl_reward_first_last"]]
        reward = "; ".join(f"{a:.2f} → {b:.2f}" for a, b in rewards) or "–"
        lines.append(f"| {v['variant']} | {steps} | {v['train_seconds_mean']:.0f} | {per_seed} | "
                     f"{v['gain_points_mean']:+.1f}{seed_ci} | {pooled['gain_points']:+.1f} "
                     f"[{pooled['ci_low']:+.1f}, {pooled['ci_high']:+.1f}] | {reward} | "
                     f"{_over_sft_cell(v.get('rl_over_sft'))} | "
                     f"{_over_sft_cell(v.get('rl_last_over_sft'))} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _over_sft_cell(over: dict | None) -> str:
    """'per seed; mean [seed CI]; pooled gain [95 % CI]' of an RL-over-SFT summary."""
    if not over:
        return "–"
    ci = "" if over["seed_ci_low"] is None else f" [{over['seed_ci_low']:+.1f}, {over['seed_ci_high']:+.1f}]"
    cell = ", ".join(f"{g:+.1f}" for g in over["gain_points_per_seed"]) + f"; {over['gain_points_mean']:+.1f}{ci}"
    pooled = over["pooled"]
    return cell + f"; pooled {pooled['gain_points']:+.1f} [{pooled['ci_low']:+.1f}, {pooled['ci_high']:+.1f}]"


def _steps_arg(value: str) -> tuple[str, dict[str, int]]:
    """'VARIANT=sft:120,rl:40' → (VARIANT, {sft: 120, rl: 40})."""
    name, _, spec = value.rpartition("=")
    try:
        steps = {phase: int(n) for phase, n in (part.split(":") for part in spec.split(","))}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{value!r}: expected VARIANT=sft:N,rl:M") from error
    if not name or not steps or set(steps) - {"sft", "rl"} or min(steps.values()) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected VARIANT=sft:N,rl:M with N, M >= 1")
    return name, steps


def _set_arg(value: str) -> tuple[str, object]:
    """'rl_learning_rate=1e-2' → ('rl_learning_rate', 0.01): the value read as JSON (1e-2 is a number
    there, a string to YAML 1.1), else as YAML (true, bf16)."""
    key, sep, raw = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{value!r}: expected KEY=VALUE, e.g. rl_learning_rate=0.02")
    try:
        return key.strip(), json.loads(raw)
    except ValueError:
        pass
    try:
        return key.strip(), yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"{value!r}: VALUE is neither JSON nor YAML ({error})") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.objective_study",
        description="From experts.DOMAIN in params.yaml, trains z with sft, rl (greedy REINFORCE, trl GRPO with its "
        "default DAPO loss, trl RLOO), sft+rl (the configured algorithm) and sft+rl with trl RLOO, on the same base, "
        "once per seed; each keeps its best val z. Scores each on DOMAIN's test split against the base (paired "
        "bootstrap), aggregates over seeds and writes reports/objective_study/DOMAIN.{json,md}. Needs "
        "`dvc repro decompose` first.",
        epilog="Equal compute, three seeds: --budget-seconds 60 --seeds 0 1 2 (about 6 x 3 x 75 s plus the timing "
        "runs on 2 cores for math).",
    )
    parser.add_argument("domain", help="a domain with an `experts.<domain>` entry in params.yaml")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--rl-steps", type=int, default=60, help="RL steps of the RL-only variants without a budget")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: params seed)")
    parser.add_argument("--budget-seconds", type=float, help="equal compute: seconds of training steps per run")
    parser.add_argument("--steps", type=_steps_arg, action="append", default=[],
                        help="VARIANT=sft:N,rl:M: a variant's steps as a report records them (repeatable)")  # fmt: skip
    parser.add_argument("--variants", nargs="+", metavar="NAME", help="only these variants (names as in the report)")
    parser.add_argument("--set", type=_set_arg, action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="an experts.DOMAIN param for every run, after the variant's changes, e.g. "
                        "rl_learning_rate=1e-2 (repeatable; VALUE is read as JSON, else YAML)")  # fmt: skip
    parser.add_argument("--tag", help="a pilot's name: writes DOMAIN_TAG.{json,md} instead of DOMAIN.{json,md}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    try:
        report = compare_objectives(load_params(args.params), args.domain, args.rl_steps, args.seeds,
                                    args.budget_seconds, dict(args.steps), progress=not args.quiet,
                                    only=args.variants, overrides=dict(args.overrides), tag=args.tag,
                                    origin=provenance.run_record(parser.prog, argv))  # fmt: skip
    except UserError as error:
        print(f"objective_study: {error}", file=sys.stderr)
        return error.exit_code
    print(json.dumps({v["variant"]: v["gain_points_mean"] for v in report["variants"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
