"""DVC stage `prepare`: params `data` → data/prepared/, data/routing/, reports/data/.

Builds every domain's splits and the routing benchmark made from their val/test rows
(bayes_llm/data/routing.py), writes parquet and gates it with Great Expectations. Writes go to a
staging directory that replaces `data/prepared/` only when validation passes; the validation report
is written either way, so a failure can be read, and nothing half-made stays.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import Params, load_params
from bayes_llm.data import routing
from bayes_llm.data.domains import Domain, build, resolve
from bayes_llm.data.prepared import split_path
from bayes_llm.data.sources import untracked_files
from bayes_llm.data.validate import ValidationReport, validate, validate_routing
from bayes_llm.errors import UserError
from bayes_llm.io import staged_dir, write_json


class DataValidationError(UserError):
    """The prepared data failed the gate; the message is the readable report."""


def _write_split(path: Path, rows: list[dict]) -> None:
    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # one bar per tiny file is noise; `prepare` reports its own progress
    path.parent.mkdir(parents=True, exist_ok=True)
    Dataset.from_list(rows).to_parquet(str(path))


def _routing(domains: list[Domain], built: dict, params: Params, staging: Path, progress: bool) -> dict | None:
    """Build and write the routing benchmark from the train/val/test splits of the expert domains;
    → {part: frame read back}, or None when it is switched off."""
    cfg = params.data.routing
    if not cfg.enabled:
        return None
    experts = {d.name: (d.answer_kind, built[d.name]) for d in domains if not d.test_only}
    parts = routing.build(experts, cfg, params.data.seed)
    frames = {}
    for part, rows in parts.items():
        pd.DataFrame(rows).to_parquet(routing.path(staging, part), index=False)
        frames[part] = pd.read_parquet(routing.path(staging, part))
    return frames


def _summary(domains: list[Domain], frames: dict, report: ValidationReport, routed: dict | None) -> dict:
    """Metrics for `dvc metrics`: a function of the params alone (timings go to timing.json)."""
    per_domain = {}
    for domain in domains:
        rows = {split: len(df) for split, df in frames[domain.name][1].items()}
        per_domain[domain.name] = {
            "answer_kind": domain.answer_kind,
            "source": domain.source,
            "test_only": domain.test_only,
            "rows": rows,
            "total": sum(rows.values()),
        }
    return {
        "validation": "passed" if report.success else "failed",
        "failed_expectations": len(report.failures),
        "expectations": report.expectations,
        "rows_total": sum(d["total"] for d in per_domain.values()),
        "domains": per_domain,
        "routing": {part: f["kind"].value_counts().sort_index().to_dict() for part, f in (routed or {}).items()},
    }


def prepare(
    params: Params,
    out_dir: Path = paths.DATA,
    report_dir: Path = paths.DATA_REPORTS,
    progress: bool = True,
    routing_dir: Path = paths.ROUTING,
) -> dict:
    """Build, write, validate; returns the summary. Raises DataValidationError on a failed gate."""
    started = time.monotonic()
    domains = resolve(params.data)
    with staged_dir(out_dir) as staging, staged_dir(routing_dir) as routing_staging:
        frames, built = {}, {}
        for domain in domains:
            built[domain.name] = splits = build(domain, params.data, params.data.seed)
            for split, rows in splits.items():
                _write_split(split_path(staging, domain.name, split), rows)
            # Validate what is on disk, not what we meant to write.
            frames[domain.name] = (domain, {s: pd.read_parquet(split_path(staging, domain.name, s)) for s in splits})
        report = validate(frames, params.data, progress=progress)
        routed = _routing(domains, built, params, routing_staging, progress)
        if routed is not None:
            texts = {name: [text for row in splits.get("train", []) for key in ("prompt", "answer", "solution")
                            if isinstance(text := row.get(key), str)] for name, splits in built.items()}  # fmt: skip
            trained = [text for domain_texts in texts.values() for text in domain_texts]
            generated = [text for d in domains if d.source == "synthetic" for text in texts[d.name]]
            experts = [d for d in domains if not d.test_only]
            labels = [d.name for d in experts] + [routing.OTHER]
            mixed = routing.mixable({d.answer_kind for d in experts})
            gate = validate_routing(routed, trained, generated, labels, params.data, mixed, progress)
            report = report.merged(gate)
        summary = _summary(domains, frames, report, routed)
        write_json(report_dir / "validation.json", report.to_json())
        write_json(report_dir / "summary.json", summary)
        write_json(report_dir / "timing.json", {"stage_seconds": round(time.monotonic() - started, 2)})
        if not report.success:
            # What an earlier run left would pass for this params' data: nothing is left instead.
            for stale in (out_dir, routing_dir):
                shutil.rmtree(stale, ignore_errors=True)
            raise DataValidationError(f"{report.text()}\nfull report: {report_dir / 'validation.json'}")
        manifest = {"seed": params.data.seed, "domains": [asdict(d) for d in domains]}
        write_json(staging / paths.DATA_MANIFEST.name, manifest)
    return summary


def format_summary(summary: dict) -> str:
    width = max([12, *(len(name) + 2 for name in summary["domains"])])  # arc_challenge and longer
    lines = [f"{'domain':<{width}}{'source':<11}{'train':>7}{'val':>7}{'test':>7}"]
    for name, info in summary["domains"].items():
        rows = info["rows"]
        lines.append(
            f"{name:<{width}}{info['source']:<11}" + "".join(f"{rows.get(s, '-'):>7}" for s in ("train", "val", "test"))
        )
    for part, kinds in summary["routing"].items():
        lines.append(f"routing benchmark, {part}: " + ", ".join(f"{n} {kind}" for kind, n in kinds.items()))
    lines.append(
        f"{summary['rows_total']} rows, validation {summary['validation']} ({summary['expectations']} expectations)"
    )
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> int:
    params = load_params(args.params)
    for name, source in params.data.sources.items():
        if source.type == "local" and (outside := untracked_files(source)):
            files = ", ".join(map(str, outside))
            print(f"note: data.sources.{name}: {files} lie outside {paths.RAW}/, the directory `dvc repro` "
                  "watches: it will not rerun prepare when they change", file=sys.stderr)  # fmt: skip
    print(format_summary(prepare(params, progress=not args.quiet)))
    return 0


STAGE = Stage(
    name="prepare",
    dvc_name="prepare",
    help="build, validate and write the data (DVC stage `prepare`)",
    description="Generate or load every domain's train/val/test splits, write them to data/prepared/ as parquet, "
    "build the dispatcher's routing benchmark (held-out phrasings, mixed and off-domain prompts) into data/routing/, "
    "and gate both with Great Expectations. On failure nothing is left in either; the report is in "
    "reports/data/validation.json.",
    run=_command,
    deps=(paths.RAW,),
    outs=(paths.DATA, paths.ROUTING,
          *(paths.DATA_REPORTS / f for f in ("validation.json", "timing.json", "summary.json"))),
)
