"""Quantisation quality on real weights: perplexity over a text for float32 and each stored format, beside
llama.cpp's q4_0 / q8_0 rules simulated on the same weights.

    python example/quant_quality.py MODEL --text FILE [--chunk 512] [--chunks 4] [--formats int8 int4 ...]

MODEL is a Hugging Face checkpoint directory (a Baichuan / XVERSE layout convert_weight.py takes), one of our
float32 model directories, or a Llama-architecture GGUF file (read by baichuan2.gguf_checkpoint: dequantised,
q/k rows un-permuted, grouped key/value heads repeated; needs the `gguf` package). Each format is converted into a
temporary directory (removed at the end) and scored over `--chunks` chunks of `--chunk` tokens of the text
(tokenised with the model's own tokenizer), each chunk on its own.

Rows printed (`--formats` picks them; float32 always comes first, as the reference):
  bfloat16, int8, int4              our stored formats as convert_weight.py writes them (int8 / int4 group 32,
                                    the "search" scale method), run by the model as it loads them (the CPU kernels
                                    also round the activations to int8 per 32 inputs)
  int8-absmax, int4-absmax          the same with the first scale rule (absmax / qmax; older directories)
  q8_0-rule, q4_0-rule              llama.cpp's rules on the same tensors, weight-only, float32 activations
Columns: perplexity, and its increase over float32 in percent.
"""
import argparse
import os
import sys
import tempfile
import time

from baichuan2 import runtime

FORMATS = ("bfloat16", "int8", "int4", "int8-absmax", "int4-absmax", "q8_0-rule", "q4_0-rule")
DEFAULT_FORMATS = ("int8", "int4", "q8_0-rule", "q4_0-rule")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("model", help="Hugging Face checkpoint directory, our float32 model directory or .gguf file")
    parser.add_argument("--text", required=True, help="a text file to score (UTF-8)")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per chunk (default 512)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks scored (default 4; fewer if the text is short)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(DEFAULT_FORMATS))
    runtime.add_device_argument(parser)
    return parser.parse_args(argv)


def fail(message):
    print(f"quant_quality.py: error: {message}", file=sys.stderr)
    return 2


def token_ids(model_dir, text_file):
    """The text as token ids, by the model directory's own tokenizer (SentencePiece or tokenizer.json)."""
    from baichuan2.model_dir import load_tokenizer  # pylint: disable=import-outside-toplevel
    with open(text_file, encoding="utf-8") as f:
        text = f.read()
    return load_tokenizer(model_dir).encode(text, add_special_tokens=False)


def build(fmt, source, float_dir, work):
    """The model directory of one row, made in `work`."""
    # pylint: disable=import-outside-toplevel
    from baichuan2.convert_weight import convert
    from baichuan2.quality import RULES, simulated_dir
    out = os.path.join(work, fmt)
    if fmt.endswith("-rule"):
        simulated_dir(float_dir, out, RULES[fmt[:-len("-rule")]])
    elif fmt == "bfloat16":
        convert(source, out, dtype="bfloat16", show_progress=False)
    else:
        bits, _, method = fmt.partition("-")
        convert(source, out, quantize=bits, scale_method=method or "search", show_progress=False)
    return out


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.model):
        return fail(f"{args.model} does not exist: pass a checkpoint directory or a .gguf file")
    if not os.path.isfile(args.text):
        return fail(f"--text {args.text} is not a file")
    runtime.setup_inference(args.device, mode="graph", threads=args.threads, prog="quant_quality.py")
    # pylint: disable=import-outside-toplevel
    from baichuan2.convert_weight import ConversionError, convert
    from baichuan2.gguf_checkpoint import GGUFError, gguf_to_checkpoint
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.quality import perplexity

    with tempfile.TemporaryDirectory(prefix="quant_quality-") as work:
        try:
            source = args.model
            if os.path.isfile(source):
                source = os.path.join(work, "checkpoint")
                gguf_to_checkpoint(args.model, source)
            float_dir = os.path.join(work, "float32")
            convert(source, float_dir, dtype="float32", show_progress=False)
            ids = token_ids(float_dir, args.text)
        except (ConversionError, GGUFError, ValueError, OSError) as exc:
            return fail(str(exc))
        chunks = min(args.chunks, len(ids) // args.chunk)
        if chunks < 1:
            return fail(f"{args.text} has {len(ids)} tokens, fewer than one chunk of {args.chunk}")
        ids = ids[:chunks * args.chunk]
        print(f"{args.model}: {chunks} chunks of {args.chunk} tokens of {args.text}")
        print(f"{'weights':<14}{'perplexity':>12}{'vs float32':>12}")
        base = None
        for fmt in ("float32",) + tuple(f for f in args.formats if f != "float32"):
            start = time.time()
            model_dir = float_dir if fmt == "float32" else build(fmt, source, float_dir, work)
            value = perplexity(BaichuanForCausalLM.from_pretrained(model_dir), ids, args.chunk)
            base = base or value
            change = "-" if fmt == "float32" else f"{100 * (value / base - 1):+.1f} %"
            print(f"{fmt:<14}{value:>12.3f}{change:>12}   ({time.time() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
