"""Publishing a bundle version: commit the DVC state, push the data, tag the version with GTO.

A version is a git tag `<bundle>@v<X.Y.Z>` (GTO's format) on a commit whose `dvc.lock` pins the
bundle, with the data on the DVC remote, so anyone with the repository and the remote can fetch it:
`dvc artifacts get <repo> <bundle> --rev v<X.Y.Z>`. A run whose experts, dispatcher and SVD manifest are
the same as the latest version's publishes nothing new.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from bayes_llm import paths
from bayes_llm.config import load_params
from bayes_llm.errors import UserError
from bayes_llm.io import atomic_path, read_json
from bayes_llm.pipeline import Workspace, tool

TRACKED_STATE = ["dvc.lock", "params.yaml", "reports"]  # what a version's commit records
SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
# The bundle files that differ between two builds of the same experts (version, git revision).
VOLATILE_FILES = {"README.md"}


class PublishError(UserError):
    pass


@dataclass(frozen=True)
class Published:
    name: str
    version: str
    tag: str
    commit: str
    remote: str
    new: bool  # False: the run changed nothing, `version` is the latest already published

    def to_dict(self) -> dict:
        return asdict(self)


def _semver(text: str) -> tuple[int, int, int]:
    match = SEMVER.match(text)
    if not match:
        raise PublishError(f"version {text!r} is not X.Y.Z")
    return int(match[1]), int(match[2]), int(match[3])


def published_versions(workspace: Workspace, name: str) -> list[str]:
    """Versions with a GTO tag in this repository, oldest first."""
    tags = workspace.git("tag", "--list", f"{name}@v*").split()
    versions = [tag.split("@v", 1)[1] for tag in tags if SEMVER.match(tag.split("@v", 1)[1])]
    return sorted(versions, key=_semver)


def next_version(published: list[str], declared: str) -> str:
    """The params' declared version if it is new and not behind, else the latest with its patch bumped."""
    if not published or _semver(declared) > _semver(published[-1]):
        return declared
    major, minor, patch = _semver(published[-1])
    return f"{major}.{minor}.{patch + 1}"


def set_bundle_version(params_file: Path, version: str) -> None:
    """Rewrite `bundle.version` in place (keeping the file's comments), then re-validate."""
    text = params_file.read_text()
    pattern = re.compile(r"^(bundle:\n(?:[ \t]+.*\n|\n)*?[ \t]+version:[ \t]*)(\S+)", re.MULTILINE)
    if not pattern.search(text):
        raise PublishError(f"{params_file}: no bundle.version to set")
    with atomic_path(params_file) as staged:  # an interrupted rewrite leaves the old params whole
        staged.write_text(pattern.sub(lambda m: m[1] + version, text, count=1))
        shutil.copymode(params_file, staged)  # (the temp file is private: 0600)
    if load_params(params_file).bundle.version != version:
        raise PublishError(f"{params_file}: bundle.version did not take the value {version}")


def _content(manifest: dict) -> dict:
    return {path: digest for path, digest in manifest.get("files", {}).items() if path not in VOLATILE_FILES}


def _manifest_at(workspace: Workspace, path: str, rev: str) -> dict | None:
    import dvc.api

    try:
        return json.loads(dvc.api.read(path, repo=str(workspace.root), rev=rev))
    except Exception:  # not in the cache nor on the remote: treat the run as new
        return None


def default_remote_url(workspace: Workspace) -> str:
    from dvc.repo import Repo

    with Repo(str(workspace.root)) as repo:
        name = repo.config["core"].get("remote")
        if not name:
            raise PublishError("no default DVC remote: `dvc remote add -d <name> <url>` (see the README)")
        return str(repo.config["remote"][name]["url"])


def check_version(workspace: Workspace, version: str | None) -> None:
    """A version asked for is X.Y.Z and not published yet (None: the next one, always possible)."""
    if version is None:
        return
    _semver(version)
    name = load_params(workspace.root / "params.yaml").bundle.name
    if version in published_versions(workspace, name):
        raise PublishError(f"{name} v{version} is already published: pass another version, or none for the next")


def publish(workspace: Workspace, version: str | None = None, push_git: bool = False) -> Published:
    """Build the bundle, and if it is new: commit the DVC state, push the data, tag the version."""
    check_version(workspace, version)  # a bad version fails before any work
    params_file = workspace.root / "params.yaml"
    params = load_params(params_file)
    name = params.bundle.name
    manifest_path = f"bundles/{name}/manifest.json"
    workspace.repro(["bundle"])
    manifest = read_json(workspace.root / manifest_path, PublishError, "run `dvc repro bundle`")
    versions = published_versions(workspace, name)
    remote = default_remote_url(workspace)
    if versions and version is None:
        previous = _manifest_at(workspace, manifest_path, f"{name}@v{versions[-1]}")
        if previous is not None and _content(previous) == _content(manifest):
            commit = workspace.git("rev-list", "-n", "1", f"{name}@v{versions[-1]}")
            return Published(name, versions[-1], f"{name}@v{versions[-1]}", commit, remote, new=False)
    target = version or next_version(versions, params.bundle.version)
    if target in versions:
        raise PublishError(f"{name} v{target} is already published: pass another version, or none for the next")
    if target != params.bundle.version:
        set_bundle_version(params_file, target)
        workspace.repro(["bundle"])  # the manifest and model card carry the version
    workspace.git("add", "--", *TRACKED_STATE)
    if workspace.git("status", "--porcelain", "--", *TRACKED_STATE):
        workspace.git("-c", "user.name=bayes-llm", "-c", "user.email=bayes-llm@localhost",
                      "commit", "-q", "-m", f"Publish {name} v{target}", "--", *TRACKED_STATE)  # fmt: skip
    workspace.push()
    tag = f"{name}@v{target}"
    workspace.run(tool("gto"), "register", name, "HEAD", "--version", f"v{target}", "-m", f"{name} v{target}")
    if push_git:
        workspace.git("push", "origin", "HEAD", tag)
    return Published(name, target, tag, workspace.git("rev-parse", "HEAD"), remote, new=True)


def summary_markdown(published: Published, workspace: Workspace) -> str:
    """The Prefect artifact: which version, where, how to fetch it, and its evaluation table."""
    from bayes_llm.bundle.manifest import results_section  # imports torch: not at the flow's start-up

    state = "published" if published.new else "unchanged: the latest version is still"
    lines = [
        f"# {published.name} v{published.version}",
        "",
        f"- {state} `{published.tag}` (commit `{published.commit[:12]}`)",
        f"- data on the DVC remote `{published.remote}`",
        "",
        "Fetch it anywhere with git access to the repository (`<repo>`: its URL, or `.` in a clone):",
        "",
        "```bash",
        f"dvc artifacts get <repo> {published.name} --rev v{published.version} -o {published.name}",
        f"gto show {published.name}   # every version",
        f"dvc get <repo> bundles/{published.name} --rev {published.tag}   # the same, by path",
        f"bayes-llm bundle verify {published.name} --base models/base",
        "```",
        "",
        *results_section(workspace.root / "reports"),
    ]
    return "\n".join(lines)


def metrics_table(workspace: Workspace) -> list[dict]:
    """summary.json as rows (one per system) for a Prefect table artifact."""
    path = workspace.root / paths.EVAL_REPORTS / "summary.json"
    if not path.is_file():
        return []
    rows: dict[str, dict] = {}
    for key, value in json.loads(path.read_text()).items():
        system, column = key.rsplit(".", 1)
        rows.setdefault(system, {"system": system})[column] = value
    return list(rows.values())
