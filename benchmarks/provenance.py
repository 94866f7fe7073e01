"""What a study's report records about the run that wrote it: the command that repeats it and the code
it ran, so each figure in reports/objective_study/ can be traced and rerun."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

# Besides the pipeline's outputs, what a study's figures depend on.
CODE = ("bayes_llm", "benchmarks", "params.yaml")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # no git, or not a checkout (an unpacked release)


def run_record(prog: str, argv: list[str] | None = None) -> dict:
    """{command: the command line that repeats the run (`prog` and its arguments; sys.argv's when `argv`
    is None), revision: the git commit it ran at (None outside a checkout), code_changed: whether the
    library, the studies or the params file (params.yaml, or --params) differed from that commit, a new
    file in them included (None when git could not tell)}."""
    args = sys.argv[1:] if argv is None else argv
    command = shlex.join([*prog.split(), *args])
    given = [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "--params"]
    given += [arg.split("=", 1)[1] for arg in args if arg.startswith("--params=")]
    top = _git("rev-parse", "--show-toplevel")
    if top is None:
        return {"command": command, "revision": None, "code_changed": None}
    # A params file outside the checkout, or one git does not track, is in no commit: not repeatable from it.
    inside = [p for p in given if Path(p).resolve().is_relative_to(Path(top).resolve())]
    untracked = len(inside) < len(given) or any(_git("ls-files", "--error-unmatch", "--", p) is None for p in inside)
    status = _git("status", "--porcelain", "--untracked-files=all", "--", *CODE, *inside)
    return {"command": command, "revision": _git("rev-parse", "HEAD"),
            "code_changed": None if status is None else bool(status) or untracked}


def markdown_lines(run: dict | None) -> list[str]:
    """A report's 'Rerun:' paragraph (none for a report written without a record)."""
    if not run:
        return []
    changed = ", with uncommitted code changes" if run["code_changed"] else ""
    at = f" (written at {run['revision'][:12]}{changed})" if run["revision"] else ""
    return [f"Rerun: `{run['command']}`{at}.", ""]
