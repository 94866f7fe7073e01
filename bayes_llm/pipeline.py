"""The DVC pipeline driven from code: what the Prefect flows run (they stay thin).

A `Workspace` is a checkout of this project. The flows run the stages with the `dvc` command line
(DVC's own locks, run-cache and progress), and an expert can be trained in a scratch copy of the
workspace so that several experts train at once: DVC holds one lock per workspace. Workspaces meet
only through the DVC remote; what one run hands to another (params, lock file, git revision) travels
as a `Snapshot`, so a worker on another machine can take part.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from bayes_llm import paths
from bayes_llm.command import RESTORE_ONLY_ENV
from bayes_llm.config import load_params, parse_params
from bayes_llm.errors import UserError
from bayes_llm.io import atomic_path

# Output that marks a failure worth retrying: another process holds the lock, or the remote is
# briefly unreachable. Anything else (a stage's own error, bad params) fails the same way again.
TRANSIENT_PATTERNS = re.compile(
    r"Unable to acquire lock|is busy|Connection (reset|refused|aborted)|timed out|Temporary failure in name resolution"
    r"|Service Unavailable|Too Many Requests",
    re.IGNORECASE,
)
OUTPUT_TAIL = 40  # lines of a failed command's output kept in its error
ARTIFACT_ROOTS = ("data/", "models/", "reports/", "bundles/")  # what stages write, not code


class StageFailed(UserError):
    """A `dvc` command failed; the message holds the command and the end of its output."""


class TransientFailure(StageFailed):
    """A failure that may pass when tried again (a lock, the network)."""


@dataclass(frozen=True)
class Snapshot:
    """What a run hands to an expert worker: the code revision and the files DVC reads state from."""

    rev: str
    params: str
    lock: str
    # The git objects of the expert stage's code at rev (`Workspace.code`); empty: this checkout's
    # working tree, for scratch copies of this same checkout only.
    code: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def tool(name: str) -> str:
    """The command `name` beside this interpreter (a worker started from the venv uses its DVC/GTO)."""
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.is_file() else name


class Workspace:
    def __init__(self, root: Path | str, log: Callable[[str], None] = print) -> None:
        self.root = Path(root).resolve()
        self.log = log
        if not (self.root / "dvc.yaml").is_file():
            raise UserError(f"{self.root}: not a bayes-llm project (no dvc.yaml)")

    # -- commands ------------------------------------------------------------------------------
    def run(self, *cmd: str, env: dict[str, str] | None = None) -> str:
        """Run a command in the workspace, streaming its output to the log; raise on failure."""
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        # Bytes, split at newlines only: in text mode every progress-bar redraw (`\r`) would be a line.
        process = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines = []
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip().rsplit("\r", 1)[-1]  # a bar's last redraw
            if line:
                self.log(line)
            lines.append(line)
        if process.wait():
            tail = "\n".join(lines[-OUTPUT_TAIL:])
            error = TransientFailure if TRANSIENT_PATTERNS.search(tail) else StageFailed
            name = " ".join([Path(cmd[0]).name, *cmd[1:]])
            raise error(f"`{name}` failed (exit {process.returncode}) in {self.root}:\n{tail}")
        return "\n".join(lines)

    def dvc(self, *args: str, env: dict[str, str] | None = None) -> str:
        return self.run(tool("dvc"), *args, env=env)

    def git(self, *args: str) -> str:
        done = subprocess.run(["git", *args], cwd=self.root, capture_output=True, text=True)
        if done.returncode:
            raise StageFailed(f"`git {' '.join(args)}` failed in {self.root}: {done.stderr.strip()}")
        return done.stdout.strip()

    # -- pipeline ------------------------------------------------------------------------------
    def domains(self) -> list[str]:
        """The expert domains: the keys of `experts` in params.yaml (the `train_expert` foreach)."""
        return list(load_params(self.root / "params.yaml").experts)

    def expert_gain(self, domain: str) -> dict:
        """The expert's own-domain gain over the base (points, 95 % CI) from its report."""
        return json.loads((self.root / paths.expert_report(domain)).read_text())["gain"]

    def repro(self, stages: list[str], force: bool = False, env: dict[str, str] | None = None,
              pull: bool = True) -> str:  # fmt: skip
        """Exactly these stages (their upstream was run before); cached runs are restored, not rerun."""
        options = [*(["--pull"] if pull else []), *(["--force"] if force else [])]
        return self.dvc("repro", "--single-item", *options, *stages, env=env)

    def restore(self, stages: list[str], pull: bool = True) -> str:
        """Stages another workspace ran and pushed, restored from DVC's run-cache (or kept where this
        workspace already has their outputs). A stage DVC would run instead had no run-cache entry (a
        lost push, another remote): an error, not a silent retraining here. A bayes-llm stage refuses
        at its start ($BAYES_LLM_RESTORE_ONLY); any other command is caught by DVC's log."""
        output = self.repro(stages, env={RESTORE_ONLY_ENV: "1"}, pull=pull)
        if ran := re.findall(r"^Running stage '([^']+)'", output, re.MULTILINE):
            raise StageFailed(f"{', '.join(ran)}: run in {self.root} instead of restored from the DVC run-cache "
                              "(do the workers push to this workspace's DVC remote?)")  # fmt: skip
        return output

    def lock_entry(self, stage: str) -> dict:
        """`stage`'s entry in `dvc.lock` (cmd, deps, params, outs), read as DVC reads it; {} if none."""
        from dvc.utils.serialize import load_yaml

        lock = self.root / "dvc.lock"
        return dict(((load_yaml(str(lock)) or {}).get("stages") or {}).get(stage) or {}) if lock.is_file() else {}

    def adopt(self, made: dict[str, dict]) -> None:
        """Take what other workspaces made and pushed: stage → its `dvc.lock` entry there.

        Each entry goes into this checkout's lock first. Without it, DVC would keep outputs this checkout
        already holds (a forced retrain with nondeterministic kernels, or on another kind of machine) as
        up to date, or, with no entry here, restore whichever run-cache entry of the same code, params and
        data is newest. Every object the entries name is fetched first, and the restore runs without
        `--pull`: for a stage whose only change is missing outputs, `--pull` checks out the cached ones
        and calls it done, leaving its `cache: false` reports missing, where DVC's run-cache restore
        checks out every output of the entry."""
        from dvc.schema import COMPILED_LOCK_FILE_STAGE_SCHEMA
        from dvc.utils.serialize import dump_yaml, parse_yaml_for_update
        from voluptuous import Invalid

        for stage, entry in made.items():  # from another host: what goes into the lock must be a lock entry
            try:
                COMPILED_LOCK_FILE_STAGE_SCHEMA(entry)
            except Invalid as problem:
                raise StageFailed(f"{stage}: the worker handed back no valid dvc.lock entry ({problem})") from None
            if not entry.get("outs"):
                raise StageFailed(f"{stage}: the worker handed back an entry with no outputs")
            if unhashed := [out["path"] for out in entry["outs"] if not out.get("md5")]:
                raise StageFailed(f"{stage}: the worker handed back outputs with no md5 ({', '.join(unhashed)}): "
                                  "nothing to fetch them by")  # fmt: skip
        self._fetch(made)  # first: an object the remote lacks leaves this checkout as it was
        lock_file = self.root / "dvc.lock"
        if differ := {stage: entry for stage, entry in made.items() if self.lock_entry(stage) != entry}:
            lock = parse_yaml_for_update(lock_file.read_text(), str(lock_file)) if lock_file.is_file() else {}
            lock = lock or {"schema": "2.0"}
            for stage, entry in differ.items():
                lock.setdefault("stages", {})[stage] = entry
            with atomic_path(lock_file) as tmp:  # round-trip YAML, as DVC writes it
                dump_yaml(str(tmp), lock)
        self.restore(list(made), pull=False)
        wrong = [stage for stage, entry in made.items() if _hashes(self.lock_entry(stage)) != _hashes(entry)
                 or not all((self.root / out["path"]).exists() for out in entry["outs"])]  # fmt: skip
        if wrong:
            raise StageFailed(f"{', '.join(wrong)}: {self.root} ended with other outputs than the worker made")

    def pull(self, *targets: str, with_deps: bool = False) -> str:
        """What the remote has (run-cache included); missing objects are not an error on a first run."""
        extra = ["--with-deps"] if with_deps else []
        return self.dvc("pull", "--run-cache", "--allow-missing", *extra, *targets)

    def push(self, *targets: str) -> str:
        out = self.dvc("push", "--run-cache", *targets)
        self._push_uncached_outputs(targets)
        return out

    def _push_uncached_outputs(self, targets: tuple[str, ...]) -> None:
        """`dvc push --run-cache` leaves out the objects of `cache: false` outputs (the reports), so
        another workspace could not restore those stages from the run-cache: push them too."""
        from dvc.repo import Repo
        from dvc_data.hashfile.tree import Tree

        with Repo(str(self.root)) as repo:
            objects = [out.hash_info for out in self._outs(repo, targets) if not out.use_cache and out.hash_info]
            # The run-cache save committed those files to the local cache; outputs never run have none.
            present = [h for h in objects if _odb(repo, h).exists(h.value)]
            # a directory's object lists its files; the push sends only the objects it is given
            present += [oid for h in present if h.isdir for _, _, oid in Tree.load(_odb(repo, h), h)]
            if present and (failed := repo.cloud.push(present).failed):
                raise TransientFailure(f"could not push {len(failed)} report object(s) to the DVC remote")

    def _fetch(self, made: dict[str, dict]) -> None:
        """Fetch every output object of these lock entries into the local cache, `cache: false` reports
        (which `dvc pull` leaves out) and directories' files included; name any the remote lacks."""
        from dvc.repo import Repo
        from dvc_data.hashfile.hash_info import HashInfo
        from dvc_data.hashfile.tree import Tree

        # DVC 3 entries say `hash: md5`; an entry without it holds DVC 2's (md5-dos2unix) hashes.
        wanted = {f"{stage}: {out['path']} ({out['md5']})": HashInfo(out.get("hash") or "md5-dos2unix", out["md5"])
                  for stage, entry in made.items() for out in entry["outs"]}  # fmt: skip
        with Repo(str(self.root)) as repo:
            repo.cloud.pull(list(wanted.values()))  # a missing object is logged, not failed: checked below
            files = {f"{name}/{'/'.join(key)}": oid for name, h in wanted.items()
                     if h.isdir and _odb(repo, h).exists(h.value) for key, _, oid in Tree.load(_odb(repo, h), h)}
            if files:
                repo.cloud.pull(list(files.values()))
            missing = [name for name, h in {**wanted, **files}.items() if not _odb(repo, h).exists(h.value)]
        if missing:
            raise StageFailed(f"the DVC remote lacks {len(missing)} object(s) the workers made (a lost push?): "
                              + "; ".join(missing[:5]))  # fmt: skip

    def _outs(self, repo, targets: tuple[str, ...]) -> list:
        # Targets as this workspace's `dvc.yaml:<stage>`: a bare name resolves against the process's cwd,
        # which for a scratch copy is the checkout it was copied from (whose stage has no hashes).
        dvc_yaml = self.root / "dvc.yaml"
        stages = ([s for t in targets for s in repo.stage.collect(f"{dvc_yaml}:{t}")] if targets
                  else list(repo.index.stages))  # fmt: skip
        return [out for stage in stages for out in stage.outs]

    def expert_code(self) -> list[str]:
        """The code an expert stage runs: `train_expert`'s deps in dvc.yaml that are not artifacts."""
        stage = yaml.safe_load((self.root / "dvc.yaml").read_text())["stages"]["train_expert"]
        return ["dvc.yaml", *(d for d in stage["do"]["deps"] if not str(d).startswith(ARTIFACT_ROOTS))]

    def code(self) -> str:
        """The git objects of the expert stage's code at HEAD. Uncommitted changes to it are refused:
        another host's worker trains the committed code, and this run would then find no run-cache
        entry for its own."""
        paths_ = self.expert_code()
        changed = [*self.git("diff", "--name-only", "HEAD", "--", *paths_).splitlines(),
                   *self.git("ls-files", "--others", "--exclude-standard", "--", *paths_).splitlines()]  # fmt: skip
        if changed:
            raise StageFailed(f"{self.root} has uncommitted changes to the experts' code ({', '.join(changed[:5])}): "
                              "commit or stash them")  # fmt: skip
        return " ".join(self.git("rev-parse", *(f"HEAD:{path}" for path in paths_)).split())

    def snapshot(self, committed: bool = True) -> Snapshot:
        """`committed`: for workers in other checkouts (the code must be committed); else only scratch
        copies of this checkout take it, with its working tree as it is."""
        lock = self.root / "dvc.lock"
        return Snapshot(
            rev=self.git("rev-parse", "HEAD"),
            params=(self.root / "params.yaml").read_text(),
            lock=lock.read_text() if lock.is_file() else "",
            code=self.code() if committed else "",
        )

    def _pin_remotes(self, copy: Workspace) -> None:
        """Relative paths in the DVC config (a remote `../remote`, its key file, `cache.dir`) are relative
        to their config file: the copy, elsewhere, gets them absolute, or it would pull from and push to
        another directory."""
        from dvc.config import Config
        from dvc.config_schema import RelPath

        config = Config(dvc_dir=str(self.root / ".dvc"))
        for name, remote in config["remote"].items():
            for key, value in remote.items():
                if isinstance(value, RelPath):
                    copy.dvc("remote", "modify", "--local", name, key, str(value))
        if isinstance(cache := config["cache"].get("dir"), RelPath):
            copy.dvc("cache", "dir", "--local", str(cache))

    @contextmanager
    def scratch_copy(self, snapshot: Snapshot) -> Iterator[Workspace]:
        """A private copy of this workspace's files (no outputs, its own DVC cache) at `snapshot`."""
        head = self.git("rev-parse", "HEAD")
        if (self.code() != snapshot.code) if snapshot.code else head != snapshot.rev:
            raise StageFailed(f"{self.root} is at {head[:12]}, whose code differs from the run's "
                              f"({snapshot.rev[:12]}): check out the run's revision")  # fmt: skip
        listed = self.git("ls-files", "-co", "--exclude-standard", "-z").split("\0")
        scratch = Path(tempfile.mkdtemp(prefix="bayes-llm-scratch-"))
        try:
            for name in [*filter(None, listed), ".dvc/config.local"]:
                source = self.root / name
                if source.is_file():
                    (scratch / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(source, scratch / name)
            (scratch / "params.yaml").write_text(snapshot.params)
            if snapshot.lock:
                (scratch / "dvc.lock").write_text(snapshot.lock)
            else:  # the run has none (an empty dvc.lock is not a valid one)
                (scratch / "dvc.lock").unlink(missing_ok=True)
            subprocess.run(["git", "init", "-q"], cwd=scratch, check=True)
            copy = Workspace(scratch, self.log)
            self._pin_remotes(copy)
            yield copy
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _odb(repo, hash_info):
    """The local cache that holds objects of this hash kind (DVC 2's md5-dos2unix ones apart)."""
    return repo.cache.local if hash_info.name == "md5" else repo.cache.legacy


def _hashes(entry: dict) -> dict[str, str]:
    return {out["path"]: out.get("md5", "") for out in entry.get("outs", [])}


CHECKOUT_ENV = "BAYES_LLM_CHECKOUT"


def enter_checkout() -> dict[str, str]:
    """A Prefect pull step: run the flow in this worker's own checkout of the project, named by
    $BAYES_LLM_CHECKOUT (each host has its own clone, venv and DVC cache; they share the remote)."""
    directory = os.environ.get(CHECKOUT_ENV)
    if not directory:
        raise UserError(f"${CHECKOUT_ENV} is not set: start the worker with {CHECKOUT_ENV}=<its clone of the project>")
    workspace = Workspace(directory)  # a clear error when it is not a checkout of this project
    os.chdir(workspace.root)
    return {"directory": str(workspace.root)}


def train_expert_isolated(workspace: Workspace, domain: str, snapshot: Snapshot, force: bool = False,
                          push_attempts: int = 3, retry_seconds: float = 10.0) -> dict:
    """Train one expert in a scratch copy and push it (and its run-cache entry) to the DVC remote;
    returns its `dvc.lock` entry, for the calling run to `adopt`.

    A failed push is retried here: the scratch copy, and the trained expert in it, go when this
    returns, and a retry of the whole task would train it again from the start.
    """
    if domain not in parse_params(yaml.safe_load(snapshot.params), "the run's params").experts:
        raise StageFailed(f"no expert domain {domain!r} in the run's params")
    stage = f"train_expert@{domain}"
    with workspace.scratch_copy(snapshot) as scratch:
        scratch.pull(stage, with_deps=True)
        scratch.repro([stage], force=force)
        for attempt in range(1, push_attempts + 1):
            try:
                scratch.push(stage)
                break
            except StageFailed as failure:  # any failure: a permanent one costs only the waits
                if attempt == push_attempts:
                    raise
                wait = retry_seconds * attempt
                workspace.log(f"{stage}: push failed ({failure}); attempt {attempt + 1} of {push_attempts} "
                              f"in {wait:g} s")  # fmt: skip
                time.sleep(wait)
        return scratch.lock_entry(stage)
