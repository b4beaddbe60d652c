"""Serving benchmark: N concurrent OpenAI-API clients against a server, side by side with any other server.

    python example/bench_serve.py --model_dir DIR --clients 4 8                  # starts our server on DIR
    python example/bench_serve.py --url http://127.0.0.1:8080 --clients 4 8     # any OpenAI-compatible server
                                                                                # (llama-server -np N, vLLM, ...)
    python example/bench_serve.py --random 7B --weights int4 --clients 4 8      # a random 7B-shaped model

--random 7B|13B|S builds a model directory of that shape with random weights stored as --weights (int4, int8,
bfloat16 or float32; random_model.py, written as every model directory is: model_dir.write_servable_dir) once, in
~/.cache/baichuan2/bench/random-<shape>-<weights>/ (or --dir D), and serves it. 7B and 13B are Baichuan2-7B / -13B
(ALiBi); S is a 2-layer, 256-wide model with the same 125,696-row vocabulary, for a quick check. Its tokenizer is a
SentencePiece model of synthetic_vocab.py's pieces (the ones the random GGUF for llama.cpp carries), one per id,
so every id random weights emit decodes to text. A 7B int4 directory is 4.0 GiB; building it takes ~2 minutes.

Each client sends --requests streamed /v1/completions requests one after another: a prompt of about
--prompt_tokens tokens (random words; fresh per request, so no server can reuse an earlier prompt, unless
--shared_prefix_tokens puts the same text at the start of every prompt, as a system prompt would), greedy, exactly
--output_tokens new tokens (`ignore_eos`, which vLLM and llama-server take as well). Printed first: the CPU model; then
per client count: aggregate output tokens/s (all clients' output tokens over the wall time from the first request to
the last reply), time to first token p50 / p95, inter-token latency p50 / p95 (the time between a request's streamed
chunks), prompt tokens as the server counted them, and for our server the peak RSS of its process and the most key/value
cache blocks in use (sampled from /metrics).

The machine may be shared: compare servers in one run, on a quiet machine, before quoting numbers.
"""
import argparse
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import requests

from baichuan2.runtime import cpu_model
from baichuan2.synthetic_vocab import sentencepiece_model

HERE = os.path.dirname(os.path.abspath(__file__))
BENCH_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "baichuan2", "bench")
RANDOM_WEIGHTS = ("int4", "int4_asym", "int8", "bfloat16", "float32")
RANDOM_VOCAB = 125696  # every --random shape keeps Baichuan2's vocabulary size (the 7B preset's)
# --random shapes: config fields over the Baichuan2-7B preset (configuration_baichuan.PRESETS)
RANDOM_SHAPES = {  # shape name: (preset, fields over it)
    "7B": ("baichuan2_7b", {}),
    "13B": ("baichuan2_13b", {}),
    "S": ("baichuan2_7b", dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                               max_position_embeddings=1024, model_max_length=1024)),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="an OpenAI-compatible server already running")
    where.add_argument("--model_dir", help="start our server (example/serve.py) on this model directory")
    where.add_argument("--random", choices=list(RANDOM_SHAPES),
                       help="start our server on a random model of this shape (built once, then reused)")
    parser.add_argument("--weights", choices=RANDOM_WEIGHTS, default=None,
                        help="--random: the stored format (default int4)")
    parser.add_argument("--dir", default=None,
                        help="--random: the model directory to build or reuse (default: under " + BENCH_CACHE + ")")
    parser.add_argument("--serve_args", default="", help="extra options for serve.py, e.g. '--kv_cache_dtype int8'")
    parser.add_argument("--clients", type=int, nargs="+", default=[4])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--output_tokens", type=int, default=128)
    parser.add_argument("--shared_prefix_tokens", type=int, default=0)
    parser.add_argument("--llama_server", metavar="BIN_DIR",
                        help="also start llama.cpp's llama-server from this bin directory (scripts/build_llama_cpp.sh"
                             " prints it) on --gguf, -np the most clients, and run the same loads against it after ours")
    parser.add_argument("--gguf", help="with --llama_server: the GGUF it serves (example/make_random_gguf.py makes "
                                       "one of the 7B shape)")
    parser.add_argument("--model", default=None, help="the model id to send (default: the server's first)")
    parser.add_argument("--port", type=int, default=8123, help="port for the server this script starts")
    parser.add_argument("--timeout", type=float, default=3600)
    return parser.parse_args(argv)


class BenchError(Exception):
    """A problem with the benchmark's input, reported as one line (exit status 2)."""


def random_model_dir(shape, weights, directory=None):
    """The random model directory of --random `shape` in format `weights`: `directory` (default under BENCH_CACHE),
    built when it is not there yet (in a child process, so the benchmark holds none of its memory)."""
    directory = os.path.abspath(directory or os.path.join(BENCH_CACHE, f"random-{shape}-{weights}"))
    if os.path.isfile(os.path.join(directory, "config.json")):
        return directory
    if os.path.exists(directory):
        raise BenchError(f"--dir {directory} exists but is no model directory (no config.json): remove it or "
                         "name another")
    print(f"building the random {shape} {weights} model directory {directory} (once)", flush=True)
    start = time.perf_counter()
    # the tokenizer here, before any MindSpore import: MindSpore switches protobuf to its pure-Python
    # implementation, which takes ~15 s for these 125,696 pieces against ~1 s
    with tempfile.TemporaryDirectory(prefix="bench_tokenizer_") as tokenizer_dir:
        with open(os.path.join(tokenizer_dir, "tokenizer.model"), "wb") as f:
            f.write(sentencepiece_model(RANDOM_VOCAB))
        child = multiprocessing.get_context("spawn").Process(target=build_random_dir,
                                                             args=(shape, weights, directory, tokenizer_dir))
        child.start()
        child.join()
    if child.exitcode != 0:
        raise BenchError(f"building {directory} failed (exit status {child.exitcode}; its error is above)")
    print(f"built {directory} in {time.perf_counter() - start:.0f} s", flush=True)
    return directory


def build_random_dir(shape, weights, directory, tokenizer_dir):
    """Child process of random_model_dir: random weights (random_model.py) and the tokenizer in `tokenizer_dir`,
    written as a servable model directory (model_dir.write_servable_dir: atomic, a crash leaves nothing behind)."""
    from baichuan2 import runtime  # pylint: disable=import-outside-toplevel
    from baichuan2.model_dir import write_servable_dir  # pylint: disable=import-outside-toplevel
    from baichuan2.random_model import build_random_model  # pylint: disable=import-outside-toplevel
    rt = runtime.setup_inference("CPU", mode="pynative", prog="bench_serve.py")
    preset, fields = RANDOM_SHAPES[shape]
    model = build_random_model(fields, weights, rt.compute_dtype, preset=preset)
    if model.config.vocab_size != RANDOM_VOCAB:  # the tokenizer was made for RANDOM_VOCAB ids
        raise ValueError(f"the {shape} model has {model.config.vocab_size} ids, its tokenizer {RANDOM_VOCAB}")
    write_servable_dir(directory, model.config, model=model, tokenizer_dir=tokenizer_dir)


def words(count, rng):
    """About `count` tokens of text: short random lowercase words (about one token each with most tokenizers)."""
    return " ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 4)))
                    for _ in range(count))


def percentile(values, q):
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def stream_one(url, model, prompt, args):
    """(time to first token, [inter-chunk gaps], output tokens, prompt tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": args.output_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, last, gaps, chunks, usage = None, None, [], 0, None
    with requests.post(url + "/v1/completions", json=body, stream=True, timeout=args.timeout) as response:
        if not response.ok:
            raise RuntimeError(f"{response.status_code}: {response.text[:300]}")
        for line in response.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if event.get("usage"):
                usage = event["usage"]
            if not any(choice.get("text") for choice in event.get("choices") or []):
                continue
            now = time.perf_counter()
            if first is None:
                first = now - start
            else:
                gaps.append(now - last)
            last = now
            chunks += 1
    output = usage["completion_tokens"] if usage else chunks
    return first, gaps, output, usage["prompt_tokens"] if usage else None


class MetricsSampler(threading.Thread):
    """Samples our server's /metrics (cache blocks in use) and its process's RSS while the clients run."""

    def __init__(self, url, pid):
        super().__init__(daemon=True)
        self.url, self.pid, self.stop = url, pid, threading.Event()
        self.blocks, self.rss = 0, 0

    def run(self):
        while not self.stop.wait(0.25):
            try:
                text = requests.get(self.url + "/metrics", timeout=5).text
                for line in text.splitlines():
                    if line.startswith("baichuan2:kv_cache_blocks") and 'state="in_use"' in line:
                        self.blocks = max(self.blocks, int(float(line.rsplit(" ", 1)[1])))
            except requests.RequestException:
                pass
            if self.pid:
                try:
                    with open(f"/proc/{self.pid}/status", encoding="ascii") as f:
                        for line in f:
                            if line.startswith("VmHWM:"):
                                self.rss = max(self.rss, int(line.split()[1]) * 1024)
                except OSError:
                    pass


def run_clients(url, model, clients, args, rng):
    prefix = words(args.shared_prefix_tokens, rng) + " " if args.shared_prefix_tokens else ""
    prompts = [[prefix + words(args.prompt_tokens - args.shared_prefix_tokens, rng) for _ in range(args.requests)]
               for _ in range(clients)]
    results, errors = [], []

    def client(mine):
        for prompt in mine:
            try:
                results.append(stream_one(url, model, prompt, args))
            except Exception as exc:  # pylint: disable=broad-except  # reported below, the others go on
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, results, errors


def start_server(args):
    command = [sys.executable, os.path.join(HERE, "serve.py"), "--model_dir", args.model_dir, "--port",
               str(args.port)] + args.serve_args.split()
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return server, wait_healthy(server, f"http://127.0.0.1:{args.port}")


def start_llama_server(args):
    """llama-server on --gguf with a slot per client (-np), each slot's context room for one request, the same
    thread count as ours; (process, url)."""
    from baichuan2.llama_cpp import LlamaCppError, tool  # pylint: disable=import-outside-toplevel
    try:
        binary = tool(args.llama_server, "llama-server")
    except LlamaCppError as e:
        sys.exit(f"bench_serve.py: error: {e}")
    slots = max(args.clients)
    per_slot = 2 * args.prompt_tokens + args.output_tokens + 64  # a word can take more than one token
    port = args.port + 1
    command = [binary, "-m", args.gguf, "--port", str(port), "-np", str(slots), "-c", str(slots * per_slot),
               "-t", str(os.cpu_count()), "--no-webui"]
    log = tempfile.TemporaryFile(mode="w+")  # llama-server logs every request: a pipe nobody reads would fill
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    server.log = log
    return server, wait_healthy(server, f"http://127.0.0.1:{port}")


def _output(server):
    if getattr(server, "log", None) is not None:
        server.log.seek(0)
        return server.log.read()[-2000:]
    return server.stdout.read()[-2000:]


def wait_healthy(server, url):
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"bench_serve.py: error: the server exited: {_output(server)}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return url
        except requests.RequestException:
            pass
        time.sleep(1)
    server.kill()
    sys.exit("bench_serve.py: error: the server did not answer /health within 10 minutes")


def measure(url, pid, label, args):
    """Runs every --clients load against one server; prints a row each and returns them."""
    model = args.model or requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
    rng = random.Random(0)  # the same prompts for every server measured
    run_clients(url, model, 1, argparse.Namespace(**dict(vars(args), requests=1, output_tokens=4)), rng)  # warm
    print(f"server {url} ({label}), model {model}; prompts ~{args.prompt_tokens} tokens "
          f"({args.shared_prefix_tokens} shared), {args.output_tokens} output tokens, {args.requests} requests "
          "per client")
    print(f"{'clients':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} "
          f"{'prompt tok':>10} {'peak RSS':>9} {'blocks':>6}", flush=True)
    rows = {}
    for clients in args.clients:
        sampler = MetricsSampler(url, pid)
        sampler.start()
        wall, results, errors = run_clients(url, model, clients, args, rng)
        sampler.stop.set()
        sampler.join()
        ttft = [r[0] for r in results if r[0] is not None]
        gaps = [g for r in results for g in r[1]]
        prompt_tokens = [r[3] for r in results if r[3]]
        row = rows[clients] = {"rate": sum(r[2] for r in results) / wall, "ttft50": percentile(ttft, 50),
                               "ttft95": percentile(ttft, 95)}
        rss = f"{sampler.rss / 2 ** 30:.2f}G" if sampler.rss else "-"
        print(f"{clients:>7} {row['rate']:>9.2f} {row['ttft50']:>8.2f}s {row['ttft95']:>8.2f}s "
              f"{percentile(gaps, 50) * 1e3:>6.0f}ms {percentile(gaps, 95) * 1e3:>6.0f}ms "
              f"{statistics.mean(prompt_tokens) if prompt_tokens else float('nan'):>10.0f} {rss:>9} "
              f"{sampler.blocks or '-':>6}", flush=True)
        for error in errors[:3]:
            print(f"  failed request: {error}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    if bool(args.llama_server) != bool(args.gguf) or (args.llama_server and not os.path.isfile(args.gguf)):
        print("bench_serve.py: error: --llama_server and --gguf go together, --gguf an existing file",
              file=sys.stderr)
        return 2
    if min(args.clients) < 1 or args.requests < 1 or args.output_tokens < 1 or \
            not 0 <= args.shared_prefix_tokens < args.prompt_tokens:
        print("bench_serve.py: error: --clients, --requests, --output_tokens must be >= 1 and "
              "--shared_prefix_tokens below --prompt_tokens", file=sys.stderr)
        return 2
    if (args.dir or args.weights) and not args.random:
        print("bench_serve.py: error: --weights and --dir go with --random (a model directory has its own format)",
              file=sys.stderr)
        return 2
    print(f"CPU: {cpu_model()}")
    if args.random:
        try:
            args.model_dir = random_model_dir(args.random, args.weights or "int4", args.dir)
        except BenchError as e:
            print(f"bench_serve.py: error: {e}", file=sys.stderr)
            return 2
    server, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    try:
        ours = measure(url, server.pid if server else None, "ours: " + args.model_dir if server else "given", args)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    if args.llama_server:
        llama, llama_url = start_llama_server(args)
        try:
            theirs = measure(llama_url, llama.pid, "llama.cpp llama-server: " + args.gguf, args)
        finally:
            llama.terminate()
            llama.wait(timeout=60)
        print("ours / llama-server: " + "; ".join(
            f"{c} clients: output tok/s {ours[c]['rate'] / theirs[c]['rate']:.2f}x, TTFT p50 "
            f"{ours[c]['ttft50'] / theirs[c]['ttft50']:.2f}x, p95 {ours[c]['ttft95'] / theirs[c]['ttft95']:.2f}x"
            for c in args.clients))
    return 0


if __name__ == "__main__":
    sys.exit(main())
