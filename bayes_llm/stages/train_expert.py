"""DVC stage `train_expert@<domain>`: base + svd + data/prepared + params experts.<domain>
→ models/experts/<domain>.safetensors, reports/experts/<domain>.{json,png}, the DVCLive curves and
<domain>_timing.json.

Trains z (`bayes_llm.experts.trainer`) and evaluates it against the base. The report holds base and
expert accuracy on every domain's test split (greedy; code is pass@1 in the sandbox; the base's
scores are those the base stage saved), the own-domain gain with a 95 % paired bootstrap CI, the gain
on the other domains (interference), for `sft+rl` the RL phase's own gain over the SFT z, and the
objective, steps and the step of the kept z. Seconds go to <domain>_timing.json, a cached output (DVC
keeps no run-cache entry for a stage with plain `cache: false` outputs, and the retrain flow restores
experts trained elsewhere from it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.io import staged_dir, write_json
from bayes_llm.stats import paired_bootstrap


def expert_domains(params: Params, domain: str) -> dict[str, dict]:
    """The prepared domains by name, once `domain` has an `experts` entry and a train split; else a clear error."""
    if domain not in params.experts:
        raise UserError(f"no `experts.{domain}` entry in params.yaml (experts: {', '.join(params.experts) or 'none'})")
    infos = {d["name"]: d for d in prepared.domains()}
    if domain not in infos or infos[domain]["test_only"]:
        trainable = [n for n, d in infos.items() if not d["test_only"]]
        raise UserError(f"experts.{domain}: not a prepared domain with a train split (have: {', '.join(trainable)})")
    return infos


def train_expert(params: Params, domain: str, progress: bool = True) -> dict | None:
    """Train, evaluate and save `domain`'s expert; its report (None in a helper process of a
    distributed run: process 0 evaluates and writes)."""
    from bayes_llm.evaluate.base_scores import base_test_scores
    from bayes_llm.experts.distributed import Shards
    from bayes_llm.experts.trainer import Trainer
    from bayes_llm.model.greedy import greedy_scores
    from bayes_llm.model.load import load_base
    from bayes_llm.plots import expert_curves
    from bayes_llm.svf.decompose import check_base, load_factors
    from bayes_llm.svf.expert import Expert, save_expert
    from bayes_llm.svf.scaling import SVF, Composer

    infos = expert_domains(params, domain)
    cfg = params.experts[domain]
    started = time.perf_counter()
    shards = Shards.from_launcher(params.distributed.shares)
    model, tokenizer = load_base()
    factors, manifest = load_factors(paths.SVD)
    check_base(model, manifest, paths.SVD)
    kind = infos[domain]["answer_kind"]
    tokens = params.base_eval.max_new_tokens
    train_rows = prepared.read_split(paths.DATA, domain, "train")
    val_rows = prepared.read_split(paths.DATA, domain, "val")
    evaluated = [n for n, d in infos.items() if not d["test_only"]]
    tests = {other: prepared.read_split(paths.DATA, other, "test") for other in evaluated}
    # Read before training, so a stale or missing score file fails at once, not after minutes of training.
    base_hits = {other: base_test_scores(paths.BASE, other, rows, tokens[infos[other]["answer_kind"]])
                 for other, rows in tests.items()}  # fmt: skip

    cloze = prepared.scored_by_choice_text(infos[domain])  # validated as its test task scores it
    svf = SVF(model, factors, mode=params.svf.mode, max_mult=params.svf.max_mult)
    trainer = Trainer(svf, tokenizer, kind, train_rows, val_rows, cfg, params.seed, paths.expert_checkpoint(domain),
                      manifest["svd_fingerprint"], tokens[kind], progress, shards=shards, cloze=cloze)  # fmt: skip
    result = trainer.run()
    if not shards.main:
        return None
    scales = {}
    for name, z in (("expert", result.best_z), ("sft", result.sft_z)):
        if z is not None:
            svf.load_z(z)
            scales[name] = svf.scales()
    svf.detach()

    composer = Composer(model, factors)
    headroom = _headroom(model, tokenizer, composer, kind, trainer.val_rows, cfg, result, scales.get("sft"),
                         tokens[kind], params.seed, cloze)  # fmt: skip
    hits: dict[str, dict[str, list[float]]] = {other: {"base": base_hits[other]} for other in tests}
    for system in ["expert"] + (["sft"] if cfg.objective == "sft+rl" else []):
        if system == "sft" and _same_z(result.sft_z, result.best_z):  # RL never beat it on val: the same answers
            hits[domain]["sft"] = list(hits[domain]["expert"])
            continue
        composer.merge(scales[system])  # once per system: composing every target matrix takes about a second
        for other, rows in tests.items():
            if system == "expert" or other == domain:  # the SFT z only on its own domain
                other_kind = infos[other]["answer_kind"]
                hits[other][system] = greedy_scores(model, tokenizer, other_kind, rows, tokens[other_kind],
                                                    cfg.eval_batch_size)  # fmt: skip
    composer.unmerge()

    accuracy = {d: {s: round(sum(h) / len(h), 4) for s, h in systems.items()} for d, systems in hits.items()}
    own = hits[domain]
    report = {
        "domain": domain,
        "answer_kind": kind,
        "objective": cfg.objective,
        "rl_algorithm": cfg.rl_algorithm if "rl" in cfg.objective else None,
        "steps": result.steps,
        "phases": dict(result.phases),
        "kept_step": kept_step(result.curve, result.best_val),
        "resumed_from_step": result.resumed_from,
        "val_accuracy": {"base": result.base_val, "sft": result.sft_val, "expert": result.best_val},
        "val_metric": "cloze" if cloze else "greedy",  # the kept z's criterion (test accuracy is greedy)
        "test_accuracy": accuracy[domain],
        "gain": paired_bootstrap(own["base"], own["expert"], seed=params.seed),
        "interference": {
            d: {**accuracy[d], "gain": paired_bootstrap(h["base"], h["expert"], seed=params.seed)}
            for d, h in hits.items()
            if d != domain
        },
        "z_parameters": sum(z.numel() for z in result.best_z.values()),
    }
    if "sft" in own:
        report["rl_gain_over_sft"] = paired_bootstrap(own["sft"], own["expert"], seed=params.seed)
    if headroom:
        report["headroom"] = headroom
    if result.precision != cfg.train_precision:  # bf16 asked for, no native bf16 here (Trainer)
        report["train_precision_used"] = result.precision

    expert = Expert(
        domain=domain,
        mode=params.svf.mode,
        max_mult=params.svf.max_mult,
        z=result.best_z,
        base_fingerprint=manifest["base_fingerprint"],
        svd_fingerprint=manifest["svd_fingerprint"],
        training={"seed": params.seed, **cfg.model_dump()},
        metrics={"test_accuracy": accuracy[domain], "gain": report["gain"]},
    )
    save_expert(expert, paths.expert_file(domain))
    curves = training_curves(result.curve)
    log_curves(curves, paths.expert_live(domain))
    expert_curves(curves, report["kept_step"], result.best_val, paths.expert_report(domain, ".png"),
                  f"{domain} expert ({cfg.objective})")  # fmt: skip
    timing = {"train_seconds": round(result.seconds, 1), "stage_seconds": round(time.perf_counter() - started, 1)}
    write_json(paths.expert_report(domain), report)
    write_json(paths.expert_report(domain, "_" + paths.TIMING), timing)
    trainer.finished()
    return report | timing


def _same_z(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[name], b[name]) for name in a)


def _headroom(model, tokenizer, composer, kind: str, val_rows: list[dict], cfg, result, sft_scales, tokens: int,
              seed: int, cloze: bool) -> dict | None:  # fmt: skip
    """pass@1 and pass@k on val of the base and of the SFT z (None without one): how much RL can gain.
    pass@1 is the greedy val accuracy the trainer measured on these rows (measured here when the trainer
    validated by cloze)."""
    from bayes_llm.experts.headroom import pass_at_k
    from bayes_llm.model.greedy import greedy_scores

    if cfg.headroom_k == 0:
        return None
    temperature = cfg.headroom_sampling_temperature

    def passk() -> float:
        return pass_at_k(model, tokenizer, kind, val_rows, cfg.headroom_k, temperature, tokens, cfg.eval_batch_size,
                         seed)  # fmt: skip

    def pass1(trained: float) -> float:
        if not cloze:
            return trained
        hits = greedy_scores(model, tokenizer, kind, val_rows, tokens, cfg.eval_batch_size)
        return round(sum(hits) / max(len(hits), 1), 4)

    out = {"k": cfg.headroom_k, "temperature": temperature, "items": len(val_rows),
           "base": {"pass1": pass1(result.base_val), "passk": passk()}, "sft": None}  # fmt: skip
    if sft_scales is not None:
        composer.merge(sft_scales)
        out["sft"] = {"pass1": pass1(result.sft_val), "passk": passk()}
        composer.unmerge()
    return out


REWARD_WINDOW = 10  # RL batch rewards are noisy (a handful of rollouts each): plotted as a trailing mean
Series = dict[str, list[tuple[int, float]]]


def training_curves(curve: list[dict]) -> Series:
    """The trainer's curve as metric series (name → [(step, value)]): the SFT loss, the RL batch reward
    (raw, its trailing mean, and the KL to the base where one was recorded) and greedy val accuracy
    (step 0: the base)."""
    rewards = [(r["step"], r["reward"]) for r in curve if r["phase"] == "rl" and "reward" in r]
    mean = [(step, sum(w for _, w in rewards[max(0, i + 1 - REWARD_WINDOW) : i + 1]) / min(i + 1, REWARD_WINDOW))
            for i, (step, _) in enumerate(rewards)]  # fmt: skip
    series = {
        "sft/loss": [(r["step"], r["loss"]) for r in curve if r["phase"] == "sft" and "loss" in r],
        "rl/reward": rewards,
        f"rl/reward_mean{REWARD_WINDOW}": mean,
        # no KL term, or trl's logs without one: no point, not a measured 0
        "rl/kl": [(r["step"], r["kl"]) for r in curve if r["phase"] == "rl" and r.get("kl") is not None],
        "val_accuracy": [(r["step"], r["val_accuracy"]) for r in curve if "val_accuracy" in r],
    }
    return {name: [(step, round(value, 6)) for step, value in points] for name, points in series.items() if points}


@contextlib.contextmanager
def _without_env(name: str):
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


def log_curves(series: Series, directory: Path) -> None:
    """The series through DVCLive (`plots/metrics/<name>.tsv` for `dvc plots`, `metrics.json` with each
    one's last value for `dvc exp show`), written whole once training is done: a resumed run logs
    exactly what an uninterrupted one does."""
    from dvclive import Live

    # Logged from a scratch directory outside the repository and its pipeline, then moved into place
    # whole: inside, DVCLive `git add`s untracked files in its directory under `dvc exp run`, and reads
    # git state (an uncommitted worker clone failed with "Empty git repo").
    with tempfile.TemporaryDirectory(prefix="bayes-llm-live-") as scratch, staged_dir(directory) as staging:
        with contextlib.chdir(scratch), _without_env("DVC_ROOT"), Live(".", dvcyaml=False, save_dvc_exp=False,
                                                                       report=None) as live:
            for step, name, value in sorted((step, name, value) for name, points in series.items()
                                            for step, value in points):  # fmt: skip
                live.step = step
                live.log_metric(name, value)
            live.make_summary()
        shutil.copytree(scratch, staging, dirs_exist_ok=True)


def kept_step(curve: list[dict], best_val: float) -> int:
    """The step whose z was kept: the first to reach the best val accuracy (the trainer keeps a z
    only when it is strictly better)."""
    return next(r["step"] for r in curve if "val_accuracy" in r and r["val_accuracy"] == best_val)


def _command(args: argparse.Namespace) -> int:
    from bayes_llm.experts.distributed import launched, relaunch

    params = load_params(args.params)
    if params.distributed.processes > 1 and not launched():
        expert_domains(params, args.domain)  # a bad domain fails here, not in every process
        quiet = ["--quiet"] if args.quiet else []
        processes = params.distributed.processes
        return relaunch(processes, ["bayes_llm", "--params", str(args.params), "train-expert", args.domain, *quiet])
    report = train_expert(params, args.domain, progress=not args.quiet)
    if report is None:
        return 0
    print(json.dumps({k: report[k] for k in ("domain", "objective", "test_accuracy", "gain", "kept_step",
                                             "train_seconds")}))  # fmt: skip
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("domain", help="a domain with an `experts.<domain>` entry in params.yaml")


STAGE = Stage(
    name="train-expert",
    dvc_name="train_expert",
    help="train one domain's SVF expert (DVC stage `train_expert@<domain>`)",
    description="Trains z for DOMAIN with params experts.DOMAIN (objective sft | rl | sft+rl), keeping the z with "
    "the best greedy val accuracy and checkpointing every experts.DOMAIN.checkpoint_every steps to "
    "models/checkpoints/DOMAIN (a killed run resumes there). With distributed.processes > 1 it runs as that many "
    "processes under `accelerate launch`, each on its share of every batch (data parallel, gloo). "
    "Then evaluates base and expert on every domain's test "
    "split and writes models/experts/DOMAIN.safetensors, reports/experts/DOMAIN.{json,png}, the training curves "
    "through DVCLive (reports/experts/live/DOMAIN: SFT loss, RL reward, val accuracy) and DOMAIN_timing.json.",
    run=_command,
    arguments=_arguments,
    deps=(paths.BASE, paths.SVD, paths.DATA),
    outs=(
        paths.expert_file("${key}"),
        *(paths.expert_report("${key}", suffix) for suffix in (".png", ".json", "_" + paths.TIMING)),
        paths.expert_live("${key}") / "plots" / "metrics",
        paths.expert_live("${key}") / "metrics.json",
    ),
)
