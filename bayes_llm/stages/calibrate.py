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
import statistics
import time
from typing import TYPE_CHECKING

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.errors import UserError
from bayes_llm.io import write_json

if TYPE_CHECKING:
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


def _train_classifier(engine: Engine, params: Params, domains: list[str], progress: bool) -> Expert:
    from bayes_llm.dispatch.classifier import train_classifier
    from bayes_llm.svf.expert import Expert
    from bayes_llm.svf.scaling import SVF

    cfg = params.dispatch.classifier
    train = {d: [r["prompt"] for r in prepared.read_split(paths.DATA, d, "train")] for d in domains}
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
        batch = engine.tokenizer([engine.tokenizer.bos_token + prompt], return_tensors="pt", add_special_tokens=False)
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


def calibrate(params: Params, progress: bool = True) -> dict:
    from bayes_llm.dispatch.calibration import confusion, fit_temperature, fit_threshold, nll, reliability
    from bayes_llm.dispatch.controller import Controller
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

    classifier = _train_classifier(engine, params, domains, progress)
    val_prompts, val_targets = _prompts(domains, "val")
    test_prompts, test_targets = _prompts(domains, "test")
    controllers, report = {}, {"domains": domains, "prior": cfg.prior, "strategies": {}}
    for strategy in ("prompt", "cls"):
        start = Controller.with_prior(domains, prior)
        engine.use_first_pass(strategy)
        val = label_logprobs(engine.model, engine.tokenizer, val_prompts, start.labels, cfg.batch_size, progress)
        test = label_logprobs(engine.model, engine.tokenizer, test_prompts, start.labels, cfg.batch_size, progress)
        tuned = fit_threshold(fit_temperature(start, val, val_targets), val, cfg.max_fallback)
        controllers[strategy] = tuned
        report["strategies"][strategy] = {
            "temperature": round(tuned.temperature, 4),
            "threshold": round(tuned.threshold, 6),
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
    engine.controllers = controllers
    timing = _timings(
        engine, params, val_prompts[:: max(1, len(val_prompts) // cfg.timing_prompts)][: cfg.timing_prompts]
    )
    chosen = report["strategies"][cfg.strategy]
    report["strategy"] = cfg.strategy
    report["routing_accuracy"] = chosen["test"]["routing_accuracy"]
    report["ece_after"] = chosen["ece"]["test"]["after"]["ece"]
    timing["stage_seconds"] = round(time.perf_counter() - started, 1)

    save_dispatcher(paths.DISPATCHER, controllers, classifier, {"domains": domains, "strategy": cfg.strategy})
    write_json(REPORT_DIR / "metrics.json", report)
    write_json(REPORT_DIR / paths.TIMING, timing)
    ece = chosen["ece"]["test"]
    reliability_plot({f"before (T=1), ECE {ece['before']['ece']:.3f}": ece["before"]["table"],
                      f"after (T={chosen['temperature']:.2f}), ECE {ece['after']['ece']:.3f}": ece["after"]["table"]},
                     REPORT_DIR / "reliability.png", f"first pass ({cfg.strategy}) on the test splits")  # fmt: skip
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
    deps=(paths.BASE, paths.SVD, paths.EXPERTS, paths.DATA),
    outs=(paths.DISPATCHER,
          *(REPORT_DIR / f for f in ("reliability.png", "confusion.png", "metrics.json", paths.TIMING))),
)
