"""The ASGI app: OpenAI-compatible `/v1/completions`, `/v1/chat/completions` (streaming too),
`/v1/models`, `/health`, and the demo page at `/`.

FastAPI on uvicorn: both are already in the stack (Prefect's server runs on them), pydantic gives the
request schema and its errors for free, and streaming is Server-Sent Events through a plain
`StreamingResponse`, the wire format OpenAI's clients read. Every error is OpenAI's error object with
a 4xx status naming the field to fix; the model runs in the scheduler's thread, so a slow or broken
request never blocks the event loop or the other requests.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi import HTTPException as FastAPIHTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from bayes_llm.bundle.manifest import models_layout, verify
from bayes_llm.inference.engine import Engine
from bayes_llm.prompts import answer_prompt, is_chat
from bayes_llm.serve.protocol import ChatRequest, CompletionRequest, Extension, Sampled
from bayes_llm.serve.scheduler import DEFAULT_MAX_TOKENS, STOPPED, Batching, Job, Routing, Sampling, Scheduler
from bayes_llm.svf.blend import blend_weights

# The markers of the base's answer format, `Question: … / Answer:`
QUESTION_MARK, ANSWER_MARK = (part.strip() for part in answer_prompt("\0").split("\0"))


class RequestError(Exception):
    """A request this server will not run: the client's to fix (4xx)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def _unavailable() -> RequestError:
    return RequestError(STOPPED, status=503, code="server_unavailable")


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")  # a lone surrogate from a request
    # A stopped worker does not come back: OpenAI's clients would retry a 503 twice
    headers = {"x-should-retry": "false"} if code == "server_unavailable" else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param or None, "code": code}}, status,
                        headers=headers)  # fmt: skip


def _validation_message(error: dict) -> tuple[str, str]:
    where = ".".join(str(part) for part in error["loc"] if part != "body")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown or unsupported field", where
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})", "body"
    if not where and error["type"] in ("model_attributes_type", "dict_type"):  # form data, text/plain, ...
        return "the body must be a JSON object, sent with Content-Type: application/json", "body"
    # (a validator's own ValueError comes as "Value error, <its message>")
    return f"{where or 'body'}: {error['msg'].removeprefix('Value error, ')}", where


class BodyLimit:
    """Refuses a request body over `limit` bytes with 413, whether or not it says its length up front
    (a chunked upload is counted as it arrives, and stopped there)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _error(413, f"the body is larger than {self.limit} bytes", code="request_too_large")(
                scope, receive, send)  # fmt: skip
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise FastAPIHTTPException(413, f"the body is larger than {self.limit} bytes")
            return message

        await self.app(scope, counted, send)


class Server:
    """What a request needs besides its body: the engine's tokenizer and experts, and the scheduler."""

    def __init__(self, engine: Engine, scheduler: Scheduler, model_id: str, defaults: Extension,
                 max_tokens_limit: int = 512, max_prompt_tokens: int | None = None) -> None:  # fmt: skip
        self.engine, self.scheduler, self.model_id, self.defaults = engine, scheduler, model_id, defaults
        self.context = engine.context
        self.max_tokens_limit = min(max_tokens_limit, self.context - 1)
        self.max_prompt_tokens = max_prompt_tokens or self.context - 1

    # --- a request → jobs ----------------------------------------------------------------------

    def routing(self, ext: Extension) -> Routing:
        domains = self.engine.domains
        if ext.expert is not None:
            if ext.expert not in domains:
                raise RequestError(f"bayes_llm.expert: no expert {ext.expert!r} (experts: {', '.join(domains)})",
                                   "bayes_llm.expert", code="unknown_expert")  # fmt: skip
            return Routing(strategy=f"expert:{ext.expert}")
        if ext.blend is not None:
            unknown = sorted(set(ext.blend) - set(domains))
            if unknown:
                raise RequestError(f"bayes_llm.blend: no expert {', '.join(map(repr, unknown))} (experts: "
                                   f"{', '.join(domains)})", "bayes_llm.blend", code="unknown_expert")  # fmt: skip
            try:
                weights = blend_weights(ext.blend)
            except ValueError as error:
                raise RequestError(f"bayes_llm.blend: {error}", "bayes_llm.blend") from None
            return Routing(strategy="blend", blend=tuple(sorted(weights.items())))
        strategy = ext.strategy or self.defaults.strategy or "prompt"
        if strategy.startswith("expert:"):
            expert = strategy.split(":", 1)[1]
            if expert not in domains:
                raise RequestError(f"bayes_llm.strategy: no expert {expert!r} (experts: {', '.join(domains)})",
                                   "bayes_llm.strategy", code="unknown_expert")  # fmt: skip
            return Routing(strategy=strategy)
        if strategy not in ("prompt", "cls", "base"):
            raise RequestError(f"bayes_llm.strategy: {strategy!r}: use prompt | cls | base | expert:<domain> "
                               "(fewshot needs examples: `bayes-llm generate --strategy fewshot`)",
                               "bayes_llm.strategy")  # fmt: skip
        if strategy != "base" and strategy not in self.engine.controllers:
            raise RequestError(f"bayes_llm.strategy: {strategy!r}: the bundle has no calibrated dispatcher for it",
                               "bayes_llm.strategy")  # fmt: skip
        return Routing(strategy=strategy, mode=ext.blending_mode or self.defaults.blending_mode or "weighted_average",
                       top_k=ext.top_k or self.defaults.top_k or 2)  # fmt: skip

    def sampling(self, body: Sampled, max_tokens: int) -> Sampling:
        return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        stop=tuple(body.stop or ()), seed=body.seed, ignore_eos=body.bayes_llm.ignore_eos)  # fmt: skip

    def encode(self, text: str, max_tokens: int | None, param: str) -> list[int]:
        """The prompt's token ids; refused when it leaves no room for `max_tokens` (or, unset, for one token)."""
        tokenizer = self.engine.tokenizer
        bos = tokenizer.bos_token
        # A chat model's text is sent as given (its template's turns carry their own start); a plain base
        # was trained with a BOS before every document.
        if bos and not is_chat(tokenizer) and not text.startswith(bos):
            text = bos + text
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.max_prompt_tokens or len(ids) + (max_tokens or 1) > self.context:
            asked = f" and max_tokens {max_tokens}" if max_tokens else ""
            raise RequestError(f"{param}: the prompt is {len(ids)} tokens{asked}: more than the model's context of "
                               f"{self.context} tokens allows (prompts: at most {self.max_prompt_tokens})",
                               param, code="context_length_exceeded")  # fmt: skip
        return ids

    def chat_text(self, body: ChatRequest) -> tuple[str, str]:
        """(what pass 1 classifies: the last user message, what pass 2 continues)."""
        users = [m for m in body.messages if m.role == "user"]
        if not users:
            raise RequestError("messages: no user message to answer", "messages")
        question = self.route_text(users[-1].text())
        tokenizer = self.engine.tokenizer
        if is_chat(tokenizer):
            messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                        for m in body.messages]  # fmt: skip
            return question, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # A base without a chat template was trained on one question at a time, in this format.
        return question, answer_prompt(question)

    def route_text(self, prompt: str) -> str:
        """What pass 1 classifies: the question of a prompt that is one question in the base's answer
        format (`Question: … / Answer:`, a BOS before it or not), else the prompt as given (context,
        few-shot examples and all). The dispatcher was calibrated on bare questions; wrapped, most of
        them were routed to another domain (9 of 32 right, 26 bare)."""
        bos = self.engine.tokenizer.bos_token
        body = (prompt.removeprefix(bos) if bos else prompt).strip()
        if not (body.startswith(QUESTION_MARK) and body.endswith(ANSWER_MARK)):
            return prompt
        middle = body[len(QUESTION_MARK) : -len(ANSWER_MARK)]
        question = middle.rstrip()
        if "\n" not in middle[len(question) :]:  # `Answer:` opens a line of its own
            return prompt
        # (string methods, not a regex: a backtracking pattern took seconds on a run of newlines)
        if any(line.lstrip().startswith((QUESTION_MARK, ANSWER_MARK)) for line in question.split("\n")):
            return prompt  # a second question or an answer inside: few-shot examples, not one question
        return question.strip() or prompt

    def check_model(self, model: str) -> None:
        if model != self.model_id:
            raise RequestError(f"model: {model!r} is not served here; this server serves {self.model_id!r}",
                               "model", 404, "model_not_found")  # fmt: skip


async def _submit(server: Server, texts: list[tuple[str, str]], body: Sampled, max_tokens: int | None, param: str):
    """Jobs for (route text, model text) pairs, validated before any is queued; events → one queue.
    Unset `max_tokens` is 64, or what the context leaves after the longest prompt."""
    if not server.scheduler.alive:
        raise _unavailable()
    routing = server.routing(body.bayes_llm)
    if max_tokens is not None and max_tokens > server.max_tokens_limit:
        raise RequestError(f"max_tokens: {max_tokens} is more than this server allows ({server.max_tokens_limit})",
                           "max_tokens")  # fmt: skip
    params = [param] if len(texts) == 1 else [f"{param}.{i}" for i in range(len(texts))]
    # Tokenized off the event loop: a long prompt must not stall the other requests' streams.
    ids = await asyncio.to_thread(lambda: [server.encode(model_text, max_tokens, where)
                                           for (_, model_text), where in zip(texts, params, strict=True)])  # fmt: skip
    sampling = server.sampling(body, max_tokens or min(DEFAULT_MAX_TOKENS, server.context - max(map(len, ids))))
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emitter(index: int):
        return lambda event, payload: loop.call_soon_threadsafe(events.put_nowait, (index, event, payload))

    jobs = [Job(route, model_ids, sampling, routing, emitter(i), stream=body.stream)
            for i, ((route, _), model_ids) in enumerate(zip(texts, ids, strict=True))]  # fmt: skip
    for job in jobs:
        server.scheduler.submit(job)
    return jobs, events


async def _collect(jobs: list[Job], events: asyncio.Queue) -> list[dict[str, Any]]:
    results = [{"text": "", "bayes_llm": {}} for _ in jobs]
    open_jobs = len(jobs)
    while open_jobs:
        index, event, payload = await events.get()
        result = results[index]
        if event == "routed":
            result["bayes_llm"].update(payload)
        elif event == "text":
            result["text"] += payload
        elif event == "done":
            result.update(payload)
            result["bayes_llm"]["timing_ms"] = result.pop("timing_ms")
            open_jobs -= 1
        elif event == "error":
            raise RequestError(f"generation failed: {payload}", status=500)
        elif event == "unavailable":
            raise _unavailable()
    return results


def _usage(results: list[dict]) -> dict[str, int]:
    prompt = sum(r.get("prompt_tokens", 0) for r in results)
    completion = sum(r.get("completion_tokens", 0) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _script_json(value) -> str:
    """JSON to put inside a <script>: a bundle's names are not trusted to hold no `</script>`."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _sse(data: dict | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def _stream(jobs: list[Job], events: asyncio.Queue, head: dict, chat: bool,
                  include_usage: bool) -> AsyncIterator[bytes]:  # fmt: skip
    """SSE chunks: per choice, its pass-1 result (and, in chat, the role) first, then the text as it
    is generated, then the finish reason; usage last when asked; `[DONE]`. A client that goes away
    cancels its rows (the `finally`), and the batch goes on without them."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None = None, finish: str | None = None, extra: dict | None = None,
              role: bool = False) -> bytes:  # fmt: skip
        if chat:
            delta = {"role": "assistant"} if role else {"content": text} if text is not None else {}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish}
        if extra:
            choice["bayes_llm"] = extra
        return _sse({**head, "object": kind, "choices": [choice]})

    done: list[dict] = []
    try:
        while len(done) < len(jobs):
            index, event, payload = await events.get()
            if event == "routed":  # chat: the role comes with it
                yield chunk(index, extra=payload, role=True)
            elif event == "text":
                yield chunk(index, payload)
            elif event == "done":
                done.append(payload)
                yield chunk(index, finish=payload["finish_reason"], extra={"timing_ms": payload["timing_ms"]})
            elif event in ("error", "unavailable"):
                error = {"message": f"generation failed: {payload}", "type": "server_error", "code": None}
                if event == "unavailable":
                    error.update(message=payload, code="server_unavailable")
                yield _sse({"error": error})
                return
        if include_usage:
            yield _sse({**head, "object": kind, "choices": [], "usage": _usage(done)})
        yield _sse("[DONE]")
    finally:
        for job in jobs:
            job.cancelled.set()  # a no-op for finished rows; stops the rest if the client left


def create_app(server: Server, max_body_bytes: int = 1 << 20) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="bayes-llm", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        messages = [_validation_message(e) for e in error.errors()]
        return _error(400, "; ".join(m for m, _ in messages), messages[0][1] if messages else None)

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.message, error.param, error.code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        messages = {404: f"no route {request.method} {request.url.path}",
                    405: f"{request.method} is not allowed on {request.url.path}"}  # fmt: skip
        codes = {413: "request_too_large"}  # a chunked body counted past the limit (BodyLimit)
        return _error(error.status_code, messages.get(error.status_code, str(error.detail)),
                      code=codes.get(error.status_code))  # fmt: skip

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        return _error(500, f"the server failed on this request: {type(error).__name__}: {error}")

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    def head(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.model_id}

    async def respond(request: Request, jobs: list[Job], events: asyncio.Queue, body: Sampled, chat: bool):
        ids = head("chatcmpl" if chat else "cmpl")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(jobs, events, ids, chat, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})  # fmt: skip
        collecting = asyncio.ensure_future(_collect(jobs, events))
        try:
            while not collecting.done():  # a client that gives up waiting cancels its rows
                await asyncio.wait([collecting], timeout=0.1)
                if not collecting.done() and await request.is_disconnected():
                    collecting.cancel()
                    return None
            results = collecting.result()
        finally:
            for job in jobs:
                job.cancelled.set()
        if chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": r["text"]}, "logprobs": None,
                        "finish_reason": r["finish_reason"], "bayes_llm": r["bayes_llm"]}
                       for i, r in enumerate(results)]  # fmt: skip
        else:
            choices = [{"index": i, "text": r["text"], "finish_reason": r["finish_reason"], "logprobs": None,
                        "bayes_llm": r["bayes_llm"]} for i, r in enumerate(results)]  # fmt: skip
        kind = "chat.completion" if chat else "text_completion"
        return {**ids, "object": kind, "choices": choices, "usage": _usage(results)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream and len(prompts) > 1:
            raise RequestError("prompt: stream one prompt per request", "prompt")
        texts = [(server.route_text(p), p) for p in prompts]
        jobs, events = await _submit(server, texts, body, body.max_tokens, "prompt")
        return await respond(request, jobs, events, body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        server.check_model(body.model)
        if body.max_tokens and body.max_completion_tokens and body.max_tokens != body.max_completion_tokens:
            raise RequestError("max_tokens and max_completion_tokens differ: give one", "max_completion_tokens")
        max_tokens = body.max_completion_tokens or body.max_tokens
        jobs, events = await _submit(server, [server.chat_text(body)], body, max_tokens, "messages")
        return await respond(request, jobs, events, body, chat=True)

    def card() -> dict:
        engine = server.engine
        return {"id": server.model_id, "object": "model", "created": 0, "owned_by": "bayes-llm",
                "bayes_llm": {"experts": engine.domains, "strategies": ["base", *sorted(engine.controllers),
                                                                        *(f"expert:{d}" for d in engine.domains)],
                              "default_strategy": server.defaults.strategy, "context": server.context}}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return card()

    @app.get("/health")
    async def health():
        stats = server.scheduler.stats
        alive = server.scheduler.alive
        body = {"status": "ok" if alive else "the scheduler thread has stopped", "model": server.model_id,
                "batching": server.scheduler.batching, "waiting": server.scheduler.waiting,
                **{k: round(v, 3) for k, v in stats.items()}}  # fmt: skip
        return JSONResponse(body, 200 if alive else 503)

    page = resources.files("bayes_llm.serve").joinpath("demo.html").read_text()
    page = page.replace("__MODEL__", _script_json(server.model_id))
    page = page.replace("__EXPERTS__", _script_json(server.engine.domains))

    @app.get("/", response_class=HTMLResponse)
    async def demo():
        return page

    return app


def load_app(bundle: Path, base: Path, svd: Path | None = None, *, max_batch: int = 16, max_wait: float = 0.01,
             batching: Batching = "mixed", max_tokens_limit: int = 512,
             decode_threads: int | None = None) -> FastAPI:  # fmt: skip
    """The app for a bundle on its base: refused when the bundle's files do not match its manifest or
    the base is not the one its experts were trained on. `svd` defaults to `svd/` beside the base."""
    manifest = verify(bundle, base)
    layout = models_layout(bundle, base, svd if svd is not None else Path(base).parent / "svd")
    try:
        engine = Engine(layout)
    finally:
        shutil.rmtree(layout)  # its symlinks only: the engine has read everything it needs
    dispatch = manifest["params"]["dispatch"]
    strategy = dispatch["strategy"] if dispatch["strategy"] in engine.controllers else "prompt"
    defaults = Extension(strategy=strategy, blending_mode=dispatch["blending_mode"], top_k=dispatch["top_k"])
    scheduler = Scheduler(engine, max_batch, max_wait, batching, decode_threads)
    return create_app(Server(engine, scheduler, manifest["name"], defaults, max_tokens_limit))
