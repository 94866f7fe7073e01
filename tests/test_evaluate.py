from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager

from bayes_llm.baselines.lora import LoraAdapters, LoraError
from bayes_llm.cli import main
from bayes_llm.config import ParamsError, parse_params
from bayes_llm.errors import UserError
from bayes_llm.evaluate import TASKS_DIR, scoring
from bayes_llm.evaluate.lm import BayesLLM
from bayes_llm.inference.engine import Engine, blend_key
from bayes_llm.stages.evaluate import expand_systems, per_item
from tests.conftest import enter_copy, raw_params


@pytest.fixture(scope="module")
def evaluated(full_smoke_project: Path) -> Path:
    return full_smoke_project


# --- tasks and scoring ---------------------------------------------------------------------------


def test_shipped_tasks_load_in_lm_eval_with_the_group():
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    names = set(manager.all_tasks)
    assert {"bayes_llm", "bayes_llm_math", "bayes_llm_code", "bayes_llm_reasoning", "bayes_llm_reasoning_gen",
            "bayes_llm_transfer"} <= names  # fmt: skip
    assert not any(name.startswith("_") for name in names)  # templates are not tasks


def test_scoring_matches_the_experts_reward():
    doc = {"answer": "26", "choices": ["1", "2", "3"], "tests": ["assert f(2) == 4"]}
    assert scoring.number_match(doc, ["5 + 11 = 16. 16 + 10 = 26.\n#### 26"]) == {"exact_match": 1.0}
    letter = {"answer": "B", "choices": ["3", "9", "4"]}  # written: the letter after '####', scan first
    assert scoring.letter_match(letter, ["3 < 9, 9 > 4: largest 9.\n#### B"]) == {"exact_match": 1.0}
    assert scoring.letter_match(letter, ["A is 3, B is 9.\n#### A"]) == {"exact_match": 0.0}
    assert scoring.number_match(doc, ["#### 25"]) == {"exact_match": 0.0}
    assert scoring.letter_choices(doc) == ["A", "B", "C"]
    assert scoring.letter_target({"answer": "C"}) == 2
    good = scoring.code_item(doc, ["def f(x):\n    return 2 * x\nQuestion: next"])["pass@1"]
    bad = scoring.code_item(doc, ["def f(x):\n    return x"])["pass@1"]
    assert good[0] == "def f(x):\n    return 2 * x\n"  # cut where a new document starts
    assert scoring.pass_at_1([good, bad]) == 0.5
    samples = [{"doc_id": 1, "pass@1": bad}, {"doc_id": 0, "pass@1": good}]
    assert per_item(samples, "pass@1,none") == [1.0, 0.0]  # doc order, judged by the sandbox


def test_systems_expand_and_are_validated():
    assert expand_systems(["base", "expert:*", "oracle"], ["math", "code"]) == [
        "base", "expert:math", "expert:code", "oracle"]  # fmt: skip
    with pytest.raises(UserError, match="expert:poetry"):
        expand_systems(["expert:poetry"], ["math"])
    raw = raw_params()
    raw["evaluate"]["systems"] = ["base", "adaptive:vibes"]
    with pytest.raises(ParamsError, match=r"evaluate\.systems"):
        parse_params(raw)


# --- the lm-eval model ---------------------------------------------------------------------------


def _request(task: str, prompt: str, kind: str = "generate_until") -> Instance:
    args = (f"Question: {prompt}\nAnswer:", {"until": ["\nQuestion:"], "max_gen_toks": 4, "do_sample": False})
    if kind == "loglikelihood":
        args = (f"Question: {prompt}\nAnswer:", " A")
    return Instance(request_type=kind, doc={"prompt": prompt}, arguments=args, idx=0,
                    metadata=(task, 0, 1))  # fmt: skip


def test_model_groups_requests_by_weights_and_shares_results(evaluated, monkeypatch):
    monkeypatch.chdir(evaluated)
    engine = Engine(Path("models"))
    memo: dict = {}
    loads: list[tuple] = []
    original = engine.use_blend
    monkeypatch.setattr(engine, "use_blend", lambda blend: (loads.append(blend_key(blend)), original(blend)))
    requests = [_request("bayes_llm_math", f"What is {i} + 1?") for i in range(3)]
    requests += [_request("bayes_llm_code", "Write f."), _request("bayes_llm_transfer", "Which? A) 1 B) 2")]
    oracle = BayesLLM(mode="oracle", engine=engine, results=memo, batch_size=4)
    answers = oracle.generate_until(requests)
    assert len(answers) == 5 and all(isinstance(a, str) for a in answers)
    assert sorted(loads) == sorted([(("math", 1.0),), (("code", 1.0),), ()])  # one load per weight group
    loads.clear()
    expert = BayesLLM(mode="expert:math", engine=engine, results=memo, batch_size=4)
    assert expert.generate_until(requests[:3]) == answers[:3]
    assert loads == []  # the oracle already answered these with the math expert's weights
    adaptive = BayesLLM(mode="adaptive:prompt", engine=engine, results={}, batch_size=4)
    assert len(adaptive.loglikelihood([_request("bayes_llm_reasoning", "Which is largest?", "loglikelihood")])) == 1
    with pytest.raises(UserError, match="unknown system"):
        BayesLLM(mode="expert:poetry", engine=engine)
    with pytest.raises(UserError, match="unknown system"):
        BayesLLM(mode="lora", engine=engine)  # no adapters given


# --- the stage -----------------------------------------------------------------------------------


def test_fewshot_search_scores_a_choice_text_domain_by_its_choices(evaluated, monkeypatch):
    from bayes_llm.data import prepared
    from bayes_llm.evaluate.lm import FewShotSearch

    monkeypatch.chdir(evaluated)
    domains = prepared.domains
    monkeypatch.setattr(prepared, "domains", lambda: [{**d, "choice_answer": "text"} if d["name"] == "reasoning"
                                                      else d for d in domains()])  # fmt: skip
    searched = []

    class Recorder:
        def fewshot(self, rows, kind, **options):
            searched.append((kind, options["cloze"]))
            raise RuntimeError("recorded")

    search = FewShotSearch(Recorder(), 2, {}, 0, {"number": 4, "code": 4, "letter": 4})
    for task in ("bayes_llm_reasoning", "bayes_llm_math"):
        with pytest.raises(RuntimeError, match="recorded"):
            search(task)
    assert searched == [("letter", True), ("number", False)]


def test_evaluate_writes_every_system_and_the_reports(evaluated):
    summary = json.loads((evaluated / "reports/eval/summary.json").read_text())
    systems = ["base", "expert_math", "expert_code", "expert_reasoning", "oracle", "adaptive_prompt",
               "adaptive_cls", "adaptive_fewshot", "lora"]  # fmt: skip
    for system in systems:
        for column in ("math", "code", "reasoning", "transfer", "reasoning_loglik", "mean"):
            assert 0.0 <= summary[f"{system}.{column}"] <= 1.0, (system, column)
        assert (evaluated / f"reports/eval/lm_eval/{system}.json").is_file()
    for domain in ("math", "code", "reasoning"):  # oracle routing = the domain's own expert
        assert summary[f"oracle.{domain}"] == summary[f"expert_{domain}.{domain}"]
    assert summary["oracle.transfer"] == summary["base.transfer"]  # no expert for transfer: base weights
    gains = json.loads((evaluated / "reports/eval/gains.json").read_text())
    assert gains["oracle"]["math"]["items"] == 12 and "base" not in gains
    fewshot = json.loads((evaluated / "reports/eval/fewshot.json").read_text())
    assert fewshot["bayes_llm_transfer"]["split"] == "test" and fewshot["bayes_llm_math"]["split"] == "val"
    for picture in ("scores.png", "gains.png"):
        assert (evaluated / "reports/eval" / picture).read_bytes()[:4] == b"\x89PNG"
    readme = (evaluated / "reports/README.md").read_text()
    assert "| adaptive:prompt |" in readme and "eval/scores.png" in readme and "| evaluate |" in readme
    table = (evaluated / "reports/eval/results.md").read_text()
    assert "| system | math | code | reasoning | mean | transfer | reasoning_loglik |" in table
    # reasoning is scored in writing; its log-likelihood score is the second, named column
    tasks = json.loads((evaluated / "reports/eval/lm_eval/base.json").read_text())["results"]
    assert {"bayes_llm_reasoning_gen", "bayes_llm_reasoning"} <= set(tasks)
    assert "**reasoning**: `bayes_llm_reasoning_gen`" in readme
    assert "**reasoning_loglik**: `bayes_llm_reasoning`" in readme


def test_evaluate_is_deterministic(evaluated, tmp_path, monkeypatch):
    project = enter_copy(evaluated, tmp_path, monkeypatch)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["evaluate"]["systems"] = ["base", "expert:math", "adaptive:prompt", "lora"]
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    first = json.loads((evaluated / "reports/eval/summary.json").read_text())
    assert main(["evaluate", "--quiet"]) == 0
    again = json.loads((project / "reports/eval/summary.json").read_text())
    systems = {key.split(".")[0] for key in again}
    # four systems and the chance row, each on 4 tasks, reasoning's log-likelihood column and the mean
    assert systems == {"base", "expert_math", "adaptive_prompt", "lora", "chance"} and len(again) == 5 * 6
    assert again == {key: value for key, value in first.items() if key.split(".")[0] in systems}


def test_lora_adapters_refuse_another_base_and_missing_files(evaluated, tmp_path, monkeypatch, capsys):
    project = enter_copy(evaluated, tmp_path, monkeypatch)
    adapters = LoraAdapters(Path("models/base"))
    assert adapters.domains == ["math", "code", "reasoning"]
    assert adapters.weights("transfer")[0] == () and adapters.weights("math")[0] == ("lora", "math")
    meta = project / "models/lora/lora.json"
    adapters_fingerprint = json.loads(meta.read_text())["base_fingerprint"]
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_fingerprint": "0" * 64}))
    with pytest.raises(LoraError, match="another base"):
        LoraAdapters(Path("models/base"))
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "base_fingerprint": adapters_fingerprint}))
    (project / "models/lora/code/adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(LoraError, match="cannot load the adapter"):
        LoraAdapters(Path("models/base"))
    meta.write_text("{not json")
    with pytest.raises(LoraError, match="not valid JSON"):
        LoraAdapters(Path("models/base"))
    shutil.rmtree(project / "models/lora")
    assert main(["evaluate", "--quiet"]) == 1  # a clear error (UserError), not a traceback
    assert "run `dvc repro train_lora`" in capsys.readouterr().err


def test_a_corrupt_test_split_fails_clearly_and_keeps_the_old_reports(evaluated, tmp_path, monkeypatch, capsys):
    project = enter_copy(evaluated, tmp_path, monkeypatch)
    before = {path.name: path.read_bytes() for path in (project / "reports/eval/lm_eval").iterdir()}
    (project / "data/prepared/reasoning/test.parquet").write_bytes(b"garbage")
    assert main(["evaluate", "--quiet"]) == 1
    assert "reasoning/test.parquet: cannot read it" in capsys.readouterr().err
    after = {path.name: path.read_bytes() for path in (project / "reports/eval/lm_eval").iterdir()}
    assert after == before


def test_max_gen_toks_sets_every_generative_tasks_answer_length(evaluated, tmp_path, monkeypatch):
    project = enter_copy(evaluated, tmp_path, monkeypatch)
    raw = yaml.safe_load((project / "params.yaml").read_text())
    with pytest.raises(ParamsError, match=r"max_gen_toks.*greater than 0"):
        parse_params({**raw, "evaluate": {**raw["evaluate"], "max_gen_toks": 0}})
    raw["evaluate"].update(systems=["base"], max_gen_toks=1)
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    shipped = json.loads((evaluated / "reports/eval/lm_eval/base.json").read_text())["configs"]
    assert main(["evaluate", "--quiet"]) == 0
    configs = json.loads((project / "reports/eval/lm_eval/base.json").read_text())["configs"]
    generative = {task for task, config in configs.items() if config["output_type"] == "generate_until"}
    assert generative and all(shipped[task]["generation_kwargs"]["max_gen_toks"] > 1 for task in generative)
    for task in generative:  # only the length changes: the stop sequences and the rest stay the task's
        assert configs[task]["generation_kwargs"] == {**shipped[task]["generation_kwargs"], "max_gen_toks": 1}
    assert "cut at **1 tokens**" in (project / "reports/README.md").read_text()
    assert "cut at" not in (evaluated / "reports/README.md").read_text()
