from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from bayes_llm import paths
from bayes_llm.cli import main
from bayes_llm.config import ExpertParams, load_params
from bayes_llm.data import prepared
from bayes_llm.evaluate.base_scores import FILE, BaseScoresError, base_test_scores
from bayes_llm.experts import trainer as train_module
from bayes_llm.experts.distributed import Shards, kept_sequences, sft_part_loss, sft_share_loss
from bayes_llm.experts.headroom import Samples, read_answer
from bayes_llm.experts.objectives import reinforce_loss, rollouts, sft_batch, sft_loss, token_nll
from bayes_llm.experts.trainer import Trainer, TrainingError
from bayes_llm.model.greedy import greedy_scores
from bayes_llm.model.load import load_checkpoint
from bayes_llm.rewards.correctness import code_of, correctness
from bayes_llm.stats import paired_bootstrap
from bayes_llm.svf.decompose import load_factors, read_manifest
from bayes_llm.svf.expert import load_expert, read_expert
from bayes_llm.svf.scaling import SVF
from benchmarks import provenance
from benchmarks.headroom import figures
from benchmarks.headroom import main as headroom
from benchmarks.objective_study import _Study
from benchmarks.objective_study import main as objective_study
from benchmarks.rl_diagnosis import _Runs
from benchmarks.rl_diagnosis import main as rl_diagnosis
from tests.conftest import ROOT, build_smoke_project, enter_copy

PIPELINE_FIXTURES = {"project"}  # prepare, base, decompose (and more) at smoke size

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A smoke-size project with prepared data, a pretrained base and its SVD."""
    return build_smoke_project(tmp_path_factory.mktemp("project"), [["prepare"], ["base"], ["decompose"]])


@pytest.fixture
def workdir_project(project, tmp_path, monkeypatch) -> Path:
    return enter_copy(project, tmp_path, monkeypatch)


def _set_expert(root: Path, domain: str, **changes) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["experts"][domain].update(changes)
    (root / "params.yaml").write_text(yaml.safe_dump(params))


def test_train_expert_writes_a_loadable_expert_and_an_honest_report(workdir_project):
    assert main(["train-expert", "math", "--quiet"]) == 0
    report = json.loads(Path("reports/experts/math.json").read_text())
    assert report["objective"] == "sft+rl" and report["steps"] == 4
    assert set(report["interference"]) == {"code", "reasoning"}
    gain = report["gain"]
    assert gain["ci_low"] <= gain["gain_points"] <= gain["ci_high"] and gain["items"] == 12
    assert "rl_gain_over_sft" in report
    headroom = report["headroom"]  # pass@1 is the greedy val accuracy the trainer measured
    assert headroom["k"] == 8 and headroom["temperature"] == 1.0 and headroom["items"] == 6
    assert headroom["base"]["pass1"] == report["val_accuracy"]["base"]
    assert headroom["sft"]["pass1"] == report["val_accuracy"]["sft"]
    assert all(0 <= v <= 1 for system in ("base", "sft") for v in headroom[system].values())
    expert = load_expert("models/experts/math.safetensors", read_manifest("models/svd"))
    assert expert.domain == "math" and expert.training["objective"] == "sft+rl"
    assert expert.metrics["test_accuracy"] == report["test_accuracy"]
    assert Path("reports/experts/math.png").stat().st_size > 0
    live = Path("reports/experts/live/math")  # the curves as DVCLive logged them
    for name in ("sft/loss", "rl/reward", "rl/reward_mean10", "val_accuracy"):
        assert (live / "plots/metrics" / f"{name}.tsv").stat().st_size > 0
    # scores only in the metrics file; seconds in their own file
    assert not any("seconds" in key for key in report) and report["kept_step"] in (0, 2, 4)
    assert set(json.loads(Path("reports/experts/math_timing.json").read_text())) == {"train_seconds", "stage_seconds"}
    val = (live / "plots/metrics/val_accuracy.tsv").read_text().splitlines()
    assert val[0] == "step\tval_accuracy" and [line.split("\t")[0] for line in val[1:]] == ["0", "2", "4"]
    summary = json.loads((live / "metrics.json").read_text())  # what `dvc exp show` reads: the last values
    assert summary["step"] == 4 and summary["val_accuracy"] == float(val[-1].split("\t")[1])
    assert set(summary) == {"sft", "rl", "val_accuracy", "step"} and "reward" in summary["rl"]
    assert not Path("models/checkpoints/math").exists()  # cleared after success
    saved = json.loads(Path("models/base", FILE).read_text())["domains"]
    for domain, accuracy in report["interference"].items():  # the base side is the base stage's scores
        assert accuracy["base"] == round(sum(saved[domain]["scores"]) / len(saved[domain]["scores"]), 4)


def test_an_sft_z_that_rl_never_beat_is_scored_on_test_once(workdir_project, monkeypatch):
    _set_expert(Path("."), "math", rl_learning_rate=1e-12)  # RL cannot move z: the SFT z is kept
    math_test = prepared.read_split(paths.DATA, "math", "test")
    scored = []

    def counted(model, tokenizer, kind, rows, *args):
        scored.append(list(rows) == math_test)
        return greedy_scores(model, tokenizer, kind, rows, *args)

    monkeypatch.setattr("bayes_llm.model.greedy.greedy_scores", counted)
    assert main(["train-expert", "math", "--quiet"]) == 0
    report = json.loads(Path("reports/experts/math.json").read_text())
    assert report["kept_step"] <= report["phases"]["sft"]
    assert report["val_accuracy"]["expert"] == report["val_accuracy"]["sft"]
    assert scored.count(True) == 1  # the expert's pass; the SFT z's answers are the same ones
    assert report["test_accuracy"]["sft"] == report["test_accuracy"]["expert"]
    assert report["rl_gain_over_sft"]["gain_points"] == 0.0


def test_the_saved_base_scores_are_the_bases_own_and_checked_against_the_split(workdir_project, capsys, monkeypatch):
    saved = json.loads(Path("models/base", FILE).read_text())["domains"]
    assert set(saved) == {"math", "code", "reasoning"}
    model, tokenizer = load_checkpoint("models/base")
    rows = prepared.read_split(paths.DATA, "reasoning", "test")
    tokens = saved["reasoning"]["max_new_tokens"]
    assert saved["reasoning"]["scores"] == greedy_scores(model, tokenizer, "letter", rows, tokens, 5)
    assert base_test_scores(Path("models/base"), "reasoning", rows, tokens) == saved["reasoning"]["scores"]
    with pytest.raises(BaseScoresError, match="reasoning's test split changed since the base was scored"):
        base_test_scores(Path("models/base"), "reasoning", [{**rows[0], "answer": "Z"}, *rows[1:]], tokens)
    with pytest.raises(BaseScoresError, match=f"scored with max_new_tokens {tokens}, now {tokens + 1}"):
        base_test_scores(Path("models/base"), "reasoning", rows, tokens + 1)
    Path("models/base", FILE).write_text(json.dumps({"domains": {"reasoning": {"scores": []}}}))
    with pytest.raises(BaseScoresError, match="reasoning's entry is malformed"):
        base_test_scores(Path("models/base"), "reasoning", rows, tokens)
    with pytest.raises(BaseScoresError, match="has no scores for 'math'"):
        base_test_scores(Path("models/base"), "math", rows, tokens)
    Path("models/base", FILE).unlink()  # a base from before the scores were saved

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the base scores")

    monkeypatch.setattr(Trainer, "run", no_training)
    assert main(["train-expert", "math", "--quiet"]) == 1
    assert f"models/base/{FILE} not found: re-run the base stage (`dvc repro base`)" in capsys.readouterr().err
    assert not Path("models/experts").exists()


def test_unknown_domain_or_missing_base_are_clear_errors(workdir_project, capsys):
    assert main(["train-expert", "poetry", "--quiet"]) == 1
    assert "no `experts.poetry` entry" in capsys.readouterr().err
    shutil.rmtree("models/base")  # a clear error at once, not a hub lookup for the id 'models/base'
    assert main(["train-expert", "math", "--quiet"]) == 1
    assert "models/base: no base model there: run `dvc repro base` first" in capsys.readouterr().err
    assert not Path("models/experts").exists()


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_checkpoint_and_ends_identical(project, tmp_path):
    runs = {}
    for name in ("straight", "killed"):
        root = tmp_path / name
        shutil.copytree(project, root)
        _set_expert(
            root,
            "reasoning",
            objective="sft",
            sft_steps=40,
            checkpoint_every=2,
            eval_every=20,
            train_precision="bf16",
            sft_drop_hardest=0.25,
        )
        runs[name] = root
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "bayes_llm.cli", "train-expert", "reasoning", "--quiet"]
    subprocess.run(command, cwd=runs["straight"], env=env, check=True, capture_output=True)

    process = subprocess.Popen(command, cwd=runs["killed"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    state = runs["killed"] / "models/checkpoints/reasoning/state.json"
    deadline = time.monotonic() + 120
    while not (state.is_file() and json.loads(state.read_text())["step"] >= 4) and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(state.read_text())["step"]
    assert 4 <= killed_at < 40, "the run ended before it could be killed"
    assert not (runs["killed"] / "models/experts/reasoning.safetensors").exists()

    done = subprocess.run(command, cwd=runs["killed"], env=env, capture_output=True, text=True, check=True)
    assert f"resuming from the checkpoint at step {killed_at}" in done.stdout + done.stderr
    straight = read_expert(runs["straight"] / "models/experts/reasoning.safetensors")
    resumed = read_expert(runs["killed"] / "models/experts/reasoning.safetensors")
    assert all(torch.equal(straight.z[n], resumed.z[n]) for n in straight.z)
    report = json.loads((runs["killed"] / "reports/experts/reasoning.json").read_text())
    assert report["resumed_from_step"] == killed_at


@pytest.mark.parametrize("native", [False, True])
def test_bf16_trains_in_fp32_where_the_device_has_no_native_bf16(workdir_project, monkeypatch, capsys, native):
    monkeypatch.setattr(train_module, "native_bf16", lambda device: native)
    _set_expert(Path("."), "reasoning", objective="sft", train_precision="bf16")
    assert main(["train-expert", "reasoning", "--quiet"]) == 0
    report = json.loads(Path("reports/experts/reasoning.json").read_text())
    assert report.get("train_precision_used") == (None if native else "fp32")  # only a fallback is noted
    assert ("no native bfloat16" in capsys.readouterr().out) is not native
    expert = read_expert(Path("models/experts/reasoning.safetensors"))
    assert expert.training["train_precision"] == "bf16"  # what was asked for; the report says what ran


def test_a_checkpoint_is_resumed_only_by_a_run_on_the_same_rows(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    model, tokenizer = load_checkpoint("models/base")
    factors, _ = load_factors("models/svd")
    svf = SVF(model, factors)
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    cfg = ExpertParams(objective="sft", sft_steps=2, sft_batch_size=2, val_items=4)

    def fingerprint(train: list[dict], val: list[dict], eval_tokens: int = 4) -> str:
        return Trainer(svf, tokenizer, "number", train, val, cfg, 0, tmp_path / "ckpt", "fp", eval_tokens,
                       progress=False).checkpoint.fingerprint  # fmt: skip

    same = fingerprint(rows, rows)
    assert fingerprint([dict(r) for r in rows], rows) == same
    assert fingerprint(rows[:-1], rows) != same  # a re-prepared train split
    assert fingerprint(rows, [{**rows[0], "answer": "3"}, *rows[1:]]) != same  # a changed val answer
    assert fingerprint(rows, [*rows, rows[0]]) == same  # beyond val_items: not validated on, not part of the run
    assert fingerprint(rows, rows, eval_tokens=8) != same  # val answers of another length: other scores
    monkeypatch.setattr(train_module, "native_bf16", lambda device: True)
    cfg = ExpertParams(objective="sft", sft_steps=2, sft_batch_size=2, val_items=4, train_precision="bf16")
    in_bf16 = fingerprint(rows, rows)
    monkeypatch.setattr(train_module, "native_bf16", lambda device: False)
    assert fingerprint(rows, rows) != in_bf16  # a bf16 checkpoint is not resumed in fp32, where bf16 fell back
    cfg = ExpertParams(objective="sft", sft_steps=2, sft_batch_size=2, val_items=4)
    monkeypatch.setattr(train_module, "_training_code", lambda: "a fixed trainer")
    assert fingerprint(rows, rows) != same  # a checkpoint of other training code starts over


def test_the_last_checkpoint_stays_until_the_outputs_are_written(project, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(project)
    tokenizer = load_checkpoint("models/base")[1]
    factors, _ = load_factors("models/svd")
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    cfg = ExpertParams(objective="sft+rl", sft_steps=2, rl_steps=2, sft_batch_size=2, rl_batch_size=2, eval_every=1,
                       val_items=4, checkpoint_every=9)  # fmt: skip

    def trainer() -> Trainer:
        return Trainer(SVF(load_checkpoint("models/base")[0], factors), tokenizer, "number", rows, rows, cfg, 0,
                       tmp_path / "ckpt", "fp", 4, progress=False)  # fmt: skip

    first = trainer()
    done = first.run()
    assert json.loads((tmp_path / "ckpt/state.json").read_text())["step"] == 4  # killed while scoring: resumable
    again = trainer().run()  # nothing left to train
    assert "resuming from the checkpoint at step 4/4" in capsys.readouterr().out
    assert again.resumed_from == 4 and again.curve == done.curve and again.best_val == done.best_val
    assert all(torch.equal(again.best_z[n], done.best_z[n]) and torch.equal(again.sft_z[n], done.sft_z[n])
               for n in done.best_z)  # fmt: skip
    first.finished()
    assert not (tmp_path / "ckpt").exists()


def test_a_non_finite_loss_stops_with_a_clear_error_and_keeps_the_checkpoint(project, tmp_path, monkeypatch):
    monkeypatch.chdir(project)
    model, tokenizer = load_checkpoint("models/base")
    factors, _ = load_factors("models/svd")
    svf = SVF(model, factors)
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}] * 8
    real = train_module.sft_loss
    calls = []

    def poisoned(model, batch, *args):
        calls.append(1)
        loss = real(model, batch, *args)
        return loss * float("nan") if len(calls) == 5 else loss

    monkeypatch.setattr(train_module, "sft_loss", poisoned)
    cfg = ExpertParams(objective="sft", sft_steps=10, sft_batch_size=2, checkpoint_every=2, eval_every=5, val_items=2)
    with pytest.raises(TrainingError, match="non-finite loss at step 5"):
        Trainer(svf, tokenizer, "number", rows, rows, cfg, 0, tmp_path / "ckpt", "fp", 4, progress=False).run()
    assert json.loads((tmp_path / "ckpt/state.json").read_text())["step"] == 4


def test_a_choice_text_domain_is_validated_by_its_choices_likelihood(project, tmp_path, monkeypatch):
    from bayes_llm.model.cloze import cloze_scores

    monkeypatch.chdir(project)
    model, tokenizer = load_checkpoint("models/base")
    factors, _ = load_factors("models/svd")
    rows = [{"id": str(i), "prompt": f"Which is {i}?", "choices": ["no", str(i), "maybe"], "answer": "B",
             "solution": str(i)} for i in range(6)]  # fmt: skip
    base = cloze_scores(*load_checkpoint("models/base"), rows, batch_size=4)
    monkeypatch.setattr(train_module, "greedy_scores", lambda *_, **__: pytest.fail("validated by greedy answers"))
    cfg = ExpertParams(objective="sft", sft_steps=2, sft_batch_size=2, eval_every=1, val_items=6, checkpoint_every=9)
    result = Trainer(SVF(model, factors), tokenizer, "letter", rows, rows, cfg, 0, tmp_path / "ckpt", "fp", 4,
                     progress=False, cloze=True).run()  # fmt: skip
    assert result.base_val == sum(base) / len(base)
    assert [r["step"] for r in result.curve if "val_accuracy" in r] == [0, 1, 2]


@pytest.mark.parametrize("algorithm", ["grpo", "rloo"])
def test_trl_rl_phase_trains_z_only_and_reports_each_step(project, tmp_path, monkeypatch, algorithm):
    monkeypatch.chdir(project)
    model, tokenizer = load_checkpoint("models/base")
    factors, _ = load_factors("models/svd")
    svf = SVF(model, factors)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith(".z")}
    rows = [{"prompt": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    cfg = ExpertParams(objective="rl", rl_algorithm=algorithm, rl_steps=3, rl_batch_size=2, num_generations=2,
                       temperature=1.0, rl_learning_rate=0.05, beta=0.04, max_new_tokens=4, eval_every=2,
                       val_items=4, checkpoint_every=2)  # fmt: skip
    trainer = Trainer(svf, tokenizer, "number", rows, rows, cfg, 0, tmp_path / "ckpt", "fp", 4, progress=False)
    result = trainer.run()
    assert [r["step"] for r in result.curve] == [0, 1, 2, 3] and {r["phase"] for r in result.curve} == {"rl"}
    assert all({"loss", "reward", "kl"} <= set(r) for r in result.curve[1:])
    assert "val_accuracy" in result.curve[2] and "val_accuracy" in result.curve[3]
    assert any(not torch.equal(z, torch.ones_like(z)) for z in svf.z().values()), "trl did not move z"
    unchanged = {n: p for n, p in model.named_parameters() if n in weights}
    assert all(torch.equal(weights[n], p) for n, p in unchanged.items()), "trl trained more than z"
    assert json.loads((tmp_path / "ckpt/state.json").read_text())["step"] == 3  # until the caller is done
    trainer.finished()
    assert not (tmp_path / "ckpt").exists()


def test_compare_objectives_reports_every_variant_against_the_base(workdir_project, capsys):
    assert objective_study(["math", "--quiet", "--rl-steps", "2", "--seeds", "0", "1"]) == 0
    report = json.loads(Path("reports/objective_study/math.json").read_text())
    algorithms = [v["changes"].get("rl_algorithm") for v in report["variants"]]
    assert algorithms == [None, "reinforce", "grpo", "rloo", None, "rloo", "reinforce", "reinforce"]
    assert report["seeds"] == [0, 1]
    assert report["run"]["command"] == "python -m benchmarks.objective_study math --quiet --rl-steps 2 --seeds 0 1"
    table = Path("reports/objective_study/math.md").read_text()
    assert "\nRerun: `python -m benchmarks.objective_study math --quiet --rl-steps 2 --seeds 0 1`.\n" in table
    for variant in report["variants"]:
        gains = [run["gain"]["gain_points"] for run in variant["runs"]]
        assert gains == variant["gain_points_per_seed"] and [r["seed"] for r in variant["runs"]] == [0, 1]
        assert variant["seed_ci_low"] <= variant["gain_points_mean"] == round(sum(gains) / 2, 2) \
            <= variant["seed_ci_high"]
        assert variant["pooled"]["items"] == report["test_items"] == 12
    rl = report["variants"][2]["runs"][0]  # trl's own logs: whether the loss reached z, and dead groups
    assert rl["rl_grad_norm_mean"] >= 0 and 0 <= rl["rl_zero_std_groups_mean"] <= 1
    assert report["variants"][1]["steps"] == {"rl": 2} and report["variants"][4]["steps"] == {"sft": 2, "rl": 2}
    table = Path("reports/objective_study/math.md").read_text()
    assert table.count("\n| ") == 9  # header + one row per variant
    assert not Path("models/experts").exists()  # a comparison writes no expert
    assert objective_study(["math", "--quiet", "--rl-steps", "0"]) == 1
    assert objective_study(["poetry", "--quiet"]) == 1
    assert objective_study(["math", "--quiet", "--steps", "sfft=sft:2"]) == 1
    err = capsys.readouterr().err
    assert "--rl-steps must be at least 1" in err and "no `experts.poetry` entry" in err
    assert "--steps or --variants names no variant: ['sfft']" in err


def test_a_pilot_runs_chosen_variants_with_changed_params_under_its_own_name(workdir_project, monkeypatch, capsys):
    study = Path("reports/objective_study/math.json")
    before = study.read_bytes() if study.exists() else None
    # every val pass beats the last, so each RL phase is kept and its SFT z is scored on its own
    rising = itertools.count()
    monkeypatch.setattr(train_module.Trainer, "validate", lambda self: next(rising))
    name = "sft+rl (reinforce, sampled groups, baseline)"
    args = ["math", "--quiet", "--variants", "sft", name, "--set", "rl_batch_size=2", "--set", "eval_every=1",
            "--set", "rl_learning_rate=1e-2", "--seeds", "0", "1", "--tag", "pilot"]  # fmt: skip
    assert objective_study(args) == 0
    report = json.loads(Path("reports/objective_study/math_pilot.json").read_text())
    assert (study.read_bytes() if study.exists() else None) == before  # the study's own report is left alone
    sft, variant = report["variants"]
    assert variant["variant"] == name and report["overrides"] == {"rl_batch_size": 2, "eval_every": 1,
                                                                  "rl_learning_rate": 0.01}  # fmt: skip
    assert variant["changes"]["num_generations"] == 8 and variant["changes"]["baseline"] is True
    assert "rl_over_sft" not in sft and all("rl_gain_over_sft" not in run for run in sft["runs"])
    for alone, run in zip(sft["runs"], variant["runs"], strict=True):  # the same seed's SFT z, scored apart
        assert run["rl_kept"] and run["sft_test_accuracy"] == alone["test_accuracy"]
        over = run["rl_gain_over_sft"]
        assert over["items"] == 12 and over["gain_points"] == pytest.approx(
            100 * (run["test_accuracy"] - run["sft_test_accuracy"]), abs=0.02)
        assert run["train_precision"] == "fp32"
    gains = [run["rl_gain_over_sft"]["gain_points"] for run in variant["runs"]]
    assert variant["rl_over_sft"]["gain_points_per_seed"] == gains
    assert variant["rl_over_sft"]["gain_points_mean"] == round(sum(gains) / 2, 2)
    pooled = variant["rl_over_sft"]["pooled"]  # the seed-averaged items: its mean is the mean of the seeds'
    assert pooled["items"] == 12 and pooled["gain_points"] == pytest.approx(sum(gains) / 2, abs=0.02)
    assert pooled["ci_low"] <= pooled["gain_points"] <= pooled["ci_high"]
    assert not any({"scores", "sft_scores", "last_scores"} & set(run) for run in variant["runs"])
    for run in variant["runs"]:  # val rose at every step, so the z kept is the RL phase's last
        assert run["rl_last_gain_over_sft"] == run["rl_gain_over_sft"]
    assert variant["rl_last_over_sft"] == variant["rl_over_sft"] and "rl_last_over_sft" not in sft
    assert "; pooled " in Path("reports/objective_study/math_pilot.md").read_text()
    assert objective_study(["math", "--quiet", "--variants", "sfft"]) == 1
    assert objective_study(["math", "--quiet", "--set", "rl_lr=0.1"]) == 1
    greedy = "rl (reinforce, greedy ±1)"
    assert objective_study(["math", "--quiet", "--variants", greedy, "--set", "num_generations=4"]) == 1
    assert objective_study(["math", "--quiet", "--tag", "../x"]) == 1
    err = capsys.readouterr().err
    assert "names no variant: ['sfft']" in err and "rl_lr: Extra inputs are not permitted" in err
    assert "greedy rollouts (temperature 0) are all the same" in err and "--tag must be letters" in err
    with pytest.raises(SystemExit):
        objective_study(["math", "--set", "rl_steps"])
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(("val", "passes"), [
    ([0, 1, 2, 3, -1, -2], ("kept", "sft", "last")),  # RL kept at its first step, then val falls
    ([0, -1, -2, -3, -4, -5], ("kept", "last")),  # nothing kept: the kept z is the SFT z, scored once
])  # fmt: skip
def test_the_rl_phase_is_scored_for_the_z_kept_and_for_its_last_z(workdir_project, monkeypatch, val, passes):
    vals = iter(val)  # the base, 2 SFT steps and 3 RL steps, each validated
    monkeypatch.setattr(train_module.Trainer, "validate", lambda self: next(vals))
    finals, train = [], train_module.Trainer.run

    def run_and_keep_the_last_z(self):
        result = train(self)
        finals.append(self.svf.z())
        return result

    monkeypatch.setattr(train_module.Trainer, "run", run_and_keep_the_last_z)
    # each test pass scores another share of the 12 items right, so every gain tells the passes apart
    patterns = {"kept": [1.0] * 6 + [0.0] * 6, "sft": [1.0] * 3 + [0.0] * 9, "last": [1.0] * 9 + [0.0] * 3}
    scored = []

    def fake_scores(self, svf, z):
        svf.detach()
        scored.append(z)
        return patterns[passes[len(scored) - 1]]

    monkeypatch.setattr(_Study, "test_scores", fake_scores)
    assert objective_study(["math", "--quiet", "--variants", "sft+rl (reinforce, the default)", "--set",
                            "sft_steps=2", "--set", "rl_steps=3", "--set", "eval_every=1", "--tag", "last"]) == 0
    variant = json.loads(Path("reports/objective_study/math_last.json").read_text())["variants"][0]
    (run,) = variant["runs"]
    assert len(scored) == len(passes) and all(torch.equal(scored[-1][n], z) for n, z in finals[0].items())
    assert not all(torch.equal(scored[0][n], z) for n, z in finals[0].items())  # the last z is not the kept
    sft = patterns["sft"] if run["rl_kept"] else patterns["kept"]
    seed = load_params(Path("params.yaml")).seed
    assert run["rl_kept"] == ("sft" in passes)
    assert run["rl_gain_over_sft"] == variant["rl_over_sft"]["pooled"] == paired_bootstrap(sft, patterns["kept"],
                                                                                           seed=seed)  # fmt: skip
    assert run["rl_last_gain_over_sft"] == variant["rl_last_over_sft"]["pooled"] \
        == paired_bootstrap(sft, patterns["last"], seed=seed)
    assert run["rl_last_test_accuracy"] == 0.75 and run["rl_last_gain_over_sft"]["gain_points"] > 0


def test_a_timing_disturbed_by_a_busy_machine_is_taken_again(monkeypatch):
    from benchmarks import objective_study as study_module

    clock = iter([0.0, 1.0,  # the discarded 1-step run
                  1.0, 1.5, 1.5, 1.95,  # round 1: 2 steps 0.5 s (disturbed), 6 steps 0.45 s: a negative step
                  2.0, 2.1, 2.1, 2.5])  # round 2: 0.1 s and 0.4 s, the fastest of each: (0.4 − 0.1) / 4 steps
    monkeypatch.setattr(study_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))  # its clock only
    study = object.__new__(study_module._Study)
    study.params = load_params(ROOT / "params.yaml")
    trained = []
    study.train_z = lambda cfg, seed: (trained.append(cfg.sft_steps) or type("Z", (), {"detach": lambda self: None})(),
                                       None)  # fmt: skip
    cfg = study.params.experts["math"]
    assert study.step_seconds(cfg, "sft") == pytest.approx(0.075)
    assert trained == [1, 2, 6, 2, 6]
    clock = itertools.cycle([0.0, 1.0])  # every run 1 s: no step ever costs anything
    with pytest.raises(Exception, match=r"s per step in 3 rounds \(a busy machine\?\)"):
        study.step_seconds(cfg, "sft")


def test_equal_compute_sets_steps_from_a_timing_run_and_replays_them(workdir_project):
    assert objective_study(["math", "--quiet", "--budget-seconds", "0.5", "--steps", "sft=sft:3"]) == 0
    report = json.loads(Path("reports/objective_study/math.json").read_text())
    timed = {v["variant"]: v for v in report["variants"]}
    assert timed["sft"]["steps"] == {"sft": 3} and timed["sft"]["step_seconds"] is None  # given, not timed
    mixed = next(v for name, v in timed.items() if name.startswith("sft+rl (reinforce"))
    assert set(mixed["step_seconds"]) == {"sft", "rl"} and min(mixed["step_seconds"].values()) > 0
    replay = [f"{name}={','.join(f'{p}:{n}' for p, n in v['steps'].items())}" for name, v in timed.items()]
    assert objective_study(["math", "--quiet", *[a for r in replay for a in ("--steps", r)]]) == 0
    again = json.loads(Path("reports/objective_study/math.json").read_text())
    assert [v["gain_points_per_seed"] for v in again["variants"]] == [v["gain_points_per_seed"] for v in timed.values()]


def test_rl_diagnosis_runs_every_algorithm_on_fixed_prompts_and_on_the_train_split(workdir_project, capsys):
    assert rl_diagnosis(["math", "--steps", "2"]) == 1  # no expert to start from yet
    assert "expert file not found" in capsys.readouterr().err
    assert main(["train-expert", "math", "--quiet"]) == 0
    args = ["math", "--memorize", "2", "--steps", "4", "--learning-rates", "0.001", "0.01", "--rl-batch-size", "2"]
    assert rl_diagnosis(args) == 0
    report = json.loads(Path("reports/objective_study/math_rl_diagnosis.json").read_text())
    assert report["run"]["command"] == "python -m benchmarks.rl_diagnosis " + " ".join(args)
    algorithms = ["reinforce (group baseline)", "trl grpo (dapo loss)", "trl rloo"]
    memorized = report["memorize"]
    assert list(memorized["runs"]) == algorithms and memorized["learning_rate"] == 0.01 and memorized["prompts"] == 2
    assert list(report["generalize"]["runs"]) == [f"{a}, lr {lr}" for a in algorithms for lr in ("0.001", "0.01")]
    for run in [*memorized["runs"].values(), *report["generalize"]["runs"].values()]:
        assert len(run["reward"]) == 4 and [step for step, _ in run["val_curve"]] == [0, 1, 2, 3, 4]
        assert run["grad_norm_mean"] is not None
    for name, run in memorized["runs"].items():  # a quarter of 4 steps is one step
        assert run["reward_first_quarter"] == run["reward"][0] and run["reward_last_quarter"] == run["reward"][-1]
        assert (run["zero_std_groups_mean"] is None) == (name.startswith("reinforce"))  # trl logs dead groups
    for chart in ("reward", "val"):
        assert Path(f"reports/objective_study/math_rl_diagnosis_{chart}.png").stat().st_size > 0
    for bad, message in [
        (["--steps", "1"], "--steps must be at least 2"),
        (["--learning-rates", "0"], "--learning-rates must be distinct values in (0, 10]"),
        (["--learning-rates", "0.01", "0.01"], "--learning-rates must be distinct"),
        (["--rl-batch-size", "0"], "--rl-batch-size at least 1"),
        (["--memorize", "1", "--rl-batch-size", "2"], "--memorize must be 0 (skip check 1) or between"),
        (["--algorithms", "reinforce", "ppo"], "--algorithms: unknown ppo; choose from reinforce, grpo, rloo"),
        (["--tag", "../x"], "--tag must be letters"),
        (["--eval-every", "0"], "--eval-every must be at least 1"),
        (["--temperature", "0"], "--num-generations 8 --temperature 0.0: greedy rollouts (temperature 0) are all"),
    ]:
        assert rl_diagnosis(["math", *bad]) == 1
        assert message in capsys.readouterr().err
    assert rl_diagnosis(["poetry"]) == 1
    assert "no `experts.poetry` entry" in capsys.readouterr().err
    # one algorithm, check 2 only, beside the report (a long-budget run)
    args = ["math", "--algorithms", "rloo", "--memorize", "0", "--steps", "4", "--eval-every", "3",
            "--rl-batch-size", "2", "--learning-rates", "0.001", "0.01", "--test-gain", "--tag", "one",
            "--num-generations", "3", "--temperature", "0.5"]  # fmt: skip
    assert rl_diagnosis(args) == 0
    one = json.loads(Path("reports/objective_study/math_rl_diagnosis_one.json").read_text())
    assert one["memorize"] == {"prompts": 0, "learning_rate": None, "runs": {}} and one["eval_every"] == 3
    assert one["sampling"] == {"num_generations": 3, "temperature": 0.5}
    assert list(one["generalize"]["runs"]) == ["trl rloo, lr 0.001", "trl rloo, lr 0.01"]
    stage = json.loads(Path("reports/experts/math.json").read_text())
    for run in one["generalize"]["runs"].values():
        assert len(run["reward"]) == 4 and [step for step, _ in run["val_curve"]] == [0, 3, 4]
        assert run["reward_last_quarter"] == run["reward"][-1]
        assert run["test"]["items"] == len(prepared.read_split(paths.DATA, "math", "test"))
        assert run["test"]["gain"]["gain_points"] == round(100 * (run["test"]["kept"] - run["test"]["start"]), 2)
        # the start z is the stage's expert, scored as the stage scored it
        assert run["test"]["start"] == stage["test_accuracy"]["expert"]
        assert run["val_start"] == round(stage["val_accuracy"]["expert"], 4)
    assert Path("reports/objective_study/math_rl_diagnosis_one_val.png").stat().st_size > 0
    assert not Path("reports/objective_study/math_rl_diagnosis_one_reward.png").exists()
    # the smoke model scores 0 everywhere, so check directly that a scored z leaves the weights as they were
    runs = _Runs(load_params(Path("params.yaml")), "math", "number")
    before = {name: weight.clone() for name, weight in runs.model.state_dict().items()}
    rows = prepared.read_split(paths.DATA, "math", "test")[:2]
    runs.test_hits({n: z * 1.5 for n, z in runs.start_z.items()}, rows, batch_size=2)
    assert all(torch.equal(before[name], weight) for name, weight in runs.model.state_dict().items())


def test_headroom_reads_answers_and_votes_by_majority():
    assert read_answer("number", "2 + 2 = 4.\n#### 4", {}) == read_answer("number", "#### 4.0", {}) == "4.0"
    assert read_answer("number", "no number", {}) is None
    assert read_answer("number", "#### -0", {}) == read_answer("number", "#### 0", {})
    assert read_answer("letter", "Paris", {"choices": ["Rome", "Paris"]}) == "B"
    assert read_answer("code", "def f(): pass", {}) is None
    drawn = Samples(3, hits=[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
                    answers=[["3.0", "4.0", "4.0"], ["A", "B", "C"], [None, "B", None], ["A", "B", "C"]],
                    grouped=True)  # fmt: skip
    assert drawn.any_right() == [1.0, 1.0, 1.0, 1.0]
    # a majority right; a three-way tie goes to the answer given first (right in row 2, wrong in row 4);
    # one answer read among unread ones is the majority
    assert drawn.majority_right() == [1.0, 1.0, 1.0, 0.0]
    assert Samples(1, hits=[[0.0]], answers=[[None]], grouped=True).majority_right() == [0.0]  # nothing read
    assert Samples(2, hits=[[1.0, 0.0]], answers=[[None, None]], grouped=False).majority_right() is None  # code


def test_headroom_figures_split_rows_by_greedy_verdict_and_subtask():
    rows = [{"answer": "A", "choices": list(choices), "subtask": subtask}
            for choices, subtask in [("wxyz", "a"), ("wxyz", "a"), ("wxy", "b"), ("wxyz", "b")]]
    drawn = Samples(2, hits=[[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [1.0, 0.0]],
                    answers=[["A", "A"], ["B", "A"], ["C", "B"], ["A", "D"]], grouped=True)
    f = figures("letter", rows, 2, [1.0, 0.0, 0.0, 1.0], drawn)
    # votes: A (right), B|A tie → B (wrong), C|B → C (wrong), A|D → A (right)
    assert (f["items"], f["pass1"], f["sampled_pass1"], f["passk"], f["majk"]) == (4, 0.5, 0.5, 0.75, 0.5)
    assert f["chance"] == {"pass1": 0.2708, "passk": 0.467}  # 1/4 or 1/3; 1 - (3/4)^2 or 1 - (2/3)^2
    assert f["greedy_wrong"] == {"items": 2, "sampled_right": 0.25, "right_in_k": 0.5, "right_by_majority": 0.0,
                                 "chance": {"pass1": 0.2917, "passk": 0.4965}}
    assert f["greedy_right"] == {"items": 2, "wrong_by_majority": 0.0}
    a, b = f["by_subtask"]["a"], f["by_subtask"]["b"]
    for part, expected in [(a, (2, 0.5, 1.0, 0.5, 0.5)), (b, (2, 0.5, 0.5, 0.5, 0.0))]:
        wrong = part["greedy_wrong"]["sampled_right"]
        assert (part["items"], part["pass1"], part["passk"], part["majk"], wrong) == expected
    plain = figures("number", [{"answer": "1"}], 2, [0.0], Samples(2, [[0.0, 0.0]], [["2.0", None]], grouped=True))
    assert plain["chance"] is None and plain["by_subtask"] is None and plain["greedy_wrong"]["right_by_majority"] == 0.0


def test_headroom_study_sets_pass_at_k_beside_the_majority_and_guessing(workdir_project, capsys):
    assert headroom(["math"]) == 1  # no expert yet
    assert "expert file not found" in capsys.readouterr().err
    for domain in ("math", "reasoning"):
        assert main(["train-expert", domain, "--quiet"]) == 0
    assert headroom(["math", "reasoning"]) == 0
    report = json.loads(Path("reports/objective_study/headroom.json").read_text())
    assert list(report["domains"]) == ["math", "reasoning"]
    # the project copy is no git checkout: the command alone
    assert report["run"] == {"command": "python -m benchmarks.headroom math reasoning", "revision": None,
                             "code_changed": None}  # fmt: skip
    for domain, measured in report["domains"].items():
        stage = json.loads(Path(f"reports/experts/{domain}.json").read_text())["headroom"]
        # the stage's settings and seed: the base's pass@k is the stage's, to the digit
        assert (measured["k"], measured["temperature"], measured["items"]) == (stage["k"], stage["temperature"], 6)
        assert measured["base"]["passk"] == round(stage["base"]["passk"], 4)
        for start in ("base", "expert"):
            f = measured[start]
            assert f["greedy_wrong"]["items"] + f["greedy_right"]["items"] == 6
            assert f["pass1"] == round(f["greedy_right"]["items"] / 6, 4)
            subtasks = f["by_subtask"].values()  # the subtasks add up to the whole
            assert sum(s["items"] * s["pass1"] for s in subtasks) == pytest.approx(6 * f["pass1"], abs=1e-3)
            assert sum(s["greedy_wrong"]["items"] for s in subtasks) == f["greedy_wrong"]["items"]
            val = prepared.read_split(paths.DATA, domain, "val")[:6]  # the synthetic rows name their subtask
            assert {n: s["items"] for n, s in f["by_subtask"].items()} == dict(Counter(r["subtask"] for r in val))
    assert report["domains"]["math"]["expert"]["chance"] is None
    choices = [len(row["choices"]) for row in prepared.read_split(paths.DATA, "reasoning", "val")[:6]]
    guess = {"pass1": round(sum(1 / c for c in choices) / 6, 4),
             "passk": round(sum(1 - (1 - 1 / c) ** 8 for c in choices) / 6, 4)}
    reasoning = report["domains"]["reasoning"]
    assert reasoning["base"]["chance"] == reasoning["expert"]["chance"] == guess
    table = Path("reports/objective_study/headroom.md").read_text()
    assert "\nRerun: `python -m benchmarks.headroom math reasoning`.\n" in table
    assert table.count("| reasoning | base | all |") == 1
    assert f"| {100 * guess['pass1']:.1f} / {100 * guess['passk']:.1f} |" in table
    first = prepared.read_split(paths.DATA, "reasoning", "val")[0]["subtask"]
    assert f"| reasoning | expert | {first} |" in table
    assert headroom(["reasoning", "--temperature", "0.5", "--tag", "t05"]) == 0  # a pilot beside the report
    pilot = json.loads(Path("reports/objective_study/headroom_t05.json").read_text())["domains"]
    assert list(pilot) == ["reasoning"] and pilot["reasoning"]["temperature"] == 0.5
    _set_expert(workdir_project, "math", headroom_k=0)
    for bad, code, message in [(["poetry"], 1, "no `experts.poetry` entry"),
                               (["math", "--temperature", "0"], 1, "--temperature must be in (0, 5]"),
                               (["math", "--tag", "../x"], 1, "--tag must be letters"),
                               (["math"], 1, "headroom_k is 0: set it to 2"),
                               (["--params", "missing.yaml"], 2, "params file not found")]:  # fmt: skip
        assert headroom(bad) == code
        assert message in capsys.readouterr().err


def test_trl_algorithms_need_sampled_groups():
    with pytest.raises(ValueError, match="num_generations >= 2 and temperature > 0"):
        ExpertParams(objective="rl", rl_algorithm="grpo", num_generations=1, temperature=1.0)
    with pytest.raises(ValueError, match="with num_generations 1 every advantage is 0"):  # no policy gradient
        ExpertParams(objective="rl", rl_algorithm="reinforce", baseline=True, num_generations=1, temperature=1.0)
    assert ExpertParams(objective="rl", baseline=True, num_generations=2, temperature=1.0).baseline


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_a_study_records_the_command_and_the_commit_it_ran_at(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], check=True)
    Path("params.yaml").write_text("seed: 0\n")
    subprocess.run([*git, "add", "params.yaml"], check=True)
    subprocess.run([*git, "commit", "-qm", "params"], check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    run = provenance.run_record("python -m benchmarks.headroom", ["math", "--tag", "a b"])
    assert run == {"command": "python -m benchmarks.headroom math --tag 'a b'", "revision": head, "code_changed": False}
    assert provenance.markdown_lines(run) == [f"Rerun: `{run['command']}` (written at {head[:12]}).", ""]
    Path("notes.txt").write_text("not code\n")  # untracked, and no study reads it
    assert provenance.run_record("p", [])["code_changed"] is False
    Path("benchmarks").mkdir()
    Path("benchmarks/new_study.py").write_text("")  # untracked, but code a study may import
    assert provenance.run_record("p", [])["code_changed"] is True
    Path("benchmarks/new_study.py").unlink()
    Path("seed1.yaml").write_text("seed: 1\n")  # a params file of its own, never committed
    assert provenance.run_record("p", ["math", "--params", "seed1.yaml"])["code_changed"] is True
    assert provenance.run_record("p", ["math", "--params=seed1.yaml"])["code_changed"] is True
    outside = tmp_path.parent / "seed2.yaml"  # outside the checkout: in no commit either
    outside.write_text("seed: 2\n")
    assert provenance.run_record("p", ["math", "--params", str(outside)])["code_changed"] is True
    assert provenance.run_record("p", ["math", "--params", "params.yaml"])["code_changed"] is False
    Path("params.yaml").write_text("seed: 1\n")
    changed = provenance.run_record("p", [])
    assert changed["code_changed"] is True and "with uncommitted code changes" in provenance.markdown_lines(changed)[0]
    assert provenance.markdown_lines(None) == []  # a report written before runs were recorded


def test_headroom_samples_at_its_own_temperature_else_the_rl_one_else_1():
    assert ExpertParams(temperature=0.0).headroom_sampling_temperature == 1.0  # greedy RL: nothing to sample at
    assert ExpertParams(temperature=0.7, num_generations=2).headroom_sampling_temperature == 0.7
    own = ExpertParams(temperature=0.7, num_generations=2, headroom_temperature=0.3)
    assert own.headroom_sampling_temperature == 0.3


def test_pass_at_k_near_zero_temperature_is_pass_at_1(project, monkeypatch):
    from bayes_llm.experts.headroom import pass_at_k

    monkeypatch.chdir(project)
    model, tokenizer = load_checkpoint(paths.BASE)
    rows = prepared.read_split(paths.DATA, "math", "val")
    greedy = sum(greedy_scores(model, tokenizer, "number", rows, 16, 8)) / len(rows)
    assert pass_at_k(model, tokenizer, "number", rows, 4, 1e-4, 16, 8, seed=0) == greedy  # near-greedy samples
    sampled = pass_at_k(model, tokenizer, "number", rows, 4, 2.0, 16, 8, seed=0)
    assert sampled == pass_at_k(model, tokenizer, "number", rows, 4, 2.0, 16, 8, seed=0)  # seeded


def test_sft_batch_trains_on_answer_tokens_only(project):
    _, tokenizer = load_checkpoint(str(project / "models/base"))
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "Longer: 10 - 3?", "answer": "7"}]
    batch = sft_batch(tokenizer, rows)
    labels = batch["labels"]
    assert batch["input_ids"].shape == labels.shape == batch["attention_mask"].shape
    kept = [tokenizer.decode(row[row != -100]) for row in labels]
    assert kept == [" 2<eos>", " 7<eos>"]
    assert bool((batch["attention_mask"][0, : (batch["attention_mask"][0] == 0).sum()] == 0).all())  # left padding


def test_loss_truncation_leaves_out_the_hardest_sequences(project):
    model, tokenizer = load_checkpoint(str(project / "models/base"))
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 1 + 1?", "answer": "zq xv #### qz vx"}]
    batch = sft_batch(tokenizer, rows)
    with torch.no_grad():
        full = float(sft_loss(model, batch))
        alone = [float(sft_loss(model, sft_batch(tokenizer, [row]))) for row in rows]
        assert float(sft_loss(model, batch, drop_hardest=1e-6)) == pytest.approx(full, rel=1e-5)
        assert float(sft_loss(model, batch, drop_hardest=0.5)) == pytest.approx(min(alone), rel=1e-3)
    assert max(alone) - min(alone) > 20 * 1e-3 * min(alone)  # the rows differ well beyond the tolerance


@pytest.mark.parametrize("drop_hardest", [0.0, 0.5])
def test_the_parts_of_a_batch_add_up_to_its_loss(project, drop_hardest, monkeypatch):
    """The parts' losses sum to the batch's, loss truncation ranking the whole batch's sequences, not
    each part's: fixed shares in one process (`distributed.shares`), and each process's share of an
    all-reduced gradient (two processes played in one, their gather answered with both halves' means)."""
    model, tokenizer = load_checkpoint(str(project / "models/base"))
    rows = [{"prompt": "What is 1 + 1?", "answer": "2"}, {"prompt": "What is 1 + 1?", "answer": "zq xv #### qz vx"},
            {"prompt": "Which is larger?", "answer": "9"}, {"prompt": "Sum 4 5?", "answer": "4 + 5 = 9 #### 9"}]
    with torch.no_grad():  # easiest first: truncation keeps the first part whole and nothing of the second
        nll, mask = token_nll(model, sft_batch(tokenizer, rows))
        rows = [rows[i] for i in (nll.sum(dim=1) / mask.sum(dim=1)).argsort().tolist()]
        batch = sft_batch(tokenizer, rows)
        parts, shards = Shards(shares=2).parts(), Shards(shares=2)
        keep = kept_sequences(model, batch, drop_hardest, parts, shards) if drop_hardest else None
        losses = [sft_part_loss(model, batch, part, keep) for part in parts]
        whole = float(sft_loss(model, batch, drop_hardest))
        means = (nll.sum(dim=1) / mask.sum(dim=1)).sort().values.tolist()  # rank order = the new row order
        monkeypatch.setattr(Shards, "gather", lambda self, values: means)
        shares = [sft_share_loss(model, batch, drop_hardest, Shards(rank, 2)) for rank in range(2)]
    for parted in (losses, shares):
        assert len(parted) == 2 and sum(map(float, parted)) == pytest.approx(whole, rel=1e-5)
        assert (float(parted[1]) == 0.0) == (drop_hardest > 0)


def test_rollouts_mask_everything_after_eos(project):
    model, tokenizer = load_checkpoint(str(project / "models/base"))
    rows = [{"prompt": "What is 1 + 1?"}, {"prompt": "Which is larger?"}]
    batch = rollouts(model, tokenizer, rows, n=2, temperature=1.0, max_new_tokens=6)
    assert batch.input_ids.shape[0] == 4 and len(batch.texts) == 4
    completion = batch.input_ids[:, batch.prompt_width :]
    for tokens, mask in zip(completion, batch.completion_mask, strict=True):
        eos = (tokens == tokenizer.eos_token_id).nonzero()
        if len(eos):
            first = int(eos[0])
            assert mask[: first + 1].all() and not mask[first + 1 :].any()


def test_reinforce_loss_pushes_up_rewarded_completions_and_kl_is_zero_at_the_reference():
    logprobs = torch.tensor([[-1.0, -2.0], [-1.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, kl = reinforce_loss(logprobs, mask, torch.tensor([1.0, -1.0]), logprobs.detach(), beta=0.5)
    loss.backward()
    assert kl == 0.0
    assert logprobs.grad[0, 0] < 0 and logprobs.grad[1, 0] > 0 and logprobs.grad[1, 1] == 0


def test_correctness_per_kind():
    assert correctness("number", [" 12\nQuestion: x", " 13"], [{"answer": "12"}] * 2) == [1.0, 0.0]
    assert correctness("letter", [" B", " C"], [{"answer": "B"}] * 2) == [1.0, 0.0]
    row = {"tests": ["assert inc(1) == 2"]}
    assert code_of(" def inc(n):\n    return n + 1\nQuestion: next") == "def inc(n):\n    return n + 1\n"
    completions = [" def inc(n):\n    return n + 1\nQuestion: ...", " def inc(n):\n    return n"]
    assert correctness("code", completions, [row] * 2) == [1.0, 0.0]


def test_paired_bootstrap():
    same = paired_bootstrap([1, 0, 1, 0], [1, 0, 1, 0])
    assert same["gain_points"] == same["ci_low"] == same["ci_high"] == 0.0
    better = paired_bootstrap([0] * 50 + [1] * 50, [1] * 80 + [0] * 20)
    assert better["gain_points"] == 30.0 and 0 < better["ci_low"] < 30 < better["ci_high"]
    with pytest.raises(ValueError):
        paired_bootstrap([1], [1, 0])


def test_training_curves_split_the_phases_and_smooth_the_reward(tmp_path):
    from bayes_llm.stages.train_expert import REWARD_WINDOW, kept_step, log_curves, training_curves

    curve = [{"step": 0, "phase": "sft", "val_accuracy": 0.5}, {"step": 1, "phase": "sft", "loss": 2.0},
             {"step": 2, "phase": "sft", "loss": 1.5, "val_accuracy": 0.7}]
    curve += [{"step": 2 + i, "phase": "rl", "loss": 0.1, "reward": float(i % 2), "kl": None} for i in range(1, 13)]
    curve[-1]["val_accuracy"] = 0.7
    curves = training_curves(curve)
    assert curves["sft/loss"] == [(1, 2.0), (2, 1.5)]
    assert set(curves) == {"sft/loss", "rl/reward", f"rl/reward_mean{REWARD_WINDOW}", "val_accuracy"}  # no KL: none
    mean = curves[f"rl/reward_mean{REWARD_WINDOW}"]
    assert [step for step, _ in mean] == list(range(3, 15)) and mean[1][1] == 0.5 and mean[-1][1] == 0.5
    assert curves["val_accuracy"] == [(0, 0.5), (2, 0.7), (14, 0.7)]
    log_curves(curves, tmp_path / "live")
    assert (tmp_path / "live/plots/metrics/sft/loss.tsv").read_text() == "step\tloss\n1\t2.0\n2\t1.5\n"
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary == {"sft": {"loss": 1.5}, "rl": {"reward": 0.0, f"reward_mean{REWARD_WINDOW}": 0.5},
                       "val_accuracy": 0.7, "step": 14}  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live"]  # staged, then renamed: no leftovers
    assert kept_step(curve, 0.7) == 2  # a later tie does not replace the kept z
