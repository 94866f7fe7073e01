"""Where RL's headroom is. pass@k − pass@1 bounds what RL on a correctness reward can turn into
greedy accuracy, but a guess can be right too: of 4 choices, 8 guesses name the right one 90 % of
the time. For each domain, the base and the stage's expert z on the val rows the stage validates on
(its headroom settings: k completions sampled at its temperature, its seed):

- greedy pass@1; the sampled completions' mean accuracy; pass@k; the majority vote of the k (maj@k:
  what sharpening the sampled distribution toward its mode would answer; not for code, whose
  programs are not grouped);
- for multiple-choice rows, what guessing reaches: 1/choices and 1 − (1 − 1/choices)^k;
- on the rows greedy gets wrong: the share of their samples that are right, whether one of the k
  is right, whether the majority is; on the rows greedy gets right: whether the majority is wrong;
- the same per subtask, where the rows name one (the synthetic domains do).

`python -m benchmarks.headroom [DOMAIN ...]` writes `reports/objective_study/headroom.{json,md}`;
`--temperature T` samples at T instead and `--tag NAME` writes `headroom_NAME.{json,md}`, so a pilot
keeps the report. Needs the stages' outputs (`dvc repro train_expert@DOMAIN`). A study, not a stage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence

from bayes_llm import paths
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.experts.headroom import sample
from bayes_llm.io import atomic_path, write_json
from bayes_llm.model.greedy import greedy_scores
from bayes_llm.model.load import load_base
from bayes_llm.stages.train_expert import expert_domains
from bayes_llm.svf.decompose import check_base, load_factors
from bayes_llm.svf.expert import load_expert
from bayes_llm.svf.scaling import SVF, Composer
from benchmarks.objective_study import check_tag

REPORT_DIR = paths.REPORTS / "objective_study"


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def chance(kind: str, rows: Sequence[dict], k: int) -> dict | None:
    """pass@1 and pass@k of a uniform guess among each row's choices (None: not multiple choice)."""
    if kind != "letter" or not all(row.get("choices") for row in rows):
        return None
    return {"pass1": _mean([1 / len(row["choices"]) for row in rows]),
            "passk": _mean([1 - (1 - 1 / len(row["choices"])) ** k for row in rows])}  # fmt: skip


def measure(model, tokenizer, kind: str, rows: list[dict], k: int, temperature: float, tokens: int, batch_size: int,
            seed: int) -> dict:  # fmt: skip
    """The headroom figures of the model's current weights on `rows` (see the module's docstring)."""
    greedy = greedy_scores(model, tokenizer, kind, rows, tokens, batch_size)
    drawn = sample(model, tokenizer, kind, rows, k, temperature, tokens, batch_size, seed)
    sampled = [statistics.fmean(hits) for hits in drawn.hits]
    any_right, voted = drawn.any_right(), drawn.majority_right()
    wrong = [i for i, hit in enumerate(greedy) if not hit]
    right = [i for i, hit in enumerate(greedy) if hit]
    subtasks: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get("subtask"):
            subtasks[str(row["subtask"])].append(i)
    return {
        "pass1": _mean(greedy),
        "sampled_pass1": _mean(sampled),
        "passk": _mean(any_right),
        "majk": _mean(voted) if voted is not None else None,
        "greedy_wrong": {
            "items": len(wrong),
            "sampled_right": _mean([sampled[i] for i in wrong]),
            "right_in_k": _mean([any_right[i] for i in wrong]),
            "right_by_majority": _mean([voted[i] for i in wrong]) if voted is not None else None,
        },
        "greedy_right": {
            "items": len(right),
            "wrong_by_majority": _mean([1 - voted[i] for i in right]) if voted is not None else None,
        },
        "by_subtask": {
            name: {
                "items": len(rows_of),
                "pass1": _mean([greedy[i] for i in rows_of]),
                "passk": _mean([any_right[i] for i in rows_of]),
                "majk": _mean([voted[i] for i in rows_of]) if voted is not None else None,
                "greedy_wrong_sampled_right": _mean([sampled[i] for i in rows_of if not greedy[i]]),
            }
            for name, rows_of in sorted(subtasks.items())
        } or None,
    }


def domain_headroom(params: Params, domain: str, model, tokenizer, factors, manifest,
                    temperature: float | None = None) -> dict:  # fmt: skip
    """The base's and the stage's expert z's headroom figures on `domain`'s val rows (sampled at the
    stage's headroom temperature unless `temperature` is given)."""
    kind = expert_domains(params, domain)[domain]["answer_kind"]
    cfg = params.experts[domain]
    if cfg.headroom_k < 2:
        raise UserError(f"experts.{domain}.headroom_k is {cfg.headroom_k}: set it to 2 or more to measure headroom")
    rows = prepared.read_split(paths.DATA, domain, "val")[: cfg.val_items]
    z = load_expert(paths.expert_file(domain), manifest).z  # a missing expert fails before minutes of sampling
    k, temperature = cfg.headroom_k, temperature or cfg.headroom_temperature or cfg.temperature or 1.0
    tokens = params.base_eval.max_new_tokens[kind]
    started = time.perf_counter()

    def run() -> dict:
        return measure(model, tokenizer, kind, rows, k, temperature, tokens, cfg.eval_batch_size, params.seed)

    base = run()
    svf = SVF(model, factors, mode=params.svf.mode, max_mult=params.svf.max_mult)
    svf.load_z(z)
    scales = svf.scales()
    svf.detach()
    composer = Composer(model, factors)
    composer.merge(scales)
    try:
        expert = run()
    finally:
        composer.unmerge()
    return {"answer_kind": kind, "items": len(rows), "k": k, "temperature": temperature,
            "chance": chance(kind, rows, k), "base": base, "expert": expert,
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def headroom(params: Params, domains: list[str], temperature: float | None = None, tag: str | None = None) -> dict:
    check_tag(tag)
    if temperature is not None and not 0 < temperature <= 5:
        raise UserError(f"--temperature must be in (0, 5] (got {temperature})")
    for domain in domains:  # every name checked before minutes of sampling
        expert_domains(params, domain)
    model, tokenizer = load_base()
    factors, manifest = load_factors(paths.SVD)
    check_base(model, manifest, paths.SVD)
    report = {"seed": params.seed, "split": "val", "domains": {}}
    for domain in domains:
        report["domains"][domain] = domain_headroom(params, domain, model, tokenizer, factors, manifest, temperature)
        print(f"{domain}: {_line(report['domains'][domain])}", flush=True)
    stem = REPORT_DIR / ("headroom" + (f"_{tag}" if tag else ""))
    write_json(stem.with_suffix(".json"), report)
    with atomic_path(stem.with_suffix(".md")) as tmp:
        tmp.write_text(markdown(report))
    return report


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _line(figures: dict) -> str:
    return "; ".join(f"{start} pass@1 {_pct(f['pass1'])}, pass@k {_pct(f['passk'])}, maj@k {_pct(f['majk'])}"
                     for start, f in ((s, figures[s]) for s in ("base", "expert")))  # fmt: skip


def markdown(report: dict) -> str:
    lines = [
        f"# Where RL's headroom is (val split, seed {report['seed']})",
        "",
        "`python -m benchmarks.headroom` (docstring: what each column is). Percentages. maj@k: the "
        "majority vote of the k samples; guess: a uniform guess among the choices (pass@1 / pass@k). "
        "Greedy-wrong rows: the share of their samples that are right, then the rows with a right "
        "answer among the k and with a right majority; greedy-right rows: a wrong majority.",
        "",
        "| domain | start | k at T | pass@1 greedy | sampled pass@1 | pass@k | maj@k | guess | greedy-wrong rows: "
        "right samples · right in k · right majority | greedy-right rows: wrong majority |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, d in report["domains"].items():
        guess = f"{_pct(d['chance']['pass1'])} / {_pct(d['chance']['passk'])}" if d["chance"] else "–"
        for start in ("base", "expert"):
            f = d[start]
            wrong, right = f["greedy_wrong"], f["greedy_right"]
            lines.append(
                f"| {domain} | {start} | {d['k']} at {d['temperature']:g} | {_pct(f['pass1'])} | "
                f"{_pct(f['sampled_pass1'])} | {_pct(f['passk'])} | {_pct(f['majk'])} | {guess} | "
                f"{wrong['items']} rows: {_pct(wrong['sampled_right'])} · {_pct(wrong['right_in_k'])} · "
                f"{_pct(wrong['right_by_majority'])} | {right['items']} rows: {_pct(right['wrong_by_majority'])} |"
            )
    split = [(domain, d, name) for domain, d in report["domains"].items() for name in d["expert"]["by_subtask"] or {}]
    if split:
        lines += ["", "By subtask (greedy-wrong rows: the share of their samples that are right):", "",
                  "| domain | subtask | items | base pass@1 · pass@k · maj@k · greedy-wrong right samples | "
                  "expert pass@1 · pass@k · maj@k · greedy-wrong right samples |", "|---|---|---|---|---|"]  # fmt: skip
    for domain, d, name in split:
        cells = [" · ".join(_pct(d[start]["by_subtask"][name][key])
                            for key in ("pass1", "passk", "majk", "greedy_wrong_sampled_right"))
                 for start in ("base", "expert")]  # fmt: skip
        lines.append(f"| {domain} | {name} | {d['expert']['by_subtask'][name]['items']} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.headroom",
        description="How much of pass@k − pass@1 RL could turn into greedy accuracy: for the base and each "
        "stage's expert z on val, pass@1, pass@k, the majority vote of the k samples and (multiple choice) "
        "what guessing reaches. Writes reports/objective_study/headroom.{json,md}.",
    )
    parser.add_argument("domains", nargs="*", metavar="DOMAIN", help="domains with an expert (default: every one)")
    parser.add_argument("--params", default="params.yaml", help="the params file (its seed and expert settings)")
    parser.add_argument("--temperature", type=float,
                        help="sample at this temperature (default: each expert's headroom temperature)")  # fmt: skip
    parser.add_argument("--tag", help="a pilot's name: writes headroom_TAG.{json,md} instead")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        headroom(params, args.domains or list(params.experts), args.temperature, args.tag)
    except UserError as error:
        print(f"headroom: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
