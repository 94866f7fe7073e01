"""DVC stage `base`: data/prepared + data/raw (a local model.source) + params model/tokenizer/pretrain
→ models/base/, reports/base/.

Pretrains a MambaFormer from scratch (or loads a checkpoint), measures it and saves it. Beside the
weights it saves the base's greedy scores on every test split (`test_scores.json`), which the experts
pair with their own: scored once here, not once per expert.

Components are imported inside the functions here and in the other torch stages, so that
`bayes-llm --help` and a mistyped argument answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import prepared
from bayes_llm.io import staged_dir, write_json


def _scratch(params: Params, data_dir: Path, names: list[str], val: dict[str, list[dict]], progress: bool) -> tuple:
    from transformers import AutoModelForCausalLM, set_seed

    from bayes_llm.model.architecture import build_config
    from bayes_llm.model.pretrain import documents, pack, pretrain
    from bayes_llm.model.tokenizer import train_tokenizer

    train = {name: prepared.read_split(data_dir, name, "train") for name in names}
    share = params.pretrain.solution_share
    train_docs = documents(train, params.pretrain.classify_share, params.seed, params.pretrain.domain_weights, share)
    val_docs = documents(val, params.pretrain.classify_share, params.seed + 1, solution_share=share)
    tokenizer = train_tokenizer(train_docs, params.tokenizer.vocab_size, params.model.max_length)
    set_seed(params.seed)
    config = build_config(
        params.model, len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    )
    model = AutoModelForCausalLM.from_config(config)
    train_blocks = pack(train_docs, tokenizer, params.pretrain.seq_len)
    val_blocks = pack(val_docs, tokenizer, params.pretrain.seq_len)
    stats = pretrain(model, train_blocks, val_blocks, params.pretrain, params.seed, progress)
    stats["tokens_per_document"] = round(train_blocks.numel() / len(train_docs), 1)
    stats["vocab_size"] = len(tokenizer)
    return model, tokenizer, stats


def _val_accuracy(
    model, tokenizer, params: Params, kinds: dict[str, str], val: dict[str, list[dict]], progress: bool
) -> dict:
    from bayes_llm.model.greedy import domain_accuracy

    out = {}
    for name, rows in val.items():
        kind = kinds[name]
        result = domain_accuracy(model, tokenizer, rows, kind, params.base_eval.max_new_tokens[kind],
                                 params.base_eval.batch_size, progress, desc=f"val {name}")  # fmt: skip
        if kind == "letter":
            result["chance"] = round(sum(1 / len(r["choices"]) for r in rows) / len(rows), 4)
        out[name] = result
    return out


def _routing_accuracy(model, tokenizer, params: Params, val: dict[str, list[dict]]) -> float:
    """Greedy `Task: <prompt> / Domain:` → the true label, over every domain's val rows."""
    from bayes_llm.model.greedy import greedy_completions
    from bayes_llm.prompts import classify_question

    rows = [(name, row) for name, domain_rows in val.items() for row in domain_rows]
    completions = greedy_completions(
        model, tokenizer, [classify_question(tokenizer, r["prompt"], list(val)) for _, r in rows], 4,
        params.base_eval.batch_size,
    )
    hits = [(c.split() or [""])[0] == name for (name, _), c in zip(rows, completions, strict=True)]
    return sum(hits) / max(len(hits), 1)


def build_base(
    params: Params,
    data_dir: Path = paths.DATA,
    out_dir: Path = paths.BASE,
    report_dir: Path = paths.BASE_REPORTS,
    progress: bool = True,
) -> dict:
    """Writes the model + tokenizer to `out_dir` (atomically) and the reports; returns the metrics."""
    from bayes_llm.evaluate import base_scores
    from bayes_llm.model.load import load_checkpoint
    from bayes_llm.model.pretrain import write_curve
    from bayes_llm.plots import line_plot

    started = time.monotonic()
    kinds = {d["name"]: d["answer_kind"] for d in prepared.domains(data_dir) if not d["test_only"]}
    val = {name: prepared.read_split(data_dir, name, "val") for name in kinds}
    if params.model.source == "scratch":
        model, tokenizer, stats = _scratch(params, data_dir, list(kinds), val, progress)
    else:
        model, tokenizer = load_checkpoint(params.model.source)
        stats = {
            "train_seconds": 0.0,
            "train_tokens": 0,
            "final_train_loss": None,
            "final_val_loss": None,
            "vocab_size": len(tokenizer),
        }
    curve = stats.pop("curve", None)
    timing = {"train_seconds": stats.pop("train_seconds"),
              "train_tokens_per_second": stats.pop("train_tokens_per_second", None)}  # fmt: skip
    evaluated = {name: rows[: params.base_eval.max_items] for name, rows in val.items()}
    accuracy = _val_accuracy(model, tokenizer, params, kinds, evaluated, progress)
    metrics = {
        "source": params.model.source,
        "model_type": model.config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        **stats,
        "val_accuracy": {name: round(result["accuracy"], 4) for name, result in accuracy.items()},
        "val_chance": {name: result["chance"] for name, result in accuracy.items() if "chance" in result},
        "val_routing_accuracy": round(_routing_accuracy(model, tokenizer, params, evaluated), 4),
    }
    tests = {name: (kind, prepared.read_split(data_dir, name, "test")) for name, kind in kinds.items()}
    scores = base_scores.score_test_splits(model, tokenizer, tests, params.base_eval.max_new_tokens,
                                           params.base_eval.batch_size)  # fmt: skip
    timing["stage_seconds"] = round(time.monotonic() - started, 1)
    with staged_dir(out_dir) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        write_json(staging / base_scores.FILE, scores)
    write_json(report_dir / "metrics.json", metrics)
    write_json(report_dir / paths.TIMING, timing)
    write_json(report_dir / "val_examples.json", {name: r["examples"] for name, r in accuracy.items()})
    # A loaded checkpoint was not pretrained here: its curves are empty (DVC still needs the files).
    train_curve, val_curve = (curve.train, curve.val) if curve is not None else ([], [])
    title = f"{params.model.family} base pretraining" if curve is not None else "loaded checkpoint: not pretrained here"
    write_curve(train_curve, report_dir / "train_loss.csv")
    write_curve(val_curve, report_dir / "val_loss.csv")
    line_plot({"train": train_curve, "val": val_curve}, report_dir / "loss.png", title, "step", "cross-entropy loss")
    return metrics | timing


def unwatched_checkpoint(source: str) -> Path | None:
    """A local model.source outside data/raw/ (the base stage's dependency for it): `dvc repro` does
    not see it change. None for scratch, a hub id, or a checkpoint inside data/raw/."""
    path = Path(source).expanduser()
    if source == "scratch" or not path.exists():
        return None
    return None if paths.in_raw(path) else path


def _command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    if (outside := unwatched_checkpoint(params.model.source)) is not None:
        print(f"note: model.source {outside} lies outside {paths.RAW}/, the directory `dvc repro` watches: it "
              "will not rerun base when the checkpoint changes", file=sys.stderr)  # fmt: skip
    metrics = build_base(params, progress=not args.quiet)
    print(json.dumps({k: metrics[k] for k in ("parameters", "train_seconds", "final_val_loss", "val_accuracy")}))
    return 0


STAGE = Stage(
    name="base",
    dvc_name="base",
    help="pretrain or load the base model (DVC stage `base`)",
    description="model.source: scratch trains a byte-level BPE tokenizer and pretrains a MambaFormer (params "
    "model.*, pretrain.*) on every domain's train split; any other source loads that checkpoint (local dir, hub "
    "id or .gguf file, dequantized to float32; a local one belongs under data/raw/, which `dvc repro` watches). "
    "Either way the model goes to models/base/ (safetensors), greedy val scores per domain to "
    "reports/base/metrics.json and the seconds to reports/base/timing.json.",
    run=_command,
    deps=(paths.DATA, paths.RAW),
    outs=(paths.BASE, *(paths.BASE_REPORTS / f for f in ("val_examples.json", "loss.png", "train_loss.csv",
                                                         "val_loss.csv", "metrics.json", paths.TIMING))),
)
