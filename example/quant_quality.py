"""Quantisation quality on real weights: perplexity over a text for float32 and each stored format, beside
llama.cpp's q4_0 / q8_0 rules simulated on the same weights.

    python example/quant_quality.py MODEL --text FILE [--chunk 512] [--chunks 4] [--formats int8 int4 ...]
                                    [--score all|second_half] [--llama_cpp BIN_DIR]

MODEL is a Hugging Face checkpoint directory (a Baichuan / XVERSE layout convert_weight.py takes), one of our
float32 model directories, or a Llama-architecture GGUF file (read by baichuan2.gguf_checkpoint: dequantised,
q/k rows un-permuted, grouped key/value heads repeated; needs the `gguf` package). Each format is converted into a
temporary directory (removed at the end) and scored over `--chunks` chunks of `--chunk` tokens of the text
(tokenised with the model's own tokenizer), each chunk on its own.

Rows printed (`--formats` picks them; float32 always comes first, as the reference):
  bfloat16, int8, int4, int4_asym  our stored formats as convert_weight.py writes them (int8 / int4 / int4_asym
                                    group 32, the "search" scale method; int4_asym: a minimum per group as well),
                                    run by the model as it loads them (the CPU kernels also round the activations
                                    to int8 per 32 inputs)
  int8-absmax, int4-absmax          the same with the plain scale rule (absmax / qmax; older directories)
  int4_asym-minmax                  int4_asym with the plain rule (scale (max - min) / 15, minimum = min: q4_1's)
  q8_0-rule, q4_0-rule              llama.cpp's rules on the same tensors, weight-only, float32 activations
Columns: perplexity, and its increase over float32 in percent. --score second_half counts only the second half of
each chunk (its first half as context), as llama-perplexity does; the default, all, counts every token after the
chunk's first.

--llama_cpp BIN_DIR (the bin directory scripts/build_llama_cpp.sh prints; MODEL must then be a .gguf file) adds
llama.cpp's own perplexity, by llama-perplexity, on the same text and chunks (-c CHUNK --chunks N), for a float32
GGUF of the same values our float32 holds (baichuan2.llama_cpp.float_gguf) and for its `llama-quantize --pure`
q8_0, q4_0 and q4_1 (every tensor, the embedding too, as our int8 / int4 / int4_asym and the rule rows). Rows
llama.cpp-f32, llama.cpp-q8_0, llama.cpp-q4_0, llama.cpp-q4_1; their increase is over llama.cpp-f32. What differs
from our rows: llama-perplexity counts only the second half of each chunk (the first half is context; a BOS
replaces the first token where the vocabulary adds one) where ours count every token after the first unless
--score second_half; its q4_0 / q8_0 / q4_1 also round the activations (to q8_0 blocks of 32), as our int8 / int4
kernels do (int8 per 32).
"""
import argparse
import os
import sys
import tempfile
import time

from baichuan2 import runtime

FORMATS = ("bfloat16", "int8", "int4", "int4_asym", "int8-absmax", "int4-absmax", "int4_asym-minmax", "q8_0-rule",
           "q4_0-rule")
DEFAULT_FORMATS = ("int8", "int4", "int4_asym", "q8_0-rule", "q4_0-rule")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("model", help="Hugging Face checkpoint directory, our float32 model directory or .gguf file")
    parser.add_argument("--text", required=True, help="a text file to score (UTF-8)")
    parser.add_argument("--chunk", type=int, default=512, help="tokens per chunk (default 512)")
    parser.add_argument("--chunks", type=int, default=4, help="chunks scored (default 4; fewer if the text is short)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(DEFAULT_FORMATS))
    parser.add_argument("--score", choices=("all", "second_half"), default="all",
                        help="tokens scored per chunk: all after the first (default), or the second half (llama.cpp's)")
    parser.add_argument("--llama_cpp", metavar="BIN_DIR",
                        help="llama.cpp bin directory (scripts/build_llama_cpp.sh): add llama-perplexity's rows")
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
        quantize, _, method = fmt.partition("-")
        convert(source, out, quantize=quantize, scale_method=method or "search", show_progress=False)
    return out


def main(argv=None):
    args = parse_args(argv)
    if not os.path.exists(args.model):
        return fail(f"{args.model} does not exist: pass a checkpoint directory or a .gguf file")
    if not os.path.isfile(args.text):
        return fail(f"--text {args.text} is not a file")
    if args.llama_cpp:
        from baichuan2.llama_cpp import LlamaCppError, tool  # pylint: disable=import-outside-toplevel
        if not (os.path.isfile(args.model) and args.model.endswith(".gguf")):
            return fail(f"--llama_cpp needs MODEL as a .gguf file (llama.cpp's q4_0 / q8_0 are made from its values); "
                        f"got {args.model}")
        try:
            tool(args.llama_cpp, "llama-quantize")
            tool(args.llama_cpp, "llama-perplexity")
        except LlamaCppError as exc:
            return fail(f"--llama_cpp: {exc}")
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
        scored = "second half of each scored" if args.score == "second_half" else "each scored after its first token"
        print(f"{args.model}: {chunks} chunks of {args.chunk} tokens of {args.text} ({scored})")
        print(f"{'weights':<14}{'perplexity':>12}{'vs float32':>12}")
        base = None
        for fmt in ("float32",) + tuple(f for f in args.formats if f != "float32"):
            start = time.time()
            model_dir = float_dir if fmt == "float32" else build(fmt, source, float_dir, work)
            first = args.chunk // 2 if args.score == "second_half" else 0
            value = perplexity(BaichuanForCausalLM.from_pretrained(model_dir), ids, args.chunk, first=first)
            base = base or value
            change = "-" if fmt == "float32" else f"{100 * (value / base - 1):+.1f} %"
            print(f"{fmt:<14}{value:>12.3f}{change:>12}   ({time.time() - start:.0f} s)", flush=True)
        if args.llama_cpp:
            return llama_cpp_rows(args, chunks, work)
    return 0


def llama_cpp_rows(args, chunks, work):
    """llama-perplexity's rows (see the module docstring)."""
    from baichuan2 import llama_cpp  # pylint: disable=import-outside-toplevel
    threads = args.threads or len(os.sched_getaffinity(0))
    base = None
    print("llama.cpp's own (llama-perplexity: second half of each chunk scored; increase over llama.cpp-f32):")
    try:
        f32 = os.path.join(work, "model-f32.gguf")
        llama_cpp.float_gguf(args.model, f32)
        for qtype in ("f32", "q8_0", "q4_0", "q4_1"):
            start = time.time()
            model = f32
            if qtype != "f32":
                model = os.path.join(work, f"model-{qtype}.gguf")
                llama_cpp.quantize(args.llama_cpp, f32, model, qtype, threads=threads)
            value, error, scored, n_ctx = llama_cpp.perplexity(args.llama_cpp, model, args.text, args.chunk, chunks,
                                                               threads=threads)
            if (scored, n_ctx) != (chunks, args.chunk):
                return fail(f"llama-perplexity scored {scored} chunks of {n_ctx} tokens, not {chunks} of {args.chunk}")
            base = base or value
            change = "-" if qtype == "f32" else f"{100 * (value / base - 1):+.1f} %"
            name = f"llama.cpp-{qtype}"
            print(f"{name:<14}{value:>12.3f}{change:>12}   (+/- {error:.3f}; {time.time() - start:.0f} s)", flush=True)
    except (llama_cpp.LlamaCppError, OSError) as exc:
        return fail(str(exc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
