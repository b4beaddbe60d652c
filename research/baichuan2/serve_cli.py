"""OpenAI-compatible HTTP server for a model directory, with a web chat page at /.

    python example/serve.py --model_dir DIR                      # http://127.0.0.1:8000/
    python example/serve.py --model_dir DIR --port 9000 --max_batch 16 --kv_cache_dtype int8

Binds to loopback unless --host says otherwise. A request body over --max_request_bytes gets 413 before it is read;
a client that has not sent its whole request --read_timeout seconds after starting it is disconnected.
See docs/SERVING.md for calling it with curl or the openai client.

Installed as the command `baichuan2-serve`; example/serve.py is the same command line for a checkout.
"""
import argparse
import os
import sys

from baichuan2 import runtime
from baichuan2.engine import DEFAULT_BLOCK_SIZE, DEFAULT_STEP_TOKENS, KV_ELEMENT_BYTES, block_bytes
from baichuan2.http_limits import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_READ_TIMEOUT, read_deadline_protocol


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default=None, help="id reported by /v1/models (default: directory name)")
    parser.add_argument("--max_batch", "--max_num_seqs", dest="max_batch", type=int, default=8,
                        help="most requests generated at once (continuous batching; vLLM's --max_num_seqs)")
    parser.add_argument("--max_num_batched_tokens", type=int, default=DEFAULT_STEP_TOKENS,
                        help="most tokens one step computes: long prompts are read in chunks of what the running "
                             f"requests leave (default {DEFAULT_STEP_TOKENS})")
    parser.add_argument("--kv_cache_dtype", choices=["auto", "float32", "bfloat16", "int8"], default="auto",
                        help="key/value cache format (auto: bfloat16 with the CPU kernels, else the compute dtype; "
                             "int8 keeps a scale per token and head)")
    parser.add_argument("--kv_cache_memory", type=float, default=None, metavar="GIB",
                        help="memory for the key/value cache (default: 80%% of what is available after the "
                             "weights, at most --max_batch full contexts)")
    parser.add_argument("--block_size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per cache block")
    parser.add_argument("--no_prefix_cache", action="store_true",
                        help="do not share identical prompt prefixes between requests")
    parser.add_argument("--speculative", choices=["ngram"], default=None,
                        help="speculative decoding: ngram drafts tokens from the request's own text (prompt "
                             "lookup) and verifies them in one step; the output is unchanged")
    parser.add_argument("--num_speculative_tokens", type=int, default=4,
                        help="most tokens drafted a step with --speculative (default 4)")
    parser.add_argument("--max_queue", type=int, default=None,
                        help="answer 429 when this many requests are waiting already (default: no limit)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    parser.add_argument("--max_request_bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                        help=f"largest request body taken; larger ones get 413 (default {DEFAULT_MAX_REQUEST_BYTES})")
    parser.add_argument("--read_timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                        help=f"seconds a client has to send a whole request, headers and body "
                             f"(default {DEFAULT_READ_TIMEOUT:g})")
    runtime.add_device_argument(parser)
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("BAICHUAN_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 requests (default: $BAICHUAN_API_KEY; "
                             "set one whenever --host is not loopback)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    engine_numbers = {"--max_batch": args.max_batch, "--max_num_batched_tokens": args.max_num_batched_tokens,
                      "--block_size": args.block_size, "--num_speculative_tokens": args.num_speculative_tokens}
    bad = [f"{flag} ({value})" for flag, value in engine_numbers.items() if value < 1]
    if args.kv_cache_memory is not None and not args.kv_cache_memory > 0:
        bad.append(f"--kv_cache_memory ({args.kv_cache_memory})")
    if args.max_queue is not None and args.max_queue < 0:
        bad.append(f"--max_queue ({args.max_queue})")
    if bad:
        print(f"serve.py: error: {', '.join(bad)} must be positive", file=sys.stderr)
        return 2
    if args.max_request_bytes < 1 or not args.read_timeout > 0:
        print(f"serve.py: error: --max_request_bytes ({args.max_request_bytes}) and --read_timeout "
              f"({args.read_timeout}) must be positive", file=sys.stderr)
        return 2
    runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="serve.py")
    import uvicorn  # pylint: disable=import-outside-toplevel
    from baichuan2.server import create_app  # pylint: disable=import-outside-toplevel

    try:
        app = create_app(args.model_dir, model_name=args.model_name, max_batch=args.max_batch,
                         api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                         kv_cache_dtype=args.kv_cache_dtype, kv_cache_memory=args.kv_cache_memory,
                         block_size=args.block_size, max_num_batched_tokens=args.max_num_batched_tokens,
                         prefix_cache=not args.no_prefix_cache, max_queue=args.max_queue,
                         num_speculative_tokens=args.num_speculative_tokens if args.speculative else 0)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"serve.py: error: cannot load {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    # our one start-up line instead of uvicorn's INFO lines (library logs show warnings and errors only)
    engine = app.state.engine
    cache_gib = engine.pool.capacity * block_bytes(engine.config, engine.block_size,
                                                   KV_ELEMENT_BYTES[engine.kv_cache_dtype]) / 2 ** 30
    print(f"kv cache: {engine.pool.capacity} blocks of {engine.block_size} tokens ({engine.kv_cache_dtype}, "
          f"{cache_gib:.2f} GiB), up to {engine.max_seqs} requests at once", flush=True)
    print(f"serving {args.model_dir} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                http=read_deadline_protocol(args.read_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
