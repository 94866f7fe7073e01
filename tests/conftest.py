from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from bayes_llm.config import Params, _deep_merge, parse_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's dvc, prefect, bayes-llm


def copy_project(target: Path, *, smoke: bool = False, remote: Path | None = None) -> Path:
    """This project's tracked and unignored files (no data, outputs or reports) as a fresh git repo.
    `smoke`: `profile: smoke` in params.yaml; `remote`: the DVC remote's url, committed as a real
    project commits it."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split("\n")  # fmt: skip
    for name in filter(None, listed):
        outputs = name.startswith(("data/", "reports/")) and name != "data/raw/README.md"  # data/raw: a dep
        if (ROOT / name).is_file() and not outputs and name != "dvc.lock":
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    if smoke:
        params = target / "params.yaml"
        params.write_text(params.read_text().replace("\nprofile: full", "\nprofile: smoke", 1))
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    setup = [["dvc", "remote", "modify", "local", "url", str(remote)]] if remote else []
    for cmd in (["git", "init", "-q"], *setup, ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "copy"]):  # fmt: skip
        subprocess.run(cmd, cwd=target, check=True, env=env, capture_output=True)
    return target


# Fixtures that build (part of) the smoke pipeline. A test that uses one, directly or through another
# fixture, is a pipeline test: marked slow, so `pytest -m "not slow"` is the unit suite. A test module
# names its own such fixtures in PIPELINE_FIXTURES.
PIPELINE_FIXTURES = {"full_smoke_project"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        own = getattr(item.module, "PIPELINE_FIXTURES", set())
        if (PIPELINE_FIXTURES | own) & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def raw_params(profile: str = "smoke", **data_overrides: Any) -> dict:
    """The project's params.yaml (smoke size by default), with `data` keys replaced.

    The smoke overlay is merged in first and then emptied, so the overrides are what a test sees.
    """
    raw = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    raw["profile"] = profile
    if profile == "smoke":
        raw = _deep_merge(raw, raw["smoke"])
        raw["smoke"] = {}
    raw["data"].update(data_overrides)
    return raw


def smoke_params(**data_overrides: Any) -> Params:
    return parse_params(raw_params(**data_overrides))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def build_smoke_project(root: Path, commands: list[list[str]]) -> Path:
    """Run `bayes-llm` commands (stages) in `root` on the smoke params: a module fixture's project."""
    from bayes_llm.cli import main

    (root / "params.yaml").write_text(yaml.safe_dump(raw_params()))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        for command in commands:
            assert main([*command, "--quiet"]) == 0, command
    return root


FULL_PIPELINE = [["prepare"], ["base"], ["decompose"], ["train-expert", "math"], ["train-expert", "code"],
                 ["train-expert", "reasoning"], ["calibrate"], ["train-lora"], ["evaluate"], ["bundle"]]  # fmt: skip


@pytest.fixture(scope="session")
def full_smoke_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every stage's CLI command once at smoke size (shared, read-only: use `enter_copy` to change it)."""
    return build_smoke_project(tmp_path_factory.mktemp("full"), FULL_PIPELINE)


def enter_copy(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of a module's project as the working directory, so a test may break it."""
    copy = tmp_path / "p"
    shutil.copytree(project, copy)
    monkeypatch.chdir(copy)
    return copy


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty project directory as the working directory (stages write relative paths)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
