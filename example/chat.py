"""Interactive terminal chat with a model directory, streaming the reply as it is generated.

    python example/chat.py --model_dir DIR            # Baichuan2-Chat sampling defaults
    python example/chat.py --model_dir DIR --greedy   # deterministic replies

The conversation is remembered (older rounds are dropped when the context is full). Commands: /clear forgets the
conversation, /exit (or Ctrl-D) quits.
"""
import argparse
import sys

from baichuan2 import runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--greedy", action="store_true", help="greedy decoding instead of chat sampling")
    parser.add_argument("--max_new_tokens", type=int, default=None, help="reply length limit (default 2048)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    runtime.add_device_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="chat.py")
    from baichuan2.chat import chat  # pylint: disable=import-outside-toplevel

    try:
        model, tokenizer, _ = runtime.load_model_dir(args.model_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"chat.py: error: cannot load {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    options = {"max_new_tokens": args.max_new_tokens, "seed": args.seed}
    if args.greedy:
        options.update(do_sample=False, repetition_penalty=1.0)
    print("Type a message; /clear forgets the conversation, /exit quits.", flush=True)
    messages = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except EOFError:
            print()
            break
        if not text:
            continue
        if text == "/exit":
            break
        if text == "/clear":
            messages = []
            print("(conversation cleared)", flush=True)
            continue
        messages.append({"role": "user", "content": text})
        print("Assistant: ", end="", flush=True)
        reply = []
        for piece in chat(model, tokenizer, messages, stream=True, **options):
            reply.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    print("bye", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
