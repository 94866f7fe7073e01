"""Data-parallel expert training: shares of a batch, the params that allow it, and N processes
under `accelerate launch` training the same z as one (and resuming after a kill)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil  # accelerate's own dependency
import pytest
import torch
import yaml

from bayes_llm.config import ParamsError, parse_params
from bayes_llm.experts.distributed import Shards, threads_per_process
from bayes_llm.svf.expert import read_expert
from benchmarks.ddp import main as ddp_benchmark
from tests.conftest import ROOT, build_smoke_project, raw_params

PIPELINE_FIXTURES = {"project"}


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return build_smoke_project(tmp_path_factory.mktemp("project"), [["prepare"], ["base"], ["decompose"]])


@pytest.mark.parametrize("n", [1, 2, 3, 7, 32])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_the_shares_of_a_batch_are_contiguous_and_cover_it_in_order(n, world):
    items = list(range(n))
    shares = [Shards(rank, world).share(items) for rank in range(world)]
    assert [item for share in shares for item in share] == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize(("world", "shares"), [(w, s) for w in (1, 2, 3) for s in (1, 2, 3, 5) if s >= w])
def test_fixed_shares_are_cut_the_same_for_any_number_of_processes(world, shares):
    parts = [part for rank in range(world) for part in Shards(rank, world, shares).parts()]
    assert parts == [Shards(i, shares) for i in range(shares)]  # every share once, in share order
    assert Shards(0, world).parts() == [Shards(0, world)]  # without shares: the process's own share


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"distributed": {"processes": 8}}, r"experts\.math\.sft_batch_size \(4\) < distributed\.processes \(8\)"),
        ({"distributed": {"processes": 3, "shares": 2}}, r"distributed\.shares \(2\) < distributed\.processes \(3\)"),
        ({"distributed": {"shares": 3}}, r"experts\.math\.rl_batch_size \(2\) < distributed\.shares \(3\)"),
        ({"distributed": {"shares": 0}}, r"distributed\.shares: Input should be greater than or equal to 1"),
        ({"distributed": {"processes": 0}}, r"distributed\.processes: Input should be greater than or equal to 1"),
        ({"distributed": {"backend": "nccl"}}, r"distributed\.backend: Input should be 'gloo'"),
        ({"distributed": {"processes": 2, "procs": 2}}, r"distributed\.procs: unknown key"),
    ],
)
def test_distributed_params_are_checked_against_every_expert(change, message):
    raw = raw_params()
    raw.update(change)
    with pytest.raises(ParamsError, match=message):
        parse_params(raw)


def test_trl_algorithms_are_refused_for_several_processes():
    raw = raw_params()
    raw["distributed"] = {"processes": 2}
    raw["experts"]["code"].update(rl_algorithm="grpo", num_generations=2, temperature=0.7)
    with pytest.raises(ParamsError, match=r"experts\.code: distributed\.processes > 1 trains rl_algorithm reinforce"):
        parse_params(raw)


def _set(root: Path, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    for key, value in changes.items():
        params[key] = value if not isinstance(value, dict) else {**params.get(key, {}), **value}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_two_processes_train_the_same_z_as_one(project, tmp_path, monkeypatch):
    """With fixed shares, bit for bit, sampled rollouts included; all-reduced, to float rounding."""
    monkeypatch.chdir(project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    # Sampled rollouts; 3 shares on 2 processes, so one process runs two shares and the other one (the
    # gather pads), and the SFT batch of 4 splits 2 + 1 + 1.
    params["experts"]["math"].update(num_generations=2, temperature=1.0)
    for expert in params["experts"].values():  # every expert's batches must fit the shares
        expert["rl_batch_size"] = 3
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "ddp.json"
    assert ddp_benchmark(["--params", str(tmp_path / "params.yaml"), "--domain", "math", "--sft-steps", "4",
                          "--rl-steps", "2", "--shares", "3", "--out", str(out)]) == 0  # fmt: skip
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and report["backend"] == "gloo" and report["steps"] == 6
    assert report["shares"] == 3 and report["all_reduce"]["shares"] is None
    assert report["max_abs_z_change"] > 1e-3  # training moved z: the comparison is not of two untouched z
    assert report["max_abs_z_diff"] == 0.0
    assert report["val_accuracy"]["1proc"] == report["val_accuracy"]["nproc"]
    assert report["last_loss"]["1proc"] == report["last_loss"]["nproc"]
    all_reduce = report["all_reduce"]
    # float32: the split batch sums its gradients in another order (~1e-7 relative), and Adam's first step
    # divides near-zero gradients by their own size (reports/scale/ddp.json: 1e-5 after step 1 on the default run)
    assert all_reduce["max_abs_z_change"] > 1e-3 and all_reduce["max_abs_z_diff_by_step"]["4"] <= 1e-4
    rounding = all_reduce["first_step_rounding"]  # the shares' gradients sum to the whole batch's, to rounding
    assert rounding["max_abs_grad"] > 0 and rounding["max_abs_grad_diff"] <= 1e-4 * rounding["max_abs_grad"]
    # ... and all of it: the all-reduced gradient is the shares' gradients summed in one process, and the
    # check's whole-batch gradient is the one the one-process trainer stepped with
    first = all_reduce["first_gradient"]
    assert first["max_abs_diff_nproc_vs_shares_summed_in_1proc"] == 0.0
    assert first["max_abs_diff_1proc_vs_its_rounding_check"] == 0.0
    assert report["threads"]["per_process"] == threads_per_process(2)  # the cores split, not oversubscribed


def test_the_stage_relaunches_itself_and_a_killed_run_resumes(project, tmp_path):
    """`train-expert` with distributed.processes 2 runs under accelerate launch; killed (the whole
    process group, as a lost host) it resumes from process 0's checkpoint and ends as an unbroken run,
    even resumed by one process: with fixed shares, the z is the same bit for bit."""
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        shutil.copytree(project, root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["distributed"] = {"processes": 2, "backend": "gloo", "shares": 2}
        params["experts"]["math"].update(objective="sft", sft_steps=40, checkpoint_every=2, eval_every=20)
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        runs[name] = root
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bayes_llm", "train-expert", "math", "--quiet"]
    straight = subprocess.run(command, cwd=runs["straight"], env=env, capture_output=True, text=True)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert straight.stdout.count('"domain": "math"') == 1  # one report line: process 0's

    process = subprocess.Popen(command, cwd=runs["killed"], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    state = runs["killed"] / "models/checkpoints/math/state.json"

    def saved_step() -> int:
        try:
            return json.loads(state.read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):  # not yet, or being replaced
            return 0

    deadline = time.monotonic() + 180
    while saved_step() < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    # The training processes run in their own sessions and die with their launcher, a moment after it:
    # wait for every one, or process 0 may still write a later checkpoint after killed_at is read.
    descendants = psutil.Process(process.pid).children(recursive=True)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"training processes outlived their killed launcher: {alive}"
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 40, "the run ended before it could be killed"
    assert not (runs["killed"] / "models/experts/math.safetensors").exists()

    _set(runs["killed"], distributed={"processes": 1})  # the rest on one process
    done = subprocess.run(command, cwd=runs["killed"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"resuming from the checkpoint at step {killed_at}" in done.stdout + done.stderr
    a = read_expert(runs["straight"] / "models/experts/math.safetensors")
    b = read_expert(runs["killed"] / "models/experts/math.safetensors")
    assert all(torch.equal(a.z[n], b.z[n]) for n in a.z)
    assert not (runs["killed"] / "models/checkpoints/math").exists()
