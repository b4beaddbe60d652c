"""One-shot generation from a model directory (made by research/baichuan2/convert_weight.py).

    python example/inference.py --model_dir DIR --prompt "<reserved_106>你是谁?<reserved_107>"
    python example/inference.py --model_dir DIR --prompt "你是谁?" --chat            # wraps the prompt as a chat turn
    python example/inference.py --model_dir DIR --prompt "a" --prompt "b c" --greedy --max_new_tokens 16

Several --prompt run as one left-padded batch. Generation settings: the options given here, then the model
directory's generation_config.json (a Chat model samples, a Base model decodes greedily), then the family's
defaults; max_new_tokens left to the file is cut to what the context leaves after the prompt. GRAPH mode, KV cache.
"""
import argparse
import sys
import time

from baichuan2 import generation_settings, runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="config.json + model*.safetensors + tokenizer.model")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true",
                        help="build a chat prompt (role tokens) around each prompt; the reply ends at a new turn")
    generation_settings.add_arguments(parser)
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    runtime.add_device_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="inference.py")
    from baichuan2.chat import build_chat_input, chat_options  # pylint: disable=import-outside-toplevel
    from baichuan2.generation import Generator  # pylint: disable=import-outside-toplevel

    model, tokenizer, saved = runtime.load_model_dir_or_exit(args.model_dir, "inference.py")
    config = model.config
    explicit = generation_settings.arguments_of(args)
    if args.no_cache:
        explicit["use_cache"] = False
    try:  # a bad value in generation_config.json or on the command line: one line, exit 2
        if args.chat:
            settings = chat_options(config, saved, **explicit)
            prompts = [build_chat_input(config, tokenizer.encode, [{"role": "user", "content": p}],
                                        settings["max_new_tokens"]) for p in args.prompt]
        else:
            settings = generation_settings.resolve(config, explicit, generation_config=saved)
            prompts = [tokenizer.encode(p) for p in args.prompt]
    except ValueError as exc:
        print(f"inference.py: error: {exc}", file=sys.stderr)
        return 2
    if "max_new_tokens" not in explicit:
        settings["max_new_tokens"] = generation_settings.fit_new_tokens(
            settings["max_new_tokens"], max(len(p) for p in prompts), config.max_context)
    elif settings["max_new_tokens"] >= config.max_context:
        print(f"inference.py: error: --max_new_tokens {settings['max_new_tokens']} leaves no room for the prompt in "
              f"the model's context of {config.max_context} tokens: use a smaller value", file=sys.stderr)
        return 2
    start = time.perf_counter()
    outputs = Generator(model).generate(prompts, **settings, **generation_settings.speculation_of(args))
    seconds = time.perf_counter() - start
    for prompt, new_ids in zip(args.prompt, outputs):
        print(f"### prompt: {prompt}")
        print(tokenizer.decode(new_ids, skip_special_tokens=True))
    total = sum(len(o) for o in outputs)
    print(f"[{total} new tokens in {seconds:.1f} s, compile included]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
