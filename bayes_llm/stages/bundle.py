"""DVC stage `bundle`: experts + dispatcher + SVD manifest + eval reports → bundles/<name>/.

`bayes-llm bundle verify DIR` checks a bundle against its manifest (and a base's fingerprint).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bayes_llm import paths
from bayes_llm.command import Stage
from bayes_llm.config import load_params

PICTURES = (paths.EVAL_REPORTS / "scores.png", paths.EVAL_REPORTS / "gains.png",
            paths.DISPATCH_REPORTS / "reliability.png")  # fmt: skip


def _command(args: argparse.Namespace) -> int:
    from bayes_llm.bundle.manifest import build_bundle

    print(build_bundle(load_params(args.params)))
    return 0


def _verify_command(args: argparse.Namespace) -> int:
    from bayes_llm.bundle.manifest import verify

    manifest = verify(args.bundle, args.base)
    checked = "files and base" if args.base else "files (no --base given: the base was not checked)"
    print(f"{args.bundle}: {manifest['name']} {manifest['version']}: {len(manifest['files'])} {checked} OK")
    return 0


def _arguments(parser: argparse.ArgumentParser) -> None:
    subcommands = parser.add_subparsers(dest="bundle_command", metavar="SUBCOMMAND")
    check = subcommands.add_parser(
        "verify",
        help="check a bundle's files against its manifest (and a base's fingerprint)",
        description="Refuses (exit 1, with the reason) a bundle with a missing, added or modified file, or, with "
        "--base, a base other than the one the experts were trained on.",
    )
    check.add_argument("bundle", type=Path)
    check.add_argument("--base", type=Path, help="a base model directory to check (e.g. models/base)")
    check.set_defaults(run=_verify_command)


STAGE = Stage(
    name="bundle",
    dvc_name="bundle",
    help="build bundles/<name>/ (DVC stage `bundle`); `bundle verify DIR` checks one",
    description="Copies the experts, the dispatcher and the SVD manifest into bundles/<params bundle.name>/ with "
    "manifest.json (version, base and SVD fingerprints, every file's sha256, params, metrics, git revision) and a "
    "model card (README.md).",
    run=_command,
    sandboxed=False,  # runs no model-written code
    arguments=_arguments,
    deps=(paths.SVD, paths.EXPERTS, paths.DISPATCHER, paths.EVAL_REPORTS / "summary.json",
          paths.EVAL_REPORTS / "results.md", *PICTURES),
    outs=(paths.bundle_dir("${bundle.name}"),),
)
