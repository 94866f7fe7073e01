"""End to end: the real `dvc` on a copy of this project at smoke size (slow: seconds, not ms)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import copy_project

pytestmark = pytest.mark.slow


def _run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """This project's tracked and unignored files in a fresh git repo, without data or outputs."""
    return copy_project(tmp_path / "project")


def test_smoke_repro_is_reproducible_and_tracks_params(project: Path):
    # The documented smoke command: no hand edit of params.yaml.
    out = _run(project, "dvc", "exp", "run", "-S", "profile=smoke")
    assert "Running stage 'prepare'" in out and "Running stage 'base'" in out
    summary = json.loads((project / "reports/data/summary.json").read_text())
    assert summary["validation"] == "passed"
    assert summary["domains"]["math"]["rows"] == {"train": 48, "val": 12, "test": 12}
    assert (project / "data/prepared/code/test.parquet").is_file()
    base = json.loads((project / "reports/base/metrics.json").read_text())
    assert base["train_tokens"] == 4 * 4 * 64 and (project / "models/base/model.safetensors").is_file()
    svd = json.loads((project / "reports/svf/decompose.json").read_text())
    # all: 3 MLP matrices per layer, q/k/v/o of the attention layer, in/out of the Mamba layer
    assert svd["targets"] == "all" and svd["matrices"] == 2 * 3 + 4 + 2 and svd["max_relative_error"] <= 1e-5
    dispatch = json.loads((project / "reports/dispatch/metrics.json").read_text())
    assert set(dispatch["strategies"]) == {"prompt", "cls"}
    assert (project / "models/dispatcher/dispatcher.json").is_file()
    summary = json.loads((project / "reports/eval/summary.json").read_text())
    assert {"base.mean", "oracle.math", "adaptive_prompt.mean", "lora.code"} <= set(summary)
    assert (project / "reports/README.md").is_file() and (project / "models/lora/lora.json").is_file()

    out = _run(project, "dvc", "repro")
    assert "Running stage" not in out and "didn't change" in out

    # `dvc exp show` lists the run with its params and metrics.
    shown = _run(project, "dvc", "exp", "show", "--json")
    assert "rows_total" in shown and "profile" in shown and "adaptive_prompt.mean" in shown
    _readme_comparisons(project)

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["seed"] = 99
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (project / "data/prepared/math/test.parquet").read_bytes()
    out = _run(project, "dvc", "repro")
    assert "Running stage 'prepare'" in out
    assert (project / "data/prepared/math/test.parquet").read_bytes() != before
    assert "Running stage 'base'" in out  # new data, new base

    # A base-only param re-runs base and leaves prepare alone.
    params["pretrain"]["learning_rate"] = 0.001
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(project, "dvc", "repro")
    assert "Running stage 'base'" in out and "Running stage 'prepare'" not in out

    # Another SVF target set re-runs decompose only.
    params["svf"]["targets"] = "attn"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(project, "dvc", "repro")
    assert "Running stage 'decompose'" in out and "Running stage 'base'" not in out
    assert json.loads((project / "reports/svf/decompose.json").read_text())["matrices"] == 4

    # A dispatch param re-runs calibrate only.
    params["dispatch"]["max_fallback"] = 0.05
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(project, "dvc", "repro")
    assert "Running stage 'calibrate'" in out and "Running stage 'train_expert" not in out
    assert "Running stage 'evaluate'" in out and "Running stage 'train_lora'" not in out


def _readme_comparisons(project: Path) -> None:
    """The README's comparison recipes, run as written on a committed smoke run."""
    _run(project, "git", "add", "-A")
    _run(project, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke run")
    # Every stage again with the same params: the metrics hold scores only, so nothing differs.
    out = _run(project, "dvc", "repro", "--force")
    assert "Running stage 'base'" in out and "Running stage 'evaluate'" in out
    assert _run(project, "dvc", "metrics", "diff").strip() == ""

    # A queued two-experiment grid, then the README's `dvc exp show` lines.
    _run(project, "git", "checkout", "-q", "--", ".")
    for fallback in ("0.05", "0.3"):
        _run(project, "dvc", "exp", "run", "--queue", "-n", f"fallback-{fallback}",
             "-S", f"dispatch.max_fallback={fallback}")  # fmt: skip
    _run(project, "dvc", "queue", "start", "-j", "1")
    deadline = time.monotonic() + 600
    while "Queued" in (status := _run(project, "dvc", "queue", "status")) or "Running" in status:
        assert time.monotonic() < deadline, status
        time.sleep(3)
    assert status.count("Success") == 2, status
    # The dispatcher's detail (per strategy, held-out benchmark) is dropped as the README does.
    dropped = r"(models|reports|data)/|strategies\.|heldout\."
    table = _run(project, "dvc", "exp", "show", "--only-changed", "--drop", dropped, "--keep", ".*mean$")
    header = table.splitlines()[1].split()
    assert {"base.mean", "adaptive_prompt.mean", "dispatch.max_fallback"} <= set(header)
    assert not any(column.startswith(("models/", "reports/")) or "seconds" in column for column in header), header
    markdown = _run(project, "dvc", "exp", "show", "--md", "--drop", ".*",
                    "--keep", "Experiment|.*max_fallback|.*mean$")  # fmt: skip
    rows = {line.split("|")[1].strip(): line for line in markdown.splitlines() if line.startswith("| ")}
    for name in ("fallback-0.05", "fallback-0.3"):
        row = next(line for key, line in rows.items() if f"[{name}]" in key)
        cells = [cell.strip() for cell in row.split("|")[2:-1]]
        assert len(cells) == len(rows["Experiment"].split("|")) - 3 and all(cells), row  # every mean, filled in
