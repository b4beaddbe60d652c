"""Serving benchmark: N concurrent OpenAI-API clients against a server, side by side with any other server.

    python example/bench_serve.py --model_dir DIR --clients 4 8                  # starts our server on DIR
    python example/bench_serve.py --url http://127.0.0.1:8080 --clients 4 8     # any OpenAI-compatible server
                                                                                # (llama-server -np N, vLLM, ...)

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
import os
import random
import statistics
import subprocess
import sys
import threading
import time

import requests

from baichuan2.runtime import cpu_model

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="an OpenAI-compatible server already running")
    where.add_argument("--model_dir", help="start our server (example/serve.py) on this model directory")
    parser.add_argument("--serve_args", default="", help="extra options for serve.py, e.g. '--kv_cache_dtype int8'")
    parser.add_argument("--clients", type=int, nargs="+", default=[4])
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--prompt_tokens", type=int, default=256)
    parser.add_argument("--output_tokens", type=int, default=128)
    parser.add_argument("--shared_prefix_tokens", type=int, default=0)
    parser.add_argument("--model", default=None, help="the model id to send (default: the server's first)")
    parser.add_argument("--port", type=int, default=8123, help="port for the server this script starts")
    parser.add_argument("--timeout", type=float, default=3600)
    return parser.parse_args(argv)


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
    url = f"http://127.0.0.1:{args.port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if server.poll() is not None:
            sys.exit(f"bench_serve.py: error: the server exited: {server.stdout.read()[-2000:]}")
        try:
            if requests.get(url + "/health", timeout=2).ok:
                return server, url
        except requests.RequestException:
            time.sleep(1)
    server.kill()
    sys.exit("bench_serve.py: error: the server did not answer /health within 10 minutes")


def main(argv=None):
    args = parse_args(argv)
    if min(args.clients) < 1 or args.requests < 1 or args.output_tokens < 1 or \
            not 0 <= args.shared_prefix_tokens < args.prompt_tokens:
        print("bench_serve.py: error: --clients, --requests, --output_tokens must be >= 1 and "
              "--shared_prefix_tokens below --prompt_tokens", file=sys.stderr)
        return 2
    print(f"CPU: {cpu_model()}")
    server, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    try:
        model = args.model or requests.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        rng = random.Random(0)
        run_clients(url, model, 1, argparse.Namespace(**dict(vars(args), requests=1, output_tokens=4)), rng)  # warm
        print(f"server {url} ({'ours: ' + args.model_dir if server else 'given'}), model {model}; prompts ~"
              f"{args.prompt_tokens} tokens ({args.shared_prefix_tokens} shared), {args.output_tokens} output tokens, "
              f"{args.requests} requests per client")
        print(f"{'clients':>7} {'out tok/s':>9} {'TTFT p50':>9} {'TTFT p95':>9} {'ITL p50':>8} {'ITL p95':>8} "
              f"{'prompt tok':>10} {'peak RSS':>9} {'blocks':>6}")
        for clients in args.clients:
            sampler = MetricsSampler(url, server.pid if server else None)
            sampler.start()
            wall, results, errors = run_clients(url, model, clients, args, rng)
            sampler.stop.set()
            sampler.join()
            ttft = [r[0] for r in results if r[0] is not None]
            gaps = [g for r in results for g in r[1]]
            output = sum(r[2] for r in results)
            prompt_tokens = [r[3] for r in results if r[3]]
            rss = f"{sampler.rss / 2 ** 30:.2f}G" if sampler.rss else "-"
            print(f"{clients:>7} {output / wall:>9.2f} {percentile(ttft, 50):>8.2f}s {percentile(ttft, 95):>8.2f}s "
                  f"{percentile(gaps, 50) * 1e3:>6.0f}ms {percentile(gaps, 95) * 1e3:>6.0f}ms "
                  f"{statistics.mean(prompt_tokens) if prompt_tokens else float('nan'):>10.0f} {rss:>9} "
                  f"{sampler.blocks or '-':>6}")
            for error in errors[:3]:
                print(f"  failed request: {error}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
