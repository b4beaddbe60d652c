"""OpenAI-compatible HTTP server for a model directory, with a web chat page at /.

    python example/serve.py --model_dir DIR                      # http://127.0.0.1:8000/
    python example/serve.py --model_dir DIR --port 9000 --max_batch 16

Binds to loopback unless --host says otherwise. See docs/SERVING.md for calling it with curl or the openai client.
"""
import argparse
import os
import sys

from baichuan2 import runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model_name", default=None, help="id reported by /v1/models (default: directory name)")
    parser.add_argument("--max_batch", type=int, default=8, help="most queued requests generated as one batch")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    runtime.add_device_argument(parser)
    parser.add_argument("--api-key", "--api_key", dest="api_key", default=os.environ.get("BAICHUAN_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 requests (default: $BAICHUAN_API_KEY; "
                             "set one whenever --host is not loopback)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="serve.py")
    import uvicorn  # pylint: disable=import-outside-toplevel
    from baichuan2.server import create_app  # pylint: disable=import-outside-toplevel

    try:
        app = create_app(args.model_dir, model_name=args.model_name, max_batch=args.max_batch,
                         api_key=args.api_key)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"serve.py: error: cannot load {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
