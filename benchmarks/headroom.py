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
from bayes_llm.experts.headroom import Samples, sample
from bayes_llm.io import atomic_path, write_json
from bayes_llm.model.greedy import greedy_scores
from bayes_llm.model.load import load_base
from bayes_llm.stages.train_expert import expert_domains
from bayes_llm.svf.decompose import check_base, load_factors
from bayes_llm.svf.expert import load_expert
from bayes_llm.svf.scaling import SVF
from benchmarks import provenance
from benchmarks.objective_study import check_tag, composed

REPORT_DIR = paths.REPORTS / "objective_study"


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def chance(kind: str, rows: Sequence[dict], k: int) -> dict | None:
    """pass@1 and pass@k of a uniform guess among each row's choices (None: not multiple choice, or no rows)."""
    if kind != "letter" or not rows or not all(row.get("choices") is not None for row in rows):
        return None
    return {"pass1": _mean([1 / len(row["choices"]) for row in rows]),
            "passk": _mean([1 - (1 - 1 / len(row["choices"])) ** k for row in rows])}  # fmt: skip


def figures(kind: str, rows: Sequence[dict], k: int, greedy: Sequence[float], drawn: Samples) -> dict:
    """The headroom figures (the module's docstring) of greedy verdicts and k samples per row, for all
    the rows and per subtask."""
    sampled = [statistics.fmean(hits) for hits in drawn.hits]
    any_right, voted = drawn.any_right(), drawn.majority_right()

    def of(indices: list[int]) -> dict:
        wrong = [i for i in indices if not greedy[i]]
        right = [i for i in indices if greedy[i]]
        return {
            "items": len(indices),
            "pass1": _mean([greedy[i] for i in indices]),
            "sampled_pass1": _mean([sampled[i] for i in indices]),
            "passk": _mean([any_right[i] for i in indices]),
            "majk": _mean([voted[i] for i in indices]) if voted is not None else None,
            "chance": chance(kind, [rows[i] for i in indices], k),
            "greedy_wrong": {
                "items": len(wrong),
                "sampled_right": _mean([sampled[i] for i in wrong]),
                "right_in_k": _mean([any_right[i] for i in wrong]),
                "right_by_majority": _mean([voted[i] for i in wrong]) if voted is not None else None,
                "chance": chance(kind, [rows[i] for i in wrong], k),  # the guess these rows' samples face
            },
            "greedy_right": {
                "items": len(right),
                "wrong_by_majority": _mean([1 - voted[i] for i in right]) if voted is not None else None,
            },
        }

    subtasks: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        if row.get("subtask"):
            subtasks[str(row["subtask"])].append(i)
    by_subtask = {name: of(indices) for name, indices in sorted(subtasks.items())}
    return {**of(list(range(len(rows)))), "by_subtask": by_subtask or None}


def domain_headroom(params: Params, domain: str, z: dict, model, tokenizer, factors,
                    temperature: float | None = None) -> dict:  # fmt: skip
    """The base's and the expert z's headroom figures on `domain`'s val rows (sampled at the stage's
    headroom temperature unless `temperature` is given)."""
    kind = expert_domains(params, domain)[domain]["answer_kind"]
    cfg = params.experts[domain]
    rows = prepared.read_split(paths.DATA, domain, "val")[: cfg.val_items]
    k, temperature = cfg.headroom_k, temperature or cfg.headroom_sampling_temperature
    tokens = params.base_eval.max_new_tokens[kind]
    started = time.perf_counter()

    def measure() -> dict:
        greedy = greedy_scores(model, tokenizer, kind, rows, tokens, cfg.eval_batch_size)
        drawn = sample(model, tokenizer, kind, rows, k, temperature, tokens, cfg.eval_batch_size, params.seed)
        return figures(kind, rows, k, greedy, drawn)

    base = measure()
    with composed(SVF(model, factors, mode=params.svf.mode, max_mult=params.svf.max_mult), z, factors):
        expert = measure()
    return {"answer_kind": kind, "items": len(rows), "k": k, "temperature": temperature, "base": base,
            "expert": expert, "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def headroom(params: Params, domains: list[str], temperature: float | None = None, tag: str | None = None,
             origin: dict | None = None) -> dict:
    check_tag(tag)
    if temperature is not None and not 0 < temperature <= 5:
        raise UserError(f"--temperature must be in (0, 5] (got {temperature})")
    for domain in domains:  # every domain checked before minutes of sampling
        expert_domains(params, domain)
        if params.experts[domain].headroom_k < 2:
            raise UserError(f"experts.{domain}.headroom_k is {params.experts[domain].headroom_k}: set it to 2 or "
                            "more to measure headroom")  # fmt: skip
    factors, manifest = load_factors(paths.SVD)
    experts = {domain: load_expert(paths.expert_file(domain), manifest).z for domain in domains}
    model, tokenizer = load_base()
    check_base(model, manifest, paths.SVD)
    report = {"seed": params.seed, "split": "val", "run": origin, "domains": {}}
    for domain in domains:
        report["domains"][domain] = domain_headroom(params, domain, experts[domain], model, tokenizer, factors,
                                                    temperature)  # fmt: skip
        print(f"{domain}: {_line(report['domains'][domain])}", flush=True)
    stem = REPORT_DIR / ("headroom" + (f"_{tag}" if tag else ""))
    text = markdown(report)  # rendered before either file is written: the two never disagree
    write_json(stem.with_suffix(".json"), report)
    with atomic_path(stem.with_suffix(".md")) as tmp:
        tmp.write_text(text)
    return report


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _line(measured: dict) -> str:
    return "; ".join(f"{start} pass@1 {_pct(f['pass1'])}, pass@k {_pct(f['passk'])}, maj@k {_pct(f['majk'])}"
                     for start, f in ((s, measured[s]) for s in ("base", "expert")))  # fmt: skip


def _guess(chance_of: dict | None) -> str:
    return f"{_pct(chance_of['pass1'])} / {_pct(chance_of['passk'])}" if chance_of else "–"


def _row(domain: str, start: str, subset: str, f: dict) -> str:
    wrong, right = f["greedy_wrong"], f["greedy_right"]
    return (f"| {domain} | {start} | {subset} | {f['items']} | {_pct(f['pass1'])} | {_pct(f['sampled_pass1'])} | "
            f"{_pct(f['passk'])} | {_pct(f['majk'])} | {_guess(f['chance'])} | {wrong['items']} | "
            f"{_pct(wrong['sampled_right'])} · {_pct(wrong['right_in_k'])} · {_pct(wrong['right_by_majority'])} | "
            f"{_guess(wrong['chance'])} | {_pct(right['wrong_by_majority'])} |")  # fmt: skip


def markdown(report: dict) -> str:
    settings = ", ".join(f"{domain}: {d['k']} samples at temperature {d['temperature']:g}"
                         for domain, d in report["domains"].items())  # fmt: skip
    lines = [
        f"# Where RL's headroom is (val split, seed {report['seed']})",
        "",
        f"`python -m benchmarks.headroom` (its docstring says what each column is). Percentages; {settings}. "
        "maj@k: the majority vote of the k samples. Guess: a uniform guess among the rows' choices "
        "(pass@1 / pass@k). Greedy-wrong rows: the share of their samples that are right, the share with "
        "a right answer among the k, the share whose majority is right, and the guess those rows face. "
        "Greedy-right rows: the share whose majority is wrong.",
        "",
        *provenance.markdown_lines(report.get("run")),
        "| domain | start | rows | items | pass@1 greedy | sampled pass@1 | pass@k | maj@k | guess | greedy-wrong "
        "rows | right samples · right in k · right majority | their guess | greedy-right rows: wrong majority |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for domain, d in report["domains"].items():
        for start in ("base", "expert"):
            lines.append(_row(domain, start, "all", d[start]))
            lines += [_row(domain, start, name, f) for name, f in (d[start]["by_subtask"] or {}).items()]
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
        headroom(params, args.domains or list(params.experts), args.temperature, args.tag,
                 provenance.run_record(parser.prog, argv))
    except UserError as error:
        print(f"headroom: {error}", file=sys.stderr)
        return error.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
