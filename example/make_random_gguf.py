"""A llama.cpp GGUF with random weights in the Baichuan2-7B shape, for side-by-side benchmarks with llama-server.

    python example/make_random_gguf.py OUT.gguf [--llama_cpp BIN_DIR [--types q4_0 q8_0] [--delete_f16]]

Llama architecture (Baichuan2-7B without its fused W_pack and NormHead, which change no cost): 32 layers, hidden
4096, 32 heads, MLP 11008, vocabulary 125,696, RoPE theta 10000, RMSNorm eps 1e-6, context 4096; f16 matrices
(~15 GB), float32 norms. The tokenizer in the metadata is baichuan2.synthetic_vocab's (an SPM vocabulary whose
every id is a distinct printable piece, ids 0..2 <unk> <s> </s>, no BOS added), so llama-server detokenises
whatever the random weights emit, and our random model directories use the same pieces. Weights are N(0, 0.02)
from a fixed seed, written tensor by tensor (at most one tensor in memory, ~1 GB for the embedding).

With --llama_cpp (the bin directory scripts/build_llama_cpp.sh prints), each of --types is then made with
`llama-quantize --pure OUT.gguf OUT-<type>.gguf <type>` (every tensor in that type, as a GGUF of the same shape in
q4_0 means for the benchmark); --delete_f16 removes OUT.gguf afterwards. Shape options (--layers, --hidden, ...)
make smaller files for tests. A partial file never keeps OUT's name: each file is written beside it and renamed.
"""
import argparse
import os
import sys
import time

import numpy as np

from baichuan2.llama_cpp import LlamaCppError, quantize, tool
from baichuan2.synthetic_vocab import SPECIAL_IDS, pieces, scores

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3  # llama.cpp's token types (llama_token_type)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("out", help="the f16 GGUF to write (e.g. ~/.cache/baichuan2/bench/baichuan2-7b-random.gguf)")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--ffn", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=125696)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llama_cpp", help="llama.cpp bin directory with llama-quantize (scripts/build_llama_cpp.sh)")
    parser.add_argument("--types", nargs="+", default=["q4_0", "q8_0"], help="llama-quantize types (default q4_0 q8_0)")
    parser.add_argument("--delete_f16", action="store_true", help="remove OUT after quantising")
    return parser.parse_args(argv)


def fail(message):
    print(f"make_random_gguf.py: error: {message}", file=sys.stderr)
    return 2


def tensor_plan(args):
    """[(gguf name, numpy shape [rows, cols] or [n], dtype)] in file order."""
    h, f, v = args.hidden, args.ffn, args.vocab
    plan = [("token_embd.weight", (v, h), np.float16)]
    for i in range(args.layers):
        b = f"blk.{i}."
        plan += [(b + "attn_norm.weight", (h,), np.float32)]
        plan += [(b + f"attn_{p}.weight", (h, h), np.float16) for p in ("q", "k", "v", "output")]
        plan += [(b + "ffn_norm.weight", (h,), np.float32),
                 (b + "ffn_gate.weight", (f, h), np.float16), (b + "ffn_up.weight", (f, h), np.float16),
                 (b + "ffn_down.weight", (h, f), np.float16)]
    plan += [("output_norm.weight", (h,), np.float32), ("output.weight", (v, h), np.float16)]
    return plan


def random_tensor(rng, shape, dtype):
    """Norm weights are ones; matrices N(0, 0.02), filled in row blocks so no float32 copy of the whole exists."""
    if len(shape) == 1:
        return np.ones(shape, dtype)
    out = np.empty(shape, dtype)
    step = max(1, (1 << 24) // shape[1])
    for r in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - r), shape[1]), dtype=np.float32)
        block *= 0.02
        out[r:r + step] = block
    return out


def write_gguf(args, path):
    import gguf  # pylint: disable=import-outside-toplevel
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("Baichuan2-7B shape, random weights")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(args.context)
    writer.add_embedding_length(args.hidden)
    writer.add_block_count(args.layers)
    writer.add_feed_forward_length(args.ffn)
    writer.add_head_count(args.heads)
    writer.add_head_count_kv(args.heads)
    writer.add_rope_dimension_count(args.hidden // args.heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(args.vocab)
    vocab = pieces(args.vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(vocab)
    writer.add_token_scores(scores(args.vocab))
    writer.add_token_types([TOKEN_CONTROL if i in SPECIAL_IDS.values() else TOKEN_NORMAL for i in range(args.vocab)])
    writer.add_unk_token_id(SPECIAL_IDS["unk"])
    writer.add_bos_token_id(SPECIAL_IDS["bos"])
    writer.add_eos_token_id(SPECIAL_IDS["eos"])
    writer.add_pad_token_id(SPECIAL_IDS["unk"])
    writer.add_add_bos_token(False)  # Baichuan2's tokenizer adds no BOS
    writer.add_add_eos_token(False)

    plan = tensor_plan(args)
    for name, shape, dtype in plan:
        writer.add_tensor_info(name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(args.seed)
    start, total = time.time(), sum(int(np.prod(s)) * np.dtype(d).itemsize for _, s, d in plan)
    done = 0
    for i, (name, shape, dtype) in enumerate(plan):
        writer.write_tensor_data(random_tensor(rng, shape, dtype))
        done += int(np.prod(shape)) * np.dtype(dtype).itemsize
        if name.endswith("ffn_down.weight") or i == len(plan) - 1:
            print(f"  {done / 1e9:6.2f} / {total / 1e9:.2f} GB written ({time.time() - start:.0f} s)", flush=True)
    for fout in writer.fout:
        fout.flush()
        os.fsync(fout.fileno())
    writer.close()


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(os.path.expanduser(args.out))
    if not out.endswith(".gguf"):
        return fail(f"{args.out} must end in .gguf (the quantised files are named after it)")
    if args.hidden % args.heads or args.hidden % 32 or args.ffn % 32:
        return fail("--hidden must be a multiple of --heads, and --hidden and --ffn multiples of 32 "
                    "(llama.cpp's blocks)")
    if args.llama_cpp:
        try:
            tool(args.llama_cpp, "llama-quantize")
        except LlamaCppError as exc:
            return fail(f"--llama_cpp: {exc}")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    start = time.time()
    tmp = out + ".partial"
    try:
        write_gguf(args, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"wrote {out} ({os.path.getsize(out) / 1e9:.2f} GB, {time.time() - start:.0f} s)")
    if args.llama_cpp:
        for qtype in args.types:
            dst = out[:-len(".gguf")] + f"-{qtype}.gguf"
            start = time.time()
            try:
                quantize(args.llama_cpp, out, dst, qtype)
            except LlamaCppError as exc:
                return fail(str(exc))
            print(f"wrote {dst} ({os.path.getsize(dst) / 1e9:.2f} GB, {time.time() - start:.0f} s)")
        if args.delete_f16:
            os.remove(out)
            print(f"removed {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
