"""Retrain and publish: the whole DVC pipeline as a Prefect flow, experts fanned out to workers.

    python -m flows.retrain [--force] [--version X.Y.Z] [--no-publish]

runs in-process on Prefect's embedded local API (no server needed), training the experts
concurrently in scratch copies. Deployed (`prefect.yaml`), the `retrain` flow sends each expert to
the `train-expert` deployment instead, so each domain can run on its own GPU worker; the experts
meet through the DVC remote, and each worker hands its expert's `dvc.lock` entry back to this run,
which takes exactly those outputs (`Workspace.adopt`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from prefect import flow, get_client, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
from prefect.client.schemas.sorting import ArtifactSort
from prefect.deployments import run_deployment
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

from bayes_llm.bundle.publish import check_version, metrics_table, publish, summary_markdown
from bayes_llm.errors import UserError
from bayes_llm.pipeline import Snapshot, StageFailed, TransientFailure, Workspace, train_expert_isolated

UPSTREAM = ["prepare", "base", "decompose"]
DOWNSTREAM = ["train_lora", "calibrate", "evaluate"]


def _transient_only(task, task_run, state) -> bool:
    """Retry a DVC task only when it failed on a lock or the network, never on a stage's own error."""
    try:
        state.result()
    except TransientFailure:
        return True
    except Exception:
        return False
    return False


# DVC does the caching (stages, run-cache): Prefect's own result cache stays out of the way.
dvc_task = task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10, retry_condition_fn=_transient_only)
# A lost worker: the CRASHED message of flows/lost-runs.yaml's automation (the host went silent), or
# the runner's for a process killed by a signal ("status code: -9"). A crash with an exit status (a
# failed pull step, a wrong venv: status 1) would crash again on any worker: not retried.
LOST_WORKER = re.compile(r"no heartbeat|status code:? -\d+")
# The markdown artifact in which a `train-expert` run hands its expert's `dvc.lock` entry back to
# `retrain` (as JSON in a code block: readable in the UI, parsed back exactly).
OUTPUTS_KEY = "bayes-llm-expert-outputs"
LOCK_ENTRY = re.compile(r"```json\n(.*)\n```", re.DOTALL)


def _workspace() -> Workspace:
    logger = get_run_logger()
    return Workspace(".", log=logger.info)


@dvc_task
def pull() -> None:
    _workspace().pull()


@dvc_task
def repro(stages: list[str], force: bool = False) -> None:
    _workspace().repro(stages, force=force)


@dvc_task
def adopt_experts(made: dict[str, dict]) -> None:
    _workspace().adopt(made)


@dvc_task
def push(stages: list[str]) -> None:
    _workspace().push(*stages)


@dvc_task
def train_expert_here(domain: str, snapshot: dict, force: bool) -> dict:
    return train_expert_isolated(_workspace(), domain, Snapshot(**snapshot), force)


def _lock_entry_of(run) -> dict:
    """The expert's `dvc.lock` entry a `train-expert` flow run handed back (its markdown artifact)."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]), key=ArtifactFilterKey(any_=[OUTPUTS_KEY])),
            sort=ArtifactSort.CREATED_DESC, limit=1)  # fmt: skip
    if not found or (entry := lock_entry_from_markdown(str(found[0].data))) is None:
        raise StageFailed(f"flow run {run.name} completed without a readable `{OUTPUTS_KEY}` artifact "
                          "(is the worker's checkout at this version?)")  # fmt: skip
    return entry


def lock_entry_markdown(entry: dict) -> str:
    outs = "\n".join(f"- `{out['path']}` {out.get('md5', '')}" for out in entry.get("outs", []))
    return f"{outs}\n\n```json\n{json.dumps(entry, indent=1)}\n```"


def lock_entry_from_markdown(markdown: str) -> dict | None:
    """The entry in `lock_entry_markdown`'s text; None when there is none, or not a JSON object."""
    try:
        entry = json.loads(match.group(1)) if (match := LOCK_ENTRY.search(markdown)) else None
    except json.JSONDecodeError:
        return None
    return entry if isinstance(entry, dict) else None


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=_transient_only)
def train_expert_on_worker(deployment: str, domain: str, snapshot: dict, force: bool) -> dict:
    run = run_deployment(deployment, parameters={"domain": domain, "snapshot": snapshot, "force": force},
                         flow_run_name=f"train-expert-{domain}")  # fmt: skip
    if run.state and run.state.is_crashed() and LOST_WORKER.search(run.state.message or ""):
        # Whatever the lost worker pushed is whole (remote objects are named by their md5), so another
        # worker can take the expert from the start.
        raise TransientFailure(f"expert {domain}: flow run {run.name} crashed ({run.state.message}); "
                               "retrying it on another worker")  # fmt: skip
    if not run.state or not run.state.is_completed():
        message = run.state.message if run.state else "no state"
        raise StageFailed(f"expert {domain}: flow run {run.name} ended {run.state_name}: {message} "
                          f"(its log: `prefect flow-run logs {run.id}`)")  # fmt: skip
    return _lock_entry_of(run)


@flow(name="train-expert", log_prints=True)
def train_expert(domain: str, snapshot: dict, force: bool = False) -> dict:
    """One expert in a scratch copy of this worker's checkout; the result goes to the DVC remote, and
    its `dvc.lock` entry to the `retrain` run as a markdown artifact."""
    entry = train_expert_here(domain, snapshot, force)
    create_markdown_artifact(key=OUTPUTS_KEY, markdown=lock_entry_markdown(entry),
                             description=f"train_expert@{domain}: pushed to the DVC remote")  # fmt: skip
    return entry


@flow(name="retrain", log_prints=True)
def retrain(
    force: bool = False,
    version: str | None = None,
    publish_bundle: bool = True,
    push_git: bool = False,
    expert_deployment: str | None = None,
) -> dict:
    """pull → prepare, base, decompose → experts (concurrently) → train_lora, calibrate, evaluate →
    bundle → publish. `force` retrains even what DVC's run-cache would restore; `version` (X.Y.Z)
    names the new bundle version (default: the next patch, and only if the bundle changed);
    `expert_deployment` sends each expert to that deployment (e.g. `train-expert/train-expert`)."""
    workspace = _workspace()
    if version is not None and not publish_bundle:
        raise UserError("a version names a published bundle: drop it, or publish")
    if publish_bundle:
        check_version(workspace, version)  # before hours of training, not after
    if expert_deployment:
        workspace.code()  # other hosts' workers train committed code: refuse uncommitted changes now
    pull()
    repro(UPSTREAM, force)
    push(UPSTREAM)  # the inputs of the experts, for workers that share only the remote
    snapshot = workspace.snapshot(committed=bool(expert_deployment)).to_dict()
    domains = workspace.domains()
    if expert_deployment:
        futures = [train_expert_on_worker.submit(expert_deployment, d, snapshot, force) for d in domains]
    else:
        futures = [train_expert_here.submit(d, snapshot, force) for d in domains]
    # Each expert's outputs as its worker made them (raises the first failed expert's error).
    made = {f"train_expert@{domain}": future.result() for domain, future in zip(domains, futures, strict=True)}
    adopt_experts(made)  # pulled and restored from what the workers pushed
    repro(DOWNSTREAM, force)
    result: dict = {"experts": {d: workspace.expert_gain(d) for d in domains}}
    if publish_bundle:
        published = publish(workspace, version, push_git)
        create_markdown_artifact(key="bayes-llm-bundle", markdown=summary_markdown(published, workspace),
                                 description=f"{published.name} v{published.version}")  # fmt: skip
        create_table_artifact(key="bayes-llm-metrics", table=metrics_table(workspace),
                              description=f"test accuracy (%) of every system, {published.tag}")  # fmt: skip
        result["published"] = published.to_dict()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--force", action="store_true", help="retrain even what DVC's run-cache would restore")
    parser.add_argument("--version", help="bundle version X.Y.Z (default: next patch, only if changed)")
    parser.add_argument("--no-publish", action="store_true", help="stop after evaluate: no bundle version")
    parser.add_argument("--push-git", action="store_true", help="also push the commit and tag to git origin")
    args = parser.parse_args(argv)
    # Without a server, Prefect starts a temporary one and waits 20 s for it; on a busy 2-core machine its
    # first start (a new database) can take longer, and the run failed before any stage.
    wait = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), 180)
    with temporary_settings(updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: wait}):
        result = retrain(force=args.force, version=args.version, publish_bundle=not args.no_publish,
                         push_git=args.push_git)  # fmt: skip
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
