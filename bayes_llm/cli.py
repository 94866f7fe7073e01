"""The `bayes-llm` command: a loop over the stages' and the other commands' registrations.

Stages call it too (`stages/<name>.py`), so a stage and its CLI command are one code path.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from bayes_llm.command import RESTORE_ONLY_ENV
from bayes_llm.commands import COMMANDS
from bayes_llm.config import PARAMS_FILE, load_params
from bayes_llm.errors import UserError
from bayes_llm.stages import all_stages

DESCRIPTION = """\
bayes-llm: self-adaptive hybrid Mamba/attention LLMs (Transformer²-style SVF experts chosen by a
Bayesian dispatcher), run as a reproducible DVC pipeline.

Most work runs through DVC (`dvc repro`); the stage commands below are what its stages call.
Params come from params.yaml; `profile: smoke` there (or `dvc exp run -S profile=smoke`) selects
the tiny end-to-end configuration. Benchmarks and studies live outside the package: `python -m
benchmarks.<name> --help` in the project root."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bayes-llm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="params file (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in [*all_stages(), *COMMANDS]:
        command.add_to(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "dvc_stage", None) and os.environ.get(RESTORE_ONLY_ENV):
            raise UserError(f"stage {args.dvc_stage} would run here, but this `dvc repro` only restores stages "
                            f"from the DVC run-cache (${RESTORE_ONLY_ENV}), which has no entry for it: did the "
                            "worker push to this workspace's DVC remote?")  # fmt: skip
        if args.sandboxed:
            from bayes_llm.rewards.sandbox import configure

            configure(load_params(args.params).sandbox.allow_weak_isolation)
        return args.run(args)
    except UserError as error:
        print(f"bayes-llm {args.command}: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
