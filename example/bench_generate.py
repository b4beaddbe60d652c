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
from baichuan2.kernels import FORMATS as WEIGHTS
from baichuan2.random_model import build_random_model

CONFIGS = {
    "S": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376, vocab_size=32000,
              max_position_embeddings=1024, model_max_length=1024),
    "M": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2816,
              vocab_size=125696, max_position_embeddings=1024, model_max_length=1024),
    "7B": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008,
               vocab_size=125696, max_position_embeddings=1024, model_max_length=1024),
}
GIB = 1024 ** 3
ROUNDS = 4  # batch-1 decode runs per shape and format, each after a read of the model's weights


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--configs", nargs="+", default=["S", "M"], choices=list(CONFIGS))
    parser.add_argument("--weights", nargs="+", default=["float32"], choices=WEIGHTS,
                        help="weight formats to build each shape in (int8 / int4: group size 32)")
    parser.add_argument("--prefill_tokens", type=int, default=512, help="prompt length of the prefill measurement")
    parser.add_argument("--new_tokens", type=int, default=32, help="decode steps timed per batch size")
    parser.add_argument("--no_cache_steps", type=int, default=0,
                        help="also time this many no-cache decode steps per batch size (0: skip)")
    parser.add_argument("--mode", choices=["graph", "pynative"], default="graph",
                        help="MindSpore execution mode; pynative is far slower per step (op by op from Python) but "
                             "holds a little less memory: GRAPH mode's compiled graphs hold ~30 MB per 7B layer")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "WEIGHTS"), help=argparse.SUPPRESS)
    runtime.add_device_argument(parser)
    args = parser.parse_args(argv)
    if args.prefill_tokens < 1 or args.new_tokens < 2:
        parser.error("--prefill_tokens must be >= 1 and --new_tokens >= 2")
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


def bench(name, weights, args, rt):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from baichuan2 import kernel_probes  # pylint: disable=import-outside-toplevel
    from baichuan2.generation import Generator  # pylint: disable=import-outside-toplevel

    fields = CONFIGS[name]
    model = build_random_model(fields, weights, rt.compute_dtype)
    reset_peak_rss()
    generator = Generator(model)
    config = model.config
    rng = np.random.default_rng(0)
    row = {"config": name, "weights": weights, "params": config.num_parameters()}

    # prefill, batch 1 (warm-up compiles; then the best of 2)
    length = args.prefill_tokens
    ids = ms.Tensor(rng.integers(3, config.vocab_size, size=(1, length)).astype(np.int32))
    mask = ms.Tensor(np.ones((1, length), np.int32))
    prefill = model.cached_step_cells()[0]  # one prompt's cached step, outside the engine's scheduling
    prefill.step(ids, mask, *model.empty_caches(1, length))[0].asnumpy()
    best = min(_seconds(lambda: prefill.step(ids, mask, *model.empty_caches(1, length))[0].asnumpy())
               for _ in range(2))
    row["prefill"] = length / best
    row["prefill_fraction"] = prefill_ops(config, length) / best / 1e9 / kernel_probes.peak_gops(weights)

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


def run_worker(args):
    """Child process: one shape and format; prints its row as one JSON line."""
    name, weights = args.worker
    rt = runtime.setup_inference(args.device, mode=args.mode, threads=args.threads, prog="bench_generate.py")
    row = bench(name, weights, args, rt)
    print("ROW " + json.dumps(row), flush=True)
    return 0


def child_argv(args, name, weights):
    argv = [sys.executable, os.path.abspath(__file__), "--worker", name, weights,
            "--prefill_tokens", str(args.prefill_tokens), "--new_tokens", str(args.new_tokens),
            "--no_cache_steps", str(args.no_cache_steps), "--device", args.device, "--mode", args.mode]
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
            params = BaichuanConfig.from_preset("baichuan2_7b", **CONFIGS[name]).num_parameters()
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
            print_row(json.loads(rows[-1]), header=first)
            first = False
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
