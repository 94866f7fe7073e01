"""An instruct checkpoint is asked through its chat template wherever the pipeline prompts it; a base
pretrained here sees exactly the plain text it learned. Also the real sources' per-split and test-only
shapes, and code answered in a Markdown block."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from bayes_llm.config import ParamsError
from bayes_llm.dispatch.likelihood import label_logprobs
from bayes_llm.experts.objectives import rollouts, sft_batch
from bayes_llm.model.tokenizer import train_tokenizer
from bayes_llm.prompts import answer_prompt, classify_prompt, classify_question, model_context, reply_separator
from bayes_llm.rewards.correctness import code_of, correctness
from tests.conftest import smoke_params, write_jsonl

# ChatML, the shape of SmolLM2's template (with its default system turn)
CHATML = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizers():
    texts = [answer_prompt("What is 2 + 3?") + " 5", classify_prompt("Sort 3 1 2") + " reasoning"] * 20
    plain = train_tokenizer(texts, 300, 128)
    chat = train_tokenizer(texts, 300, 128)
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    chat.chat_template = CHATML
    chat.eos_token = "<|im_end|>"
    return plain, chat


def test_a_plain_base_sees_its_pretraining_text(tokenizers):
    plain, _ = tokenizers
    expected = plain.bos_token + "Question: What is 2 + 3?\nAnswer:"
    assert model_context(plain, answer_prompt("What is 2 + 3?")) == expected
    assert reply_separator(plain) == " "
    # no labels in the plain question: the base learned the bare format in pretraining
    assert classify_question(plain, "Sort 3 1 2", ["math", "other"]) == classify_prompt("Sort 3 1 2")


def test_a_chat_model_is_asked_in_its_turns(tokenizers):
    _, chat = tokenizers
    context = model_context(chat, answer_prompt("What is 2 + 3?"))
    assert context == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQuestion: What is 2 + 3?\n"
                       "Answer:<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    assert reply_separator(chat) == ""
    question = classify_question(chat, "Sort 3 1 2", ["math", "reasoning", "other"])
    assert "math, reasoning, other" in question and question.endswith(classify_prompt("Sort 3 1 2"))


def test_sft_targets_follow_the_assistant_header_and_end_the_turn(tokenizers):
    _, chat = tokenizers
    batch = sft_batch(chat, [{"prompt": "What is 2 + 3?", "answer": "5"}])
    ids = batch["input_ids"][0].tolist()
    target = [t for t, label in zip(ids, batch["labels"][0].tolist(), strict=True) if label != -100]
    assert chat.decode(target) == "5<|im_end|>"  # no space after the header; the turn's end is the EOS
    assert chat.decode(ids).startswith("<|im_start|>system")  # the template's own start, no BOS prepended


def test_pass_one_scores_labels_in_the_chat_turns(tokenizers, monkeypatch):
    """The contexts label_logprobs scores are the chat turns, and each label follows the header directly."""
    _, chat = tokenizers
    seen = []

    class Recorder:
        def eval(self):
            return self

        def __call__(self, input_ids, attention_mask):
            import torch

            seen.extend(input_ids.tolist())
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, len(chat))})()

    label_logprobs(Recorder(), chat, ["Sort 3 1 2"], ["math", "mathematics"])  # shared first token: full scoring
    texts = [chat.decode([t for t in ids if t != chat.pad_token_id]) for ids in seen]
    assert all(text.startswith("<|im_start|>system") for text in texts)
    assert any(text.endswith("<|im_start|>assistant\nmath<|im_end|>") for text in texts)


def test_rl_rollouts_start_from_the_chat_context(tokenizers):
    _, chat = tokenizers

    class Echo:
        def generate(self, input_ids, attention_mask, **_):
            import torch

            return torch.cat([input_ids, torch.full((len(input_ids), 1), chat.eos_token_id)], dim=1)

    out = rollouts(Echo(), chat, [{"prompt": "What is 2 + 3?"}], 1, 0.0, 4)
    assert chat.decode(out.input_ids[0]).startswith("<|im_start|>system\nBe brief.")


def test_code_in_a_markdown_block_is_the_program():
    assert code_of("```python\ndef f(x):\n    return x\n```\nThis returns x.") == "def f(x):\n    return x\n"
    assert code_of("Here:\n```\nx = 1\n") == "x = 1\n"  # cut off before the closing fence
    assert code_of("``` python\nx = 2\n```\nThis explains x.") == "x = 2\n"
    assert code_of("def f():\n    return 1\nQuestion: next") == "def f():\n    return 1\n"
    # a program that parses is the program, fences in its docstring or comments included
    documented = 'def f(x):\n    """Example:\n    ```\n    f(1)\n    ```\n    """\n    return x\n'
    assert code_of(documented) == documented
    assert code_of("def f():\n    return 1\n# see ```x```\n") == "def f():\n    return 1\n# see ```x```\n"
    rows = [{"tests": ["assert add(1, 2) == 3"]}] * 2
    fenced = ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```"]
    assert correctness("code", fenced, rows) == [1.0, 0.0]


def test_a_written_answer_names_its_choice_by_letter_or_by_text():
    rows = [{"answer": "C", "choices": ["4", "42", "light years", "C"]}] * 7
    written = ["Light years.", "C) light years", "light years per second", "#### C", "42", "(C)", "4 is it"]
    assert correctness("letter", written, rows) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    # a letter opening the answer is that letter, even where a choice's text is a letter
    assert correctness("letter", ["C", "D"], [{**rows[0], "answer": "D"}] * 2) == [0.0, 1.0]
    # a choice's text may open with a capital: written whole, it is that choice, not the letter
    arc = {"answer": "B", "choices": ["A plant", "A magnet", "I think so"]}
    assert correctness("letter", ["A magnet", "a magnet.", "A plant", "I think so", "A) a plant"], [arc] * 5) == [
        1.0, 1.0, 0.0, 0.0, 0.0]  # fmt: skip
    # a number that only opens a worked answer names no choice (the synthetic scans write '12 is the largest.')
    assert correctness("letter", ["12 is the largest."], [{"answer": "A", "choices": ["12", "3"]}]) == [0.0]


def _arc_rows(n: int, prefix: str) -> list[dict]:
    return [{"id": f"{prefix}{i}", "question": f"Which of these is number {i} in the list?",
             "choices": {"text": ["one", "two"], "label": ["A", "B"]}, "answerKey": "A"} for i in range(n)]  # fmt: skip


def _arc_source(tmp_path, **extra) -> dict:
    files = {split: write_jsonl(tmp_path / f"{split}.jsonl", _arc_rows(9, split)) for split in ("train", "val", "test")}
    fields = {"prompt": "question", "answer": "answerKey", "id": "id", "choices": "choices"}
    return {"type": "local", "answer_kind": "letter", "files": files, "fields": fields, **extra}


def test_rows_per_split_ids_skipped_and_a_test_only_source(tmp_path):
    from bayes_llm.data import domains
    from bayes_llm.data.sources import SourceError

    source = _arc_source(tmp_path, max_rows={"train": 5, "test": 2}, skip_ids=["train0", "test1"])
    typo = smoke_params(sources={"arc": {**source, "skip_ids": ["train0", "tset1"]}})
    with pytest.raises(SourceError, match=re.escape("data.sources.arc.skip_ids: no row has id tset1")):
        domains.build(next(d for d in domains.resolve(typo.data) if d.name == "arc"), typo.data, 0)
    params = smoke_params(sources={"arc": source, "arc_c": {**_arc_source(tmp_path), "test_only": True,
                                                             "files": {"test": source["files"]["test"]}}})  # fmt: skip
    resolved = {d.name: d for d in domains.resolve(params.data)}
    built = domains.build(resolved["arc"], params.data, 0)
    assert {split: len(rows) for split, rows in built.items()} == {"train": 5, "val": 9, "test": 2}
    assert [row["prompt"].split("\n")[0] for row in built["train"]] == [
        f"Which of these is number {i} in the list?" for i in range(1, 6)]  # train0 skipped
    assert [row["prompt"].split("\n")[0] for row in built["test"]] == [
        "Which of these is number 0 in the list?", "Which of these is number 2 in the list?"]  # fmt: skip
    assert resolved["arc_c"].test_only and resolved["arc_c"].splits == ("test",)
    assert list(domains.build(resolved["arc_c"], params.data, 0)) == ["test"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"test_only": True}, "a test_only source reads files.test only; drop files.train, files.val"),
        ({"files": {"test": "t.jsonl"}}, "files needs train, val and test (or test_only: true)"),
        ({"fields": {"prompt": "question", "answer": "answerKey"}, "skip_ids": ["x"]}, "skip_ids needs fields.id"),
        ({"max_rows": {"tset": 3}}, "max_rows.SplitRows.tset: unknown key"),
        ({"test_only": True, "files": {"test": "t.jsonl"}, "max_rows": {"train": 3}}, "max_rows takes `test` only"),
        ({"answer_kind": "number", "choice_answer": "text"}, "choice_answer is for multiple choice"),
        ({"choice_answer": "words"}, "choice_answer: Input should be 'letter' or 'text'"),
    ],
)
def test_bad_real_source_shapes_name_the_fix(tmp_path, change, message):
    with pytest.raises(ParamsError, match=re.escape(message)):
        smoke_params(sources={"arc": {**_arc_source(tmp_path), **change}})


def test_a_missing_fetched_file_says_to_fetch_it(tmp_path, monkeypatch):
    from bayes_llm.data import domains
    from bayes_llm.data.sources import SourceError

    monkeypatch.chdir(tmp_path)
    raw = {split: f"data/raw/gsm8k/{split}.jsonl" for split in ("train", "val", "test")}
    params = smoke_params(sources={"math": {"type": "local", "answer_kind": "number", "files": raw}})
    math = next(d for d in domains.resolve(params.data) if d.name == "math")
    with pytest.raises(SourceError, match=r"run `bayes-llm fetch gsm8k` first"):
        domains.build(math, params.data, 0)


def test_the_real_profile_parses_and_its_bad_variants_are_refused():
    """The real overlay is checked here, without the network the real-smoke test needs."""
    import copy

    import yaml

    from bayes_llm.config import parse_params
    from tests.conftest import ROOT

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    real = parse_params({**raw, "profile": "real"})
    assert real.model.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and real.data.domains.math is None
    assert real.data.sources["arc_challenge"].test_only and set(real.experts) == {"math", "code", "reasoning"}
    typo = copy.deepcopy({**raw, "profile": "real"})
    typo["real"]["experts"]["math"]["sft_stepz"] = 3
    with pytest.raises(ParamsError, match=re.escape("experts.math.sft_stepz: unknown key")):
        parse_params(typo)
    without = {k: v for k, v in raw.items() if k != "real"}
    with pytest.raises(ParamsError, match="profile 'real' needs its `real:` block"):
        parse_params({**without, "profile": "real"})
    expert_on_test_only = copy.deepcopy({**raw, "profile": "real"})
    expert_on_test_only["real"]["experts"]["arc_challenge"] = {}
    with pytest.raises(ParamsError, match=re.escape("experts.arc_challenge: data.sources.arc_challenge is test_only")):
        parse_params(expert_on_test_only)


@pytest.mark.parametrize("chat_template", [False, True])
def test_cloze_picks_the_choice_text_lm_eval_would(tokenizers, chat_template):
    """A `choice_answer: text` domain is validated as lm-eval scores its test task: each choice's text
    after the task's context, log-likelihood per character, the top one is the answer."""
    import math

    import torch
    import transformers as tf
    import yaml
    from lm_eval.api.model import TemplateLM

    from bayes_llm.evaluate import TASKS_DIR
    from bayes_llm.model.cloze import cloze_scores, request_ids
    from tests.tiny_models import tiny_config

    tokenizer = tokenizers[chat_template]
    tf.set_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_config("llama", len(tokenizer))).eval()
    rows = [{"id": str(i), "prompt": f"What is {i} + 3?", "choices": [str(i + 3), f"{i} apples", "no"],
             "answer": "A"} for i in range(5)]  # fmt: skip
    template = yaml.safe_load((TASKS_DIR / "_choice_text").read_text().replace("!function", ""))

    # lm-eval's own request: the task's context through the template, its delimiter ('' after a chat
    # header, else the template's ' '), encoded by its `_encode_pair` as BayesLLM encodes (no BOS added)
    encoder = SimpleNamespace(backend="causal",
                              tok_encode=lambda text: tokenizer(text, add_special_tokens=False)["input_ids"])
    delimiter = "" if chat_template else " "

    def per_char(row: dict, choice: str) -> float:  # one sequence, no padding
        context = model_context(tokenizer, template["doc_to_text"].replace("{{prompt}}", row["prompt"]))
        ids, cont = TemplateLM._encode_pair(encoder, context, delimiter + choice)
        assert (ids, cont) == request_ids(tokenizer, row["prompt"], choice)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids + cont])).logits[0].double(), -1)
        return sum(float(logprobs[len(ids) - 1 + i, t]) for i, t in enumerate(cont)) / len(choice)

    picks = ["ABC"[max(range(3), key=lambda c: per_char(row, row["choices"][c]))] for row in rows]
    expected = [float(pick == "A") for pick in picks]
    assert cloze_scores(model, tokenizer, rows, batch_size=1) == expected
    assert cloze_scores(model, tokenizer, rows, batch_size=7) == expected  # padding and batching change nothing
    relabelled = [{**row, "answer": pick} for row, pick in zip(rows, picks, strict=True)]
    assert cloze_scores(model, tokenizer, relabelled, batch_size=4) == [1.0] * len(rows)
    assert not math.isclose(per_char(rows[0], "no"), per_char(rows[0], "3"))
    if chat_template:  # the header's newline is scored with the choice, as lm-eval scores it
        assert tokenizer.decode(request_ids(tokenizer, "What is 1 + 3?", "4")[1]).startswith("\n")
    with pytest.raises(ValueError, match="needs the row's choices"):
        cloze_scores(model, tokenizer, [{"id": "x", "prompt": "p", "answer": "A"}], batch_size=1)
