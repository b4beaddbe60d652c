"""Server faults of issue 39: a huge body, a prompt too long to tokenize, slow tokenizing, clients that never finish
their request, a failing generation. Each must leave the server answering others (here: /health while the fault is
in progress) and, afterwards, the same greedy request with the same text.

One server for the module: the tiny random model (PyNative) behind uvicorn with the read deadline of serve.py.
"""
import logging
import socket
import threading

import mindspore as ms
import pytest
import requests

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.generation import Generator
from baichuan2.http_limits import read_deadline_protocol
from baichuan2.modeling_baichuan import BaichuanForCausalLM
from baichuan2.server import create_app
from baichuan2.tokenization_baichuan import BaichuanTokenizer
from helpers import REPO, running

READ_TIMEOUT = 1.0
MAX_BYTES = 64 << 10
GREEDY = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, "temperature": 0}


class Served:
    def __init__(self, url, app, tokenizer, generator):
        self.url, self.app, self.tokenizer, self.generator = url, app, tokenizer, generator
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1])

    def greedy(self):
        response = requests.post(self.url + "/v1/chat/completions", json=GREEDY, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    def healthy(self):
        return requests.get(self.url + "/health", timeout=10).json()["status"] == "ok"

    def raw(self):
        return socket.create_connection((self.host, self.port), timeout=20)


@pytest.fixture(scope="module")
def served():
    ms.set_seed(0)
    generator = Generator(BaichuanForCausalLM(BaichuanConfig.from_preset("tiny")))
    tokenizer = BaichuanTokenizer(f"{REPO}/dataset/tokenizer.model")
    app = create_app(generator, tokenizer=tokenizer, model_name="tiny", max_request_bytes=MAX_BYTES)
    with running(app, http=read_deadline_protocol(READ_TIMEOUT)) as url:
        s = Served(url, app, tokenizer, generator)
        s.before = s.greedy()
        yield s


def read_all(sock):
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def test_a_body_over_the_limit_gets_413_before_it_is_read(served):
    """20 MB declared, 64 KiB sent: the 413 comes back without the rest, and /health answers meanwhile."""
    with served.raw() as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 20000000\r\n\r\n" + b" " * MAX_BYTES)
        assert served.healthy()
        reply = read_all(sock)  # the server closes the connection after its answer
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 "), reply[:300]
    assert b"20000000 bytes" in body and f"at most {MAX_BYTES} bytes".encode() in body and b"request_too_large" in body
    # a body without a declared length (chunked) is counted as it arrives
    response = requests.post(served.url + "/v1/completions", data=(b"x" * 4096 for _ in range(40)),
                             headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    # within the limit, chunked or not, the request goes through
    small = b'{"prompt": "hi", "max_tokens": 2, "temperature": 0}'
    response = requests.post(served.url + "/v1/completions", data=iter([small[:10], small[10:]]), timeout=60,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text


def test_a_prompt_longer_than_the_context_can_hold_is_refused_before_tokenizing(served, monkeypatch):
    encoded = []
    real = served.tokenizer.encode
    monkeypatch.setattr(served.tokenizer, "encode", lambda text, *a, **k: encoded.append(len(text)) or real(text))
    context = served.generator.config.max_context
    longest = max(len(p) for p in served.tokenizer.get_vocab())
    text = "a" * (context * longest + 1)  # under the body limit, more characters than any fitting prompt has
    for path, body in (("/v1/completions", {"prompt": text}), ("/v1/chat/completions",
                                                               {"messages": [{"role": "user", "content": text}]})):
        response = requests.post(served.url + path, json=body, timeout=30)
        error = response.json()["error"]
        assert response.status_code == 400 and error["code"] == "context_length_exceeded", response.text
        assert f"{len(text)} characters" in error["message"], error["message"]
    assert encoded == []  # never tokenized


def test_tokenizing_does_not_block_other_clients(served, monkeypatch):
    """encode waits until /health has answered: on the event loop it would wait forever (and /health with it)."""
    health_answered, entered = threading.Event(), threading.Event()
    real = served.tokenizer.encode

    def waiting_encode(text, *args, **kwargs):
        entered.set()
        assert health_answered.wait(30), "/health was not answered while a prompt was being tokenized"
        return real(text, *args, **kwargs)
    monkeypatch.setattr(served.tokenizer, "encode", waiting_encode)
    result = {}
    thread = threading.Thread(target=lambda: result.update(r=requests.post(
        served.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "temperature": 0}, timeout=60)))
    thread.start()
    assert entered.wait(30)
    assert served.healthy()
    health_answered.set()
    thread.join(60)
    assert result["r"].status_code == 200, result["r"].text


def test_a_client_that_never_finishes_its_request_is_disconnected(served):
    with served.raw() as headers_only, served.raw() as half_body, served.raw() as silent:
        headers_only.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # the blank line never comes
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        assert served.healthy()  # meanwhile
        assert read_all(headers_only).startswith(b"HTTP/1.1 408 ")
        assert b" 200 " not in read_all(half_body)  # closed by the server (sock timeout 20 s >> READ_TIMEOUT)
        assert read_all(silent).startswith(b"HTTP/1.1 408 ")  # connected, never sent a byte


def test_a_failed_generation_is_a_500_logged_with_its_traceback(served, monkeypatch):
    class Records(logging.Handler):
        def __init__(self):
            super().__init__()
            self.texts = []

        def emit(self, record):
            self.texts.append(logging.Formatter().format(record))

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory in the test")
    monkeypatch.setattr(served.app.state.engine, "step", broken)
    records, log = Records(), logging.getLogger("uvicorn.error")
    log.addHandler(records)
    try:
        response = requests.post(served.url + "/v1/chat/completions", json=GREEDY, timeout=60)
    finally:
        log.removeHandler(records)
    assert response.status_code == 500 and "out of memory in the test" in response.json()["error"]["message"]
    logged = "\n".join(records.texts)
    assert "Traceback" in logged and "RuntimeError: out of memory in the test" in logged, logged
    assert "POST /v1/chat/completions -> 500: generation failed: RuntimeError: out of memory in the test" in logged


def test_after_every_fault_the_same_greedy_request_gives_the_same_text(served):
    """Runs last in this module: the faults above left the server as it was."""
    assert served.healthy() and served.greedy() == served.before
