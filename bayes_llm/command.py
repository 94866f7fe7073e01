"""What a `bayes-llm` command registers: its name, texts, arguments and what it runs.

The CLI is a loop over these registrations (`bayes_llm.cli`). A `Stage` is a command that a DVC
stage runs; it also declares the stage's artifact inputs and outputs (paths from `bayes_llm.paths`,
with DVC's own `${key}` for a foreach stage's item), which `tests/test_layout.py` holds against
`dvc.yaml`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Set by `Workspace.restore` for a `dvc repro` that may only restore stages from the run-cache: a stage
# command DVC would run instead refuses before any work (an expert trains elsewhere, on a GPU worker).
RESTORE_ONLY_ENV = "BAYES_LLM_RESTORE_ONLY"


def no_arguments(parser: argparse.ArgumentParser) -> None:
    del parser


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    description: str
    run: Callable[[argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser], None] = no_arguments
    # Keep the description's line breaks (for examples) instead of refilling it.
    raw_description: bool = False
    # It may run model-written code: the sandbox is configured from params first (see cli.main).
    sandboxed: bool = False

    def add_to(self, commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
        kind = argparse.RawDescriptionHelpFormatter if self.raw_description else argparse.HelpFormatter
        parser = commands.add_parser(self.name, help=self.help, description=self.description, formatter_class=kind)
        self.arguments(parser)
        parser.set_defaults(run=self.run, sandboxed=self.sandboxed)
        return parser


@dataclass(frozen=True)
class Stage(Command):
    """A DVC stage's command: `stages/<dvc_name>.py` calls it (with the foreach key, if any)."""

    dvc_name: str = ""
    sandboxed: bool = True
    deps: tuple[Path | str, ...] = ()
    outs: tuple[Path | str, ...] = ()

    def add_to(self, commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
        parser = super().add_to(commands)
        parser.add_argument("--quiet", action="store_true", help="no progress bars")
        parser.set_defaults(dvc_stage=self.dvc_name)
        return parser

    def artifacts(self) -> tuple[set[str], set[str]]:
        """(deps, outs) as POSIX strings, as `dvc.yaml` writes them."""
        return {Path(p).as_posix() for p in self.deps}, {Path(p).as_posix() for p in self.outs}
