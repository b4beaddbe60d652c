"""Generation speed per model shape and weight format, against the machine's memory-bandwidth roofline.

    python example/bench_generate.py                                   # shapes S and M, float32 weights
    python example/bench_generate.py --configs S M --weights float32 bfloat16 int8 int4
    python example/bench_generate.py --configs 7B --weights bfloat16 int8 int4 --prefill_tokens 64

Each model is built directly in its weight format by baichuan2.random_model (random weights, never a float32 copy of
a bf16 / int8 / int4 model: the parameters are created uninitialised and each is filled in its stored dtype), on the
device's inference compute dtype (float32 on CPU), GRAPH mode unless --mode pynative. Printed first: the CPU model,
the projection kernel path (baichuan2.kernels) and the memory read bandwidth measured now (2 GB, all threads, the
kernels' vector loads).
Then per shape and format (each batch-1 decode run after a read of the model's own weights: see bench()):
  bytes/token  weights read per decoded token (every projection and the lm_head; one embedding row; norms) plus
               the key/value cache buffer the attention reads (batch 1)
  bw           the read bandwidth of the model's weights, probed before each of its batch-1 decode runs
  roofline     bw / bytes per token: the decode tokens/s that streaming those bytes at full speed allows
  decode       batch 1 (ROUNDS runs, interleaved with the probes) and 4, 32-token prompts, tokens/s after the
               first token (--new_tokens steps each, cached)
  of roofline  decode b1 / roofline;  overhead  ms per step beyond bytes / bandwidth (step time - bytes / bw)
  prefill      batch 1, --prefill_tokens prompt (512 default; fewer for the 7B keeps the run short), tokens/s
  of peak      the prefill's multiply-adds (projections, attention, the last token's lm_head; 2 ops each) a
               second over the compute roofline of its weight format measured just before (kernel_probes.peak_gops)
  peak RSS     the most resident memory while running (the build excluded: the peak is reset after it), GiB:
               b1 after the prefill and batch-1 decode graphs are compiled and run (one conversation), all
               after batch 4's too
Each shape and format runs in its own child process (this script again, with --worker), so memory is measured
per model and one model's memory is gone before the next is built.
--depths D ... measures instead, per shape and format, decode with D tokens already cached (--depth_batch
sequences together, a paged cache of --kv_cache_dtype, bfloat16 by default): tokens/s, the roofline of the bytes a
step reads (weights and caches) and the peak RSS:
    python example/bench_generate.py --configs 7B 13B --weights int4 --depths 0 1024 3500 --prefill_tokens 64
    python example/bench_generate.py --configs 7B --weights int4 --depths 1024 --depth_batch 8 --kv_cache_dtype int8
--speculative ngram (prompt-lookup speculative decoding) measures instead, per shape and format: the decode step
(batch 1, 32-token context, ms) and a verify step of K + 1 tokens over it, K = 1..8 (the engine's step with every
row's logits; interleaved, medians); with --copy_model M --copy_text FILE also the end-to-end greedy tokens/s with
and without it on a trained model (a model directory or a Llama GGUF such as SmolLM2's, converted to each --weights
format) for a prompt that repeats a passage of FILE and one that shares nothing with its answer, whether the tokens
are identical (exit status 1 if not), the acceptance, the tokens a step and the step costs the engine learnt:
    python example/bench_generate.py --speculative ngram --configs 7B --weights int8 int4
    python example/bench_generate.py --speculative ngram --configs --copy_model SmolLM2.gguf --copy_text LICENSE
The machine may be shared: re-measure on a quiet one before quoting numbers. Compilation is excluded (one warm-up
run of each shape first). --no_cache_steps N adds the no-cache decode (recomputing a fixed buffer each step).
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

from baichuan2 import runtime
from baichuan2.random_model import WEIGHT_FORMATS as WEIGHTS
from baichuan2.random_model import build_random_model

CONFIGS = {
    "S": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376, vocab_size=32000,
              max_position_embeddings=1024, model_max_length=1024),
    "M": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2816,
              vocab_size=125696, max_position_embeddings=1024, model_max_length=1024),
    "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
               vocab_size=125696, max_position_embeddings=4096, model_max_length=4096),
    "13B": dict(model_max_length=4096),  # the preset's shape
}
PRESETS = {"13B": "baichuan2_13b"}  # ALiBi; the others are Baichuan2-7B's architecture (RoPE)
GIB = 1024 ** 3
ROUNDS = 4  # batch-1 decode runs per shape and format, each after a read of the model's weights


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--configs", nargs="*", default=["S", "M"], choices=list(CONFIGS))
    parser.add_argument("--weights", nargs="+", default=["float32"], choices=WEIGHTS,
                        help="weight formats to build each shape in (int8 / int4: group size 32)")
    parser.add_argument("--prefill_tokens", type=int, default=512, help="prompt length of the prefill measurement")
    parser.add_argument("--new_tokens", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--no_cache_steps", type=int, default=0,
                        help="also time this many no-cache decode steps per batch size (0: skip)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph",
                        help="MindSpore execution mode; pynative is far slower per step (op by op from Python) but "
                             "holds a little less memory: GRAPH mode's compiled graphs hold ~30 MB per 7B layer")
    depth = parser.add_argument_group("decode at depth; replaces the rows above")
    depth.add_argument("--depths", nargs="+", type=int, metavar="TOKENS",
                       help="decode with this many tokens already in each sequence's cache (e.g. 0 1024 3500)")
    depth.add_argument("--depth_batch", type=int, default=1, help="sequences decoding together (default 1)")
    depth.add_argument("--kv_cache_dtype", default="bfloat16", choices=["float32", "bfloat16", "int8"],
                       help="the paged cache's rows (default bfloat16, as the server's auto)")
    spec = parser.add_argument_group("speculative decoding (prompt lookup); replaces the rows above")
    spec.add_argument("--speculative", choices=["ngram"],
                      help="measure a verify step of K + 1 tokens against a decode step (K = 1..8) per shape and "
                           "format, and with --copy_model the end-to-end speed-up")
    spec.add_argument("--copy_model", help="a trained model (model directory or Llama GGUF) for the end-to-end run")
    spec.add_argument("--copy_text", help="UTF-8 text whose first paragraphs the copying prompt repeats")
    spec.add_argument("--num_speculative_tokens", type=int, default=4, help="end-to-end: most tokens drafted a step")
    spec.add_argument("--spec_rounds", type=int, default=SPEC_ROUNDS,
                      help=f"end-to-end: runs of each prompt with and without, alternating (best taken; default "
                           f"{SPEC_ROUNDS})")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "WEIGHTS"), help=argparse.SUPPRESS)
    runtime.add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.prefill_tokens < 1 or args.new_tokens < 2 or args.spec_rounds < 1:
        parser.error("--prefill_tokens and --spec_rounds must be >= 1 and --new_tokens >= 2")
    if args.depths and (args.speculative or min(args.depths) < 0 or args.depth_batch < 1):
        parser.error("--depths takes token counts >= 0 and --depth_batch >= 1, without --speculative")
    if bool(args.copy_model) != bool(args.copy_text) or (args.copy_model and not args.speculative):
        parser.error("--copy_model and --copy_text go together, with --speculative ngram")
    for path in filter(None, (args.copy_model, args.copy_text)):
        if not os.path.exists(path):
            parser.error(f"{path} does not exist")
    return args


def reset_peak_rss():
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes():
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bytes_per_token(model, batch, slots):
    """Bytes a decode step reads: every parameter but the embedding table (one row of it), plus the k/v caches."""
    config = model.config
    total = 0
    for param in model.get_parameters():
        nbytes = param.nbytes
        if "embed_tokens" in param.name:
            nbytes = nbytes // config.vocab_size * batch
        total += nbytes
    cache = 2 * config.num_hidden_layers * batch * config.num_attention_heads * slots * config.head_dim * 4
    return total, cache


def prefill_ops(config, length):
    """Operations (2 per multiply-add) of a batch-1 prefill of `length` tokens: every token through the layers'
    projections (q, k, v, o: H x H; gate, up, down: H x I) and causal attention (scores and values over the keys up
    to its own), and the lm_head for the last token."""
    h, layers = config.hidden_size, config.num_hidden_layers
    projections = layers * (4 * h * h + 3 * h * config.intermediate_size) * length
    attention = layers * 2 * h * length * (length + 1) // 2
    return 2 * (projections + attention + config.vocab_size * h)


def timed_decode(generator, prompts, new_tokens, use_cache, steps=None):
    """Seconds per step after the first token (the first one includes the prefill)."""
    stream = generator.stream(prompts, max_new_tokens=new_tokens, eos_token_id=(), use_cache=use_cache)
    next(stream)
    start, count = time.perf_counter(), 0
    for count, _ in enumerate(stream, start=1):
        if steps and count >= steps:
            break
    return (time.perf_counter() - start) / count


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


VERIFY_DRAFTS = tuple(range(1, 9))  # K: draft tokens a verify step checks (K + 1 tokens)
SPEC_ROUNDS = 3  # end-to-end runs of each prompt, with and without speculation, alternating


def verify_costs(generator, rng, rounds=5):
    """Batch 1 after a 32-token prompt: ms of a decode step, and a verify step of K + 1 tokens over it (K =
    VERIFY_DRAFTS). Both are the engine's own step (Engine.forward: its step cell and inputs, every verified row's
    logits brought back), for the same sequence at the same position each time (a step rewrites the same pool rows),
    interleaved; medians of `rounds` after a first round that compiles each shape."""
    import statistics  # pylint: disable=import-outside-toplevel
    vocab = generator.config.vocab_size
    prompt = rng.integers(3, vocab, size=32).tolist()
    engine = generator.engine_for([prompt], 16)
    seq = engine.add(prompt, generator.options(max_new_tokens=16, eos_token_id=()))
    while not seq.output:
        engine.step()
    seconds = {k: [] for k in (0,) + VERIFY_DRAFTS}
    for rnd in range(rounds + 1):
        for k, runs in seconds.items():
            seq.draft = rng.integers(3, vocab, size=k).tolist()
            start = time.perf_counter()
            engine.forward([(seq, k + 1)])
            if rnd:
                runs.append(time.perf_counter() - start)
    seq.draft = []
    engine.abort(seq)
    base = statistics.median(seconds[0])
    return {"decode_ms": 1e3 * base, **{f"verify{k}": statistics.median(seconds[k]) / base for k in VERIFY_DRAFTS}}


def cache_bytes_per_token(config, dtype):
    """Bytes of one position's keys and values over all layers in a paged cache of `dtype` (int8: a float32 scale
    per token and head besides)."""
    from baichuan2.engine import KV_ELEMENT_BYTES, block_bytes  # pylint: disable=import-outside-toplevel
    scales = 2 * config.num_hidden_layers * config.num_attention_heads * 4 if dtype == "int8" else 0
    return block_bytes(config, 1, KV_ELEMENT_BYTES[dtype]) + scales


def depth_decode(model, depth, args, rng):
    """--depth_batch sequences with `depth` random tokens each (prefilled by the engine in chunks) decode
    --new_tokens steps together on a paged cache of --kv_cache_dtype: aggregate tokens/s, the bytes a step reads
    (the weights once, every sequence's cache at the run's mean depth), the roofline those bytes allow at the
    bandwidth of the model's own weights probed just before, and the peak RSS of the process (weights, pool,
    compiled graphs: what a server of this batch holds)."""
    # pylint: disable=import-outside-toplevel
    from baichuan2 import kernel_probes
    from baichuan2.engine import Engine
    from baichuan2.kv_pool import blocks_for
    from baichuan2.sampling import GenerationOptions
    config, batch, steps, block = model.config, args.depth_batch, args.new_tokens, 16
    if depth + steps + 2 > config.max_context:
        raise SystemExit(f"--depths {depth}: with --new_tokens {steps} past the {config.max_context}-token context")
    engine = Engine(model, batch * blocks_for(depth + steps + 2, block) + 1, block, max_step_tokens=512,
                    max_seqs=batch, prefix_cache=False, kv_cache_dtype=args.kv_cache_dtype)
    options = GenerationOptions(max_new_tokens=steps + 3, eos_token_id=()).validate()
    seqs = [engine.add(rng.integers(3, config.vocab_size, size=max(1, depth)).tolist(), options)
            for _ in range(batch)]
    while not all(s.output for s in seqs):  # the prompts, chunk by chunk, and each one's first token
        engine.step()
    engine.step()  # a decode step at this batch (compiles its shape)
    weights = [param.asnumpy() for param in model.get_parameters() if "embed_tokens" not in param.name]
    weight_bytes, _ = bytes_per_token(model, batch, 0)
    bandwidth = kernel_probes.read_bandwidth_of(weights, reps=1) * 1e9
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    seconds = time.perf_counter() - start
    mean_depth = depth + 2 + steps / 2
    step_bytes = weight_bytes + batch * mean_depth * cache_bytes_per_token(config, args.kv_cache_dtype)
    return {"depth": depth, "batch": batch, "kv": args.kv_cache_dtype, "step_mb": step_bytes / 1e6,
            "bandwidth": bandwidth / 1e9, "decode": batch * steps / seconds,
            "roofline": batch * bandwidth / step_bytes, "peak_rss": peak_rss_bytes()}


def bench(name, weights, args, rt):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from baichuan2 import kernel_probes  # pylint: disable=import-outside-toplevel
    from baichuan2.generation import Generator  # pylint: disable=import-outside-toplevel

    fields = CONFIGS[name]
    model = build_random_model(fields, weights, rt.compute_dtype, preset=PRESETS.get(name, "baichuan2_7b"))
    reset_peak_rss()
    generator = Generator(model)
    config = model.config
    rng = np.random.default_rng(0)
    row = {"config": name, "weights": weights, "params": config.num_parameters()}
    if args.speculative:
        return dict(row, **verify_costs(generator, rng))
    if args.depths:
        return dict(row, depths=[depth_decode(model, depth, args, rng) for depth in args.depths])

    # prefill, batch 1 (warm-up compiles; then the best of 2)
    length = args.prefill_tokens
    ids = ms.Tensor(rng.integers(3, config.vocab_size, size=(1, length)).astype(np.int32))
    mask = ms.Tensor(np.ones((1, length), np.int32))
    prefill = model.cached_step_cells()[0]  # one prompt's cached step, outside the engine's scheduling
    prefill.step(ids, mask, *model.empty_caches(1, length))[0].asnumpy()
    best = min(_seconds(lambda: prefill.step(ids, mask, *model.empty_caches(1, length))[0].asnumpy())
               for _ in range(2))
    row["prefill"] = length / best
    row["prefill_fraction"] = prefill_ops(config, length) / best / 1e9 / kernel_probes.peak_gops(
        "int4" if weights == "int4_asym" else weights)  # the minimums add no integer work

    # Batch 1 against the roofline: before each of ROUNDS decode runs the kernels' read loop streams this model's
    # own weights once (the bytes a step reads, where they lie in memory). On a shared virtual machine the read
    # bandwidth moves by a third within a minute, and a buffer of few distinct pages read 1.5x faster than random
    # weights (seen on a 2-core EPYC): a probe of other memory, or minutes away, says little about a decode run.
    # The fraction is the time that streaming the runs' bytes at the speeds probed just before them takes, over the
    # time the runs took. (A probe before every step put a cold start into each one: S float32 lost ~1 ms a step.)
    weights = [param.asnumpy() for param in model.get_parameters() if "embed_tokens" not in param.name]
    slots = math.ceil((32 + args.new_tokens + 1) / generator.bucket) * generator.bucket
    weight_bytes, cache_bytes = bytes_per_token(model, 1, slots)
    row["bytes"] = weight_bytes + cache_bytes
    prompts = rng.integers(3, config.vocab_size, size=(1, 32)).tolist()
    timed_decode(generator, prompts, args.new_tokens + 1, True)  # warm-up: compiles batch 1's steps
    step_seconds, stream_seconds = 0.0, 0.0
    for _ in range(ROUNDS):
        stream_seconds += args.new_tokens * row["bytes"] / (kernel_probes.read_bandwidth_of(weights, reps=1) * 1e9)
        step_seconds += args.new_tokens * timed_decode(generator, prompts, args.new_tokens + 1, True)
    steps = ROUNDS * args.new_tokens
    row["decode_b1"] = steps / step_seconds
    row["bandwidth"] = row["bytes"] * steps / stream_seconds / 1e9
    row["roofline"] = steps / stream_seconds
    row["overhead_ms"] = 1e3 * (step_seconds - stream_seconds) / steps
    row["peak_rss_b1"] = peak_rss_bytes()  # what serving one conversation holds (batch 4 not compiled yet)

    prompts = rng.integers(3, config.vocab_size, size=(4, 32)).tolist()
    timed_decode(generator, prompts, 3, True)  # warm-up: compiles batch 4's steps
    row["decode_b4"] = 4 / timed_decode(generator, prompts, args.new_tokens + 1, True)
    if args.no_cache_steps:
        for batch in (1, 4):
            prompts = rng.integers(3, config.vocab_size, size=(batch, 32)).tolist()
            timed_decode(generator, prompts, 64, False, steps=2)
            row[f"nocache_b{batch}"] = batch / timed_decode(generator, prompts, 64, False, steps=args.no_cache_steps)
    row["peak_rss"] = peak_rss_bytes()
    return row


COLUMNS = [("config", "{}", "config"), ("weights", "{}", "weights"), ("params", "{:.0f}M", "params"),
           ("bytes", "{:.0f} MB", "bytes/token"), ("bandwidth", "{:.1f}", "bw GB/s"),
           ("roofline", "{:.2f}", "roofline tok/s"),
           ("decode_b1", "{:.2f}", "decode b1 tok/s"), ("fraction", "{:.0%}", "of roofline"),
           ("overhead_ms", "{:.1f}", "overhead ms/step"), ("decode_b4", "{:.2f}", "decode b4 tok/s"),
           ("prefill", "{:.1f}", "prefill tok/s"), ("prefill_fraction", "{:.0%}", "of peak"),
           ("peak_rss_b1", "{:.2f}", "peak RSS b1 GiB"), ("peak_rss", "{:.2f}", "peak RSS all GiB")]


def print_row(row, header=False):
    if header:
        print(" | ".join(title for _, _, title in COLUMNS) + (" | no-cache b1 | no-cache b4" if "nocache_b1" in row
                                                               else ""), flush=True)
    values = dict(row, params=row["params"] / 1e6, bytes=row["bytes"] / 1e6, peak_rss=row["peak_rss"] / GIB,
                  peak_rss_b1=row["peak_rss_b1"] / GIB,
                  fraction=row["decode_b1"] / row["roofline"])
    cells = [fmt.format(values[key]) for key, fmt, _ in COLUMNS]
    if "nocache_b1" in row:
        cells += [f"{row['nocache_b1']:.2f}", f"{row['nocache_b4']:.2f}"]
    print(" | ".join(cells), flush=True)


def print_depth_rows(row, header=False):
    if header:
        print("config | weights | cache | depth | batch | MB a step | bw GB/s | roofline tok/s | decode tok/s | "
              "of roofline | peak RSS GiB", flush=True)
    for d in row["depths"]:
        print(f"{row['config']} | {row['weights']} | {d['kv']} | {d['depth']} | {d['batch']} | {d['step_mb']:.0f} | "
              f"{d['bandwidth']:.1f} | {d['roofline']:.2f} | {d['decode']:.2f} | {d['decode'] / d['roofline']:.0%} | "
              f"{d['peak_rss'] / GIB:.2f}", flush=True)


def print_verify_row(row, header=False):
    if header:
        print("config | weights | decode step ms | " + " | ".join(f"K={k}" for k in VERIFY_DRAFTS)
              + "   (a verify step of K + 1 tokens / a decode step, batch 1)", flush=True)
    print(f"{row['config']} | {row['weights']} | {row['decode_ms']:.1f} | "
          + " | ".join(f"{row[f'verify{k}']:.2f}x" for k in VERIFY_DRAFTS), flush=True)


def copy_prompts(text):
    """{name: prompt text}: "copy", a passage of `text` (its first paragraphs, ~1,000 characters) twice and then
    its first words again, so that a trained model goes on copying it; "fresh", a story to be written, sharing
    nothing with its answer."""
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    passage = ""
    for paragraph in paragraphs:
        passage = f"{passage}\n\n{paragraph}" if passage else paragraph
        if len(passage) >= 1000:
            break
    opening = " ".join(passage.split()[:8])
    return {"copy": f"{passage}\n\n{passage}\n\n{opening}",
            "fresh": "Once upon a time, in a village at the edge of a great forest, there lived"}


def load_copy_model(path, weights, work):
    """(model, its directory): the --copy_model (a checkpoint or model directory convert_weight.py takes, or a Llama
    GGUF) converted to `weights` in `work`."""
    # pylint: disable=import-outside-toplevel
    from baichuan2.convert_weight import convert
    from baichuan2.gguf_checkpoint import gguf_to_checkpoint
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    source = path
    if os.path.isfile(path):
        source = os.path.join(work, "checkpoint")
        gguf_to_checkpoint(path, source)
    model_dir = os.path.join(work, weights)
    kind = {"float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16")}.get(weights, dict(quantize=weights))
    convert(source, model_dir, show_progress=False, **kind)
    return BaichuanForCausalLM.from_pretrained(model_dir), model_dir


def copy_bench(weights, args):
    """End-to-end greedy generation on a trained model, with and without prompt lookup, per prompt of
    copy_prompts: best tokens/s of --spec_rounds alternating runs each, whether the tokens are identical, the
    acceptance (accepted / drafted) and new tokens per step."""
    import tempfile  # pylint: disable=import-outside-toplevel
    from baichuan2.generation import Generator  # pylint: disable=import-outside-toplevel
    from baichuan2.model_dir import load_tokenizer  # pylint: disable=import-outside-toplevel
    with open(args.copy_text, encoding="utf-8") as f:
        prompts = copy_prompts(f.read())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_generate-") as work:
        model, model_dir = load_copy_model(args.copy_model, weights, work)
        tokenizer = load_tokenizer(model_dir)
        generator = Generator(model)
        for name, text in prompts.items():
            ids = tokenizer.encode(text, add_special_tokens=False)
            engine = generator.engine_for([ids], args.new_tokens)
            generator.generate([ids], max_new_tokens=4, eos_token_id=())  # compiles the prefill and decode shapes
            best, outputs, counts = {}, {}, {}
            for _ in range(args.spec_rounds):
                for k in (0, args.num_speculative_tokens):
                    before = (engine.steps, engine.draft_tokens, engine.accepted_tokens)
                    start = time.perf_counter()
                    out = generator.generate([ids], max_new_tokens=args.new_tokens, eos_token_id=(),
                                             prompt_lookup_num_tokens=k)[0]
                    rate = len(out) / (time.perf_counter() - start)
                    best[k] = max(best.get(k, 0.0), rate)
                    outputs[k] = out
                    counts[k] = [now - then for now, then in
                                 zip((engine.steps, engine.draft_tokens, engine.accepted_tokens), before)]
            k = args.num_speculative_tokens
            steps, drafted, accepted = counts[k]
            costs = [engine.step_costs.cost(n) for n in range(1, k + 2)]  # what the engine's draft policy learnt
            rows.append({"weights": weights, "prompt": name, "prompt_tokens": len(ids), "new_tokens": len(outputs[k]),
                         "plain": best[0], "speculative": best[k], "identical": outputs[0] == outputs[k],
                         "drafted": drafted, "accepted": accepted,
                         "per_step": len(outputs[k]) / max(1, steps - 1),  # the first step is the prefill
                         "step_ms": [None if c is None else 1e3 * c for c in costs]})
    return rows


def print_copy_rows(rows, k, rounds):
    print(f"\nend-to-end, greedy, prompt lookup K <= {k} against none (best of {rounds} alternating runs):")
    print("weights | prompt | prompt tokens | new tokens | plain tok/s | speculative tok/s | speed-up | identical | "
          "accepted / drafted | tokens a step", flush=True)
    for r in rows:
        print(f"{r['weights']} | {r['prompt']} | {r['prompt_tokens']} | {r['new_tokens']} | {r['plain']:.2f} | "
              f"{r['speculative']:.2f} | {r['speculative'] / r['plain']:.2f}x | {'yes' if r['identical'] else 'NO'} | "
              f"{r['accepted']} / {r['drafted']} ({r['accepted'] / max(1, r['drafted']):.0%}) | "
              f"{r['per_step']:.2f}", flush=True)
    print("step costs the engine learnt (its draft policy's table; ms for a step of 1 .. K + 1 tokens):")
    for r in rows:
        print(f"{r['weights']} | {r['prompt']} | "
              + " | ".join("-" if ms is None else f"{ms:.1f}" for ms in r["step_ms"]), flush=True)


def run_worker(args):
    """Child process: one shape and format (or the copying model in one format); prints its rows as JSON lines."""
    name, weights = args.worker
    rt = runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="bench_generate.py")
    if name == "copy":
        for row in copy_bench(weights, args):
            print("ROW " + json.dumps(row), flush=True)
        return 0
    row = bench(name, weights, args, rt)
    print("ROW " + json.dumps(row), flush=True)
    return 0


def child_argv(args, name, weights):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, weights,
            "--prefill_tokens", str(args.prefill_tokens), "--new_tokens", str(args.new_tokens),
            "--no_cache_steps", str(args.no_cache_steps), "--device", args.device, "--mode", args.mode]
    if args.depths:
        argv += ["--depths", *map(str, args.depths), "--depth_batch", str(args.depth_batch),
                 "--kv_cache_dtype", args.kv_cache_dtype]
    if args.speculative:
        argv += ["--speculative", args.speculative, "--num_speculative_tokens", str(args.num_speculative_tokens),
                 "--spec_rounds", str(args.spec_rounds)]
        if args.copy_model:
            argv += ["--copy_model", args.copy_model, "--copy_text", args.copy_text]
    return argv + (["--threads", str(args.threads)] if args.threads else [])


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    rt = runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="bench_generate.py")
    from baichuan2 import BaichuanConfig, kernel_probes, kernels  # pylint: disable=import-outside-toplevel

    print(f"CPU: {runtime.cpu_model()}")
    path = kernels.isa()
    bandwidth = kernel_probes.read_bandwidth(2.0, 3) if path else None
    if bandwidth is None:
        print(f"projection kernels unavailable ({kernels.unavailable_reason()}): stock ops; no bandwidth probe, "
              "so no roofline figures")
        return 1
    print(f"{rt.device}, {rt.compute_dtype} compute, {args.mode} mode, {rt.threads} threads; kernels: path {path}, "
          f"{kernels.threads()} threads; memory read bandwidth {bandwidth:.1f} GB/s at the start (the machine may be "
          "shared: figures are noisy)", flush=True)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    first, failed = True, False
    for name in args.configs:
        for weights in args.weights:
            preset = PRESETS.get(name, "baichuan2_7b")
            params = BaichuanConfig.from_preset(preset, **CONFIGS[name]).num_parameters()
            if weights == "float32" and params * 4 > 0.6 * memory:
                print(f"{name} {weights}: skipped ({params * 4 / GIB:.0f} GiB of float32 weights do not fit next to "
                      f"the run in this machine's {memory / GIB:.0f} GiB)", flush=True)
                continue
            proc = subprocess.run(child_argv(args, name, weights), stdout=subprocess.PIPE, text=True,
                                  check=False)
            rows = [line[4:] for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0 or not rows:
                print(f"{name} {weights}: failed (exit status {proc.returncode}; its messages are above)", flush=True)
                failed = True
                continue
            printer = print_verify_row if args.speculative else print_depth_rows if args.depths else print_row
            printer(json.loads(rows[-1]), header=first)
            first = False
    if args.copy_model:
        copy_rows = []
        for weights in args.weights:
            proc = subprocess.run(child_argv(args, "copy", weights), stdout=subprocess.PIPE, text=True, check=False)
            rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
            if proc.returncode != 0 or not rows:
                print(f"copy model {weights}: failed (exit status {proc.returncode}; its messages are above)")
                failed = True
            copy_rows += rows
        print_copy_rows(copy_rows, args.num_speculative_tokens, args.spec_rounds)
        failed = failed or not all(r["identical"] for r in copy_rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
