"""Interactive terminal chat with a model directory, streaming the reply as it is generated.

    python example/chat.py --model_dir DIR            # the directory's generation_config.json settings
    python example/chat.py --model_dir DIR --greedy   # deterministic replies

Generation settings: the options given here, then the model directory's generation_config.json, then the family's
defaults (Baichuan2-Chat's sampling). The conversation is remembered (older rounds are dropped when the context is
full). Commands: /clear forgets the conversation, /exit (or Ctrl-D) quits.

Installed as the command `baichuan2-chat`; example/chat.py is the same command line for a checkout.
"""
import argparse
import sys

from baichuan2 import generation_settings, runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True)
    generation_settings.add_arguments(parser)
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    runtime.add_device_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="chat.py")
    from baichuan2.chat import chat  # pylint: disable=import-outside-toplevel

    model, tokenizer, saved = runtime.load_model_dir_or_exit(args.model_dir, "chat.py")
    explicit = generation_settings.arguments_of(args)
    try:  # a bad value in generation_config.json or on the command line: one line before the first turn
        generation_settings.resolve(model.config, explicit, generation_config=saved, chat=True)
    except ValueError as exc:
        print(f"chat.py: error: {exc}", file=sys.stderr, flush=True)
        return 2
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
        for piece in chat(model, tokenizer, messages, stream=True, generation_config=saved, **explicit,
                          **generation_settings.speculation_of(args)):
            reply.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        messages.append({"role": "assistant", "content": "".join(reply)})
    print("bye", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
