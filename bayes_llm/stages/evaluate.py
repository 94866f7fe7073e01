"""DVC stage `evaluate`: every system on every prepared domain's test split (and the transfer task)
through lm-eval, side by side.

Writes reports/eval/: lm_eval/<system>.json (lm-eval's results and task configs), summary.json (flat
`<system>.<domain>` and `<system>.mean` scores for `dvc exp show`; mean = over the domains that have
an expert), gains.json (each system's gain over the base with paired bootstrap CIs), fewshot.json
(the mixture CEM found per task), timing.json, results.md, scores.png, gains.png; and reports/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.evaluate import CHOICE_SUFFIX, TASKS_DIR, WRITTEN_SUFFIX
from bayes_llm.io import staged_dir, write_json
from bayes_llm.stats import paired_bootstrap

REPORT_DIR = paths.EVAL_REPORTS
SHIPPED_KINDS = {"number": "_number", "code": "_code"}
# A letter domain that has an expert is scored in writing (greedy, the letter after '####', as the
# expert is trained and validated): its column; by option log-likelihood in a second column.
LOGLIK = "_loglik"


def domain_of(column: str) -> str:
    """The domain a results column scores: reasoning_loglik → reasoning."""
    return column.removesuffix(LOGLIK)


def scoring(column: str, task: str, kind: str) -> str:
    """How a column is scored: number | code | letter (written) | letter_loglik | choice_text (each choice's
    text by log-likelihood) | hub (lm-eval's own task)."""
    if not task.startswith("bayes_llm_"):
        return "hub"
    if task.endswith(WRITTEN_SUFFIX):
        return "letter"
    if task.endswith(CHOICE_SUFFIX):
        return "choice_text"
    return "letter_loglik" if kind == "letter" else kind


def expand_systems(systems: list[str], experts: list[str]) -> list[str]:
    out: list[str] = []
    for system in systems:
        out += [f"expert:{d}" for d in experts] if system == "expert:*" else [system]
    missing = [s for s in out if s.startswith("expert:") and s.split(":", 1)[1] not in experts]
    if missing:
        raise UserError(f"evaluate.systems names experts that do not exist: {missing} (experts: {experts})")
    return list(dict.fromkeys(out))


def slug(system: str) -> str:
    """A system's name in metric keys: expert:math → expert_math."""
    return system.replace(":", "_")


def _task_files(infos: list[dict], custom: dict[str, str], directory: Path, experts: list[str]) -> dict[str, str]:
    """results column → lm-eval task name: one per domain, plus `<domain>_loglik` for a letter domain
    with an expert; writes a task YAML (from the shipped template) for any that is not shipped."""
    tasks = {}
    for info in infos:
        name = info["name"]
        if name in custom:
            tasks[name] = custom[name]
            continue
        prepared.read_split(paths.DATA, name, "test")  # a clear error now, not a traceback in lm-eval
        # by each option's letter, or by its text (choice_answer: text; a task of its own name)
        options = ((f"bayes_llm_{name}{CHOICE_SUFFIX}", "_choice_text") if prepared.scored_by_choice_text(info)
                   else (f"bayes_llm_{name}", "_letter"))  # fmt: skip
        if info["answer_kind"] == "letter" and name in experts:
            columns = [(name, f"bayes_llm_{name}{WRITTEN_SUFFIX}", "_letter_gen"), (name + LOGLIK, *options)]
        elif info["answer_kind"] == "letter":
            columns = [(name, *options)]
        else:
            columns = [(name, f"bayes_llm_{name}", SHIPPED_KINDS[info["answer_kind"]])]
        for column, task, template in columns:
            tasks[column] = task
            shipped = task.removeprefix("bayes_llm_") + ".yaml"
            if not (TASKS_DIR / shipped).is_file():
                data = prepared.split_path(paths.DATA, name, "test")
                (directory / shipped).write_text(f"include: {(TASKS_DIR / template).resolve()}\ntask: {task}\n"
                                                 f"dataset_kwargs:\n  data_files:\n    test: {data}\n")  # fmt: skip
    # the domains' own columns first (the table puts the expert domains, then the others)
    return dict(sorted(tasks.items(), key=lambda item: item[0].endswith(LOGLIK)))


def primary_metric(result: dict) -> str:
    """The first metric lm-eval reports for a task (e.g. 'exact_match,none')."""
    for key in result:
        if "," in key and "_stderr" not in key:
            return key
    raise UserError(f"lm-eval returned no metric for a task: {sorted(result)}")


def _portable(results: dict) -> dict:
    """lm-eval records each task's YAML by absolute path: keep it relative to the project instead."""
    root = Path.cwd()
    for config in results.get("configs", {}).values():
        metadata = config.get("metadata") or {}
        source = metadata.get("config_source")
        if source and Path(source).is_relative_to(root):
            metadata["config_source"] = Path(source).relative_to(root).as_posix()
    return results


def per_item(samples: list[dict], metric: str) -> list[float]:
    """Each test item's score (in doc order) for paired comparisons; code items are judged here from
    the (program, tests) pairs (memoized: each program already ran once for pass@1)."""
    from bayes_llm.evaluate.scoring import passes

    ordered = sorted(samples, key=lambda s: s["doc_id"])
    values = [s[metric.split(",", 1)[0]] for s in ordered]
    if values and isinstance(values[0], (tuple, list)):
        return [float(v) for v in passes([(code, tuple(tests)) for code, tests in values])]
    return [float(v) for v in values]


def evaluate(params: Params, progress: bool = True) -> dict:
    # Offline, and a fresh datasets cache per run: a cache keyed on file paths could serve stale rows.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="bayes-llm-eval-") as scratch:
        os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "datasets")
        return _evaluate(params, Path(scratch), progress)


def _evaluate(params: Params, scratch: Path, progress: bool) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from bayes_llm.baselines.lora import LoraAdapters
    from bayes_llm.evaluate.lm import BayesLLM, FewShotSearch
    from bayes_llm.evaluate.report import write_reports
    from bayes_llm.inference.engine import Engine
    from bayes_llm.prompts import is_chat

    started = time.perf_counter()
    cfg = params.evaluate
    engine = Engine(paths.MODELS)
    systems = expand_systems(cfg.systems, engine.domains)
    infos = prepared.domains()
    tasks = _task_files(infos, cfg.tasks, scratch, engine.domains)
    hub_tasks = any(not task.startswith("bayes_llm_") for task in tasks.values())
    manager = TaskManager(include_path=[str(TASKS_DIR), str(scratch)], include_defaults=hub_tasks)
    search = params.dispatch.fewshot
    fewshot = FewShotSearch(engine, search.shots, {"population": search.population, "elites": search.elites,
                                                   "iterations": search.iterations, "per_layer": search.per_layer},
                            params.seed, params.base_eval.max_new_tokens)  # fmt: skip
    lora = LoraAdapters(paths.BASE) if "lora" in systems else None
    memo: dict = {}  # (weights, request) → result, shared by all systems
    scores: dict[str, dict[str, float]] = {}
    metrics: dict[str, str] = {}  # the metric each task is scored by (the same for every system)
    items: dict[str, dict[str, list[float]]] = {}
    timing: dict[str, float] = {}
    raw: dict[str, dict] = {}  # lm-eval's results per system, written together once all systems ran
    for system in systems:
        if progress:
            print(f"evaluate: {system}", flush=True)
        clock = time.perf_counter()
        model = BayesLLM(mode=system, engine=engine, results=memo, fewshot=fewshot, lora=lora,
                         blending_mode=params.dispatch.blending_mode, top_k=params.dispatch.top_k,
                         batch_size=cfg.batch_size)  # fmt: skip
        out = lm_eval.simple_evaluate(
            model=model, tasks=list(tasks.values()), task_manager=manager, bootstrap_iters=0, log_samples=True,
            random_seed=params.seed, numpy_random_seed=params.seed, torch_random_seed=params.seed,
            fewshot_random_seed=params.seed, verbosity="ERROR",
            gen_kwargs={"max_gen_toks": cfg.max_gen_toks} if cfg.max_gen_toks else None,
            apply_chat_template=is_chat(engine.tokenizer),  # an instruct checkpoint is asked in its chat turns
        )  # fmt: skip
        scores[system], items[system] = {}, {}
        for domain, task in tasks.items():
            result = out["results"][task]
            metric = metrics[domain] = primary_metric(result)
            scores[system][domain] = round(float(result[metric]), 4)
            items[system][domain] = per_item(out["samples"][task], metric)
        timing[system] = round(time.perf_counter() - clock, 1)
        kept = {k: out[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples")
                if k in out}  # fmt: skip
        # Task configs hold the metric functions: written by name (a repr would carry a memory address).
        raw[system] = _portable(
            json.loads(json.dumps(kept, default=lambda o: getattr(o, "__qualname__", None) or str(o)))
        )

    with staged_dir(REPORT_DIR / "lm_eval") as staging:
        for system, results in raw.items():
            write_json(staging / f"{slug(system)}.json", results)
    expert_domains = [d for d in tasks if d in engine.domains]
    means = {system: sum(scores[system][d] for d in expert_domains) / len(expert_domains) for system in systems}
    summary: dict[str, float] = {}
    for system in systems:
        for domain in tasks:
            summary[f"{slug(system)}.{domain}"] = scores[system][domain]
        summary[f"{slug(system)}.mean"] = round(means[system], 4)
    by_name = {info["name"]: info for info in infos}
    chance = {column: chance_level(by_name[domain_of(column)]) for column in tasks}
    summary |= {f"chance.{domain}": value for domain, value in chance.items()}
    summary["chance.mean"] = round(sum(chance[d] for d in expert_domains) / len(expert_domains), 4)
    gains = {}
    if "base" in systems:
        gains = {
            system: {d: paired_bootstrap(items["base"][d], items[system][d], cfg.bootstrap_resamples, params.seed)
                     for d in tasks}
            for system in systems if system != "base"
        }  # fmt: skip
    report = {
        "systems": systems,
        "tasks": tasks,
        "expert_domains": expert_domains,
        "scores": scores,
        "means": means,  # over expert_domains
        "chance": chance,
        "metrics": metrics,
        "answer_kinds": {column: by_name[domain_of(column)]["answer_kind"] for column in tasks},
        "scorings": {c: scoring(c, task, by_name[domain_of(c)]["answer_kind"]) for c, task in tasks.items()},
        "gains": gains,
        "fewshot": fewshot.results,
        "timing": {"systems_seconds": timing, "stage_seconds": round(time.perf_counter() - started, 1)},
    }
    write_reports(report, summary, params)
    return report


def chance_level(info: dict) -> float:
    """The score of guessing on a domain's test split: 1/(number of choices) averaged over its items
    for multiple choice; 0 for a number or a program, which a guess does not hit."""
    if info["answer_kind"] != "letter":
        return 0.0
    rows = prepared.read_split(paths.DATA, info["name"], "test")
    return round(sum(1 / len(row["choices"]) for row in rows) / len(rows), 4)


def _command(args: argparse.Namespace) -> int:
    from bayes_llm.evaluate.report import results_table

    print(results_table(evaluate(load_params(args.params), progress=not args.quiet)))
    return 0


STAGE = Stage(
    name="evaluate",
    dvc_name="evaluate",
    help="every system on every test split through lm-eval (DVC stage `evaluate`)",
    description="Runs lm-eval's tasks (bayes_llm/evaluate/tasks, or params evaluate.tasks) with the registered "
    "model `bayes-llm` once per system in params evaluate.systems: base, each expert, oracle routing, "
    "adaptive:prompt|cls|fewshot and the LoRA baseline. Writes reports/eval/ (lm-eval results, summary.json for "
    "`dvc exp show`, gains with paired bootstrap CIs, results.md, scores.png, gains.png) and reports/README.md.",
    run=_command,
    deps=(paths.BASE, paths.SVD, paths.EXPERTS, paths.DISPATCHER, paths.LORA, paths.DATA,
          # reports/README.md quotes these (and the stage times in them)
          paths.DATA_REPORTS / "summary.json", paths.BASE_REPORTS / "metrics.json",
          paths.SVF_REPORTS / "decompose.json", paths.EXPERT_REPORTS, paths.LORA_REPORTS / "metrics.json",
          paths.DISPATCH_REPORTS / "metrics.json",
          *(d / paths.TIMING for d in (paths.DATA_REPORTS, paths.BASE_REPORTS, paths.SVF_REPORTS, paths.LORA_REPORTS,
                                        paths.DISPATCH_REPORTS))),
    outs=(*(REPORT_DIR / f for f in ("lm_eval", "gains.json", "fewshot.json", "timing.json", "results.md",
                                     "scores.png", "gains.png", "summary.json")), paths.REPORTS_README),
)
