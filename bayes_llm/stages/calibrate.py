"""DVC stage `calibrate`: base + svd + experts + data/prepared → models/dispatcher/, reports/dispatch/.

Trains the classification expert, calibrates one controller per first-pass strategy on the val
splits, measures routing on the test splits and times the two passes. reports/dispatch/ holds
metrics.json (routing accuracy, confusion matrix, ECE before/after on val and test, temperature,
threshold), timing.json (pass 1, composition, pass 2, the stage), a reliability diagram and a
confusion-matrix PNG for the default strategy.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from typing import TYPE_CHECKING

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.io import write_json

if TYPE_CHECKING:
    import torch

    from bayes_llm.dispatch.controller import Controller
    from bayes_llm.inference.engine import Engine
    from bayes_llm.svf.expert import Expert

REPORT_DIR = paths.DISPATCH_REPORTS


def _prompts(domains: list[str], split: str) -> tuple[list[str], list[int]]:
    prompts, targets = [], []
    for index, domain in enumerate(domains):
        rows = prepared.read_split(paths.DATA, domain, split)
        prompts += [row["prompt"] for row in rows]
        targets += [index] * len(rows)
    return prompts, targets


def _train_classifier(engine: Engine, params: Params, domains: list[str], routing_train: list[dict],
                      progress: bool) -> Expert:  # fmt: skip
    """The classification expert, on the train splits plus the routing benchmark's train part (train
    prompts in other wrappers, and off-domain prompts labelled `other`) when there is one."""
    from bayes_llm.dispatch.classifier import train_classifier
    from bayes_llm.dispatch.controller import OTHER
    from bayes_llm.svf.expert import Expert
    from bayes_llm.svf.scaling import SVF

    cfg = params.dispatch.classifier
    train = {d: [r["prompt"] for r in prepared.read_split(paths.DATA, d, "train")] for d in domains}
    wrapped: dict[str, list[str]] = {}
    for row in routing_train:
        wrapped.setdefault(row["target"], []).append(row["prompt"])
    for label, prompts in wrapped.items():
        # Repeated up to as many as the plain prompts, so half of a domain's draws are rephrased
        # (400 among 30,000 math prompts would be 1 % of them).
        plain = train.get(label, [])
        train[label] = plain + prompts * max(1, math.ceil(len(plain) / len(prompts)))
    if OTHER in train:
        train = {d: train[d] for d in (*domains, OTHER)}  # the label order the draws follow
    engine.use_blend({})
    svf = SVF(engine.model, engine.factors, mode=params.svf.mode, max_mult=params.svf.max_mult)
    try:
        z, losses = train_classifier(svf, engine.tokenizer, train, cfg.steps, cfg.learning_rate, cfg.batch_size,
                                     params.seed, progress)  # fmt: skip
    finally:
        svf.detach()
    classifier = Expert(
        domain="dispatcher-classifier",
        mode=params.svf.mode,
        max_mult=params.svf.max_mult,
        z=z,
        base_fingerprint=engine.manifest["base_fingerprint"],
        svd_fingerprint=engine.manifest["svd_fingerprint"],
        training={"seed": params.seed, "splits": "train", **cfg.model_dump()},
        metrics={"first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)},
    )
    engine.classifier_scales = classifier.scales(engine.factors)
    return classifier


def _timings(engine: Engine, params: Params, prompts: list[str]) -> dict:
    """Medians per prompt (batch 1): pass 1 (default strategy), composing one blend, pass 2 at N tokens."""
    import torch

    from bayes_llm.prompts import answer_prompt, model_context

    cfg = params.dispatch
    pass1, compose, pass2 = [], [], []
    blend = dict.fromkeys(engine.domains, 1.0 / len(engine.domains))
    for prompt in prompts:
        started = time.perf_counter()
        engine.route([prompt], cfg.strategy, cfg.blending_mode, cfg.top_k)
        pass1.append(time.perf_counter() - started)
        engine.clear_cache()  # time a real composition, not a cache hit
        engine.use_blend({})
        started = time.perf_counter()
        engine.use_blend(blend)
        compose.append(time.perf_counter() - started)
        started = time.perf_counter()
        context = model_context(engine.tokenizer, answer_prompt(prompt))
        batch = engine.tokenizer([context], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            engine.model.generate(**batch, max_new_tokens=cfg.timing_new_tokens, min_new_tokens=cfg.timing_new_tokens,
                                  do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)  # fmt: skip
        pass2.append(time.perf_counter() - started)
    medians = {name: statistics.median(v) for name, v in (("pass1", pass1), ("compose", compose), ("pass2", pass2))}
    return {
        "prompts": len(prompts),
        "new_tokens": cfg.timing_new_tokens,
        "strategy": cfg.strategy,
        "pass1_seconds": round(medians["pass1"], 5),
        "compose_seconds": round(medians["compose"], 5),
        "pass2_seconds": round(medians["pass2"], 5),
        "overhead_share_of_pass2": round((medians["pass1"] + medians["compose"]) / medians["pass2"], 4),
    }


def _fit(start: Controller, val: torch.Tensor, val_targets: list[int], routing_val: list[dict],
         routing_logliks: torch.Tensor, cfg) -> tuple[Controller, str]:  # fmt: skip
    """Temperature by NLL on the benchmark's held-out val phrasings (the val splits without them); the `other`
    threshold by precision on off-domain val prompts when there are some, else the fallback budget."""
    import torch

    from bayes_llm.dispatch import heldout
    from bayes_llm.dispatch.calibration import fit_temperature, fit_threshold

    # The temperature is fitted on held-out phrasings (new wordings of the domains' prompts), not on the
    # training templates, which every first pass gets right at any temperature. Off-domain rows are
    # left to the threshold: a first pass that cannot say `other` (the base's) would otherwise be
    # flattened towards uniform blends to hedge on them.
    rephrased = [i for i, row in enumerate(routing_val) if row["kind"] == "heldout"]
    if rephrased:
        gold = heldout.targets(start, [routing_val[i] for i in rephrased])
        tempered = fit_temperature(start, routing_logliks[rephrased], gold)
    else:
        tempered = fit_temperature(start, val, val_targets)
    is_other = [False] * len(val) + [row["kind"] == heldout.OTHER for row in routing_val]
    tuned = heldout.fit_other_threshold(tempered, torch.cat([val, routing_logliks]), is_other, cfg.other_precision)
    if tuned is not None:
        return tuned, f"best other recall at precision >= {cfg.other_precision} on val"
    return fit_threshold(tempered, val, cfg.max_fallback), f"at most {cfg.max_fallback} of in-domain val to the base"


def _answers(engine: Engine, params: Params, controller: Controller, posterior: torch.Tensor, rows: list[dict],
             progress: bool) -> dict:  # fmt: skip
    """The benchmark's test rows that have answers, answered by each system; soft vs hard vs oracle."""
    from tqdm.auto import tqdm

    from bayes_llm.dispatch import heldout
    from bayes_llm.rewards.correctness import correctness

    keep = [i for i, row in enumerate(rows) if row["answer_kind"] is not None]
    rows = [rows[i] for i in keep]
    blends = heldout.systems(controller, posterior[keep], rows, params.dispatch.top_k)
    scores = {}
    for name in tqdm(blends, desc="held-out answers", unit="system", disable=not progress):
        scores[name] = [0.0] * len(rows)
        for kind in sorted({row["answer_kind"] for row in rows}):
            index = [i for i, row in enumerate(rows) if row["answer_kind"] == kind]
            texts = engine.complete_with([rows[i]["prompt"] for i in index], [blends[name][i] for i in index],
                                         params.base_eval.max_new_tokens[kind], params.dispatch.batch_size)
            for i, score in zip(index, correctness(kind, texts, [rows[i] for i in index]), strict=True):
                scores[name][i] = score
    return heldout.compare(scores, rows, params.evaluate.bootstrap_resamples, params.seed)


def calibrate(params: Params, progress: bool = True) -> dict:
    from bayes_llm.data import routing
    from bayes_llm.dispatch.calibration import confusion, nll, reliability
    from bayes_llm.dispatch.controller import Controller
    from bayes_llm.dispatch.heldout import routing_report
    from bayes_llm.dispatch.likelihood import label_logprobs
    from bayes_llm.dispatch.store import save_dispatcher
    from bayes_llm.inference.engine import Engine
    from bayes_llm.plots import confusion_plot, reliability_plot

    started = time.perf_counter()
    engine = Engine(paths.MODELS)
    infos = {d["name"]: d for d in prepared.domains()}
    domains = [d for d in engine.domains if d in infos and not infos[d]["test_only"]]
    if domains != engine.domains:
        raise UserError(f"experts without a prepared train domain: {sorted(set(engine.domains) - set(domains))}")
    cfg = params.dispatch
    prior = None
    if cfg.prior == "data":
        prior = {d: len(prepared.read_split(paths.DATA, d, "train")) for d in domains}

    benchmark = params.data.routing.enabled
    routing_train, routing_val, routing_test = (routing.read(paths.ROUTING, part) if benchmark else []
                                                for part in routing.PARTS)  # fmt: skip
    # A trainable domain with no `experts` entry is in the benchmark but is no label to route to.
    covered = {*domains, routing.OTHER}
    left_out = {d for rows in (routing_train, routing_val, routing_test) for row in rows
                for d in (row["target"], *row["mix"]) if d not in covered}  # fmt: skip
    if left_out:
        print(f"calibrate: routing rows of domains without an expert left out: {', '.join(sorted(left_out))}",
              file=sys.stderr)  # fmt: skip
        routing_train, routing_val, routing_test = (
            [row for row in rows if {row["target"], *row["mix"]} <= covered]
            for rows in (routing_train, routing_val, routing_test)
        )
    classifier = _train_classifier(engine, params, domains, routing_train, progress)
    val_prompts, val_targets = _prompts(domains, "val")
    test_prompts, test_targets = _prompts(domains, "test")
    controllers, report = {}, {"domains": domains, "prior": cfg.prior, "strategies": {}}
    routing_logliks = {}
    for strategy in ("prompt", "cls"):
        start = Controller.with_prior(domains, prior)
        engine.use_first_pass(strategy)

        def score(prompts: list[str], labels: tuple[str, ...] = start.labels) -> torch.Tensor:
            return label_logprobs(engine.model, engine.tokenizer, prompts, labels, cfg.batch_size, progress)

        val, test = score(val_prompts), score(test_prompts)
        held_val = score([row["prompt"] for row in routing_val])
        routing_logliks[strategy] = held_test = score([row["prompt"] for row in routing_test])
        tuned, rule = _fit(start, val, val_targets, routing_val, held_val, cfg)
        controllers[strategy] = tuned
        report["strategies"][strategy] = {
            "temperature": round(tuned.temperature, 4),
            "threshold": round(tuned.threshold, 6),
            "threshold_rule": rule,
            "val_nll": {"before": round(nll(start, val, val_targets), 5),
                        "after": round(nll(tuned, val, val_targets), 5)},
            "ece": {
                "val": {"before": reliability(start.posterior(val), val_targets),
                        "after": reliability(tuned.posterior(val), val_targets)},
                "test": {"before": reliability(start.posterior(test), test_targets),
                         "after": reliability(tuned.posterior(test), test_targets)},
            },
            "val": confusion(tuned, tuned.posterior(val), val_targets),
            "test": confusion(tuned, tuned.posterior(test), test_targets),
        }  # fmt: skip
        if routing_test:  # val: what the fit saw; test: what it is judged on
            report["strategies"][strategy]["heldout_val"] = routing_report(start, tuned, held_val, routing_val)
            report["strategies"][strategy]["heldout"] = routing_report(start, tuned, held_test, routing_test)
    engine.controllers = controllers
    timing = _timings(
        engine, params, val_prompts[:: max(1, len(val_prompts) // cfg.timing_prompts)][: cfg.timing_prompts]
    )
    chosen = report["strategies"][cfg.strategy]
    report["strategy"] = cfg.strategy
    report["routing_accuracy"] = chosen["test"]["routing_accuracy"]
    report["ece_after"] = chosen["ece"]["test"]["after"]["ece"]
    if routing_test:
        answer_started = time.perf_counter()
        controller = controllers[cfg.strategy]
        posterior = controller.posterior(routing_logliks[cfg.strategy])
        answers = _answers(engine, params, controller, posterior, routing_test, progress)
        report["heldout"] = {"strategy": cfg.strategy, **chosen["heldout"], "answers": answers}
        timing["heldout_answers_seconds"] = round(time.perf_counter() - answer_started, 1)
    timing["stage_seconds"] = round(time.perf_counter() - started, 1)

    save_dispatcher(paths.DISPATCHER, controllers, classifier, {"domains": domains, "strategy": cfg.strategy})
    write_json(REPORT_DIR / "metrics.json", report)
    write_json(REPORT_DIR / paths.TIMING, timing)
    where = "held-out + off-domain test" if routing_test else "the test splits"
    ece = chosen["heldout"]["reliability"] if routing_test else chosen["ece"]["test"]
    reliability_plot({f"before (T=1), ECE {ece['before']['ece']:.3f}": ece["before"]["table"],
                      f"after (T={chosen['temperature']:.2f}), ECE {ece['after']['ece']:.3f}": ece["after"]["table"]},
                     REPORT_DIR / "reliability.png", f"first pass ({cfg.strategy}) on {where}")  # fmt: skip
    title = f"routing on the test splits ({cfg.strategy}), accuracy {chosen['test']['routing_accuracy']:.3f}"
    confusion_plot(chosen["test"]["matrix"], domains, chosen["test"]["labels"], REPORT_DIR / "confusion.png", title)
    return report | {"timing": timing}


def _command(args: argparse.Namespace) -> int:
    report = calibrate(load_params(args.params), progress=not args.quiet)
    keys = ("strategy", "routing_accuracy", "ece_after")
    print(json.dumps({**{k: report[k] for k in keys}, "overhead": report["timing"]["overhead_share_of_pass2"]}))
    return 0


STAGE = Stage(
    name="calibrate",
    dvc_name="calibrate",
    help="classification expert + dispatcher calibration (DVC stage `calibrate`)",
    description="Trains the classification expert on the train splits, scores every val and test prompt with both "
    "first-pass strategies (prompt: the base; cls: the classification expert), fits the controller's temperature "
    "(NLL) and `other` threshold (params dispatch.max_fallback) on val, and times pass 1, composition and pass 2. "
    "Writes models/dispatcher/ and reports/dispatch/ (metrics.json with routing accuracy, confusion matrix and ECE "
    "before/after; reliability.png; confusion.png; timing.json).",
    run=_command,
    sandboxed=False,  # runs no model-written code
    deps=(paths.BASE, paths.SVD, paths.EXPERTS, paths.DATA, paths.ROUTING),
    outs=(paths.DISPATCHER,
          *(REPORT_DIR / f for f in ("reliability.png", "confusion.png", "metrics.json", paths.TIMING))),
)
