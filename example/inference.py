"""One-shot generation from a model directory (made by research/baichuan2/convert_weight.py).

    python example/inference.py --model_dir DIR --prompt "<reserved_106>你是谁?<reserved_107>"
    python example/inference.py --model_dir DIR --prompt "你是谁?" --chat            # wraps the prompt as a chat turn
    python example/inference.py --model_dir DIR --prompt "a" --prompt "b c" --do_sample --seed 0

Several --prompt run as one left-padded batch. Defaults: greedy, 64 new tokens, GRAPH mode, KV cache.
"""
import argparse
import sys
import time

from baichuan2 import runtime


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="config.json + model*.safetensors + tokenizer.model")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="build a chat prompt (role tokens) around each prompt")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--do_sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=1.0)
    parser.add_argument("--repetition_penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no_cache", action="store_true", help="recompute the whole sequence every step")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph")
    runtime.add_device_argument(parser)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="inference.py")
    from baichuan2.chat import build_chat_input  # pylint: disable=import-outside-toplevel
    from baichuan2.generation import Generator  # pylint: disable=import-outside-toplevel

    try:
        model, tokenizer, _ = runtime.load_model_dir(args.model_dir)
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"inference.py: error: cannot load {args.model_dir}: {exc}", file=sys.stderr)
        return 2
    if args.chat:
        prompts = [build_chat_input(model.config, tokenizer.encode, [{"role": "user", "content": p}],
                                    args.max_new_tokens) for p in args.prompt]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompt]
    start = time.perf_counter()
    outputs = Generator(model).generate(
        prompts, max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
        use_cache=not args.no_cache)
    seconds = time.perf_counter() - start
    for prompt, new_ids in zip(args.prompt, outputs):
        print(f"### prompt: {prompt}")
        print(tokenizer.decode(new_ids, skip_special_tokens=True))
    total = sum(len(o) for o in outputs)
    print(f"[{total} new tokens in {seconds:.1f} s, compile included]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
