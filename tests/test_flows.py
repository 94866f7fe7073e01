"""Orchestration: the DVC workspace driver, publishing, and the Prefect flows against a real server."""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from bayes_llm.bundle.publish import PublishError, next_version, set_bundle_version
from bayes_llm.config import load_params
from bayes_llm.pipeline import Snapshot, StageFailed, TransientFailure, Workspace
from tests.conftest import BIN, ROOT, copy_project

# -- fast -------------------------------------------------------------------------------------


def test_versions_bump_only_past_what_is_published(tmp_path):
    assert next_version([], "0.1.0") == "0.1.0"
    assert next_version(["0.1.0"], "0.1.0") == "0.1.1"
    assert next_version(["0.1.0", "0.1.9", "0.1.10"], "0.1.0") == "0.1.11"  # semver order, not text order
    assert next_version(["0.1.3"], "0.2.0") == "0.2.0"  # a declared jump is kept
    params = tmp_path / "params.yaml"
    shutil.copy2(ROOT / "params.yaml", params)
    set_bundle_version(params, "3.2.1")
    assert load_params(params).bundle.version == "3.2.1"
    changed = [line for line in params.read_text().splitlines() if line not in (ROOT / "params.yaml").read_text()]
    assert changed == ["  version: 3.2.1"]  # comments and everything else kept
    with pytest.raises(PublishError, match=r"not X\.Y\.Z"):
        next_version(["1.0"], "0.1.0")


def test_failures_are_classified_for_retries(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    logged: list[str] = []
    workspace = Workspace(tmp_path, log=logged.append)
    assert workspace.run("sh", "-c", "echo hello") == "hello" and logged == ["hello"]
    with pytest.raises(TransientFailure, match="Unable to acquire lock"):
        workspace.run("sh", "-c", "echo 'ERROR: Unable to acquire lock'; exit 1")
    with pytest.raises(StageFailed, match=r"exit 3[\s\S]*params\.yaml: data\.seed") as failure:
        workspace.run("sh", "-c", "echo 'params.yaml: data.seed: must be >= 0'; exit 3")
    assert not isinstance(failure.value, TransientFailure)  # a stage's own error is not retried
    with pytest.raises(Exception, match="not a bayes-llm project"):
        Workspace(tmp_path / "nowhere")


def test_scratch_copy_takes_the_snapshot_and_refuses_another_revision(tmp_path):
    project = copy_project(tmp_path / "p", smoke=True, remote=tmp_path / "remote")
    (project / ".dvc/config.local").write_text("[core]\n    remote = local\n")
    (project / "untracked_note.md").write_text("kept\n")
    workspace = Workspace(project)
    snapshot = Snapshot(rev=workspace.git("rev-parse", "HEAD"), params="seed: 7\n", lock="schema: '2.0'\n")
    with workspace.scratch_copy(snapshot) as scratch:
        assert scratch.root != project
        assert (scratch.root / "params.yaml").read_text() == "seed: 7\n"
        assert (scratch.root / "dvc.lock").read_text() == "schema: '2.0'\n"
        assert (scratch.root / ".dvc/config.local").is_file() and (scratch.root / "untracked_note.md").is_file()
        assert (scratch.root / "bayes_llm/pipeline.py").is_file()
        kept = scratch.root
    assert not kept.exists()  # removed afterwards
    with (
        pytest.raises(StageFailed, match="check out the same revision"),
        workspace.scratch_copy(Snapshot(rev="0" * 40, params="", lock="")),
    ):
        pass


# -- end to end: a real Prefect server, work pool, deployments and workers --------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prefect:
    """A Prefect server on 127.0.0.1 and workers, started and stopped by the test."""

    def __init__(self, home: Path, project: Path) -> None:
        self.project, self.port = project, _free_port()
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        self.processes: list[subprocess.Popen] = []
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)

    def start(self, name: str, *args: str) -> None:
        log = (self.logs / f"{name}.log").open("w")
        self.processes.append(subprocess.Popen([str(BIN / "prefect"), *args], cwd=self.project, env=self.env,
                                               stdout=log, stderr=subprocess.STDOUT))  # fmt: skip

    def cli(self, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "prefect"), *args], cwd=self.project, env=self.env, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

    def wait_healthy(self, seconds: int = 90) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"Prefect server not healthy in {seconds} s:\n{(self.logs / 'server.log').read_text()}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()

    def api(self, path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


@pytest.mark.slow
def test_deployment_run_on_gpu_pool_publishes_a_fetchable_version(tmp_path):
    remote = tmp_path / "remote"
    project = copy_project(tmp_path / "project", smoke=True, remote=remote)
    prefect = Prefect(tmp_path / "prefect-home", project)
    try:
        prefect.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(prefect.port))
        prefect.wait_healthy()
        assert prefect.cli("work-pool", "create", "gpu", "--type", "process").returncode == 0
        deployed = prefect.cli("--no-prompt", "deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        prefect.start("worker-main", "worker", "start", "--pool", "gpu", "--work-queue", "default", "--limit", "1")
        for index in (1, 2):  # two GPU workers for the experts, one expert each at a time
            prefect.start(f"worker-expert-{index}", "worker", "start", "--pool", "gpu", "--work-queue", "experts",
                          "--limit", "1", "--name", f"expert-worker-{index}")  # fmt: skip

        started = time.monotonic()
        run = prefect.cli("deployment", "run", "retrain/retrain", "--watch", timeout=900)
        seconds = time.monotonic() - started
        print(f"prefect deployment run retrain/retrain --watch: {seconds:.0f} s")
        assert run.returncode == 0, (
            run.stdout
            + run.stderr
            + "\n".join(p.read_text()[-3000:] for p in sorted(prefect.logs.glob("worker-*.log")))
        )

        # Two experts ran at the same time, each on its own worker.
        expert_runs = [r for r in prefect.api("flow_runs/filter", {}) if r["name"].startswith("train-expert-")]
        assert len(expert_runs) == 3 and all(r["state_type"] == "COMPLETED" for r in expert_runs)
        spans = sorted((r["start_time"], r["end_time"]) for r in expert_runs)
        assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans
        # The Prefect artifacts say which version and where.
        keys = {a["key"] for a in prefect.api("artifacts/filter", {})}
        assert {"bayes-llm-bundle", "bayes-llm-metrics"} <= keys
        markdown = next(a for a in prefect.api("artifacts/filter", {}) if a["key"] == "bayes-llm-bundle")["data"]
        assert "bayes-llm-experts@v0.1.0" in markdown and str(remote) in markdown

        # The bundle verifies against the run's base, and the version is fetchable from a fresh clone.
        verify = subprocess.run([str(BIN / "bayes-llm"), "bundle", "verify", "bundles/bayes-llm-experts", "--base",
                                 "models/base"], cwd=project, capture_output=True, text=True)  # fmt: skip
        assert verify.returncode == 0, verify.stdout + verify.stderr
        fresh = tmp_path / "fresh"
        subprocess.run(["git", "clone", "-q", str(project), str(fresh)], check=True)
        fetched = subprocess.run([str(BIN / "dvc"), "artifacts", "get", ".", "bayes-llm-experts", "--rev", "v0.1.0",
                                  "-o", "fetched"], cwd=fresh, capture_output=True, text=True)  # fmt: skip
        assert fetched.returncode == 0, fetched.stdout + fetched.stderr
        check = subprocess.run([str(BIN / "bayes-llm"), "bundle", "verify", "fetched"], cwd=fresh, capture_output=True,
                               text=True)  # fmt: skip
        assert check.returncode == 0 and "0.1.0" in check.stdout, check.stdout + check.stderr

        # A failing stage fails the run with its message, and is not retried.
        params = project / "params.yaml"
        params.write_text(params.read_text().replace("\nseed: 0", "\nseed: -1", 1))
        failed = prefect.cli("deployment", "run", "retrain/retrain", "--watch", timeout=300)
        assert failed.returncode != 0
        run_id = re.search(r"UUID: ([0-9a-f-]{36})", failed.stdout)[1]
        last = next(r for r in prefect.api("flow_runs/filter", {}) if r["id"] == run_id)
        assert last["state_type"] == "FAILED"
        assert "seed" in last["state"]["message"] and "greater than or equal to 0" in last["state"]["message"]
        task_runs = prefect.api("task_runs/filter", {"flow_runs": {"id": {"any_": [last["id"]]}}})
        repro_runs = [t for t in task_runs if t["name"].startswith("repro")]
        assert repro_runs and all(t["run_count"] == 1 for t in repro_runs)  # deterministic: no retry
    finally:
        prefect.stop()
