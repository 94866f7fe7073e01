from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bayes_llm.cli import main
from bayes_llm.dispatch.calibration import confusion, fit_temperature, fit_threshold, nll, reliability
from bayes_llm.dispatch.controller import OTHER, Controller
from bayes_llm.dispatch.fewshot import cem_search, layer_of, mixed_scales, read_examples
from bayes_llm.dispatch.likelihood import label_logprobs
from bayes_llm.errors import UserError
from bayes_llm.inference.engine import Engine
from bayes_llm.model.greedy import greedy_completions
from bayes_llm.prompts import answer_prompt, classify_prompt
from tests.conftest import build_smoke_project, enter_copy

DOMAINS = ("math", "code", "reasoning")


# --- controller ----------------------------------------------------------------------------------


def test_posterior_is_prior_times_tempered_likelihood():
    controller = Controller.with_prior(DOMAINS, {"math": 2, "code": 1, "reasoning": 1}, temperature=2.0)
    logliks = torch.tensor([[-1.0, -3.0, -2.0, -9.0]])
    expected = torch.softmax(torch.tensor(controller.log_prior) + logliks[0].double() / 2.0, dim=-1)
    posterior = controller.posterior(logliks)[0]
    assert torch.allclose(posterior, expected) and math.isclose(float(posterior.sum()), 1.0)
    assert math.isclose(math.exp(controller.log_prior[0]), 0.75 * 0.5)  # other keeps 1/4, math 2/4 of the rest
    with pytest.raises(ValueError, match="3 labels"):
        controller.posterior(torch.zeros(1, 3))


def test_other_or_low_confidence_route_to_the_base_weights():
    controller = Controller.with_prior(DOMAINS, threshold=0.6)
    assert controller.route(torch.tensor([0.1, 0.1, 0.1, 0.7])) == OTHER
    assert controller.blend(torch.tensor([0.1, 0.1, 0.1, 0.7])) == {}
    assert controller.route(torch.tensor([0.5, 0.3, 0.1, 0.1])) == OTHER  # below the threshold
    assert controller.route(torch.tensor([0.7, 0.2, 0.05, 0.05])) == "math"
    posterior = torch.tensor([0.7, 0.2, 0.05, 0.05])
    assert controller.blend(posterior, "max") == {"math": 1.0}
    top2 = controller.blend(posterior, "top_k", top_k=2)
    assert top2.keys() == {"math", "code"} and math.isclose(top2["math"], 0.7 / 0.9, rel_tol=1e-6)
    average = controller.blend(posterior)
    assert math.isclose(sum(average.values()), 1.0) and "reasoning" in average  # other's mass is dropped


def test_controller_validates_and_round_trips():
    with pytest.raises(ValueError, match="followed by 'other'"):
        Controller(("math", "code"), (0.0, 0.0))
    with pytest.raises(ValueError, match="temperature"):
        Controller.with_prior(DOMAINS, temperature=0.0)
    controller = Controller.with_prior(DOMAINS, temperature=1.7, threshold=0.3)
    assert Controller.from_json(json.loads(json.dumps(controller.to_json()))) == controller


# --- calibration ---------------------------------------------------------------------------------


def _overconfident(n: int = 3000, temperature: float = 3.0, seed: int = 0):
    """Log-likelihoods whose true labels follow softmax(loglik / temperature): T = 1 is overconfident."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4.0, size=(n, 4))
    logits[:, 3] -= 6  # `other` rarely true
    probs = np.exp(logits / temperature)
    probs /= probs.sum(axis=1, keepdims=True)
    targets = [int(rng.choice(4, p=p)) for p in probs]
    return torch.tensor(logits), targets


def test_fitted_temperature_recovers_the_truth_and_lowers_nll_and_ece():
    logliks, targets = _overconfident()
    start = Controller(("a", "b", "c", OTHER), (0.0,) * 4)
    tuned = fit_temperature(start, logliks, targets)
    assert 2.6 < tuned.temperature < 3.4
    assert nll(tuned, logliks, targets) < nll(start, logliks, targets)
    before = reliability(start.posterior(logliks), targets)
    after = reliability(tuned.posterior(logliks), targets)
    assert after["ece"] < before["ece"] / 2 and after["ece"] < 0.03
    assert sum(b["count"] for b in after["table"]) == len(targets) and after["bins"] == 15


def test_threshold_sends_at_most_the_fallback_budget_to_the_base():
    logliks, _ = _overconfident(n=1000)
    controller = Controller(("a", "b", "c", OTHER), (0.0,) * 4)
    tuned = fit_threshold(controller, logliks, max_fallback=0.05)
    confidence = tuned.posterior(logliks).max(dim=-1).values
    assert 0.03 <= float((confidence < tuned.threshold).double().mean()) <= 0.05
    assert fit_threshold(controller, logliks, 0.0).threshold == 0.0


def test_confusion_counts_routes_including_the_base():
    controller = Controller(("a", "b", OTHER), (0.0,) * 3, threshold=0.5)
    posterior = torch.tensor([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.4, 0.35, 0.25], [0.1, 0.1, 0.8]])
    table = confusion(controller, posterior, [0, 0, 1, 1])
    assert table["matrix"] == [[1, 1, 0], [0, 0, 2]]
    assert table["routing_accuracy"] == 0.25 and table["to_base"] == 0.5


# --- few-shot CEM --------------------------------------------------------------------------------


def test_mixed_scales_interpolate_from_the_base_through_each_expert():
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    scales = {"a": {n: torch.full((3,), 2.0) for n in names}, "b": {n: torch.full((3,), 0.5) for n in names}}
    assert all(torch.equal(s, torch.ones(3)) for s in mixed_scales(np.zeros(2), scales, False).values())
    assert all(
        torch.equal(s, torch.full((3,), 2.0)) for s in mixed_scales(np.array([1.0, 0.0]), scales, False).values()
    )
    half = mixed_scales(np.array([0.5, 0.5]), scales, False)
    assert torch.allclose(half[names[0]], torch.full((3,), 1.25))
    per_layer = mixed_scales(np.array([[1.0, 0.0], [0.0, 1.0]]), scales, True)  # layer 0: a, layer 1: b
    assert torch.equal(per_layer[names[0]], torch.full((3,), 2.0))
    assert torch.equal(per_layer[names[1]], torch.full((3,), 0.5))
    assert layer_of(names[1]) == 1 and layer_of("lm_head") == 0


def test_cem_finds_the_optimum_and_never_loses_to_a_single_expert():
    target = np.array([0.3, 0.7, 0.0])

    def score(alpha):
        return -float(np.square(alpha - target).sum()), 0.0

    result = cem_search(score, (3,), population=24, elites=6, iterations=12, seed=0)
    assert np.abs(result.alpha - target).max() < 0.1 and len(result.history) == 12

    def one_hot_wins(alpha):  # reward only for exactly expert 2: only the seeded population finds it
        return float(np.array_equal(alpha, np.eye(3)[2])), -float(np.abs(alpha).sum())

    best = cem_search(one_hot_wins, (3,), population=4, elites=2, iterations=2, seed=0)
    assert best.reward == 1.0 and np.array_equal(best.alpha, np.eye(3)[2])
    with pytest.raises(ValueError, match="elites"):
        cem_search(score, (3,), population=2, elites=3, iterations=1, seed=0)


def test_read_examples_gives_clear_errors(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"prompt": "What is 2 + 2?", "answer": 4}\n\n')
    assert read_examples(good) == [{"prompt": "What is 2 + 2?", "answer": "4"}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:1: each example needs 'prompt' and 'answer'"):
        read_examples(bad)
    bad.write_text("not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:1: not a JSON object"):
        read_examples(bad)
    with pytest.raises(UserError, match="not found"):
        read_examples(tmp_path / "missing.jsonl")


# --- with a tiny pipeline ------------------------------------------------------------------------


PIPELINE_FIXTURES = {"project"}  # prepare, base, decompose (and more) at smoke size

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A smoke-size project with base, SVD, all three experts and a calibrated dispatcher."""
    experts = [["train-expert", domain] for domain in DOMAINS]
    commands = [["prepare"], ["base"], ["decompose"], *experts, ["calibrate"]]
    return build_smoke_project(tmp_path_factory.mktemp("dispatch"), commands)


@pytest.fixture
def workdir_project(project, tmp_path, monkeypatch) -> Path:
    return enter_copy(project, tmp_path, monkeypatch)


def test_label_logprobs_match_a_plain_forward(workdir_project):
    engine = Engine()
    tok = engine.tokenizer
    prompt = "What is 3 + 4?"
    context = [tok.bos_token_id, *tok(classify_prompt(prompt), add_special_tokens=False)["input_ids"]]

    def forward(label: str) -> tuple[list[int], torch.Tensor]:
        ids = [*tok(" " + label, add_special_tokens=False)["input_ids"], tok.eos_token_id]
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([context + ids])).logits[0].double()
        return ids, torch.log_softmax(logits, dim=-1)

    # Labels whose first tokens differ: one pass over the prompt, scored by that first token. (The
    # smoke tokenizer splits off the space, so take words it merged with their leading space.)
    words = [t[1:] for t in sorted(tok.get_vocab()) if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2]
    labels = [words[0], "code", words[-1]]
    assert len({forward(label)[0][0] for label in labels}) == 3
    scores = label_logprobs(engine.model, tok, [prompt, "Write a function."], labels)
    assert scores.shape == (2, 3) and torch.all(scores < 0)
    ids, logprobs = forward("code")
    assert math.isclose(float(scores[0, 1]), float(logprobs[len(context) - 1, ids[0]]), rel_tol=1e-4)
    # Labels sharing a first token: every token of the label and the EOS after it count.
    shared = ["math", "mathx"]
    assert forward(shared[0])[0][0] == forward(shared[1])[0][0]
    scores = label_logprobs(engine.model, tok, [prompt, "Write a function."], shared)
    ids, logprobs = forward("mathx")
    expected = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(ids))
    assert math.isclose(float(scores[0, 1]), expected, rel_tol=1e-4)  # padding and batching change nothing


def test_calibrate_writes_dispatcher_and_reports(workdir_project):
    report = json.loads(Path("reports/dispatch/metrics.json").read_text())
    assert report["domains"] == sorted(DOMAINS) and report["strategy"] == "cls"
    for strategy in ("prompt", "cls"):
        entry = report["strategies"][strategy]
        assert entry["temperature"] > 0 and entry["threshold_rule"]  # fitted on the benchmark: tests/test_routing
        assert len(entry["test"]["matrix"]) == 3 and len(entry["test"]["matrix"][0]) == 4
        assert sum(map(sum, entry["test"]["matrix"])) == 36  # 12 test prompts per domain
    # The routing benchmark's test part (smoke: 6 held-out per domain, 4 per mixed kind, 8 off-domain).
    heldout = report["heldout"]
    assert heldout["items"] == {"heldout": 18, "mixed": 8, "other": 8} and heldout["strategy"] == "cls"
    for key in ("routing_accuracy", "ece_before", "ece_after", "nll_after", "other_recall"):
        assert 0 <= heldout[key] <= (1 if key != "nll_after" else 1e3), key
    assert sum(map(sum, heldout["confusion"]["matrix"])) == 18 + 8
    answers = heldout["answers"]
    assert answers["heldout"]["items"] == 18 and answers["mixed"]["items"] == 8
    assert set(answers["heldout"]["accuracy"]) == {"base", "hard", "soft", "oracle"}
    assert {"soft_minus_hard", "soft_minus_oracle", "soft_minus_base"} <= set(answers["mixed"])
    assert not any("seconds" in key for key in report) and "timing" not in report  # metrics: no seconds
    timing = json.loads(Path("reports/dispatch/timing.json").read_text())
    assert timing["pass2_seconds"] > 0 and timing["overhead_share_of_pass2"] > 0 and timing["stage_seconds"] > 0
    for name in ("reliability.png", "confusion.png"):
        assert Path("reports/dispatch", name).stat().st_size > 0
    assert {p.name for p in Path("models/dispatcher").iterdir()} == {"dispatcher.json", "cls.safetensors"}


def test_other_answers_with_the_exact_base_weights_not_the_last_expert(workdir_project):
    engine = Engine()
    base = {name: w.clone() for name, w in engine.composer.base.items()}
    prompts = ["What is 2 + 5?", "Which number is the largest?\nA) 3\nB) 9"]
    plain = greedy_completions(engine.model, engine.tokenizer, [answer_prompt(p) for p in prompts], 6, 8)
    scaled = {name: torch.full_like(f.s, 1.5) for name, f in engine.factors.items()}
    engine.use_scales(("some expert",), lambda: scaled)  # other weights are loaded...
    first = next(iter(base))
    assert not torch.equal(engine.model.get_submodule(first).weight, base[first])
    engine.controllers["prompt"] = replace(engine.controllers["prompt"], threshold=1.01)  # ...nothing is confident
    answers = engine.generate(prompts, "prompt", max_new_tokens=6)
    assert all(a.blend == {} for a in answers)
    for name, weight in base.items():
        assert torch.equal(engine.model.get_submodule(name).weight, weight)
    assert [a.text for a in answers] == plain


def test_generate_groups_by_blend_and_shows_the_posterior(workdir_project, capsys):
    engine = Engine()
    answers = engine.generate(["What is 1 + 1?", "Compute 2 + 2."], "expert:math", max_new_tokens=4)
    assert [a.blend for a in answers] == [{"math": 1.0}] * 2 and len(engine._cache) == 1
    assert main(["generate", "--prompt", "What is 1 + 1?", "--show-experts", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "[posterior: code " in out and ", other " in out and "[blend:" in out
    assert main(["generate", "--prompt", "x", "--strategy", "expert:poetry"]) == 1
    assert "no expert 'poetry'" in capsys.readouterr().err


def test_fewshot_cli_searches_and_answers(workdir_project, tmp_path, capsys):
    examples = tmp_path / "shots.jsonl"
    examples.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(3)))
    args = ["generate", "--prompt", "What is 5 + 1?", "--strategy", "fewshot", "--examples", str(examples)]
    assert main([*args, "--show-experts", "--max-new-tokens", "4"]) == 0
    assert "few-shot reward" in capsys.readouterr().out
    assert main(["generate", "--prompt", "x", "--strategy", "fewshot"]) == 1
    assert "--examples" in capsys.readouterr().err


def test_fewshot_search_of_a_choice_text_task_is_by_its_choices_likelihood(workdir_project, monkeypatch):
    import bayes_llm.inference.engine as engine_module

    engine = Engine(Path("models"))
    shots = [{"id": str(i), "prompt": f"Which is {i}?", "choices": ["no", str(i), "maybe"], "answer": "B"}
             for i in range(4)]  # fmt: skip
    calls = []

    def cloze(model, tokenizer, rows, batch_size):  # the 2nd candidate (α one-hot on the first expert) wins
        calls.append(rows)
        return [0.5 if len(calls) == 2 else 0.0] * len(rows)

    monkeypatch.setattr(engine_module, "cloze_scores", cloze)
    monkeypatch.setattr(engine, "complete", lambda *_, **__: pytest.fail("searched by greedy answers"))
    result, _ = engine.fewshot(shots, "letter", population=3, elites=1, iterations=2, seed=0, cloze=True)
    assert len(calls) == 1 + len(engine.domains) + 3 + 3 and all(rows == shots for rows in calls)
    assert result.reward == 0.5 and result.alpha.tolist() == [1.0] + [0.0] * (len(engine.domains) - 1)


def test_missing_or_mismatched_dispatcher_is_a_clear_error(workdir_project, capsys):
    Path("models/experts/code.safetensors").unlink()
    assert main(["generate", "--prompt", "x"]) == 1
    assert (
        "calibrated for experts ['code', 'math', 'reasoning'], found ['math', 'reasoning']" in capsys.readouterr().err
    )
    shutil.rmtree("models/dispatcher")
    assert main(["generate", "--prompt", "x"]) == 1
    assert "run `dvc repro calibrate`" in capsys.readouterr().err
    assert main(["generate", "--prompt", "What is 1 + 1?", "--strategy", "base", "--max-new-tokens", "2"]) == 0
