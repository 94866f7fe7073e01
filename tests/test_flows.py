"""Orchestration: the DVC workspace driver, publishing, and the Prefect flows against a real server."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

from bayes_llm.bundle.publish import PublishError, check_version, next_version, set_bundle_version
from bayes_llm.config import load_params
from bayes_llm.errors import UserError
from bayes_llm.experts.distributed import free_port
from bayes_llm.pipeline import Snapshot, StageFailed, TransientFailure, Workspace, train_expert_isolated
from flows.retrain import LOST_WORKER, OUTPUTS_KEY, lock_entry_from_markdown, lock_entry_markdown
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


def test_scratch_copy_takes_the_snapshot_and_refuses_other_code(tmp_path):
    project = copy_project(tmp_path / "p", smoke=True, remote=tmp_path / "remote")
    (project / ".dvc/config.local").write_text("[core]\n    remote = local\n")
    (project / "untracked_note.md").write_text("kept\n")
    workspace = Workspace(project)
    snapshot = Snapshot(rev=workspace.git("rev-parse", "HEAD"), params="seed: 7\n", lock="schema: '2.0'\n",
                        code=workspace.code())  # fmt: skip
    with workspace.scratch_copy(snapshot) as scratch:
        assert scratch.root != project
        assert (scratch.root / "params.yaml").read_text() == "seed: 7\n"
        assert (scratch.root / "dvc.lock").read_text() == "schema: '2.0'\n"
        assert (scratch.root / ".dvc/config.local").is_file() and (scratch.root / "untracked_note.md").is_file()
        assert (scratch.root / "bayes_llm/pipeline.py").is_file()
        kept = scratch.root
    assert not kept.exists()  # removed afterwards

    def commit(*files: str) -> None:
        workspace.git("add", *files)
        workspace.git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "next")

    # A publish commit (the lock, params, reports) on the retrain host: its workers' clones stay usable.
    (project / "dvc.lock").write_text("schema: '2.0'\n")
    commit("dvc.lock")
    with workspace.scratch_copy(replace(snapshot, lock="")) as scratch:
        assert not (scratch.root / "dvc.lock").exists()  # no lock in the run: none written (an empty one is invalid)
    # Code the experts do not run may differ; theirs may not, committed or not.
    (project / "bayes_llm/serve/notes.py").write_text("# not an expert's code\n")
    assert workspace.code() == snapshot.code
    (project / "bayes_llm/experts/extra.py").write_text("print('other code')\n")
    trainer = project / "bayes_llm/experts/trainer.py"
    trainer.write_text(trainer.read_text() + "\n# edited\n")
    with pytest.raises(StageFailed, match=r"uncommitted changes to the experts' code \(bayes_llm/experts/trainer\.py, "
                                          r"bayes_llm/experts/extra\.py\)"):  # fmt: skip
        workspace.snapshot()
    local = workspace.snapshot(committed=False)  # scratch copies of this checkout take its working tree
    with workspace.scratch_copy(local) as scratch:
        assert (scratch.root / "bayes_llm/experts/trainer.py").read_text().endswith("# edited\n")
    commit("bayes_llm/experts")
    with pytest.raises(StageFailed, match="code differs from the run's"), workspace.scratch_copy(snapshot):
        pass
    with pytest.raises(StageFailed, match="code differs from the run's"), workspace.scratch_copy(local):
        pass  # another commit


def test_scratch_copy_keeps_a_relative_remote_pointing_where_it_did(tmp_path):
    project = copy_project(tmp_path / "p", smoke=True)
    (tmp_path / "remote").mkdir()
    workspace = Workspace(project)
    workspace.dvc("remote", "modify", "--local", "local", "url", "../remote")  # stored relative to .dvc/
    assert "../../remote" in (project / ".dvc/config.local").read_text()
    with workspace.scratch_copy(workspace.snapshot()) as scratch:
        assert scratch.dvc("remote", "list").split()[:2] == ["local", str(tmp_path / "remote")]


def test_a_progress_bar_is_logged_once_as_it_ended(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    logged: list[str] = []
    Workspace(tmp_path, log=logged.append).run("printf", "start\\ntrain 0%%\\rtrain 50%%\\rtrain 100%%\\ndone\\n")
    assert logged == ["start", "train 100%", "done"]


def test_restoring_a_stage_that_would_run_here_fails(tmp_path):
    workspace = _toy_dvc_project(tmp_path / "p", tmp_path / "remote", (
        f"stages:\n  made:\n    cmd: echo made > out.txt\n    outs: [out.txt]\n"
        f"  expert:\n    cmd: {sys.executable} -m bayes_llm train-expert math\n    outs: [expert.txt]\n"))
    project = workspace.root
    with pytest.raises(StageFailed, match=r"made: run in .* instead of restored from the DVC run-cache"):
        workspace.restore(["made"])
    assert "didn't change" in workspace.restore(["made"])  # outputs already here: kept, no error
    (project / "out.txt").unlink()
    workspace.restore(["made"])  # from the cache, not run again
    assert (project / "out.txt").read_text() == "made\n"
    # A bayes-llm stage refuses before any work (an expert would have trained here for hours).
    with pytest.raises(StageFailed, match=r"stage train_expert would run here, but this `dvc repro` only restores"):
        workspace.restore(["expert"])


def _toy_dvc_project(project: Path, remote: Path, dvc_yaml: str, files: dict[str, str] | None = None) -> Workspace:
    """A git + DVC project with a local remote and one commit: a stand-in for a checkout."""
    project.mkdir()
    for name, text in {"dvc.yaml": dvc_yaml, "params.yaml": "seed: 0\n", **(files or {})}.items():
        (project / name).write_text(text)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "remote", "add", "-d", "local", str(remote)]):
        subprocess.run(cmd, cwd=project, check=True, env=env, capture_output=True)
    workspace = Workspace(project)
    workspace.git("add", "-A")
    workspace.git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "toy")
    return workspace


@pytest.mark.slow  # a few dozen dvc commands
def test_a_checkout_adopts_exactly_what_its_worker_made(tmp_path):
    # A run that never gives the same bytes twice: a forced retrain with nondeterministic kernels. Shaped
    # like an expert stage for DVC's run-cache: a dep, and its uncached report a metric.
    checkout = _toy_dvc_project(tmp_path / "p", tmp_path / "remote", (
        "stages:\n  made:\n    cmd: python3 make.py\n    deps: [make.py]\n    outs: [out.txt]\n"
        "    metrics: [{report.json: {cache: false}}]\n    plots: [{live: {cache: false}}]\n"), files={"make.py": (
        "import json, os, uuid\nopen('out.txt', 'w').write(uuid.uuid4().hex)\n"
        "json.dump({'run': uuid.uuid4().hex}, open('report.json', 'w'))\n"
        "os.makedirs('live/curve', exist_ok=True)\nopen('live/curve/loss.tsv', 'w').write(uuid.uuid4().hex)\n")})
    runs = []  # three workers' runs of the same code and data: three run-cache entries on the remote
    for _ in range(3):
        with checkout.scratch_copy(checkout.snapshot(committed=False)) as worker:
            worker.repro(["made"], force=True)
            worker.push("made")
            entry = worker.lock_entry("made")
            files = ["out.txt", "report.json", "live/curve/loss.tsv"]  # the last in a cache: false directory
            runs.append((entry, {path: (worker.root / path).read_text() for path in files}))
    assert sorted(out["path"] for out in runs[0][0]["outs"]) == ["live", "out.txt", "report.json"]
    assert len({entry["outs"][0]["md5"] for entry, _ in runs}) == 3

    def holds(files: dict[str, str]) -> bool:
        return {path: (checkout.root / path).read_text() for path in files} == files

    checkout.pull()
    # No entry here: the worker's, not whichever run-cache entry DVC finds newest.
    checkout.adopt({"made": runs[1][0]})
    assert checkout.lock_entry("made") == runs[1][0] and holds(runs[1][1])
    # Other outputs of the same stage here: `dvc repro` alone would keep them as up to date.
    checkout.adopt({"made": runs[2][0]})
    assert checkout.lock_entry("made") == runs[2][0] and holds(runs[2][1])
    assert "outs:" in (checkout.root / "dvc.lock").read_text()
    checkout.adopt({"made": runs[2][0]})  # already there: nothing to do
    # Objects the remote lacks (a lost push), or no lock entry at all: an error naming them, and this
    # checkout as it was.
    lock = (checkout.root / "dvc.lock").read_text()
    missing = {**runs[2][0], "outs": [{**out, "md5": "0" * 32} if out["path"] == "out.txt" else out
                                      for out in runs[2][0]["outs"]]}  # fmt: skip
    with pytest.raises(StageFailed, match=r"remote lacks 1 object\(s\).*made: out\.txt \(0{32}\)"):
        checkout.adopt({"made": missing})
    with pytest.raises(StageFailed, match=r"no valid dvc\.lock entry"):
        checkout.adopt({"made": {"cmd": "python3 make.py", "outs": "out.txt"}})
    with pytest.raises(StageFailed, match="an entry with no outputs"):
        checkout.adopt({"made": {"cmd": "python3 make.py"}})
    unhashed = {**runs[2][0], "outs": [{"path": out["path"]} for out in runs[2][0]["outs"]]}  # the schema allows it
    with pytest.raises(StageFailed, match=r"outputs with no md5 \(live, out\.txt, report\.json\)"):
        checkout.adopt({"made": unhashed})
    assert (checkout.root / "dvc.lock").read_text() == lock and holds(runs[2][1])


def test_a_lock_entry_travels_through_its_artifact_exactly():
    entry = {"cmd": "python stages/train_expert.py math", "deps": [{"path": "models/base", "hash": "md5",
             "md5": "a1.dir", "size": 3, "nfiles": 2}], "params": {"params.yaml": {"seed": 0, "svf": {"on": "yes"}}},
             "outs": [{"path": "models/experts/math.safetensors", "hash": "md5", "md5": "b2", "size": 7}]}  # fmt: skip
    markdown = lock_entry_markdown(entry)
    assert "`models/experts/math.safetensors` b2" in markdown  # readable in the UI
    assert lock_entry_from_markdown(markdown) == entry
    assert lock_entry_from_markdown("no entry here") is None
    assert lock_entry_from_markdown("```json\n{broken\n```") is None  # a corrupt artifact: no entry, not a traceback
    assert lock_entry_from_markdown("```json\n[1, 2]\n```") is None


def test_an_expert_push_is_retried_in_its_scratch_copy(tmp_path, monkeypatch):
    project = copy_project(tmp_path / "p", smoke=True)
    workspace = Workspace(project)
    calls: list[str] = []

    def push(self, *targets):
        calls.append("push")
        if calls.count("push") < 3:
            raise TransientFailure("ERROR: Connection reset by peer")

    monkeypatch.setattr(Workspace, "pull", lambda self, *a, **k: calls.append("pull"))
    monkeypatch.setattr(Workspace, "repro", lambda self, *a, **k: calls.append("train"))
    monkeypatch.setattr(Workspace, "push", push)
    train_expert_isolated(workspace, "math", workspace.snapshot(committed=False), retry_seconds=0)
    assert calls == ["pull", "train", "push", "push", "push"]  # trained once, pushed on the third try
    calls.clear()
    with pytest.raises(TransientFailure, match="Connection reset"):
        train_expert_isolated(workspace, "math", workspace.snapshot(committed=False), push_attempts=2,
                              retry_seconds=0)  # fmt: skip
    assert calls == ["pull", "train", "push", "push"]


def test_only_a_lost_worker_is_retried():
    assert LOST_WORKER.search("no heartbeat for 100 s: the worker running it was lost")  # flows/lost-runs.yaml
    assert LOST_WORKER.search("Process exited with status code: -9. Process exited due to a SIGKILL signal.")
    assert not LOST_WORKER.search("Flow run infrastructure exited with non-zero status code 1.")  # a pull step


def test_a_version_is_checked_before_any_work(tmp_path):
    project = copy_project(tmp_path / "p", smoke=True)
    workspace = Workspace(project)
    name = load_params(project / "params.yaml").bundle.name
    workspace.git("tag", f"{name}@v0.1.0")
    check_version(workspace, None)
    check_version(workspace, "0.1.1")
    with pytest.raises(PublishError, match=r"v0\.1\.0 is already published"):
        check_version(workspace, "0.1.0")
    with pytest.raises(PublishError, match=r"not X\.Y\.Z"):
        check_version(workspace, "1.0")


def test_retrain_refuses_bad_requests_before_any_stage(tmp_path, monkeypatch):
    from flows import retrain as flow_module

    project = copy_project(tmp_path / "p", smoke=True)
    workspace = Workspace(project)
    workspace.git("tag", f"{load_params(project / 'params.yaml').bundle.name}@v0.1.0")

    def no_stage(*args, **kwargs):
        raise AssertionError("a DVC task ran before the request was checked")

    monkeypatch.setattr(flow_module, "_workspace", lambda: workspace)
    monkeypatch.setattr(flow_module, "pull", no_stage)
    run = flow_module.retrain.fn  # the flow's body, without a Prefect API
    with pytest.raises(UserError, match="a version names a published bundle"):
        run(version="0.2.0", publish_bundle=False)
    with pytest.raises(PublishError, match=r"v0\.1\.0 is already published"):
        run(version="0.1.0")
    with pytest.raises(PublishError, match=r"not X\.Y\.Z"):
        run(version="1.0")
    trainer = project / "bayes_llm/experts/trainer.py"
    trainer.write_text(trainer.read_text() + "\n# edited\n")
    with pytest.raises(StageFailed, match="uncommitted changes to the experts' code"):
        run(publish_bundle=False, expert_deployment="train-expert/train-expert")
    with pytest.raises(AssertionError, match="a DVC task ran"):  # a local run takes the working tree
        run(publish_bundle=False)


@pytest.mark.slow  # the smoke pipeline, as a flow on Prefect's embedded local API
def test_local_retrain_flow_trains_experts_in_scratch_copies_and_adopts_them(tmp_path):
    remote = tmp_path / "remote"
    project = copy_project(tmp_path / "p", smoke=True, remote=remote)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"), "PREFECT_API_URL": "",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "flows.retrain", "--no-publish"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    result = json.loads(done.stdout[done.stdout.index("{\n"):])
    workspace = Workspace(project)
    assert set(result["experts"]) == set(workspace.domains()) and "published" not in result
    for domain in workspace.domains():  # trained in scratch copies, restored here, whole
        outs = workspace.lock_entry(f"train_expert@{domain}")["outs"]
        assert outs and all((project / out["path"]).exists() for out in outs)
    stages = [f"train_expert@{domain}" for domain in workspace.domains()]
    assert "Data and pipelines are up to date" in workspace.dvc("status", *stages)  # nothing left to run


# -- end to end: a real Prefect server, work pool, deployments and workers --------------------


class Prefect:
    """A Prefect server on 127.0.0.1 and workers, started and stopped by the test."""

    def __init__(self, home: Path, project: Path) -> None:
        self.project, self.port = project, free_port()
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{self.port}/api",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
                    "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs = home / "logs"
        self.logs.mkdir(parents=True)

    def start(self, name: str, *args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.Popen:
        """A Prefect command in the background, in its own session."""
        log = (self.logs / f"{name}.log").open("w")
        self.processes[name] = subprocess.Popen([str(BIN / "prefect"), *args], cwd=cwd or self.project,
                                                env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)  # fmt: skip
        return self.processes[name]

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
        for process in reversed(self.processes.values()):
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)

    def api(self, path: str, body: dict) -> list[dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/api/{path}", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return 0


def _host_of(run: dict, workers: dict[str, subprocess.Popen]) -> str | None:
    """Which worker started a flow run's process (its infrastructure_pid, `[host:]pid`)."""
    pid = int(str(run.get("infrastructure_pid") or "0").rsplit(":", 1)[-1] or 0)
    by_pid = {worker.pid: name for name, worker in workers.items()}
    while pid > 1 and pid not in by_pid:
        pid = _parent(pid)
    return by_pid.get(pid)


def _lose_host(worker: subprocess.Popen) -> None:
    """SIGKILL a worker and every process under it, at once: its host is gone."""
    tree, grew = {worker.pid}, True
    while grew:
        children = {int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and _parent(int(p.name)) in tree}
        grew = not children <= tree
        tree |= children
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _log_messages(prefect: Prefect, flow_run_id: str) -> list[str]:
    """Every log line of a flow run (the API pages them 200 at a time)."""
    messages: list[str] = []
    while page := prefect.api("logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}},
                                              "offset": len(messages), "limit": 200}):  # fmt: skip
        messages += [log["message"] for log in page]
    return messages


def _remote_objects_are_whole(remote: Path) -> int:
    """Every object in a DVC remote is complete: its md5 is its name. Returns how many there are."""
    objects = [p for p in (remote / "files/md5").rglob("*") if p.is_file()]
    for path in objects:
        name = path.parent.name + path.name.removesuffix(".dir")
        assert hashlib.md5(path.read_bytes()).hexdigest() == name, f"half-written object in the remote: {path}"
    return len(objects)


@pytest.mark.slow
def test_deployment_run_on_gpu_pool_publishes_a_fetchable_version(tmp_path):
    """Expert workers on two "hosts": each its own clone, DVC cache and session, sharing only the DVC
    remote with the retrain run. One host is killed mid-expert: that run crashes (no heartbeats),
    the retrain run retries the expert on the other host, publishes, and the remote holds only whole
    objects."""
    remote = tmp_path / "remote"
    project = copy_project(tmp_path / "project", smoke=True, remote=remote)
    prefect = Prefect(tmp_path / "prefect-home", project)
    try:
        prefect.start("server", "server", "start", "--host", "127.0.0.1", "--port", str(prefect.port))
        prefect.wait_healthy()
        assert prefect.cli("work-pool", "create", "gpu", "--type", "process").returncode == 0
        automation = prefect.cli("automation", "create", "--from-file", "flows/lost-runs.yaml")
        assert automation.returncode == 0, automation.stdout + automation.stderr
        deployed = prefect.cli("--no-prompt", "deploy", "--all")
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        prefect.start("worker-main", "worker", "start", "--pool", "gpu", "--work-queue", "default", "--limit", "1")
        hosts = {}
        for index in (1, 2):  # two expert hosts, one expert each at a time
            clone = tmp_path / f"host-{index}" / "bayes-llm"
            subprocess.run(["git", "clone", "-q", str(project), str(clone)], check=True)
            assert not (clone / ".dvc/cache").exists()  # its own cache, filled from the remote only
            name = f"worker-expert-{index}"
            hosts[name] = prefect.start(name, "worker", "start", "--pool", "gpu", "--work-queue", "experts",
                                        "--limit", "1", "--name", name, cwd=clone,
                                        env={"BAYES_LLM_CHECKOUT": str(clone)})  # fmt: skip

        started = time.monotonic()
        retrain = subprocess.Popen([str(BIN / "prefect"), "deployment", "run", "retrain/retrain", "--watch"],
                                   cwd=project, env=prefect.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)  # fmt: skip
        # Lose the host of the first expert that starts, a few seconds into it (after its first heartbeat).
        killed, deadline = None, time.monotonic() + 600
        while killed is None and time.monotonic() < deadline and retrain.poll() is None:
            runs = [r for r in prefect.api("flow_runs/filter", {}) if r["name"].startswith("train-expert-")]
            candidate = next(((r, h) for r in runs if r["state_type"] == "RUNNING" and (h := _host_of(r, hosts))), None)
            if candidate:
                time.sleep(3)
                run, host = candidate
                now = next(r for r in prefect.api("flow_runs/filter", {}) if r["id"] == run["id"])
                if now["state_type"] == "RUNNING":  # still mid-expert
                    lost_run, killed = run, host
                    _lose_host(hosts[host])
            time.sleep(0.5)
        if not killed:
            retrain.kill()
            runs = [(r["name"], r["state_type"], r["infrastructure_pid"]) for r in prefect.api("flow_runs/filter", {})]
            logs = "\n".join(p.read_text()[-3000:] for p in sorted(prefect.logs.glob("worker-*.log")))
            raise AssertionError(f"no expert run started on an expert host: {runs}\n{retrain.communicate()[0]}\n{logs}")
        output, _ = retrain.communicate(timeout=1200)
        seconds = time.monotonic() - started
        print(f"prefect deployment run retrain/retrain --watch, one host lost: {seconds:.0f} s")
        assert retrain.returncode == 0, (
            output + "\n".join(p.read_text()[-3000:] for p in sorted(prefect.logs.glob("worker-*.log")))
        )

        # The lost run crashed; every expert completed, the lost one on the surviving host.
        expert_runs = [r for r in prefect.api("flow_runs/filter", {}) if r["name"].startswith("train-expert-")]
        states = sorted((r["name"], r["state_type"]) for r in expert_runs)
        lost = next(r for r in expert_runs if r["id"] == lost_run["id"])
        # Crashed by the heartbeat automation, or first by its runner when that saw the SIGKILL (under load)
        assert lost["state_type"] == "CRASHED" and LOST_WORKER.search(lost["state"]["message"]), states
        completed = [r for r in expert_runs if r["state_type"] == "COMPLETED"]
        assert sorted(r["name"] for r in completed) == ["train-expert-code", "train-expert-math",
                                                         "train-expert-reasoning"], states  # fmt: skip
        # Two experts ran at the same time, each on its own host (the lost one before it was lost).
        spans = sorted((r["start_time"], r["end_time"] or lost["state"]["timestamp"]) for r in [*completed, lost])
        assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans
        retrain_run = next(r for r in prefect.api("flow_runs/filter", {}) if r["deployment_id"] and
                           not r["name"].startswith("train-expert-") and r["state_type"] == "COMPLETED")  # fmt: skip
        messages = _log_messages(prefect, retrain_run["id"])
        retried = [m for m in messages if f"flow run {lost['name']} crashed" in m and "on another worker" in m]
        assert retried, "the retrain run did not say which expert it retried"
        assert _remote_objects_are_whole(remote) > 0
        # Each expert's run handed back its lock entry, and the retrain checkout holds exactly its outputs.
        handed = {a["flow_run_id"]: lock_entry_from_markdown(a["data"]) for a in prefect.api("artifacts/filter", {})
                  if a["key"] == OUTPUTS_KEY}  # fmt: skip
        for run in completed:
            stage = f"train_expert@{run['name'].removeprefix('train-expert-')}"
            held = [(out["path"], out["md5"]) for out in Workspace(project).lock_entry(stage)["outs"]]
            assert held == [(out["path"], out["md5"]) for out in handed[run["id"]]["outs"]], stage

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
