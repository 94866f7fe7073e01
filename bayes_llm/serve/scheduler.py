"""The serving loop: concurrent requests are collected into batches; each batch runs pass 1 batched,
then pass 2 for every row at once with that row's own blend (`serve.rowwise`).

One worker thread owns the model. A batch is formed from whatever is waiting when the worker is free
(up to `max_batch`, waiting at most `max_wait` for more after the first request) and runs to its end:
rows that finish early (EOS, their own `max_tokens`, a stop string, a client that went away) stop
being streamed and are answered at once (their `done` does not wait for the batch), then padded
until the batch ends. New requests wait for the next batch rather than
join a running one: a row's Mamba state and attention KV cache are rows of the batch's cache tensors,
built by one prefill over the left-padded prompts, and a late row would need its own prefill spliced
into those tensors (continuous batching is future work).

`batching="regroup"` is the path without per-row blends: the batch is split by blend, each group's
weights are merged into the model (`Engine.use_blend`) and the groups generate one after another.
It is kept to measure the mixed path against (benchmarks/serve_benchmark.py).
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from bayes_llm.dispatch.likelihood import label_logprobs
from bayes_llm.inference.engine import Engine, blend_key
from bayes_llm.serve.rowwise import RowwiseSVF
from bayes_llm.svf.blend import BlendMode, blend_scales, blend_weights

Batching = Literal["mixed", "regroup"]
# Pass 1 runs over the prompts sorted by length in forwards of this many: less padding. On 16 test
# prompts of the default run (16-90 tokens) 78 ms against 115 ms in one forward, and 87 ms by 4.
FIRST_PASS_CHUNK = 8
DEFAULT_MAX_TOKENS = 64  # a request that does not say (and the context leaves room for)
STOPPED = "the server's generation worker has stopped: restart the server"
# Below this a temperature is greedy: logits / 1e-300 overflow to inf, and the draw is the argmax anyway.
MIN_TEMPERATURE = 1e-4


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Routing:
    """How pass 1 picks the weights: `strategy` prompt | cls | base | expert:<domain>, or a fixed blend."""

    strategy: str = "prompt"
    mode: BlendMode = "weighted_average"
    top_k: int = 2
    blend: tuple[tuple[str, float], ...] | None = None


@dataclass
class Job:
    """One prompt: `route_text` is what pass 1 classifies, `model_ids` what pass 2 continues."""

    route_text: str
    model_ids: list[int]
    sampling: Sampling
    routing: Routing
    # (event, payload): routed, text, done, error, unavailable (the worker has stopped); called from the worker
    emit: Callable[[str, Any], None]
    stream: bool = True  # False: the text comes in one piece when the row ends
    routed: bool = False  # its pass-1 result was emitted
    answered: bool = False  # its `done` (or error) was emitted: nothing more is sent for it
    started_output: bool = False  # some of its answer was emitted (a failed batch cannot rerun it then)
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)


class _Row:
    """Pass-2 state of one job: its tokens so far, what was streamed, and why it stopped."""

    def __init__(self, job: Job, tokenizer, on_end: Callable[[_Row], None]) -> None:
        self.job, self.tokenizer, self.on_end = job, tokenizer, on_end
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already emitted
        self.finish: str | None = None
        self.finished_at: float | None = None
        self.generator = None
        if job.sampling.temperature >= MIN_TEMPERATURE:
            seed = job.sampling.seed if job.sampling.seed is not None else int.from_bytes(os.urandom(4), "little")
            self.generator = torch.Generator().manual_seed(generator_seed(seed))

    def add(self, token: int, eos: set[int]) -> None:
        if self.finish is not None:
            return
        if self.job.cancelled.is_set():
            return self._end("cancelled")
        if token in eos and not self.job.sampling.ignore_eos:
            return self._end("stop", flush=True)
        self.ids.append(token)
        stops = self.job.sampling.stop
        if not self.job.stream and not stops:  # nothing to look at before the end: decode once, then
            if len(self.ids) >= self.job.sampling.max_tokens:
                self._end("length", flush=True)
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        found = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in stops) if i >= 0]
        if found:
            return self._end("stop", text=text[: min(found)])
        if len(self.ids) >= self.job.sampling.max_tokens:
            return self._end("length", text=text)
        if not self.job.stream:  # a whole answer is sent once, as the row ends: until then it has sent
            return  # nothing, and a failed batch can run it again
        # Hold back what may be the start of a stop string or half of a multi-byte character.
        hold = max((len(s) - 1 for s in stops), default=0)
        safe = max(self.sent, len(text) - hold)  # (a text shorter than the hold-back sends nothing yet)
        while safe > self.sent and text[safe - 1] == "\ufffd":
            safe -= 1
        self._send(text[:safe])

    def _send(self, text: str) -> None:
        if len(text) > self.sent:
            self.job.started_output = True
            self.job.emit("text", text[self.sent :])
            self.sent = len(text)

    def _end(self, reason: str, text: str | None = None, flush: bool = False) -> None:
        if flush:
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text is not None and reason != "cancelled":
            self._send(text)
        self.finish, self.finished_at = reason, time.perf_counter()
        self.on_end(self)


class _Streamer(BaseStreamer):
    """transformers calls `put` with the prompt once, then with each step's token of every row."""

    def __init__(self, rows: Sequence[_Row], eos: set[int], decode_threads: int | None = None) -> None:
        self.rows, self.eos, self.prompt_seen, self.decode_threads = rows, eos, False, decode_threads
        self.first_token = True

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first_token and self.decode_threads:  # the prefill is done: one-token steps from here
            torch.set_num_threads(self.decode_threads)
        self.first_token = False
        for row, token in zip(self.rows, value.view(-1).tolist(), strict=True):
            row.add(token, self.eos)

    def end(self) -> None:
        for row in self.rows:
            if row.finish is None:  # the batch's longest max_tokens ran out first
                row._end("length", flush=True)


class _RowsDone(StoppingCriteria):
    def __init__(self, rows: Sequence[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for row in self.rows:  # a client gone between two steps stops its row now
            if row.finish is None and row.job.cancelled.is_set():
                row._end("cancelled")
        return torch.tensor([row.finish is not None for row in self.rows], device=input_ids.device)


class _Sampler(LogitsProcessor):
    """Per-row sampling inside greedy `generate`: a sampled row's scores become one-hot on its draw,
    so each request keeps its own temperature, top_p and seed in a shared batch."""

    def __init__(self, rows: Sequence[_Row], eos: set[int]) -> None:
        self.rows, self.eos = rows, sorted(eos)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for r, row in enumerate(self.rows):
            sampling = row.job.sampling
            if sampling.ignore_eos:
                scores[r, self.eos] = -float("inf")
            if row.generator is None or row.finish is not None:
                continue
            probs = torch.softmax(scores[r].float() / sampling.temperature, dim=-1)
            if sampling.top_p < 1.0:
                sorted_probs, order = probs.sort(descending=True)
                outside = sorted_probs.cumsum(0) - sorted_probs > sampling.top_p  # keeps at least the top token
                probs[order[outside]] = 0
            token = int(torch.multinomial(probs, 1, generator=row.generator))
            scores[r] = -float("inf")
            scores[r, token] = 0.0
        return scores


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 16, max_wait: float = 0.01,
                 batching: Batching = "mixed", decode_threads: int | None = None) -> None:  # fmt: skip
        if not 0 <= max_wait <= 60:  # (the worker's queue wait cannot take inf or nan)
            raise ValueError(f"max_wait: {max_wait} s: give 0 to 60 seconds")
        self.engine, self.max_batch, self.max_wait, self.batching = engine, max_batch, max_wait, batching
        self.decode_threads = decode_threads
        self.rowwise = RowwiseSVF(engine.model, engine.factors)
        tokenizer = engine.tokenizer
        self.eos = {tokenizer.eos_token_id} | set(_as_list(engine.model.generation_config.eos_token_id))
        self.eos.discard(None)
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._closing, self._closed = threading.Lock(), False
        self._thread = threading.Thread(target=self._loop, name="bayes-llm-scheduler", daemon=True)
        self.stats = {"batches": 0, "rows": 0, "cancelled": 0, "errors": 0, "first_pass_seconds": 0.0,
                      "generate_seconds": 0.0}

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        with self._closing:
            if not self._closed:
                self._queue.put(job)
                return
        job.emit("unavailable", STOPPED)

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # --- the worker ----------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            self._batches()
        finally:  # however the worker ends, no request is left waiting for it: none is queued from now on,
            with self._closing:  # and those queued already are told
                self._closed = True
            while not self._queue.empty():
                if (job := self._queue.get()) is not None:
                    job.emit("unavailable", STOPPED)

    def _batches(self) -> None:
        while (job := self._queue.get()) is not None:
            batch, deadline = [job], time.perf_counter() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            live = [j for j in batch if not j.cancelled.is_set()]
            self.stats["cancelled"] += len(batch) - len(live)  # their clients left while they waited
            if live:
                self._run(live)

    def _run(self, batch: list[Job]) -> None:
        try:
            self._serve(batch)
        except BaseException:  # the worker itself is ending: its batch (reruns included) is told before it goes
            for job in batch:
                if not job.answered and not job.cancelled.is_set():
                    job.emit("unavailable", STOPPED)
            raise

    def _serve(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        try:
            # The model holds the exact base weights (blends live in the hooks, or are merged per group
            # by regroup): pass 1 scores with them, after a failed regroup batch too.
            self.engine.use_blend({})
            routes = self.first_pass(batch)
            routed = time.perf_counter()
            for job, (blend, posterior) in zip(batch, routes, strict=True):
                shown = {name: round(w, 4) for name, w in blend.items() if round(w, 4) > 0}  # 1e-30 is noise
                if not job.routed:  # (a job rerun alone after a failed batch was routed already)
                    job.emit("routed", {"blend": shown, "posterior": posterior, "strategy": job.routing.strategy})
                    job.routed = True

            def answer(row: _Row) -> None:  # as a row ends: a short answer does not wait for the batch
                if row.finish != "cancelled":
                    self._answer(row, started, routed, len(batch))

            rows = [_Row(job, self.engine.tokenizer, answer) for job in batch]
            if self.batching == "mixed":
                scales = [self._scales(blend) for blend, _ in routes]
                with self.rowwise.rows(scales):
                    self._generate(rows)
            else:
                groups: dict[tuple, list[int]] = {}
                for i, (blend, _) in enumerate(routes):
                    groups.setdefault(blend_key(blend), []).append(i)
                for key, index in groups.items():
                    self.engine.use_blend(dict(key))
                    self._generate([rows[i] for i in index])
        except Exception as error:  # one bad batch must not stop the server, nor one bad row the batch
            # Rows that have sent nothing yet run again alone, so only the request that breaks fails.
            open_jobs = [job for job in batch if not job.answered and not job.cancelled.is_set()]
            retry = [job for job in open_jobs if not job.started_output] if len(batch) > 1 else []
            failed = [job for job in open_jobs if all(job is not other for other in retry)]
            self.stats["errors"] += bool(failed)
            for job in failed:
                job.answered = True
                job.emit("error", f"{type(error).__name__}: {error}")
            for job in retry:
                if not job.cancelled.is_set():  # (a failed sibling's request has gone, say)
                    self._serve([job])
            return
        done = time.perf_counter()
        self.stats["batches"] += 1
        self.stats["rows"] += len(batch)
        self.stats["cancelled"] += sum(row.finish == "cancelled" for row in rows)
        self.stats["first_pass_seconds"] += routed - started
        self.stats["generate_seconds"] += done - routed
        for row in rows:  # the cancelled ones (their clients left: nobody reads this)
            if not row.job.answered:
                self._answer(row, started, routed, len(batch))

    def _answer(self, row: _Row, started: float, routed: float, batch_rows: int) -> None:
        row.job.answered = True
        end = row.finished_at or time.perf_counter()
        row.job.emit("done", {
            "finish_reason": row.finish or "length",
            "prompt_tokens": len(row.job.model_ids),
            "completion_tokens": len(row.ids),
            "timing_ms": {"queue": _ms(started - row.job.submitted), "first_pass": _ms(routed - started),
                          "generate": _ms(end - routed), "batch_rows": batch_rows},
        })  # fmt: skip

    def _scales(self, blend: dict[str, float]):
        return blend_scales(self.engine.expert_scales, blend) if blend else None

    def first_pass(self, batch: Sequence[Job]) -> list[tuple[dict[str, float], dict[str, float]]]:
        """(blend, posterior) per job; prompts that need the dispatcher are scored together per strategy."""
        routes: list[tuple[dict[str, float], dict[str, float]] | None] = [None] * len(batch)
        by_strategy: dict[str, list[int]] = {}
        for i, job in enumerate(batch):
            r = job.routing
            if r.blend is not None:
                routes[i] = (blend_weights(dict(r.blend)), {})
            elif r.strategy == "base":
                routes[i] = ({}, {})
            elif r.strategy.startswith("expert:"):
                routes[i] = ({r.strategy.split(":", 1)[1]: 1.0}, {})
            else:
                by_strategy.setdefault(r.strategy, []).append(i)
        engine = self.engine
        for strategy, index in by_strategy.items():
            controller = engine.controller(strategy)
            index = sorted(index, key=lambda i: len(batch[i].route_text))  # similar lengths share a forward
            prompts = [batch[i].route_text for i in index]
            # pass 1 may score prompt × label rows: the classification expert applies to whatever batch it is
            first = self.rowwise.same(engine.classifier_scales) if strategy == "cls" else nullcontext()
            with first:
                logliks = label_logprobs(engine.model, engine.tokenizer, prompts, controller.labels, FIRST_PASS_CHUNK)
            for i, row in zip(index, controller.posterior(logliks), strict=True):
                r = batch[i].routing
                posterior = {k: round(float(p), 4) for k, p in zip(controller.labels, row, strict=True)}
                routes[i] = (controller.blend(row, r.mode, r.top_k), posterior)
        return [route for route in routes if route is not None]

    def _generate(self, rows: Sequence[_Row]) -> None:
        tokenizer, model = self.engine.tokenizer, self.engine.model
        width = max(len(row.job.model_ids) for row in rows)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r.job.model_ids)) + r.job.model_ids for r in rows])
        attention_mask = torch.tensor([[0] * (width - len(r.job.model_ids)) + [1] * len(r.job.model_ids)
                                       for r in rows])  # fmt: skip
        threads = torch.get_num_threads()
        try:
            with torch.no_grad():
                model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max(row.job.sampling.max_tokens for row in rows),
                    do_sample=False,
                    logits_processor=LogitsProcessorList([_Sampler(rows, self.eos)]),
                    stopping_criteria=StoppingCriteriaList([_RowsDone(rows)]),
                    streamer=_Streamer(rows, self.eos, self.decode_threads),
                    pad_token_id=pad,
                    eos_token_id=sorted(self.eos),
                )
        finally:
            torch.set_num_threads(threads)  # pass 1 and the next prefill get every thread again


def generator_seed(seed: int) -> int:
    """A request's seed (any 64-bit integer, as OpenAI's API takes) as the 32 bits torch's CPU generator
    keeps: seeds below 2**32 as they are, others hashed, so 5 and 5 + 2**32 do not draw the same."""
    if 0 <= seed < 2**32:
        return seed
    digest = hashlib.blake2b(seed.to_bytes(16, "little", signed=True), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)
