"""Serving: per-row SVF is exact, and a real `bayes-llm serve` process answers the official `openai`
client, batches concurrent requests with different blends, refuses bad requests with 4xx and keeps
serving, and its demo page works in a real headless browser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import openai
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from transformers import AutoModelForCausalLM

from bayes_llm.bundle.manifest import BundleError, verify
from bayes_llm.experts.distributed import free_port
from bayes_llm.model.load import load_checkpoint
from bayes_llm.serve import scheduler as scheduling
from bayes_llm.serve.app import Server, _script_json, create_app
from bayes_llm.serve.protocol import Extension
from bayes_llm.serve.rowwise import RowwiseSVF
from bayes_llm.serve.scheduler import Job, Routing, Sampling, Scheduler, generator_seed
from bayes_llm.svf.blend import blend_scales
from bayes_llm.svf.decompose import svd_factors
from bayes_llm.svf.scaling import Composer
from bayes_llm.svf.targets import select_targets
from tests.cdp import BROWSER, Page
from tests.conftest import BIN
from tests.tiny_models import save_tiny_checkpoint

# --- per-row SVF ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = save_tiny_checkpoint("bamba", tmp_path_factory.mktemp("tiny") / "bamba")
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    factors = {name: svd_factors(model.get_submodule(name).weight) for name in select_targets(model, "all")}
    generator = torch.Generator().manual_seed(0)
    blends = [{name: 1 + 0.5 * torch.randn(f.s.shape, generator=generator) for name, f in factors.items()}
              for _ in range(2)]  # fmt: skip
    return model, factors, blends


def test_rowwise_rows_match_merged_weights_and_leave_the_base_exact(tiny):
    model, factors, (a, b) = tiny
    ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(input_ids=ids).logits
        composer = Composer(model, factors)
        merged = []
        for scales in (a, b):
            composer.merge(scales)
            merged.append(model(input_ids=ids).logits)
        composer.unmerge()
        rowwise = RowwiseSVF(model, factors)
        with rowwise.rows([a, None, b]):
            mixed = model(input_ids=ids).logits
        with rowwise.rows([a, a, a]):  # every row adapted: the unindexed path
            all_a = model(input_ids=ids).logits
        with rowwise.same(a):  # one set of scales, any batch
            same_a = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
        rowwise.remove()
    assert not torch.allclose(merged[0], base, atol=1e-3)  # the scales do change the model
    torch.testing.assert_close(mixed[0], merged[0][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(mixed[1], base[1])  # a base row is untouched, bit for bit
    torch.testing.assert_close(mixed[2], merged[1][2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(all_a, merged[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(same_a, merged[0], atol=1e-4, rtol=1e-4)
    assert torch.equal(after, base)  # outside `rows` the hooks do nothing


def test_rowwise_refuses_a_batch_of_another_size(tiny):
    model, factors, (a, _) = tiny
    rowwise = RowwiseSVF(model, factors)
    try:
        with rowwise.rows([a, None]), pytest.raises(RuntimeError, match="batch of 3 rows"):
            model(input_ids=torch.ones(3, 4, dtype=torch.long))
    finally:
        rowwise.remove()


class TinyEngine:
    """What the scheduler needs of an `Engine`, on the tiny checkpoint with two made-up experts."""

    def __init__(self, model, tokenizer, factors, experts) -> None:
        self.model, self.tokenizer, self.factors, self.expert_scales = model, tokenizer, factors, experts
        self.classifier_scales, self.controllers = None, {}
        self.composer = Composer(model, factors)
        self.context = model.config.max_position_embeddings

    @property
    def domains(self) -> list[str]:
        return list(self.expert_scales)

    def use_blend(self, blend: dict) -> None:
        self.composer.merge(blend_scales(self.expert_scales, blend)) if blend else self.composer.unmerge()


def _run(scheduler: Scheduler, requests: list[tuple[dict, Sampling]], prompt_ids: list[int],
         stream: bool = True) -> list[dict]:  # fmt: skip
    out = [{"text": "", "pieces": 0} for _ in requests]

    def emit(i):
        def record(event, payload):
            if event == "text":
                out[i]["text"] += payload
                out[i]["pieces"] += 1
            elif event in ("done", "error"):
                out[i][event] = payload

        return record

    jobs = [Job("", prompt_ids, sampling, Routing(strategy="blend", blend=tuple(blend.items())) if blend else
                Routing(strategy="base"), emit(i), stream) for i, (blend, sampling) in enumerate(requests)]  # fmt: skip
    scheduler._serve(jobs)
    return out


def test_a_mixed_batch_answers_as_each_blend_alone_with_its_own_limits(tiny, tmp_path):
    model, factors, (a, b) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    engine = TinyEngine(model, tokenizer, factors, {"a": a, "b": b})
    prompt = tokenizer("Question: What is 3 + 4?\nAnswer:", add_special_tokens=False)["input_ids"]
    long = Sampling(max_tokens=8, ignore_eos=True)
    requests = [
        ({"a": 1.0}, long),
        ({}, long),
        ({"b": 1.0}, long),
        ({"a": 0.5, "b": 0.5}, Sampling(max_tokens=3, ignore_eos=True)),
    ]
    mixed = _run(Scheduler(engine, batching="mixed"), requests, prompt)
    alone = [_run(Scheduler(engine, batching="regroup"), [request], prompt)[0] for request in requests]
    assert [m["text"] for m in mixed] == [a["text"] for a in alone]
    whole = _run(Scheduler(engine), requests, prompt, stream=False)  # decoded once at the end: the same text
    assert [w["text"] for w in whole] == [m["text"] for m in mixed] and {w["pieces"] for w in whole} == {1}
    assert max(m["pieces"] for m in mixed) > 1  # streamed as it was generated
    assert len({m["text"] for m in mixed}) == 4  # every blend answers differently here
    assert [m["done"]["completion_tokens"] for m in mixed] == [8, 8, 8, 3]
    assert [m["done"]["finish_reason"] for m in mixed] == ["length"] * 4
    assert all(m["done"]["timing_ms"]["batch_rows"] == 4 for m in mixed)
    # a stop string ends its row before the string, the others go on
    stop = mixed[0]["text"][2:4]
    cut = _run(Scheduler(engine), [({"a": 1.0}, Sampling(max_tokens=8, ignore_eos=True, stop=(stop,))),
                                   ({}, long)], prompt)  # fmt: skip
    assert cut[0]["text"] == mixed[0]["text"][: mixed[0]["text"].index(stop)]
    assert cut[0]["done"]["finish_reason"] == "stop" and cut[1]["text"] == mixed[1]["text"]
    # a stop string the answer starts with: nothing may leak before it matches (streamed or not)
    starts = Sampling(max_tokens=8, ignore_eos=True, stop=(mixed[0]["text"][:4],))
    for stream in (True, False):
        head = _run(Scheduler(engine), [({"a": 1.0}, starts)], prompt, stream)
        assert head[0]["text"] == "" and head[0]["done"]["finish_reason"] == "stop"
    # sampling is per row and seeded: the same seed gives the same text, in any batch
    hot = Sampling(max_tokens=6, temperature=1.0, seed=7, ignore_eos=True)
    first = _run(Scheduler(engine), [({"a": 1.0}, hot), ({}, long)], prompt)[0]["text"]
    again = _run(Scheduler(engine), [({"b": 1.0}, long), ({"a": 1.0}, hot)], prompt)[1]["text"]
    assert first == again


def test_a_row_that_ends_early_is_answered_before_its_batch_ends(tiny, tmp_path):
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    scheduler = Scheduler(TinyEngine(model, tokenizer, factors, {"a": a}))
    events: list[tuple[int, str]] = []
    jobs = [Job("", [1, 5, 6], Sampling(max_tokens=n, ignore_eos=True), Routing(strategy="base"),
                lambda event, payload, i=i: events.append((i, event)))
            for i, n in enumerate([1, 12])]  # fmt: skip
    scheduler._serve(jobs)
    assert events.count((0, "done")) == 1 and events.count((1, "done")) == 1
    # the short row's `done` comes while the long one is still generating, not after the batch
    assert events.index((0, "done")) < max(i for i, e in enumerate(events) if e == (1, "text"))
    assert jobs[0].answered and jobs[1].answered


def test_a_failing_batch_answers_its_requests_with_an_error_and_the_next_batch_runs(tiny, tmp_path):
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    engine = TinyEngine(model, tokenizer, factors, {"a": a})
    ids = torch.tensor([[1, 5, 6]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
    scheduler = Scheduler(engine, batching="regroup")
    broken = _run(scheduler, [({"a": 1.0}, Sampling(max_tokens=2))], [model.config.vocab_size + 5])  # no such token
    assert "IndexError" in broken[0]["error"] and "done" not in broken[0]
    assert scheduler.stats["errors"] == 1
    ok = _run(scheduler, [({}, Sampling(max_tokens=2, ignore_eos=True))], [1, 5, 6])
    assert ok[0]["done"]["completion_tokens"] == 2
    with torch.no_grad():  # the failed group's merged weights did not stay loaded
        assert torch.equal(model(input_ids=ids).logits, before)


def test_one_broken_row_fails_alone_and_the_rest_of_its_batch_answers(tiny, tmp_path):
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    scheduler = Scheduler(TinyEngine(model, tokenizer, factors, {"a": a}))
    out = [{} for _ in range(3)]
    jobs = [Job("", ids, Sampling(max_tokens=3, ignore_eos=True), Routing(strategy="base"),
                lambda event, payload, i=i: out[i].__setitem__(event, payload))
            for i, ids in enumerate([[1, 5, 6], [model.config.vocab_size + 5], [1, 7]])]  # fmt: skip
    scheduler._serve(jobs)
    assert "IndexError" in out[1]["error"] and "done" not in out[1]
    assert [out[i]["done"]["completion_tokens"] for i in (0, 2)] == [3, 3] and "error" not in out[0]
    assert scheduler.stats["errors"] == 1


def test_a_whole_answer_with_stop_strings_is_rerun_alone_when_its_batch_fails(tiny, tmp_path, monkeypatch):
    """A non-streamed row has sent nothing until it ends, stop strings or not, so a batch that fails
    mid-generation runs it again alone; a row whose client has left is not run again."""
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    scheduler = Scheduler(TinyEngine(model, tokenizer, factors, {"a": a}))
    sample = scheduling._Sampler.__call__
    steps = {"batched": 0}

    def fails_once(self, input_ids, scores):  # the third step of a batch of several rows (an out-of-memory, say)
        if len(self.rows) > 1:
            steps["batched"] += 1
            if steps["batched"] == 3:
                raise RuntimeError("out of memory")
        return sample(self, input_ids, scores)

    monkeypatch.setattr(scheduling._Sampler, "__call__", fails_once)
    events: list[list[str]] = [[] for _ in range(3)]
    texts = ["", "", ""]

    def emit(i):
        def record(event, payload):
            events[i].append(event)
            texts[i] += payload if event == "text" else ""
        return record

    jobs = [Job("", [1, 5, 6, 7], Sampling(max_tokens=6, ignore_eos=True, stop=stop), Routing(strategy="base"),
                emit(i), stream=False) for i, stop in enumerate([(), ("zzz",), ("zzz",)])]  # fmt: skip
    runs = []
    serve = scheduler._serve
    monkeypatch.setattr(scheduler, "_serve", lambda batch: runs.append(len(batch)) or serve(batch))

    def leave(event, payload):  # the third client goes away once its request is routed
        events[2].append(event)
        jobs[2].cancelled.set()

    jobs[2].emit = leave
    scheduler._serve(jobs)
    assert events[0] == events[1] == ["routed", "text", "done"], events
    assert texts[0] == texts[1] and texts[0]  # (no "zzz" in it: the same answer)
    assert "text" not in events[2] and "error" not in events[2] and runs == [3, 1, 1]


def test_seeds_past_32_bits_draw_their_own_samples():
    assert generator_seed(5) == 5 and generator_seed(2**32 - 1) == 2**32 - 1  # as before, where torch keeps them
    wide = [5 + 2**32, 7 + 2**40, -(2**63), -1, 2**63 - 1]
    seeds = [generator_seed(s) for s in wide]
    assert all(0 <= s < 2**32 for s in seeds) and len({*seeds, 5, 7, 0}) == len(wide) + 3


def test_a_prompt_in_the_answer_format_is_routed_on_its_question():
    server = SimpleNamespace(engine=SimpleNamespace(tokenizer=SimpleNamespace(bos_token="<bos>")))

    def route(prompt: str) -> str:
        return Server.route_text(server, prompt)

    for wrapped in ("Question: What is 7 + 5?\nAnswer:", "<bos>Question: What is 7 + 5?\r\nAnswer: ",
                    "Question:What is 7 + 5?\nAnswer:", " Question:\nWhat is 7 + 5?\n\nAnswer:"):  # fmt: skip
        assert route(wrapped) == "What is 7 + 5?", wrapped
    assert route("Question: Sort 3, 1.\nKeep duplicates.\nAnswer:") == "Sort 3, 1.\nKeep duplicates."
    # anything else goes as given: context before the question, few-shot examples, no question at all
    for prompt in ("What is 7 + 5?", "Question: \nAnswer:", "class Stack:\n    pass\nQuestion: Add pop.\nAnswer:",
                   "Question: 1 + 1?\nAnswer: 2\n\nQuestion: 2 + 2?\nAnswer:", "My Question: x\nAnswer:",
                   "Question: x Answer:", "Question:\n Question: 1 + 1?\nAnswer:"):  # fmt: skip
        assert route(prompt) == prompt, prompt
    # linear in the prompt: a regex took 9 s on 2,000 newlines, on the event loop
    started = time.perf_counter()
    for hostile in ("Question: a" + "\n" * 500_000 + "b", "Question: a" + "\n" * 500_000 + "Answer:"):
        route(hostile)
    assert time.perf_counter() - started < 5


# --- a real server on the smoke bundle -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(full_smoke_project: Path, tmp_path_factory):
    bundle = next((full_smoke_project / "bundles").iterdir())
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    with log.open("w") as out:
        process = subprocess.Popen(["bayes-llm", "serve", "--bundle", str(bundle), "--port", str(port),
                                    "--max-wait-ms", "50"], cwd=full_smoke_project, stdout=out,
                                   stderr=subprocess.STDOUT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield {"url": url, "model": bundle.name, "bundle": bundle, "process": process, "log": log}
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server['url']}/v1", api_key="unused", max_retries=0, timeout=120)


def _ext(message) -> dict:
    return message.model_extra["bayes_llm"]


def test_models_and_a_chat_answer_with_its_posterior_and_blend(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [server["model"]]
    experts = models[0].model_extra["bayes_llm"]["experts"]
    assert sorted(experts) == ["code", "math", "reasoning"]
    reply = client.chat.completions.create(model=server["model"], max_tokens=8,
                                           messages=[{"role": "user", "content": "What is 3 + 4?"}])  # fmt: skip
    choice = reply.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    ext = _ext(choice)
    assert set(ext["posterior"]) == {*experts, "other"} and abs(sum(ext["posterior"].values()) - 1) < 1e-3
    assert set(ext["blend"]) <= set(experts) and ext["strategy"] == "cls"
    assert ext["timing_ms"]["first_pass"] > 0 and reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_gives_the_same_answer_and_the_posterior_first(server, client):
    messages = [{"role": "user", "content": "Write a function that adds one."}]
    whole = client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12)
    chunks = list(client.chat.completions.create(model=server["model"], messages=messages, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "posterior" in chunks[0].choices[0].model_extra["bayes_llm"]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content  # greedy either way
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]


def test_overrides_pick_the_weights(server, client):
    def ext(**extension) -> dict:
        reply = client.completions.create(model=server["model"], prompt="Question: What is 2 + 2?\nAnswer:",
                                          max_tokens=4, extra_body={"bayes_llm": extension})  # fmt: skip
        return _ext(reply.choices[0])

    assert ext(expert="code")["blend"] == {"code": 1.0} and ext(expert="code")["posterior"] == {}
    # pass 1 classifies the question inside the answer format, as it does a chat message, wrapped or not
    posteriors = [_ext(client.chat.completions.create(model=server["model"], max_tokens=1, messages=[
        {"role": "user", "content": content}]).choices[0])["posterior"]
        for content in ("What is 2 + 2?", "Question: What is 2 + 2?\nAnswer:")]  # fmt: skip
    assert ext()["posterior"] == posteriors[0] == posteriors[1]
    assert ext(strategy="base")["blend"] == {}
    assert ext(blend={"math": 1, "reasoning": 3})["blend"] == {"math": 0.25, "reasoning": 0.75}
    top1 = ext(strategy="cls", blending_mode="top_k", top_k=1)
    assert len(top1["blend"]) <= 1 and top1["strategy"] == "cls" and top1["posterior"]


def test_concurrent_requests_with_different_blends_share_a_batch_and_match_running_alone(server, client):
    blends = [{"math": 1}, {"code": 1}, {"reasoning": 1}, {"math": 1, "code": 1}, {}, {"code": 2, "reasoning": 1}]

    def ask(blend: dict) -> tuple[str, dict]:
        extension = {"blend": blend, "ignore_eos": True} if blend else {"strategy": "base", "ignore_eos": True}
        reply = client.completions.create(model=server["model"], prompt="Question: What is 5 + 6?\nAnswer:",
                                          max_tokens=10, extra_body={"bayes_llm": extension})  # fmt: skip
        return reply.choices[0].text, _ext(reply.choices[0])

    alone = [ask(blend) for blend in blends]
    together: list = [None] * len(blends)
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(blends[i]))) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert max(ext["timing_ms"]["batch_rows"] for _, ext in together) > 1  # they did share a batch
    assert [ext["blend"] for _, ext in together] == [ext["blend"] for _, ext in alone]
    # (the smoke experts are two steps from the base: that blends change answers is shown on the tiny model above)


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        ({"messages": [{"role": "user", "content": "hi"}], "tools": []}, 400, "tools: unknown or unsupported"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 100000}, 400, "more than this server allows"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"expert": "poetry"}}, 400, "no expert"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"blend": {"math": 0}}}, 400, "all zero"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"strategy": "fewshot"}}, 400, "fewshot"),
        ({"messages": [{"role": "user", "content": "what is " * 400}]}, 400, "context"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "no user message"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4"}, 404, "not served here"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, 400, "seed"),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
         "only with stream"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"blend": {"math": 1e300}}}, 400, "blend"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"strategy": "base", "expert": "math"}},
         400, "give one of"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"blend": {"\ud800": 1}}}, 400, "no expert"),
        ({"messages": [{"role": "user", "content": "hi"}], "bayes_llm": {"strategy": "expert:"}}, 400, "no expert"),
        ({"messages": [{"role": "user", "content": "hi \ud800"}]}, 400, "not valid Unicode"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400, "not valid Unicode"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n: Input should be 1"),  # more than it does
        ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs: Input should be False"),
        ({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, 400,
         "presence_penalty: Input should be less than or equal to 0"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": None}, 400, "model"),  # no default to fall to
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, 400, "stop: up to 4 non-empty strings"),
    ],
)
def test_bad_requests_get_a_4xx_that_names_the_problem(server, body, status, says):
    content = json.dumps({"model": server["model"], **body})  # ASCII: a lone surrogate travels as \ud800
    response = httpx.post(f"{server['url']}/v1/chat/completions", content=content, timeout=60,
                          headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert says in error["message"] and error["type"] == "invalid_request_error"
    assert "Value error, " not in error["message"]  # pydantic's prefix to a validator's own message
    assert "stop: stop" not in error["message"]


def test_null_is_the_default_and_defaults_of_what_it_does_not_do_are_accepted(server, client):
    """As in OpenAI's API: clients that send every field (null, n 1, no penalty) get the plain answer."""
    messages = [{"role": "user", "content": "What is 3 + 4?"}]
    plain = client.chat.completions.create(model=server["model"], max_tokens=6, messages=messages)
    spelled = client.chat.completions.create(model=server["model"], max_tokens=6, messages=messages, n=1,
                                             temperature=None, top_p=None, stream=None, logprobs=False,
                                             presence_penalty=0, frequency_penalty=0.0)  # fmt: skip
    assert spelled.choices[0].message.content == plain.choices[0].message.content
    assert _ext(spelled.choices[0])["blend"] == _ext(plain.choices[0])["blend"]
    nulls = {"top_p": None, "stream_options": None, "bayes_llm": {"ignore_eos": None, "strategy": None}}
    raw = httpx.post(f"{server['url']}/v1/chat/completions", timeout=60,
                     json={"model": server["model"], "messages": messages, "max_tokens": 4, **nulls}).json()
    assert "logprobs" in raw["choices"][0] and raw["choices"][0]["logprobs"] is None  # as OpenAI's choices have it


def test_malformed_and_oversize_bodies_and_unknown_routes(server, client):
    url = server["url"]
    broken = httpx.post(f"{url}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]["message"]
    form = httpx.post(f"{url}/v1/completions", data={"model": server["model"], "prompt": "hi"})  # curl -d's kind
    assert form.status_code == 400 and "Content-Type: application/json" in form.json()["error"]["message"]
    huge = httpx.post(f"{url}/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    chunked = httpx.post(f"{url}/v1/completions", content=iter([b" " * (1 << 16)] * 32),  # no content-length
                         headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413 and "larger than" in chunked.json()["error"]["message"]
    assert chunked.json()["error"]["code"] == "request_too_large"  # the same error either way
    infinite = httpx.post(f"{url}/v1/completions", headers={"content-type": "application/json"},
                          content=b'{"model": "%s", "prompt": "hi", "bayes_llm": {"blend": {"math": Infinity}}}'
                          % server["model"].encode())  # fmt: skip
    assert infinite.status_code == 400 and infinite.json()["error"]["param"] == "bayes_llm.blend.math"
    # a temperature too small to divide by is greedy, not a crash
    tiny_t = client.completions.create(model=server["model"], prompt="Question: What is 1 + 1?\nAnswer:",
                                       max_tokens=4, temperature=1e-300)  # fmt: skip
    greedy = client.completions.create(model=server["model"], prompt="Question: What is 1 + 1?\nAnswer:",
                                       max_tokens=4)  # fmt: skip
    assert tiny_t.choices[0].text == greedy.choices[0].text
    top_only = client.completions.create(model=server["model"], prompt="Question: What is 1 + 1?\nAnswer:",
                                         max_tokens=4, temperature=1.0, top_p=0)  # fmt: skip
    assert top_only.choices[0].text == greedy.choices[0].text  # top_p 0: the top token only, as OpenAI's
    # a long prompt is tokenized off the event loop, then refused
    long = httpx.post(f"{url}/v1/completions", json={"model": server["model"], "prompt": "x" * 900_000}, timeout=60)
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded"
    assert client.models.retrieve(server["model"]).id == server["model"]
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert httpx.get(f"{url}/v1/nothing").status_code == 404
    assert httpx.get(f"{url}/v1/completions").status_code == 405
    with pytest.raises(openai.BadRequestError, match="no expert"):
        client.chat.completions.create(model=server["model"], messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"bayes_llm": {"expert": "poetry"}})  # fmt: skip
    # and it still serves
    reply = client.completions.create(model=server["model"], prompt="Question: What is 1 + 1?\nAnswer:", max_tokens=3)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_client_that_leaves_mid_stream_stops_its_row_and_the_server_goes_on(server, client):
    before = httpx.get(f"{server['url']}/health").json()
    body = {"model": server["model"], "prompt": "Question: What is 9 + 9?\nAnswer:", "max_tokens": 200, "stream": True,
            "bayes_llm": {"ignore_eos": True}}  # fmt: skip
    with httpx.stream("POST", f"{server['url']}/v1/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # routed: generation has started
        next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 120
    while (health := httpx.get(f"{server['url']}/health").json())["rows"] == before["rows"]:
        assert time.monotonic() < deadline, "the batch of the abandoned stream never ended"
        time.sleep(0.1)
    assert health["cancelled"] == before["cancelled"] + 1 and health["errors"] == before["errors"]
    # a client that stops waiting for a whole (non-streamed) answer cancels it too
    whole = {**body, "stream": False, "max_tokens": 230, "prompt": [body["prompt"]] * 8}  # about 0.5 s of work
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server['url']}/v1/completions", json=whole, timeout=0.15)
    deadline = time.monotonic() + 120
    while httpx.get(f"{server['url']}/health").json()["cancelled"] == health["cancelled"]:
        assert time.monotonic() < deadline, "the abandoned request was never cancelled"
        time.sleep(0.1)
    reply = client.completions.create(model=server["model"], prompt="Question: What is 1 + 2?\nAnswer:", max_tokens=3)
    assert reply.choices[0].text is not None


def test_a_bundle_for_another_base_is_refused_before_serving(server, tmp_path):
    other = save_tiny_checkpoint("bamba", tmp_path / "other")
    with pytest.raises(BundleError, match="refused: made for base"):
        verify(server["bundle"], other)
    done = subprocess.run([str(BIN / "bayes-llm"), "serve", "--bundle", str(server["bundle"]), "--base", str(other),
                           "--svd", str(tmp_path), "--port", str(free_port())], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode != 0 and "refused" in done.stderr


@pytest.mark.skipif(BROWSER is None, reason="no Chromium (Debian: apt install chromium; CI installs it)")
def test_demo_page_streams_the_answer_and_draws_the_posterior(server, tmp_path):
    page = Page(server["url"] + "/", tmp_path / "profile")
    try:
        assert page.evaluate("document.getElementById('model').textContent") == server["model"]
        page.type("#prompt", "What is 4 + 3?")
        page.press_enter()
        state = page.wait_for("['done', 'error'].includes(document.body.dataset.state) && document.body.dataset.state")
        assert state == "done", page.evaluate("document.getElementById('status').textContent")
        time.sleep(0.6)  # the bars' width transition
        bars = page.evaluate("[...document.querySelectorAll('.bar-row')].map(r => [r.dataset.label, "
                             "r.querySelector('.bar').getBoundingClientRect().width])")  # fmt: skip
        assert sorted(label for label, _ in bars) == ["code", "math", "other", "reasoning"]
        assert max(width for _, width in bars) > 20  # the winning expert's bar is drawn
        assert page.evaluate("document.getElementById('answer').textContent.length") > 0
        assert page.evaluate("document.getElementById('status').textContent").startswith("done")
        shot = page.screenshot(tmp_path / "demo.png")
    finally:
        page.close()
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert (pixels < 250).mean() > 0.01 and len(np.unique(pixels)) > 20  # not a blank page
    artifacts = os.environ.get("BAYES_LLM_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / "serve-demo.png").write_bytes(shot.read_bytes())


def test_serve_help_explains_itself():
    done = subprocess.run([sys.executable, "-m", "bayes_llm", "serve", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "OpenAI" in done.stdout and "--batching" in done.stdout


def test_serve_refuses_a_wait_its_worker_cannot_take(tiny, tmp_path):
    done = subprocess.run([sys.executable, "-m", "bayes_llm", "serve", "--bundle", str(tmp_path), "--max-wait-ms",
                           "inf"], capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2 and "give milliseconds from 0 to 60000" in done.stderr
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    with pytest.raises(ValueError, match="max_wait"):
        Scheduler(TinyEngine(model, tokenizer, factors, {"a": a}), max_wait=float("nan"))


def test_the_demo_page_keeps_a_bundle_name_out_of_its_script():
    name = 'x</script><script>alert(1)</script>'
    assert "<" not in _script_json(name) and json.loads(_script_json([name])) == [name]


def test_health_says_503_once_the_worker_thread_is_gone(tiny, tmp_path):
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    engine = TinyEngine(model, tokenizer, factors, {"a": a})
    scheduler = Scheduler(engine)
    with TestClient(create_app(Server(engine, scheduler, "tiny", Extension()))) as client:  # starts the worker
        assert client.get("/health").status_code == 200
        scheduler.stop()
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "the scheduler thread has stopped"
        refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_unavailable"
    # a job that reaches the queue as the worker ends is told so, not left waiting
    told = []
    scheduler.submit(Job("", [1, 5], Sampling(max_tokens=1), Routing(strategy="base"),
                         lambda event, payload: told.append((event, payload))))  # fmt: skip
    assert told == [("unavailable", scheduling.STOPPED)]


def test_the_batch_a_dying_worker_was_running_is_told_before_it_goes(tiny, tmp_path, monkeypatch):
    model, factors, (a, _) = tiny
    _, tokenizer = load_checkpoint(str(save_tiny_checkpoint("bamba", tmp_path / "tok")))
    scheduler = Scheduler(TinyEngine(model, tokenizer, factors, {"a": a}))

    class WorkerExit(BaseException):  # what no `except Exception` stops (SystemExit, KeyboardInterrupt)
        pass

    def dies(self, input_ids, scores):
        raise WorkerExit

    monkeypatch.setattr(scheduling._Sampler, "__call__", dies)
    told = [[], []]
    jobs = [Job("", [1, 5, 6], Sampling(max_tokens=3), Routing(strategy="base"),
                lambda event, payload, i=i: told[i].append(event)) for i in range(2)]  # fmt: skip
    jobs[1].cancelled.set()
    with pytest.raises(WorkerExit):
        scheduler._run(jobs)
    assert told == [["routed", "unavailable"], ["routed"]]  # (a client that has gone is not told)

    # a batch that fails, then a rerun during which the worker ends: the reruns not yet run are told too
    def fails_then_dies(self, input_ids, scores):
        raise RuntimeError("batch failed") if len(self.rows) > 1 else WorkerExit

    monkeypatch.setattr(scheduling._Sampler, "__call__", fails_then_dies)
    told = [[] for _ in range(3)]
    jobs = [Job("", [1, 5, 6], Sampling(max_tokens=3), Routing(strategy="base"),
                lambda event, payload, i=i: told[i].append(event)) for i in range(3)]  # fmt: skip
    with pytest.raises(WorkerExit):
        scheduler._run(jobs)
    assert told == [["routed", "unavailable"]] * 3
