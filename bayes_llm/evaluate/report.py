"""What `evaluate` writes for people: the results table, the pictures, and reports/README.md, the page a
person reads first (what ran with which params, the table, the pictures, the time per stage)."""

from __future__ import annotations

import json
from pathlib import Path

from bayes_llm import paths
from bayes_llm.config import Params
from bayes_llm.io import atomic_path, write_json
from bayes_llm.plots import grouped_bars

EVAL_DIR = paths.EVAL_REPORTS


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


# What each column's score measures, by how it is scored (bayes_llm/evaluate/tasks).
MEASURES = {
    "number": "greedy exact match of the number after `####` (the first number when there is no `####`)",
    "code": "pass@1: the greedy program passes the item's tests in the sandbox",
    "letter": "greedy, the choice it names: the letter after `####` (the model may write its scan first), or the "
    "choice's text written out",
    "letter_loglik": "multiple choice by option log-likelihood (the letter right after `Answer:`; no writing)",
    "choice_text": "multiple choice by each choice's text, log-likelihood per character (lm-eval's acc_norm)",
}


def results_table(report: dict) -> str:
    """Rows: systems, then the chance level; columns: domains with an expert, their mean, then test-only
    tasks (e.g. transfer)."""
    experts = report["expert_domains"]
    others = [d for d in report["tasks"] if d not in experts]
    header = ["system", *experts, "mean", *others]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for system in report["systems"]:
        row, mean = report["scores"][system], report["means"][system]
        cells = [_pct(row[d]) for d in experts] + [f"**{_pct(mean)}**"] + [_pct(row[d]) for d in others]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    chance = report.get("chance")
    if chance:
        mean = sum(chance[d] for d in experts) / max(len(experts), 1)
        cells = [chance[d] for d in experts] + [mean] + [chance[d] for d in others]
        lines.append("| *chance* | " + " | ".join(f"*{_pct(c)}*" for c in cells) + " |")
    return "\n".join(lines)


def measures(report: dict) -> list[str]:
    """One line per column: the lm-eval task and metric, and what it measures."""
    lines = []
    for domain, task in report["tasks"].items():
        kind, how = report["answer_kinds"][domain], report["scorings"][domain]
        what = MEASURES.get(how, f"lm-eval's own task, {kind} answers")
        lines.append(f"- **{domain}**: `{task}`, metric `{report['metrics'][domain]}` — {what}; "
                     f"chance {_pct(report['chance'][domain])} %.")  # fmt: skip
    return lines


def gains_table(report: dict) -> str:
    tasks = list(report["tasks"])
    lines = ["| system | " + " | ".join(tasks) + " |", "|" + "---|" * (len(tasks) + 1)]
    for system, gains in report["gains"].items():
        cells = [f"{g['gain_points']:+.1f} [{g['ci_low']:+.1f}, {g['ci_high']:+.1f}]" for g in gains.values()]
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def target_check(report: dict) -> list[str]:
    """The issue's quality target, stated with the measured figures (met or not)."""
    means = report["means"]
    adaptive = [s for s in report["systems"] if s.startswith("adaptive:")]
    singles = [s for s in report["systems"] if s.startswith("expert:")]
    if not adaptive or not singles or "oracle" not in means:
        return []
    best = max(adaptive, key=means.__getitem__)
    single = max(singles, key=means.__getitem__)
    oracle = means["oracle"]
    return [
        f"- Best adaptive strategy: **{best}**, mean {_pct(means[best])} "
        f"(best single expert {single}: {_pct(means[single])}; oracle routing: {_pct(oracle)}).",
        f"- Adaptive ≥ best single expert: **{'met' if means[best] >= means[single] else 'missed'}**; "
        f"adaptive ≥ 97 % of oracle ({_pct(0.97 * oracle)}): "
        f"**{'met' if means[best] >= 0.97 * oracle else 'missed'}**.",
    ]


def stage_times(report: dict) -> list[tuple[str, float | None]]:
    """Each stage's `stage_seconds` from its timing file (none of them is a metric)."""
    files = {"prepare": paths.DATA_REPORTS / paths.TIMING, "base": paths.BASE_REPORTS / paths.TIMING,
             "decompose": paths.SVF_REPORTS / paths.TIMING}  # fmt: skip
    files |= {f"train_expert@{d}": paths.expert_report(d, "_" + paths.TIMING) for d in report["expert_domains"]}
    files |= {"train_lora": paths.LORA_REPORTS / paths.TIMING, "calibrate": paths.DISPATCH_REPORTS / paths.TIMING}
    rows = [(stage, _read(path).get("stage_seconds")) for stage, path in files.items()]
    return [*rows, ("evaluate", report["timing"]["stage_seconds"])]


def _listing(values: dict, fmt: str = "{}") -> str:
    return ", ".join(f"{key} {fmt.format(value)}" for key, value in values.items())


def _heldout_lines(heldout: dict | None) -> list[str]:
    """The dispatcher on prompts off its templates (reports/dispatch/metrics.json `heldout`)."""
    if not heldout:
        return []
    items = heldout["items"]
    lines = [
        f"  - Off the templates (routing benchmark, test part: {items['heldout']} held-out phrasings, "
        f"{items['mixed']} mixed, {items['other']} off-domain prompts): routing accuracy "
        f"{heldout['routing_accuracy']}, ECE {heldout['ece_before']} → {heldout['ece_after']}, `other` precision "
        f"{heldout['other_precision']} / recall {heldout['other_recall']}."
    ]
    answers = heldout.get("answers", {})
    if "heldout" in answers:
        gains = [
            f"on {kind} prompts {d['gain_points']:+} [{d['ci_low']:+}, {d['ci_high']:+}]"
            for kind in ("heldout", "mixed")
            if kind in answers
            for d in [answers[kind]["soft_minus_hard"]]
        ]
        lines.append(
            f"  - Answers there: adaptive (soft) / oracle = {answers['adaptive_over_oracle']} on held-out phrasings; "
            f"soft blend − hard top-1 {'; '.join(gains)} points."
        )
    return lines


def readme(report: dict, params: Params) -> str:
    base = _read(paths.BASE_REPORTS / "metrics.json")
    dispatch = _read(paths.DISPATCH_REPORTS / "metrics.json")
    data = _read(paths.DATA_REPORTS / "summary.json").get("domains", {})
    times = stage_times(report)
    total = sum(t for _, t in times if t is not None)
    splits = ("train", "val", "test")
    base_val = _listing({d: 100 * v for d, v in base.get("val_accuracy", {}).items()}, "{:.1f} %")
    base_chance = _listing({d: 100 * v for d, v in base.get("val_chance", {}).items()}, "{:.1f} %")
    tokens = params.evaluate.max_gen_toks
    cut = [f"- Every generated answer was cut at **{tokens} tokens** (`evaluate.max_gen_toks`), not each task's "
           "own length: a quick look, not comparable with a default run."] if tokens else []  # fmt: skip
    lines = [
        "# bayes-llm reports",
        "",
        "Written by the `evaluate` stage of `dvc repro` from the other stages' reports; every figure here",
        "comes from a file under `reports/` (the links say which). Compare runs with `dvc exp show` and",
        "`dvc metrics diff`.",
        "",
        "## What ran",
        "",
        f"- Profile **{params.profile}**, seed {params.seed}.",
        "- Data (train/val/test rows): "
        + ", ".join(f"{name} ({info['source']}, {info['answer_kind']}, "
                    + "/".join(str(info["rows"].get(s, 0)) for s in splits) + ")" for name, info in data.items())
        + " — [reports/data](data/).",
        f"- Base: {base.get('model_type', '?')} ({params.model.source}), {base.get('parameters', 0) / 1e6:.2f}M "
        f"parameters; on the val splits, greedy: {base_val} (code: pass@1 of its tests; chance {base_chance or '—'})"
        " — [reports/base](base/).",
        f"- Experts: SVF on `{params.svf.targets}` ({params.svf.mode}); "
        + ", ".join(f"{d}: {e.objective}" for d, e in params.experts.items())
        + " — [reports/experts](experts/).",
        f"- LoRA baseline: rank {params.evaluate.lora.rank} on {', '.join(params.evaluate.lora.targets)}, "
        f"{params.evaluate.lora.steps} SFT steps per domain — [reports/lora](lora/).",
        f"- Dispatcher: first pass `{dispatch.get('strategy')}`, routing accuracy {dispatch.get('routing_accuracy')}, "
        f"ECE {dispatch.get('ece_after')} on the test splits, blending `{params.dispatch.blending_mode}` — "
        "[reports/dispatch](dispatch/).",
        *_heldout_lines(dispatch.get("heldout")),
        "",
        "## Results (test splits, %)",
        "",
        "Every column is an lm-eval task; what its score measures:",
        "",
        *measures(report),
        *cut,
        "",
        "`mean` is over the domains that have an expert; a test-only task (transfer) has no expert, so oracle",
        "routing answers it with the base. *chance* is the score of guessing.",
        "",
        results_table(report),
        "",
        *target_check(report),
        "",
        "Gain over the base in points, [95 % paired bootstrap CI]:",
        "",
        gains_table(report) if report["gains"] else "(no base row evaluated)",
        "",
        "![scores](eval/scores.png)",
        "",
        "![gain over base](eval/gains.png)",
        "",
    ]
    if report["fewshot"]:
        lines += ["Few-shot CEM mixtures (α per expert; reward on the k examples):", ""]
        for task, found in report["fewshot"].items():
            note = " (taken from the test split and still scored)" if found["split"] == "test" else ""
            lines.append(f"- {task}: α {_listing(found['alpha'])}, reward {found['reward']} on {found['shots']} "
                         f"{found['split']} examples{note}")  # fmt: skip
        lines.append("")
    lines += [
        "## Time per stage (seconds, this machine)",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {name} | {'—' if t is None else t} |" for name, t in times],
        f"| **total** | **{total:.0f}** |",
        "",
        f"The total is the stages' own time ({total / 60:.1f} min); `dvc repro` adds its hashing and each stage's "
        "Python start-up, and a fresh clone about 2 minutes of installing (README, Quick start).",
        "",
        "Per system (evaluate, seconds): " + _listing(report["timing"]["systems_seconds"]),
        "",
    ]
    return "\n".join(lines)


def write_reports(report: dict, summary: dict[str, float], params: Params) -> None:
    write_json(EVAL_DIR / "summary.json", summary)
    write_json(EVAL_DIR / "gains.json", report["gains"])
    write_json(EVAL_DIR / "fewshot.json", report["fewshot"])
    write_json(EVAL_DIR / "timing.json", report["timing"])
    with atomic_path(EVAL_DIR / "results.md") as tmp:
        tmp.write_text("# Evaluation (test splits, %)\n\n" + results_table(report) + "\n\nGain over base "
                       "(points, [95 % CI]):\n\n" + (gains_table(report) or "") + "\n")  # fmt: skip
    scores = {s: {d: 100 * v for d, v in row.items()} for s, row in report["scores"].items()}
    grouped_bars(scores, EVAL_DIR / "scores.png", "test scores per domain", "score (%)")
    if report["gains"]:
        gains = {s: {d: g["gain_points"] for d, g in row.items()} for s, row in report["gains"].items()}
        spans = {s: {d: (g["ci_low"], g["ci_high"]) for d, g in row.items()} for s, row in report["gains"].items()}
        grouped_bars(gains, EVAL_DIR / "gains.png", "gain over the base (points, 95 % CI)", "points", spans)
    with atomic_path(paths.REPORTS_README) as tmp:
        tmp.write_text(readme(report, params))
