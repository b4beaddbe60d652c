"""OpenAI-compatible HTTP server (FastAPI) over one model, with a single-page chat UI.

    app = create_app("path/to/model_dir")        # or create_app(generator, tokenizer=tokenizer)
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/chat/completions, POST /v1/completions (OpenAI request/response schema, `stream: true` gives
Server-Sent Events ending with `data: [DONE]`), GET /v1/models, GET /health, GET / (static/chat.html).

Continuous batching: one worker thread owns the model's generation engine (engine.py, engine_worker.py). Every step
decodes all running requests together; a request that arrives meanwhile joins at the next step (its prompt read in
chunks between the others' tokens), a finished or cancelled one leaves at once and frees its key/value blocks. Each
request keeps its own sampling options (rows with different temperatures, seeds, stops share a step) and a greedy
reply does not depend on what else runs. The cache is a pool of blocks (kv_pool.py; its size and dtype are
create_app's kv_cache_* arguments, printed at start by serve.py); a request that could never fit gets 400, one that
fits waits in the queue while the pool is full, and beyond `max_queue` waiting requests the server answers 429.
Identical prompt prefixes (a system prompt, a conversation's history) are computed once and shared (prefix_cache).
GET /metrics reports the engine in the Prometheus text format (vLLM's metric names).

A client that disconnects marks its request cancelled: a queued one is dropped, a running one is aborted at the next
step. Bad input gets a 4xx with an OpenAI-style error body.

Generation settings are generation_settings.resolve'd, as for chat.py, inference.py and the pipeline: the request's
fields over the model directory's generation_config.json over the family's defaults (temperature 0 is greedy
decoding, and greedy stays plain greedy: a sampling file's repetition_penalty applies only when sampling); a
request without max_tokens gets the file's max_new_tokens, cut to what the context leaves. With `api_key`, every
/v1 path wants `Authorization: Bearer <key>` (401 otherwise, as vLLM's --api-key); /health and the page stay open.

Nobody blocked by one request: a body over max_request_bytes gets 413 before it is read (http_limits.BodyLimit); a
prompt with more characters than the context could hold (context x the longest token's characters) gets 400 before
it is tokenized; tokenizing runs in a thread of its own, off the event loop. A 500 is logged with its cause in the
server log (uvicorn.error), a generation failure with its traceback.
"""
import asyncio
import concurrent.futures
import hmac
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .chat import build_chat_input
from .engine import DEFAULT_BLOCK_SIZE, DEFAULT_STEP_TOKENS, KV_ELEMENT_BYTES, Engine, RequestTooLarge, pool_blocks
from .engine_worker import EngineWorker, Metrics
from .generation import Generator
from .generation_settings import read_generation_config, resolve
from .http_limits import DEFAULT_MAX_REQUEST_BYTES, BodyLimit

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_LOG = logging.getLogger("uvicorn.error")  # the server log


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
    # strict: "5" is not an int, 1 is not a bool; unknown fields are kept (model_extra) and refused by name
    # (unsupported_fields): a field this server does not implement is never silently ignored
    model_config = ConfigDict(strict=True, extra="allow")


IGNORED_FIELDS = {"user", "metadata", "store", "service_tier"}  # bookkeeping fields that change no output


def unsupported_fields(req, path=""):
    """400 naming the first field of `req` this server does not implement (tools, response_format other than
    text, logit_bias with entries, any unknown field)."""
    for name in sorted(req.model_extra or {}):
        if name in IGNORED_FIELDS and not path:
            continue
        value = req.model_extra[name]
        if name == "response_format" and value in ({"type": "text"}, None):
            continue
        if name == "logit_bias" and not value:
            continue
        what = {"tools": "tool calls", "tool_choice": "tool calls", "functions": "function calls",
                "function_call": "function calls", "response_format": "structured output (only {\"type\": "
                "\"text\"})", "logit_bias": "logit_bias"}.get(name, "this field")
        raise APIError(400, f"{path}{name}: {what} is not supported by this server", param=path + name,
                       code="unsupported_field")


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
    top_k: Optional[int] = Field(default=None, ge=-1)  # vLLM's extra sampling fields; -1 (as 0) = off
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stop: Optional[Union[str, List[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(default=1, ge=1, le=16)
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
    explicit = {"top_p": req.top_p, "top_k": 0 if req.top_k == -1 else req.top_k,
                "repetition_penalty": req.repetition_penalty,
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
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=20)


class CompletionRequest(_Sampling):
    prompt: Union[str, List[str], List[int], List[List[int]]] = Field(min_length=1)  # text or token ids
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)  # the legacy API's: the top N per token
    echo: bool = False  # the prompt's text (and with logprobs its tokens' logprobs) before the completion


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
    submitted: float = 0.0  # time.monotonic() when queued (time to first token)
    min_p: float = 0.0
    min_tokens: int = 0
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None  # None: none; N: each token's logprob and the N most likely
    prompt_logprobs: bool = False  # echo with logprobs: the prompt tokens' logprobs too
    prompt_lookup_num_tokens: int = 0  # speculative decoding (serve.py --speculative ngram)

    def send(self, *event):
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


# ---------------------------------------------------------------------------------------------- the app
def _load(model_dir):
    from .runtime import load_model_dir  # pylint: disable=import-outside-toplevel
    model, tokenizer, generation = load_model_dir(model_dir)
    return Generator(model), tokenizer, generation


def create_app(source, tokenizer=None, model_name=None, max_batch=8, api_key=None, generation_config=None,
               max_request_bytes=DEFAULT_MAX_REQUEST_BYTES, kv_cache_dtype="auto", kv_cache_memory=None,
               block_size=DEFAULT_BLOCK_SIZE, max_num_batched_tokens=DEFAULT_STEP_TOKENS, prefix_cache=True,
               max_queue=None, num_speculative_tokens=0):
    """FastAPI app serving `source`: a model directory, or a Generator (then pass its tokenizer).

    generation_config: request defaults (a dict as in generation_config.json); default: the model directory's file.
    api_key: when set, /v1 requests must carry it as a Bearer token. max_request_bytes: larger bodies get 413.
    The engine: max_batch sequences at once (vLLM's max_num_seqs), at most max_num_batched_tokens tokens a step
    (prompts are read in chunks of what is left), the key/value pool in kv_cache_dtype ("auto": the model's
    preferred, model.kv_cache_dtypes()) with kv_cache_memory GiB (default: engine.pool_blocks, most of the memory
    available after the weights), blocks of block_size tokens, prefix sharing unless prefix_cache is False; with
    max_queue, requests beyond that many waiting get 429. num_speculative_tokens K > 0: every request decodes with
    prompt-lookup speculation (up to K tokens drafted from its own text, verified in one step; same output)."""
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
    if int(max_request_bytes) < 1:
        raise ValueError(f"max_request_bytes must be positive, got {max_request_bytes}")
    max_prompt_chars = context * _longest_token_chars(tokenizer)
    model = generator.model
    dtype = model.kv_cache_dtypes()[0] if kv_cache_dtype == "auto" else kv_cache_dtype
    blocks = pool_blocks(config, block_size, None if kv_cache_memory is None else kv_cache_memory * 2 ** 30,
                         KV_ELEMENT_BYTES[dtype], max_seqs=max_batch)
    engine = Engine(model, blocks, block_size, max_step_tokens=max(max_num_batched_tokens, max_batch),
                    max_seqs=max_batch, prefix_cache=prefix_cache, kv_cache_dtype=dtype)
    worker = EngineWorker(engine, tokenizer)
    metrics = Metrics(engine, worker, model_name)
    # one thread tokenizes (off the event loop; one at a time, as the tokenizer was used before)
    tokenizing = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="baichuan2-tokenize")

    app = FastAPI(title="Baichuan2 OpenAI-compatible server")
    app.state.worker, app.state.generator, app.state.tokenizer = worker, generator, tokenizer
    app.state.engine = engine
    app.router.add_event_handler("shutdown", worker.close)
    app.router.add_event_handler("shutdown", lambda: tokenizing.shutdown(wait=False))

    def too_large(size):
        said = f"{size} bytes" if size is not None else "more than that"
        return JSONResponse(status_code=413, headers={"Connection": "close"}, content=error_body(
            f"the request body is {said}; this server takes at most {max_request_bytes} bytes "
            f"(serve.py --max_request_bytes)", code="request_too_large"))
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes, reject=too_large)

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
    async def _api_error(request, exc):
        if exc.status >= 500:  # the server's fault: its cause goes to the server log, not only to the client
            _LOG.error("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
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

    def check_chars(count, param):
        """The cheap bound before tokenizing: a prompt of more characters cannot fit in the context."""
        if count > max_prompt_chars:
            raise APIError(400, f"this model's maximum context length is {context} tokens, and the prompt has {count}"
                                f" characters: more than {max_prompt_chars} cannot fit (a token stands for at most "
                                f"{max_prompt_chars // context} characters)", param=param,
                           code="context_length_exceeded")

    async def tokenized(function, *args):
        return await asyncio.get_running_loop().run_in_executor(tokenizing, function, *args)

    def check_common(req, prompt, prompt_param, default_max_tokens):
        unsupported_fields(req)
        if req.stream_options is not None:
            unsupported_fields(req.stream_options, "stream_options.")
        for i, message in enumerate(getattr(req, "messages", ())):
            unsupported_fields(message, f"messages.{i}.")
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

    def make_jobs(req, prompt, chat, logprobs=None, prompt_logprobs=False):
        """The request's n jobs for one prompt (choice j of a seeded request samples with seed + j)."""
        settings = request_settings(config, generation_config, req, chat)
        stops, max_tokens = check_common(req, prompt, "messages" if chat else "prompt", settings["max_new_tokens"])
        if req.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({req.min_tokens}) is larger than max_tokens ({max_tokens})",
                           param="min_tokens")
        seed = settings.get("seed")
        return [Job(prompt=prompt, max_tokens=max_tokens,
                    temperature=settings["temperature"] if settings["do_sample"] else 0.0, top_p=settings["top_p"],
                    top_k=settings["top_k"], repetition_penalty=settings["repetition_penalty"],
                    seed=None if seed is None else seed + j, stops=stops,
                    stop_token_ids=list(settings.get("stop_token_ids", [])),
                    eos_token_id=settings.get("eos_token_id"), loop=asyncio.get_running_loop(), min_p=req.min_p,
                    min_tokens=req.min_tokens, ignore_eos=req.ignore_eos, presence_penalty=req.presence_penalty,
                    frequency_penalty=req.frequency_penalty, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                    prompt_lookup_num_tokens=num_speculative_tokens)
                for j in range(req.n)]

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

    def usage_of(jobs, completion_tokens):
        prompt_tokens = sum(len(job.prompt) for job in {id(j.prompt): j for j in jobs}.values())
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def submit(jobs):
        for job in jobs:
            try:
                engine.check_fits(len(job.prompt), job.max_tokens)
            except RequestTooLarge as exc:
                raise APIError(400, str(exc), param="max_tokens", code="context_length_exceeded") from exc
        if max_queue is not None and worker.waiting() + len(jobs) > max_queue:
            raise APIError(429, f"the server has {worker.waiting()} requests waiting (at most {max_queue}): retry "
                                f"later", type_="rate_limit_exceeded", code="queue_full")
        for job in jobs:
            job.submitted = time.monotonic()
            worker.submit(job)

    async def respond(jobs, request, req, prefix, make_chunk, make_full):
        """The response for `jobs` (choice i is jobs[i]): one body, or with req.stream Server-Sent Events whose
        chunks carry their choice's index. make_chunk(request_id, index, text, finish_reason, logprob_entries,
        first) and make_full(request_id, choices, usage), where each choice is (index, text, finish_reason,
        logprob entries, prompt logprobs)."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        submit(jobs)
        if req.stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage

            def data(body):
                if include_usage:  # OpenAI: every chunk has a null usage, an extra last one the totals
                    body.setdefault("usage", None)
                return f"data: {json.dumps(body)}\n\n"

            async def pump(index, job, queue):
                async for event in events_of(job, request):
                    await queue.put((index, event))
                await queue.put((index, None))

            async def sse():
                queue, open_jobs, tokens, started = asyncio.Queue(), len(jobs), 0, set()
                pumps = [asyncio.ensure_future(pump(i, job, queue)) for i, job in enumerate(jobs)]
                try:
                    while open_jobs:
                        index, event = await queue.get()
                        if event is None:
                            open_jobs -= 1
                            continue
                        first = index not in started
                        started.add(index)
                        if event[0] == "delta":
                            yield data(make_chunk(request_id, index, event[1], None, event[2], first))
                        elif event[0] == "done":
                            tokens += event[2]
                            yield data(make_chunk(request_id, index, "", event[1], event[3], first))
                        else:
                            yield data(error_body(event[1], "server_error"))
                    if include_usage:
                        last = dict(make_chunk(request_id, 0, "", None, None, False), choices=[],
                                    usage=usage_of(jobs, tokens))
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    for task in pumps:
                        task.cancel()
            return StreamingResponse(sse(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        async def collect(index, job):
            pieces, entries, done = [], [], None
            async for event in events_of(job, request):
                if event[0] == "delta":
                    pieces.append(event[1])
                    entries += event[2] or []
                elif event[0] == "done":
                    done = event
                    entries += event[3] or []
                else:
                    raise APIError(500, event[1], type_="server_error")
            if done is None:
                return None
            return index, "".join(pieces), done[1], entries if job.logprobs is not None else None, done[4], done[2]

        results = await asyncio.gather(*(collect(i, job) for i, job in enumerate(jobs)))
        if any(r is None for r in results):  # the client left
            for job in jobs:
                job.cancelled = True
            return JSONResponse(status_code=499, content=error_body("client closed the request"))
        usage = usage_of(jobs, sum(r[5] for r in results))
        return make_full(request_id, [r[:5] for r in results], usage)

    def token_text(token):
        return tokenizer.decode([token], skip_special_tokens=False)

    def chat_logprobs(entries):
        """OpenAI chat's logprobs object: each token's text, logprob, bytes and its top_logprobs."""
        def item(token, logprob):
            text = token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
        return {"content": [dict(item(token, logprob), top_logprobs=[item(t, lp) for t, lp in top])
                            for token, logprob, top in entries]}

    def legacy_logprobs(entries, echoed=(), offset=0):
        """The legacy completions logprobs object (tokens, token_logprobs, top_logprobs, text_offset); `echoed`:
        the prompt's (token, logprob or None) first, when echo."""
        tokens, values, tops, offsets = [], [], [], []
        for token, logprob, top in list(echoed) + list(entries):
            text = token_text(token)
            offsets.append(offset)
            offset += len(text)
            tokens.append(text)
            values.append(logprob)
            tops.append(None if top is None else {token_text(t): lp for t, lp in top})
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}

    def chat_prompt(plain):
        """The chat template without history cutting: what does not fit is rejected (check_common), never silently
        dropped."""
        unlimited = _ContextOverride(config, model_max_length=10 ** 9)
        try:
            return build_chat_input(unlimited, tokenizer.encode, plain, max_new_tokens=1)
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from exc

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        if getattr(config, "chat_format", None) is None:
            raise APIError(400, f"{model_name} is a base model without a chat template: use /v1/completions",
                           param="messages")
        plain = [{"role": m.role, "content": message_text(m, i)} for i, m in enumerate(req.messages)]
        check_chars(sum(len(m["content"]) for m in plain), "messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        jobs = make_jobs(req, await tokenized(chat_prompt, plain), chat=True,
                         logprobs=(req.top_logprobs or 0) if req.logprobs else None)

        def chunk(request_id, index, text, finish_reason, entries, first):
            delta = {"content": text} if text else {}
            if first:  # each choice's first chunk says who speaks (OpenAI)
                delta = {"role": "assistant", "content": text}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
            if req.logprobs:
                choice["logprobs"] = chat_logprobs(entries) if entries else None
            return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model_name, "choices": [choice]}

        def full(request_id, choices, usage):
            return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": index, "message": {"role": "assistant", "content": text},
                                 "logprobs": chat_logprobs(entries) if entries is not None else None,
                                 "finish_reason": finish_reason}
                                for index, text, finish_reason, entries, _ in choices], "usage": usage}

        return await respond(jobs, request, req, "chatcmpl", chunk, full)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        one = isinstance(req.prompt, str) or isinstance(req.prompt[0], int)
        prompts = [req.prompt] if one else req.prompt  # each a text, or token ids (lm-eval sends those)
        check_chars(max(len(p) if isinstance(p, str) else 0 for p in prompts), "prompt")
        if req.echo and req.stream:
            raise APIError(400, "echo is not supported with stream=true", param="echo")
        encoded = []
        for p in prompts:
            if not isinstance(p, str):
                bad = next((t for t in p if not 0 <= t < config.vocab_size), None)
                if bad is not None:
                    raise APIError(400, f"prompt token id {bad} is outside the vocabulary (0 to "
                                        f"{config.vocab_size - 1})", param="prompt")
            encoded.append(list(p) if not isinstance(p, str) else
                           await tokenized(lambda text: list(tokenizer.encode(text)), p))
        jobs = [job for ids in encoded for job in make_jobs(
            req, ids, chat=False, logprobs=req.logprobs, prompt_logprobs=req.echo and req.logprobs is not None)]
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts for _ in range(req.n)]

        def chunk(request_id, index, text, finish_reason, entries, first):
            del first
            logprobs = legacy_logprobs(entries) if req.logprobs is not None and entries else None
            return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]}

        def full(request_id, choices, usage):
            out = []
            for index, text, finish_reason, entries, prompt_lp in choices:
                logprobs = None
                if req.logprobs is not None:
                    echoed = []
                    if req.echo:  # the first prompt token has no logprob: nothing precedes it
                        prompt = jobs[index].prompt
                        echoed = [(prompt[0], None, None)] + [
                            (token, value, top) for (token, value), top in zip(prompt_lp or [], _tops(prompt_lp))]
                    logprobs = legacy_logprobs(entries or [], echoed)
                out.append({"index": index, "text": (texts[index] if req.echo else "") + text,
                            "logprobs": logprobs, "finish_reason": finish_reason})
            return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model_name,
                    "choices": out, "usage": usage}

        return await respond(jobs, request, req, "cmpl", chunk, full)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "baichuan2"}]}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    @app.get("/health")
    async def health():
        return {"status": "ok" if worker.thread.is_alive() else "worker stopped", "model": model_name}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        with open(os.path.join(STATIC_DIR, "chat.html"), encoding="utf-8") as f:
            return f.read()

    return app


def _tops(prompt_logprobs):
    """Top entries for echoed prompt tokens: each token's own (the engine reports no alternatives for prompts)."""
    return [[(token, value)] for token, value in prompt_logprobs or []]


def _longest_token_chars(tokenizer):
    """The most characters one token of `tokenizer` stands for (its longest vocabulary piece; 64 when the tokenizer
    lists no vocabulary). A byte token stands for at most one character, so no text encodes to fewer tokens than
    its characters divided by this."""
    try:
        pieces = tokenizer.get_vocab()
    except (AttributeError, NotImplementedError):
        return 64
    return max((len(p) for p in pieces), default=64) or 64


class _ContextOverride:
    """A read-only view of a config with some attributes replaced."""

    def __init__(self, config, **overrides):
        self._config, self._overrides = config, overrides

    def __getattr__(self, name):
        if name in self._overrides:
            return self._overrides[name]
        return getattr(self._config, name)


__all__ = ["create_app", "APIError", "request_settings"]
