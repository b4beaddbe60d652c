"""OpenAI-compatible HTTP server (FastAPI) over one model, with a single-page chat UI.

    app = create_app("path/to/model_dir")        # or create_app(generator, tokenizer=tokenizer)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI request/response schema, `stream: true` gives
Server-Sent Events ending with `data: [DONE]`), GET /v1/models, GET /health, GET / (static/chat.html).

Batching: one worker thread owns the model. It takes the oldest queued request plus up to `max_batch - 1` queued
requests that can share its generation call and runs them as one left-padded batch (Generator.stream).
generation.py samples a whole batch with one set of options and one random generator, so requests are grouped by
sampling parameters: greedy requests (temperature 0) are compatible with each other; sampling requests are compatible
when temperature, top_p, top_k and repetition_penalty are equal and neither asked for a seed (a seeded request runs
alone, so it is reproducible). max_tokens may differ: the batch runs to the largest and each row stops at its own.
The batch size is padded to a power of two (repeating a prompt) so GRAPH mode compiles only a few shapes.

A client that disconnects marks its request cancelled: a queued one is dropped before it takes a batch slot, a
running row stops being decoded and the batch ends as soon as all its rows are finished or cancelled (generation.py's
static batch cannot take a new request in mid-generation). Bad input gets a 4xx with an OpenAI-style error body.

Generation settings are generation_settings.resolve'd, as for chat.py, inference.py and the pipeline: the request's
fields over the model directory's generation_config.json over the family's defaults (temperature 0 is greedy
decoding, and greedy stays plain greedy: a sampling file's repetition_penalty applies only when sampling); a
request without max_tokens gets the file's max_new_tokens, cut to what the context leaves. With `api_key`, every
/v1 path wants `Authorization: Bearer <key>` (401 otherwise, as vLLM's --api-key); /health and the page stay open.
"""
import asyncio
import collections
import hmac
import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import build_chat_input
from .generation import Generator
from .generation_settings import read_generation_config, resolve

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ---------------------------------------------------------------------------------------------- errors
class APIError(Exception):
    """An error the client caused (or that it should see), returned as OpenAI's {"error": {...}} body."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self):
        return JSONResponse(status_code=self.status, content=error_body(self.message, self.type, self.param,
                                                                          self.code))


def error_body(message, type_="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------- request schema
class _Strict(BaseModel):
    # strict: "5" is not an int, 1 is not a bool; unknown OpenAI fields (presence_penalty, user, ...) are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Union[str, List[dict]]  # a list of parts: only {"type": "text", "text": ...} (checked in message_text)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    # None = left out: the model directory's generation_config.json decides (see request_settings)
    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)  # vLLM's extra sampling fields
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1
    seed: Optional[int] = None


def message_text(message, index):
    """A message's content as one string: a list of text parts is joined with newlines (as vLLM does)."""
    if isinstance(message.content, str):
        return message.content
    texts, others = [], []
    for part in message.content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            others.append(repr(kind) if kind != "text" else "'text' without a string 'text'")
    if others:
        raise APIError(400, f"messages.{index}.content: unsupported content part type {', '.join(others)}; this "
                            f"model reads only text parts ({{\"type\": \"text\", \"text\": ...}})",
                       param=f"messages.{index}.content", code="unsupported_content")
    return "\n".join(texts)


def request_settings(config, generation_config, req, chat):
    """Generation settings of one request (generation_settings.resolve): its fields over generation_config (the
    model directory's generation_config.json) over the family's defaults. temperature 0 means greedy decoding, as
    in OpenAI's API; a temperature above 0 means sampling. chat: a chat completion (the format's stop ids)."""
    explicit = {"top_p": req.top_p, "top_k": req.top_k, "repetition_penalty": req.repetition_penalty,
                "seed": req.seed}
    if req.temperature is not None:
        explicit["do_sample"] = req.temperature > 0
        if req.temperature > 0:
            explicit["temperature"] = req.temperature
    try:
        return resolve(config, explicit, generation_config=generation_config, chat=chat)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)  # newer name for max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str]]


# ---------------------------------------------------------------------------------------------- jobs
@dataclass
class Job:
    """One request in the queue; the worker thread pushes events to `events` on the server's event loop."""
    prompt: List[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: Optional[int]
    stops: List[str]
    stop_token_ids: List[int]
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    top_k: int = 0
    repetition_penalty: float = 1.0
    eos_token_id: Optional[Union[int, List[int]]] = None  # None: the model config's

    def batch_key(self):
        """Jobs with equal keys can run in one Generator.stream call (None: must run alone)."""
        eos = tuple(self.eos_token_id) if isinstance(self.eos_token_id, list) else self.eos_token_id
        if self.temperature == 0:
            return ("greedy", self.repetition_penalty, tuple(self.stop_token_ids), eos)
        if self.seed is not None:
            return None
        return ("sample", self.temperature, self.top_p, self.top_k, self.repetition_penalty,
                tuple(self.stop_token_ids), eos)

    def send(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class RowText:
    """Turns one row's token ids into text pieces to send: holds back an incomplete multi-byte character (decoded
    as U+FFFD) and any tail that could be the start of a stop string."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.ids, self.text, self.sent = [], "", 0

    def add(self, token):
        """Returns (piece to send, whether a stop string was hit)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        self.text = text
        hits = [text.find(s, max(0, self.sent - len(s))) for s in self.stops]
        hits = [h for h in hits if h >= 0]
        if hits:
            return self._take(min(hits)), True
        hold = max([k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])], default=0)
        return self._take(len(text) - hold), False

    def flush(self):
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(len(self.text))

    def _take(self, end):
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece


class BatchWorker:
    """The thread that owns the model: takes batches of compatible jobs from the queue and generates them."""

    def __init__(self, generator, tokenizer, max_batch=8):
        self.generator, self.tokenizer, self.max_batch = generator, tokenizer, max(1, int(max_batch))
        self.pending = collections.deque()
        self.cond = threading.Condition()
        self.closed = False
        self.batches = []  # sizes of the batches run, for tests and logs
        self.steps = []  # generation steps each batch ran (ends early when every client left)
        self.busy = False  # generating a batch right now
        self.thread = threading.Thread(target=self._run, name="baichuan2-generation", daemon=True)
        self.thread.start()

    def submit(self, job):
        with self.cond:
            self.pending.append(job)
            self.cond.notify()

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=30)

    def _next_batch(self):
        with self.cond:
            while not self.closed and not any(not j.cancelled for j in self.pending):
                self.pending.clear()
                self.cond.wait()
            if self.closed:
                return []
            live = [j for j in self.pending if not j.cancelled]
            first, batch, rest = live[0], [live[0]], []
            key = first.batch_key()
            context = self.generator.config.max_context
            for job in live[1:]:
                fits = (max(len(j.prompt) for j in batch + [job]) + max(j.max_tokens for j in batch + [job])
                        <= context)
                if key is not None and job.batch_key() == key and fits and len(batch) < self.max_batch:
                    batch.append(job)
                else:
                    rest.append(job)
            self.pending = collections.deque(rest)
            return batch

    def _run(self):
        while True:
            batch = self._next_batch()
            if not batch:
                return
            self.batches.append(len(batch))
            self.busy = True
            try:
                self._generate(batch)
            except Exception as exc:  # pylint: disable=broad-except  # one bad batch must not stop the server
                for job in batch:
                    job.send("error", f"generation failed: {type(exc).__name__}: {exc}")
            finally:
                self.busy = False

    def _generate(self, batch):
        first = batch[0]
        rows = len(batch)
        width = 1 << (rows - 1).bit_length()  # power of two: few distinct compiled shapes
        prompts = [j.prompt for j in batch] + [first.prompt] * (width - rows)
        options = dict(max_new_tokens=max(j.max_tokens for j in batch), stop_token_ids=first.stop_token_ids,
                       do_sample=first.temperature > 0, temperature=first.temperature or 1.0, top_p=first.top_p,
                       top_k=first.top_k, repetition_penalty=first.repetition_penalty, seed=first.seed,
                       eos_token_id=first.eos_token_id)
        texts = [RowText(self.tokenizer, j.stops) for j in batch]
        done = [False] * rows

        def finish(row, reason):
            done[row] = True
            job = batch[row]
            if not job.cancelled:
                tail = texts[row].flush() if reason != "stop_string" else ""
                if tail:
                    job.send("delta", tail)
                job.send("done", "stop" if reason == "stop_string" else reason, len(texts[row].ids))

        steps = self.generator.stream(prompts, **options)
        self.steps.append(0)
        try:
            for step in steps:
                self.steps[-1] += 1
                for row, job in enumerate(batch):
                    if done[row]:
                        continue
                    if job.cancelled:
                        done[row] = True
                    elif step[row] is None:  # eos or a stop id
                        finish(row, "stop")
                    else:
                        piece, hit = texts[row].add(step[row])
                        if piece:
                            job.send("delta", piece)
                        if hit:
                            finish(row, "stop_string")
                        elif len(texts[row].ids) >= job.max_tokens:
                            finish(row, "length")
                if all(done):
                    break
        finally:
            steps.close()
        for row in range(rows):  # the stream ended: every remaining row stopped at eos
            if not done[row]:
                finish(row, "stop")


# ---------------------------------------------------------------------------------------------- the app
def _load(model_dir):
    from .runtime import load_model_dir  # pylint: disable=import-outside-toplevel
    model, tokenizer, generation = load_model_dir(model_dir)
    return Generator(model), tokenizer, generation


def create_app(source, tokenizer=None, model_name=None, max_batch=8, api_key=None, generation_config=None):
    """FastAPI app serving `source`: a model directory, or a Generator (then pass its tokenizer).

    generation_config: request defaults (a dict as in generation_config.json); default: the model directory's file.
    api_key: when set, /v1 requests must carry it as a Bearer token."""
    if isinstance(source, (str, os.PathLike)):
        generator, tokenizer, saved = _load(str(source))
        generation_config = saved if generation_config is None else generation_config
        model_name = model_name or os.path.basename(os.path.normpath(str(source)))
    else:
        generator = source
        if tokenizer is None:
            raise ValueError("create_app(generator) needs tokenizer=")
    model_name = model_name or "baichuan2"
    config = generator.config
    context = config.max_context
    created = int(time.time())
    if generation_config is None:
        generation_config = read_generation_config(getattr(config, "name_or_path", None))
    resolve(config, generation_config=generation_config)  # a bad value in the file: ValueError before serving
    worker = BatchWorker(generator, tokenizer, max_batch)

    app = FastAPI(title="Baichuan2 OpenAI-compatible server")
    app.state.worker, app.state.generator, app.state.tokenizer = worker, generator, tokenizer
    app.router.add_event_handler("shutdown", worker.close)

    if api_key:
        @app.middleware("http")
        async def _check_api_key(request, call_next):
            if request.url.path.startswith("/v1"):
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    return JSONResponse(status_code=401, content=error_body(
                        "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
                        code="invalid_api_key"))
            return await call_next(request)

    @app.exception_handler(APIError)
    async def _api_error(_request, exc):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request, exc):
        # FastAPI's default is a 422 in its own format; OpenAI clients expect 400 + {"error": ...}
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "request body is not valid JSON"
        elif loc:
            message = f"{'.'.join(loc)}: {message}"
        return JSONResponse(status_code=400, content=error_body(message, param=".".join(loc) or None,
                                                                code=first.get("type")))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc):
        return JSONResponse(status_code=exc.status_code, content=error_body(str(exc.detail), code=exc.status_code))

    def check_common(req, prompt, prompt_param, default_max_tokens):
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n", code="unsupported_value")
        if req.model is not None and req.model != model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stops) > 4:
            raise APIError(400, "stop takes at most 4 sequences", param="stop")
        if not prompt:
            raise APIError(400, "the prompt is empty", param=prompt_param)
        if req.stream_options is not None and not req.stream:
            raise APIError(400, "stream_options is only allowed with stream=true", param="stream_options")
        room = context - len(prompt)
        max_tokens = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if room < 1:
            raise APIError(400, f"this model's maximum context length is {context} tokens, and the prompt alone has "
                                f"{len(prompt)} tokens", param=prompt_param, code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(default_max_tokens, room)
        if len(prompt) + max_tokens > context:
            raise APIError(400, f"this model's maximum context length is {context} tokens; the request asks for "
                                f"{len(prompt) + max_tokens} ({len(prompt)} prompt tokens + max_tokens {max_tokens}):"
                                f" lower max_tokens to at most {room}", param="max_tokens",
                           code="context_length_exceeded")
        return stops, max_tokens

    def make_job(req, prompt, chat):
        settings = request_settings(config, generation_config, req, chat)
        stops, max_tokens = check_common(req, prompt, "messages" if chat else "prompt", settings["max_new_tokens"])
        return Job(prompt=prompt, max_tokens=max_tokens,
                   temperature=settings["temperature"] if settings["do_sample"] else 0.0, top_p=settings["top_p"],
                   top_k=settings["top_k"], repetition_penalty=settings["repetition_penalty"],
                   seed=settings.get("seed"), stops=stops, stop_token_ids=list(settings.get("stop_token_ids", [])),
                   eos_token_id=settings.get("eos_token_id"), loop=asyncio.get_running_loop())

    async def events_of(job, request):
        """Worker events for `job`; marks it cancelled when the client goes away."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(job.events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                yield event
                if event[0] in ("done", "error"):
                    return
        finally:
            job.cancelled = True  # no-op once done; frees the row / queue place otherwise

    def usage_of(job, completion_tokens):
        return {"prompt_tokens": len(job.prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(job.prompt) + completion_tokens}

    async def respond(job, request, req, prefix, make_chunk, make_full):
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        worker.submit(job)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            def chunk(text, finish_reason):
                body = make_chunk(request_id, text, finish_reason)
                if include_usage:  # OpenAI: every chunk has a null usage, an extra last one the totals
                    body["usage"] = None
                return f"data: {json.dumps(body)}\n\n"

            async def sse():
                async for event in events_of(job, request):
                    if event[0] == "delta":
                        yield chunk(event[1], None)
                    elif event[0] == "done":
                        yield chunk("", event[1])
                        if include_usage:
                            last = dict(make_chunk(request_id, "", event[1]), choices=[],
                                        usage=usage_of(job, event[2]))
                            yield f"data: {json.dumps(last)}\n\n"
                    else:
                        yield f"data: {json.dumps(error_body(event[1], 'server_error'))}\n\n"
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, finish_reason, completion_tokens = [], None, 0
        async for event in events_of(job, request):
            if event[0] == "delta":
                pieces.append(event[1])
            elif event[0] == "done":
                finish_reason, completion_tokens = event[1], event[2]
            else:
                raise APIError(500, event[1], type_="server_error")
        if finish_reason is None:  # the client left
            return JSONResponse(status_code=499, content=error_body("client closed the request"))
        return make_full(request_id, "".join(pieces), finish_reason, usage_of(job, completion_tokens))

    def chat_prompt(messages):
        """The chat template without history cutting: what does not fit is rejected (check_common), never silently
        dropped."""
        unlimited = _ContextOverride(config, model_max_length=10 ** 9)
        plain = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(messages)]
        try:
            return build_chat_input(unlimited, tokenizer.encode, plain, max_new_tokens=1)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if getattr(config, "chat_format", None) is None:
            raise APIError(400, f"{model_name} is a base model without a chat template: use /v1/completions",
                           param="messages")
        job = make_job(req, chat_prompt(req.messages), chat=True)

        def chunk(request_id, text, finish_reason):
            delta = {"content": text} if text or finish_reason is None else {}
            if finish_reason is None and not text:
                delta = {"role": "assistant", "content": ""}
            return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        def full(request_id, text, finish_reason, usage):
            return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish_reason}], "usage": usage}

        return await respond(job, request, req, "chatcmpl", chunk, full)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(prompts) != 1:
            raise APIError(400, "prompt must be one string (batches of prompts are not supported)", param="prompt")
        job = make_job(req, list(tokenizer.encode(prompts[0])), chat=False)

        def chunk(request_id, text, finish_reason):
            return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

        def full(request_id, text, finish_reason, usage):
            return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}],
                    "usage": usage}

        return await respond(job, request, req, "cmpl", chunk, full)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "baichuan2"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok" if worker.thread.is_alive() else "worker stopped", "model": model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(os.path.join(STATIC_DIR, "chat.html"), encoding="utf-8") as f:
            return f.read()

    return app


class _ContextOverride:
    """A read-only view of a config with some attributes replaced."""

    def __init__(self, config, **overrides):
        self._config, self._overrides = config, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._config, name)


__all__ = ["create_app", "BatchWorker", "APIError", "request_settings"]
