"""The OpenAI-compatible server: the openai client (plain and streaming) against direct greedy generation,
16 concurrent streams, malformed requests, a client leaving mid-stream, and the chat page in headless Chromium.

One server for the whole module: uvicorn in a thread on a free loopback port, serving the tiny parity model in
GRAPH mode. The test's own Generator is the server's too (generation runs only while the server is idle)."""
import concurrent.futures
import json
import os
import subprocess
import threading
import time

import mindspore as ms
import numpy as np
import pytest
import requests
from mindspore import Tensor

from baichuan2 import BaichuanForCausalLM
from baichuan2.chat import build_chat_input
from baichuan2.generation import Generator
from baichuan2.server import create_app
from baichuan2.tokenization_baichuan import BaichuanTokenizer
from helpers import PYTHON, REPO, call_script, free_port, running

openai = pytest.importorskip("openai")  # pinned in requirements.txt; importorskip only makes the reason clear
uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny-baichuan2"
CHROMIUM = "/usr/bin/chromium"


class Served:
    def __init__(self, url, generator, tokenizer, app):
        self.url, self.generator, self.tokenizer, self.app = url, generator, tokenizer, app
        self.config = generator.config

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def direct_chat(self, messages, max_tokens):
        """The reply greedy generation gives for `messages` through the chat template, without the server."""
        prompt = build_chat_input(self.config, self.tokenizer.encode, messages, max_new_tokens=max_tokens)
        ids = self.generator.generate([prompt], max_new_tokens=max_tokens, do_sample=False,
                                      stop_token_ids=[self.config.user_token_id])[0]
        return self.tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(parity_model_dir):
    ms.set_context(mode=ms.GRAPH_MODE)
    model_dir = parity_model_dir("baichuan2_7b")
    generator = Generator(BaichuanForCausalLM.from_pretrained(model_dir))
    tokenizer = BaichuanTokenizer.from_pretrained(model_dir)
    # float32 cache rows: the replies and logprobs are compared with the model's own float32 generation
    app = create_app(generator, tokenizer=tokenizer, model_name=MODEL, max_batch=8, kv_cache_dtype="float32")
    try:
        with running(app) as url:
            yield Served(url, generator, tokenizer, app)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)


def user(text):
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_openai_client_plain_and_streaming_match_direct_greedy(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert requests.get(served.url + "/health", timeout=10).json()["status"] == "ok"
    messages = user("What is the capital of France?")
    expected = served.direct_chat(messages, 12)
    assert expected, "the fixture should give a non-empty greedy reply"

    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12

    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                            stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length") and len(chunks) > 2  # token by token

    # /v1/completions: the raw prompt, no template, stopping only at eos
    prompt_ids = served.tokenizer.encode("Once upon a time")
    ids = served.generator.generate([prompt_ids], max_new_tokens=10, do_sample=False)[0]
    completion = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0)
    assert completion.choices[0].text == served.tokenizer.decode(ids, skip_special_tokens=True)
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text


@pytest.mark.slow
def test_stop_strings_cut_the_reply(served):
    messages = user("Tell me a story")
    full = served.direct_chat(messages, 16)
    stop = full[3:5]
    assert stop.strip() and len(full) > 5
    client = served.client()
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[:full.index(stop)]


@pytest.mark.slow
def test_sixteen_concurrent_streams_are_batched_and_kept_apart(served):
    prompts = [f"question {i}: {'why ' * (i % 5)}tell me about number {i * 7}" for i in range(16)]
    expected = [served.direct_chat(user(p), 10) for p in prompts]
    assert len(set(expected)) > 8, "distinct prompts should give distinct replies"
    steps_before = len(served.app.state.worker.step_sizes)
    start = threading.Barrier(16)

    def ask(prompt):
        client = served.client()
        start.wait(timeout=60)  # all 16 requests arrive together, so they queue and get batched
        stream = client.chat.completions.create(model=MODEL, messages=user(prompt), max_tokens=10, temperature=0,
                                                stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, prompts, timeout=120))
    assert got == expected
    sizes = served.app.state.worker.step_sizes[steps_before:]
    assert max(sizes) > 1, f"requests were not batched: {sizes}"


@pytest.mark.slow
def test_sampling_and_greedy_requests_side_by_side(served):
    """Requests with different sampling settings share the engine's steps: greedy stays exact and a seeded
    request repeats whatever runs beside it."""
    def ask(kwargs):
        return served.client().chat.completions.create(model=MODEL, messages=user("pick a colour"), max_tokens=8,
                                                       **kwargs).choices[0].message.content

    settings = [dict(temperature=0), dict(temperature=0.8, top_p=0.9), dict(temperature=0),
                dict(temperature=1.2, seed=7), dict(temperature=1.2, seed=7), dict(temperature=0.8, top_p=0.9)]
    with concurrent.futures.ThreadPoolExecutor(len(settings)) as pool:
        got = list(pool.map(ask, settings, timeout=120))
    greedy = served.direct_chat(user("pick a colour"), 8)
    assert got[0] == got[2] == greedy
    assert got[3] == got[4]


def test_metrics_in_prometheus_format_count_what_was_served(served):
    served.client().chat.completions.create(model=MODEL, messages=user("count me"), max_tokens=5, temperature=0)
    text = requests.get(served.url + "/metrics", timeout=10).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    label = f'model_name="{MODEL}"'
    engine = served.app.state.engine
    assert values[f"vllm:generation_tokens_total{{{label}}}"] == engine.generated_tokens >= 5
    assert values[f"vllm:prompt_tokens_total{{{label}}}"] == engine.prompt_tokens > 0
    assert values[f"vllm:num_requests_running{{{label}}}"] == 0  # idle again
    assert values[f"vllm:kv_cache_usage_perc{{{label}}}"] == 0.0
    finished = sum(v for k, v in values.items() if k.startswith("vllm:request_success_total"))
    ttft = values[f"vllm:time_to_first_token_seconds_count{{{label}}}"]
    assert ttft >= 1 and finished >= ttft  # every request that got a token was counted when it ended
    assert values[f'vllm:time_to_first_token_seconds_bucket{{{label},le="+Inf"}}'] == ttft


def log_softmax_rows(served, ids):
    """float64 log-probabilities [S, V] of an uncached forward over ids (the independent check of logprobs)."""
    logits = served.generator.model(Tensor(np.array([ids], np.int32))).asnumpy()[0].astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.mark.slow
def test_completions_logprobs_echo_n_and_a_list_of_prompts(served):
    """lm-eval's API mode: echo + logprobs score a prompt's tokens; n copies and a list of prompts give a choice
    each, in order."""
    prompts = ["The capital of France is", "One two three"]
    body = requests.post(served.url + "/v1/completions", timeout=120, json={
        "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}).json()
    choices = body["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for number, prompt in enumerate(prompts):
        ids = list(served.tokenizer.encode(prompt))
        new = served.generator.generate([ids], max_new_tokens=3, do_sample=False)[0]
        reference = log_softmax_rows(served, ids + new)
        for choice in choices[2 * number:2 * number + 2]:
            assert choice["text"].startswith(prompt)
            logprobs = choice["logprobs"]
            values = logprobs["token_logprobs"]
            assert values[0] is None and len(values) == len(ids) + len(new)
            wanted = [reference[i - 1, token] for i, token in enumerate(ids + new) if i > 0]
            np.testing.assert_allclose(values[1:], wanted, atol=1e-4)
            assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
            for k, top in enumerate(logprobs["top_logprobs"][len(ids):]):  # generated tokens: the 2 most likely
                best = np.sort(reference[len(ids) - 1 + k])[::-1][:len(top)]
                assert 1 <= len(top) <= 2  # two tokens with the same text share a key
                np.testing.assert_allclose(sorted(top.values(), reverse=True), best, atol=1e-4)
    assert body["usage"]["prompt_tokens"] == sum(len(served.tokenizer.encode(p)) for p in prompts)
    # token ids instead of text (lm-eval's default): the same scores; one id list or a list of them
    ids = [list(served.tokenizer.encode(p)) for p in prompts]
    for prompt in (ids, ids[0]):
        again = requests.post(served.url + "/v1/completions", timeout=120, json={
            "prompt": prompt, "n": 2, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True}).json()
        assert [c["logprobs"]["token_logprobs"] for c in again["choices"]] == [
            c["logprobs"]["token_logprobs"] for c in choices[:len(again["choices"])]]
    refused = requests.post(served.url + "/v1/completions", timeout=30, json={
        "prompt": [5, served.config.vocab_size], "max_tokens": 1})
    assert refused.status_code == 400 and "outside the vocabulary" in refused.json()["error"]["message"]


@pytest.mark.slow
def test_chat_logprobs_and_the_first_streamed_chunk(served):
    messages = user("Name a colour.")
    reply = served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                    logprobs=True, top_logprobs=3, extra_body={"top_k": -1})
    content = reply.choices[0].logprobs.content
    prompt = build_chat_input(served.config, served.tokenizer.encode, messages, max_new_tokens=4)
    new = served.generator.generate([prompt], max_new_tokens=4, do_sample=False,
                                    stop_token_ids=[served.config.user_token_id])[0]
    reference = log_softmax_rows(served, prompt + new)
    assert len(content) == len(new)
    for i, (item, token) in enumerate(zip(content, new)):
        assert item.logprob == pytest.approx(reference[len(prompt) - 1 + i, token], abs=1e-4)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
    chunks = list(served.client().chat.completions.create(model=MODEL, messages=messages, max_tokens=4,
                                                          temperature=0, stream=True, n=2))
    firsts = {}
    for chunk in chunks:
        for choice in chunk.choices:
            firsts.setdefault(choice.index, choice.delta)
    assert sorted(firsts) == [0, 1] and all(delta.role == "assistant" for delta in firsts.values())


@pytest.mark.slow
def test_bench_serve_drives_concurrent_streaming_clients(served):
    code, out, err = call_script(os.path.join(REPO, "example", "bench_serve.py"), [
        "--url", served.url, "--clients", "3", "--requests", "1", "--prompt_tokens", "6", "--output_tokens", "4"])
    ms.set_context(mode=ms.GRAPH_MODE)  # call_script leaves PyNative; the module's server compiled in GRAPH mode
    assert code == 0, err
    assert out.startswith("CPU: ") and "failed request" not in out, out
    row = [line.split() for line in out.splitlines() if line.split()[:1] == ["3"]][0]
    assert float(row[1]) > 0 and row[2].endswith("s")  # output tokens/s, TTFT p50


@pytest.mark.slow
def test_bench_serve_builds_and_serves_a_random_model_whose_every_id_decodes(tmp_path):
    """--random S: a random model directory with the full 125,696-id vocabulary, built once under
    ~/.cache/baichuan2/bench (HOME points into tmp_path here), nothing written to the current directory."""
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    from baichuan2.kernels import cache_dir  # the compiled kernels stay where they are (a compile takes minutes)
    env = dict(os.environ, HOME=str(home), BAICHUAN_KERNEL_CACHE=cache_dir())
    done = subprocess.run([PYTHON, os.path.join(REPO, "example", "bench_serve.py"), "--random", "S", "--weights",
                           "int4", "--clients", "2", "--requests", "1", "--prompt_tokens", "12", "--output_tokens",
                           "8", "--port", str(free_port())], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "building the random S int4 model directory" in done.stdout and "failed request" not in done.stdout
    row = [line.split() for line in done.stdout.splitlines() if line.split()[:1] == ["2"]][0]
    assert float(row[1]) > 0 and int(row[6]) >= 12  # output tokens/s; prompt tokens the server counted
    assert os.listdir(cwd) == []
    model_dir = home / ".cache" / "baichuan2" / "bench" / "random-S-int4"
    with open(model_dir / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["vocab_size"] == 125696 and config["quantization_config"]["bits"] == 4
    tokenizer = BaichuanTokenizer.from_pretrained(str(model_dir))
    assert len(tokenizer) == config["vocab_size"]
    # every id the head can emit has text of its own (SentencePiece directly: the tokenizer's decode per id is ~20x
    # slower; the served requests above went through it)
    texts = [tokenizer.sp_model.decode([i]) for i in range(3, config["vocab_size"])]
    assert all(texts) and len(set(texts)) == len(texts)
    assert [tokenizer.decode([i]) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    code, _, err = call_script(os.path.join(REPO, "example", "bench_serve.py"), [
        "--model_dir", str(model_dir), "--weights", "int8"])
    assert code == 2 and "--weights and --dir go with --random" in err


@pytest.mark.slow
def test_speculative_serving_gives_the_same_text_and_counts_drafts(served):
    app = create_app(served.generator, tokenizer=served.tokenizer, model_name=MODEL, kv_cache_dtype="float32",
                     num_speculative_tokens=4)
    def complete(url, prompt):
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
        return requests.post(url + "/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
    first = "Tell me about the weather."
    prompt = first + complete(served.url, first) + first
    plain = complete(served.url, prompt)
    with running(app) as url:
        got = complete(url, prompt)
        metrics = requests.get(url + "/metrics", timeout=10).text
    assert got == plain
    drafted = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_draft_tokens_total")]
    # (whether this tiny random model's output repeats enough to draft is up to it: the engine's tests check that)
    assert drafted and float(drafted[0].rsplit(" ", 1)[1]) == app.state.engine.draft_tokens


def test_a_full_queue_answers_429(served, monkeypatch):
    app = create_app(served.generator, tokenizer=served.tokenizer, model_name=MODEL, max_queue=2)
    monkeypatch.setattr(app.state.worker, "waiting", lambda: 2)
    with running(app) as url:
        response = requests.post(url + "/v1/chat/completions", json={"messages": user("hi"), "max_tokens": 2},
                                 timeout=30)
    assert response.status_code == 429 and response.json()["error"]["code"] == "queue_full"


BAD_REQUESTS = [
    ("bad JSON", "/v1/chat/completions", b'{"messages": [', 400),
    ("missing messages", "/v1/chat/completions", {"model": MODEL}, 400),
    ("messages not a list", "/v1/chat/completions", {"messages": "hello"}, 400),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 400),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ("content not a string", "/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400),
    ("max_tokens a string", "/v1/chat/completions", {"messages": user("hi"), "max_tokens": "ten"}, 400),
    ("negative max_tokens", "/v1/chat/completions", {"messages": user("hi"), "max_tokens": -3}, 400),
    ("temperature out of range", "/v1/chat/completions", {"messages": user("hi"), "temperature": 7.5}, 400),
    ("top_p zero", "/v1/chat/completions", {"messages": user("hi"), "top_p": 0}, 400),
    ("n over 16", "/v1/chat/completions", {"messages": user("hi"), "n": 17}, 400),
    ("tools", "/v1/chat/completions", {"messages": user("hi"), "tools": [{"type": "function"}]}, 400),
    ("json response_format", "/v1/chat/completions",
     {"messages": user("hi"), "response_format": {"type": "json_object"}}, 400),
    ("logit_bias", "/v1/completions", {"prompt": "a", "logit_bias": {"5": 10}}, 400),
    ("misspelt field", "/v1/completions", {"prompt": "a", "max_token": 3}, 400),
    ("top_logprobs without logprobs", "/v1/chat/completions", {"messages": user("hi"), "top_logprobs": 2}, 400),
    ("legacy logprobs over 5", "/v1/completions", {"prompt": "a", "logprobs": 6}, 400),
    ("stream not a bool", "/v1/chat/completions", {"messages": user("hi"), "stream": "yes"}, 400),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-9", "messages": user("hi")}, 404),
    ("prompt over the context", "/v1/chat/completions", {"messages": user("word " * 200)}, 400),
    ("max_tokens over the context", "/v1/chat/completions", {"messages": user("hi"), "max_tokens": 500}, 400),
    ("system message last", "/v1/chat/completions",
     {"messages": user("hi") + [{"role": "system", "content": "late"}]}, 400),
    ("completion without prompt", "/v1/completions", {"max_tokens": 4}, 400),
    ("empty completion prompt", "/v1/completions", {"prompt": ""}, 400),
    ("five stop strings", "/v1/completions", {"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ("negative seed", "/v1/chat/completions", {"messages": user("hi"), "temperature": 0.5, "seed": -1}, 400),
    ("infinite repetition_penalty", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": Infinity}', 400),
    ("NaN temperature", "/v1/completions", b'{"prompt": "a", "temperature": NaN}', 400),
    ("unknown path", "/v1/embeddings", {"input": "hi"}, 404),
]


@pytest.mark.slow
def test_malformed_requests_get_openai_errors_and_the_server_keeps_serving(served):
    for name, path, body, status in BAD_REQUESTS:
        if isinstance(body, bytes):
            response = requests.post(served.url + path, data=body, headers={"Content-Type": "application/json"},
                                     timeout=30)
        else:
            response = requests.post(served.url + path, json=body, timeout=30)
        assert response.status_code == status, f"{name}: {response.status_code} {response.text}"
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], name
    reply = served.client().chat.completions.create(model=MODEL, messages=user("still there?"), max_tokens=6,
                                                    temperature=0)
    assert reply.choices[0].message.content == served.direct_chat(user("still there?"), 6)


def test_a_client_leaving_mid_stream_frees_the_server(served, monkeypatch):
    worker, engine = served.app.state.worker, served.app.state.engine
    real_step = engine.step
    generated_before = engine.generated_tokens

    def slow_step():  # 50 ms a token: the client surely leaves before 40 tokens are done
        time.sleep(0.05)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    with requests.post(served.url + "/v1/chat/completions", stream=True, timeout=60,
                       json={"messages": user("a long answer please"), "max_tokens": 40, "temperature": 0,
                             "stream": True}) as response:
        first = next(response.iter_lines(chunk_size=1, decode_unicode=True))
        assert first.startswith("data: ")
    # the abandoned request must not hold the model: it is aborted, its blocks freed, and the worker goes idle
    deadline = time.time() + 30
    while worker.pending or worker.busy:
        assert time.time() < deadline, "the worker kept generating for a client that left"
        time.sleep(0.05)
    generated = engine.generated_tokens - generated_before
    assert generated < 40, f"generation ran to the end ({generated} tokens) for a client that left"
    assert engine.pool.active_hits([]) == 0 and all(refs == 0 for refs in engine.pool.refs)
    monkeypatch.undo()
    reply = served.client().chat.completions.create(model=MODEL, messages=user("next"), max_tokens=4, temperature=0)
    assert reply.choices[0].message.content == served.direct_chat(user("next"), 4)


@pytest.mark.slow
def test_chat_page_in_headless_chromium(served, tmp_path, monkeypatch):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the browser test needs Debian's chromium at {CHROMIUM}: run scripts/setup_env.sh as root "
                    f"or `apt-get install chromium`")
    from playwright.sync_api import sync_playwright  # pylint: disable=import-outside-toplevel

    first, second = "hello there", "and what next?"
    expected_first = served.direct_chat(user(first), 8)
    expected_second = served.direct_chat(user(first) + [{"role": "assistant", "content": expected_first}]
                                         + user(second), 8)
    profile = tmp_path / "profile"
    profile.mkdir()
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"]
    with sync_playwright() as p:
        # a persistent context is how Playwright takes an explicit (new, empty) --user-data-dir
        context = p.chromium.launch_persistent_context(str(profile), executable_path=CHROMIUM, headless=True,
                                                       args=args, viewport={"width": 900, "height": 600})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(served.url + "/", timeout=30000)
            page.wait_for_selector(f"#model:text('{MODEL}')", timeout=30000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "8")
            for turn, (text, expected) in enumerate([(first, expected_first), (second, expected_second)]):
                page.fill("#input", text)
                page.click("#send")
                reply = page.locator(".msg.assistant[data-done='1']").nth(turn)  # data-done: stream ended
                reply.wait_for(timeout=60000)
                assert reply.text_content() == expected
            shot = tmp_path / "chat.png"
            page.screenshot(path=str(shot))
            if os.environ.get("SERVER_SCREENSHOT"):  # to look at it by hand
                page.screenshot(path=os.environ["SERVER_SCREENSHOT"])
            page.click("#clear")
            assert page.locator(".msg").count() == 0
            # Stop: slow generation down, stop after the first piece; the page is ready for the next message
            full = served.direct_chat(user("a long one"), 30)
            assert len(full) > 10, "the fixture should give a long reply"
            engine = served.app.state.engine
            real_step = engine.step
            monkeypatch.setattr(engine, "step", lambda: time.sleep(0.1) or real_step())
            page.fill("#max_tokens", "30")
            page.fill("#input", "a long one")
            page.click("#send")
            page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 0",
                                   timeout=60000)
            page.click("#stop", timeout=5000)
            page.locator(".msg.assistant[data-done='1']").wait_for(timeout=10000)
            assert page.is_enabled("#send") and not page.is_enabled("#stop")
            stopped = page.locator(".msg.assistant").text_content()
            assert full.startswith(stopped) and 0 < len(stopped) < len(full), (stopped, full)
            monkeypatch.undo()
        finally:
            context.close()
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


# ---------------------------------------------------------------------------------------------- ecosystem fields
def submitted_jobs(served, monkeypatch):
    """Records every Job the server queues (the worker still runs them)."""
    worker, jobs = served.app.state.worker, []
    real_submit = worker.submit

    def record(job):
        jobs.append(job)
        real_submit(job)

    monkeypatch.setattr(worker, "submit", record)
    return jobs


def test_left_out_sampling_fields_come_from_generation_config(served, monkeypatch):
    with open(os.path.join(served.config.name_or_path, "generation_config.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["temperature"] != 1.0 and saved["top_k"] > 0  # the fixture is a Chat model: Chat's defaults
    jobs = submitted_jobs(served, monkeypatch)
    client = served.client()
    client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3)
    client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=3, temperature=0.5, top_p=0.5)
    client.chat.completions.create(model=MODEL, messages=user("hi"))
    defaults, explicit, no_max = jobs
    assert (defaults.temperature, defaults.top_p, defaults.top_k, defaults.repetition_penalty) == (
        saved["temperature"], saved["top_p"], saved["top_k"], saved["repetition_penalty"])
    assert (explicit.temperature, explicit.top_p, explicit.top_k) == (0.5, 0.5, saved["top_k"])
    # max_new_tokens of the file, cut to what the context leaves after the prompt
    assert no_max.max_tokens == min(saved["max_new_tokens"], served.config.max_context - len(no_max.prompt))
    # greedy stays plain greedy (the file's repetition_penalty belongs to sampling): the reply is direct greedy's
    reply = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=6, temperature=0)
    assert jobs[-1].repetition_penalty == 1.0
    assert reply.choices[0].message.content == served.direct_chat(user("hi"), 6)


def test_request_settings_of_a_greedy_or_missing_file():
    from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
    from baichuan2.chat_format import BASE_DEFAULTS  # pylint: disable=import-outside-toplevel
    from baichuan2.server import CompletionRequest, request_settings  # pylint: disable=import-outside-toplevel
    base = SimpleNamespace(chat_format=None, eos_token_id=2)
    plain = request_settings(base, {}, CompletionRequest(prompt="a"), chat=False)
    assert plain["do_sample"] is False and plain["max_new_tokens"] == BASE_DEFAULTS["max_new_tokens"]
    greedy_file = {"do_sample": False, "temperature": 0.7}
    assert request_settings(base, greedy_file, CompletionRequest(prompt="a"), chat=False)["do_sample"] is False
    sampled = request_settings(base, greedy_file, CompletionRequest(prompt="a", temperature=0.5), chat=False)
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.5


def test_content_as_a_list_of_text_parts(served):
    parts = [{"type": "text", "text": "What is the capital"}, {"type": "text", "text": "of France?"}]
    reply = served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == served.direct_chat(user("What is the capital\nof France?"), 8)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    response = requests.post(served.url + "/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts + [image]}]})
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'image_url'" in error["message"] and error["param"] == "messages.1.content", error


def test_stream_options_include_usage_adds_a_last_usage_chunk(served):
    client = served.client()
    messages = user("count to three")
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == plain.choices[0].message.content
    # without it the stream ends with the finish chunk (no usage), and on /v1/completions it works the same
    assert list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, temperature=0,
                                               stream=True))[-1].choices[0].finish_reason is not None
    legacy = list(client.completions.create(model=MODEL, prompt="Once", max_tokens=3, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert legacy[-1].choices == [] and legacy[-1].usage.prompt_tokens == len(served.tokenizer.encode("Once"))
    response = requests.post(served.url + "/v1/chat/completions", timeout=30, json={
        "messages": messages, "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


def test_context_length_error_names_the_right_numbers(served):
    prompt = build_chat_input(served.config, served.tokenizer.encode, user("hi"), max_new_tokens=1)
    response = requests.post(served.url + "/v1/chat/completions", timeout=30,
                             json={"messages": user("hi"), "max_tokens": 10 ** 9})
    assert response.status_code == 400
    error = response.json()["error"]
    context = served.config.max_context
    assert error["code"] == "context_length_exceeded" and error["param"] == "max_tokens"
    assert (f"maximum context length is {context} tokens" in error["message"]
            and f"({len(prompt)} prompt tokens + max_tokens {10 ** 9})" in error["message"]
            and f"at most {context - len(prompt)}" in error["message"]), error["message"]


def test_api_key_is_checked_as_a_bearer_token(served):
    app = create_app(served.generator, tokenizer=served.tokenizer, model_name=MODEL, api_key="s3cret")
    with running(app) as url:
        assert requests.get(url + "/health", timeout=10).status_code == 200  # open, as in vLLM
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = requests.get(url + "/v1/models", headers=headers, timeout=10)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", headers
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == [MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=user("hi"), max_tokens=4, temperature=0)
        assert reply.choices[0].message.content == served.direct_chat(user("hi"), 4)


def test_serve_py_takes_the_api_key_from_its_flag_or_the_environment(monkeypatch):
    """serve.py's command line hands create_app the key of --api-key / --api_key, else of $BAICHUAN_API_KEY
    (the device set-up and the model load are stubbed: only the command line runs)."""
    from baichuan2 import runtime, server
    keys = []

    def create_app_stub(model_dir, **kwargs):
        keys.append(kwargs["api_key"])
        raise ValueError("no model loaded in this test")
    monkeypatch.setattr(runtime, "setup_inference", lambda *args, **kwargs: None)
    monkeypatch.setattr(server, "create_app", create_app_stub)
    serve = os.path.join(REPO, "example", "serve.py")
    monkeypatch.delenv("BAICHUAN_API_KEY", raising=False)
    for flags in ([], ["--api-key", "k1"]):
        code, _, err = call_script(serve, ["--model_dir", "m", *flags])
        assert code == 2 and "no model loaded in this test" in err, err
    monkeypatch.setenv("BAICHUAN_API_KEY", "k2")
    for flags in ([], ["--api_key", "k3"]):
        code, _, err = call_script(serve, ["--model_dir", "m", *flags])
        assert code == 2 and "no model loaded in this test" in err, err
    assert keys == [None, "k1", "k2", "k3"]
