"""Projection kernels (baichuan2.kernels) against the stock MindSpore ops, side by side in one run.

    python example/bench_kernels.py                              # every format, the Baichuan2-7B layer shapes
    python example/bench_kernels.py --formats int8 --shapes 4096x4096 --prefill 64

Prints the CPU model, the kernel path (avx512 / avx2) and threads, and the machine's memory read bandwidth measured
now (2 GB read on all threads with the kernels' own vector loads; again before each row, as bw). Then per format
and weight shape N x K:
  decode   M = 1: GB/s of weights read and the fraction of the row's bandwidth (the roofline), kernel and stock
  prefill  M = 64, 512: GFLOPS (2 M N K / time), kernel and stock, and the kernel's fraction of the format's
           compute roofline measured now (peak: the rate of the instruction its matrix-matrix kernel is built on,
           vpdpbusd / vdpbf16ps / FMA, in independent chains on all the kernels' threads; again before each row)
Both paths run as GRAPH-mode Cells; decode cycles through enough weight copies (>= 256 MB) that the weights come
from memory, not the 32 MB L3. Stock paths: float32 MatMul(transpose_b); bfloat16 Cast + MatMul; int8 Cast x
scales + MatMul; int4 nibble unpack (FloorDiv, Sub, Concat) + the same. Random weights, group size 32.

    python example/bench_kernels.py --decode_rows 1 2 4 5 8 16 --formats int4 int8 --shapes 4096x4096

--decode_rows M ...: small-batch decode (a server's batch, speculative verification's K + 1 rows) instead: per format
and weight shape, ms per call at each M with the weights streamed from memory (>= 256 MB of copies, as decode), the
M values interleaved in rounds so that each ratio to M = 1 is taken side by side (median over rounds); and the
compute floor: the same call on one slice of the rows (<= 6 MB, read again and again, so it stays in the caches),
scaled to the whole shape: a ratio near floor / t(M = 1) is compute-bound, one near 1 memory-bound.

    python example/bench_kernels.py --paged 128 1024 --formats int4   # the whole-stack ops instead

--paged DEPTH ...: a batch-1 decode step of the whole stack (every layer, the final norm, the lm_head; random layers
of --stack_shape, RoPE) at each depth (keys already cached), ms per step: CachedStackLogits (contiguous float32
caches) against PagedStackLogits (a pool of 16-row blocks in shuffled order; float32, bfloat16 and int8 pools).
"""
import argparse
import math
import time

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from baichuan2 import kernel_probes, kernels, runtime

SHAPES = ("4096x4096", "11008x4096", "4096x11008", "125696x4096")
GROUP = 32
MIN_DECODE_BYTES = 256e6
# --paged: (layers, hidden, heads, MLP width, vocabulary), bench_generate.py's shapes S and M and the 7B
STACK_SHAPES = {"S": (8, 512, 8, 1376, 32000), "M": (12, 1024, 16, 2816, 125696), "7B": (32, 4096, 32, 11008, 125696)}
POOL_BLOCK = 16
POOL_DTYPES = ("float32", "bfloat16", "int8")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(kernels.FORMATS), choices=kernels.FORMATS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), help="N x K of the weight, e.g. 4096x11008")
    parser.add_argument("--prefill", nargs="*", type=int, default=[64, 512], help="prefill row counts M")
    parser.add_argument("--no_stock", action="store_true", help="skip the stock MindSpore paths")
    parser.add_argument("--seconds", type=float, default=0.5, help="least time per measurement")
    parser.add_argument("--decode_rows", nargs="+", type=int, metavar="M",
                        help="time decode at these row counts instead (streamed and in-cache floor, ratios to M = 1)")
    parser.add_argument("--rounds", type=int, default=5, help="--decode_rows: interleaved rounds per M")
    parser.add_argument("--paged", nargs="+", type=int, metavar="DEPTH",
                        help="time the whole-stack ops' decode step at these depths instead (cached vs paged)")
    parser.add_argument("--stack_shape", default="S", choices=list(STACK_SHAPES), help="--paged: the layers' shape")
    return parser.parse_args(argv)


def make_weights(fmt, n, k, rng):
    """(weight tensors of one projection, bytes read per product), built directly in the target format."""
    if fmt == "float32":
        return (Tensor(rng.standard_normal((n, k), dtype=np.float32)),), 4 * n * k
    if fmt == "bfloat16":
        return (Tensor(rng.standard_normal((n, k), dtype=np.float32)).astype(ms.bfloat16),), 2 * n * k
    groups = math.ceil(k / GROUP)
    scales = Tensor((rng.random((n, groups), dtype=np.float32) * 0.01 + 1e-3).astype(np.float16))
    if fmt == "int8":
        return (Tensor(rng.integers(-127, 128, (n, k), dtype=np.int8)), scales), n * k + 2 * n * groups
    units = math.ceil(k / 32) * 16
    return (Tensor(rng.integers(0, 256, (n, units), dtype=np.uint8)), scales), n * units + 2 * n * groups


def stock_projection(fmt, k):
    """The stock-op path for `fmt`, a function of (x, *weights)."""
    matmul = ops.MatMul(transpose_b=True)

    def dequant(q, s):
        n = q.shape[0]
        w = q.astype(ms.float32).reshape(n, -1, GROUP) * s.astype(ms.float32).reshape(n, -1, 1)
        return w.reshape(n, -1)[:, :k]

    def int4_values(p):
        n = p.shape[0]
        b = p.astype(ms.int32).reshape(n, -1, 16)
        high = b // 16
        return ops.concat((b - high * 16, high), -1).reshape(n, -1) - 8

    if fmt == "float32":
        return matmul
    if fmt == "bfloat16":
        return lambda x, w: matmul(x, w.astype(ms.float32))
    if fmt == "int8":
        return lambda x, q, s: matmul(x, dequant(q, s))
    return lambda x, p, s: matmul(x, dequant(int4_values(p), s))


class Many(nn.Cell):
    """One product per weight copy in a single graph (one launch for all of them)."""

    def __init__(self, fn, copies):
        super().__init__()
        self.fn = fn
        self.copies = copies

    def construct(self, x, weights):
        outs = ()
        for i in range(self.copies):
            outs = outs + (self.fn(x, *weights[i]),)
        return outs


def seconds_per_product(cell, x, weights, copies, least):
    cell(x, weights)  # compile + warm up
    runs, start = 0, time.perf_counter()
    while True:
        out = cell(x, weights)
        out[-1].asnumpy()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= least and runs >= 2:
            return elapsed / (runs * copies)


class Step(nn.Cell):
    """One call of a whole-stack op."""

    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, *inputs):
        return self.op(*inputs)


def seconds_per_step(op, inputs, least):
    cell = Step(op)
    cell(*inputs).asnumpy()  # compile + warm up
    runs, start = 0, time.perf_counter()
    while True:
        cell(*inputs).asnumpy()
        runs += 1
        elapsed = time.perf_counter() - start
        if elapsed >= least and runs >= 2:
            return elapsed / runs


def bench_stack(args, rng):
    """--paged: ms per batch-1 decode step, CachedStackLogits against PagedStackLogits per pool dtype."""
    layers, hidden, heads, width, vocab = STACK_SHAPES[args.stack_shape]
    dim = hidden // heads
    positions = max(args.paged) + 1
    cos, sin = (Tensor(rng.standard_normal((positions, dim), dtype=np.float32)) for _ in range(2))
    x = Tensor(rng.standard_normal((1, hidden), dtype=np.float32))
    shared = [Tensor(np.ones(hidden, np.float32)), Tensor(np.array([1e-6], np.float32)),
              Tensor(np.array([GROUP, 1], np.int32))]  # norm, eps, spec (RoPE)
    slopes = Tensor(np.ones(heads, np.float32))
    print(f"stack {args.stack_shape}: {layers} layers, hidden {hidden}, {heads} heads, MLP {width}, "
          f"vocabulary {vocab}; pool blocks of {POOL_BLOCK} rows; ms per decode step (paged / cached)")
    for fmt in args.formats:
        per_layer = []
        for _ in range(layers):
            per_layer += [Tensor(np.ones(hidden, np.float32))] * 2
            for n, k in [(hidden, hidden)] * 4 + [(width, hidden)] * 2 + [(hidden, width)]:
                per_layer += make_weights(fmt, n, k, rng)[0]
        head = make_weights(fmt, vocab, hidden, rng)[0]
        for depth in args.paged:
            slots = depth + 1
            caches = [Tensor(np.zeros((layers, 1, heads, slots, dim), np.float32)) for _ in range(2)]
            cached = seconds_per_step(kernels.cached_stack_op(len(head)), [
                x, *shared, Tensor(np.ones((1, slots), np.int32)), Tensor(np.array([depth], np.int32)), cos, sin,
                slopes, *caches, *per_layer, *head], args.seconds)
            del caches
            row = f"{fmt:9} depth {depth:6} | cached {cached * 1e3:8.2f}"
            blocks = -(-slots // POOL_BLOCK)
            tables = Tensor(rng.permutation(blocks).astype(np.int32).reshape(1, blocks))
            for pool in POOL_DTYPES:
                shape = (layers, blocks, heads, POOL_BLOCK, dim)
                pools = [Tensor(np.zeros(shape, np.int8 if pool == "int8" else np.float32)) for _ in range(2)]
                if pool == "bfloat16":
                    pools = [p.astype(ms.bfloat16) for p in pools]
                scales = [Tensor(np.ones(shape[:4], np.float32)) for _ in range(2)]
                paged = seconds_per_step(kernels.paged_stack_op(len(head)), [
                    x, *shared, Tensor(np.array([[0, depth]], np.int32)), Tensor(np.array([0], np.int32)), tables,
                    cos, sin, slopes, *pools, *scales, *per_layer, *head], args.seconds)
                row += f" | paged {pool} {paged * 1e3:8.2f} ({paged / cached:4.2f})"
            print(row, flush=True)


# --decode_rows floor: one slice of the weight's rows, at most this many bytes, read again and again (it stays in the
# caches, L2 / L3); large enough that a call is far longer than a launch and the threads' fork / join
FLOOR_BYTES = 6e6
FLOOR_COPIES = 8


def bench_decode_rows(args, rng):
    """--decode_rows: ms per call at each M (weights from memory), its ratio to M = 1 taken round by round, and
    the compute floor (one slice of rows that stays in the caches, FLOOR_COPIES times a launch, scaled to N rows)."""
    rows = sorted(set(args.decode_rows) | {1})
    least = args.seconds / 2
    print(f"decode at M = {rows}: ms per call (weights streamed from memory), x M = 1 (median over {args.rounds} "
          "interleaved rounds); floor: ms per call with the weights in cache (a slice of rows, scaled to N); "
          "tok/s x: M / ratio")
    print(f"{'format':7} {'N x K':>11} {'M':>3} | {'ms':>8} {'GB/s':>6} {'x M=1':>6} {'tok/s x':>7} | "
          f"{'floor ms':>8} {'floor/t1':>8}")
    for fmt in args.formats:
        op = kernels.linear_op(fmt, GROUP)
        for shape in args.shapes:
            n, k = map(int, shape.lower().split("x"))
            first, nbytes = make_weights(fmt, n, k, rng)
            copies = max(1, min(16, math.ceil(MIN_DECODE_BYTES / nbytes)))
            weights = (first,) + tuple(make_weights(fmt, n, k, rng)[0] for _ in range(copies - 1))
            nslice = max(8, min(n, int(FLOOR_BYTES * n / nbytes)) // 8 * 8)
            piece = tuple(w[:nslice] for w in first)
            xs = {m: Tensor(rng.standard_normal((m, k), dtype=np.float32)) for m in rows}
            stream = {m: Many(op, copies) for m in rows}
            floor = {m: Many(op, FLOOR_COPIES) for m in rows}
            times = {m: [] for m in rows}
            floors = {m: [] for m in rows}
            for _ in range(args.rounds):
                for m in rows:  # interleaved: every M in each round, so drift on a shared machine hits all alike
                    times[m].append(seconds_per_product(stream[m], xs[m], weights, copies, least))
                    floors[m].append(seconds_per_product(floor[m], xs[m], (piece,) * FLOOR_COPIES, FLOOR_COPIES,
                                                         least / 2) * n / nslice)
            t1 = np.array(times[1])
            for m in rows:
                t, f = np.median(times[m]), np.median(floors[m])
                ratio = np.median(np.array(times[m]) / t1)
                print(f"{fmt:7} {shape:>11} {m:3} | {t * 1e3:8.3f} {nbytes / t / 1e9:6.1f} {ratio:6.2f} "
                      f"{m / ratio:7.2f} | {f * 1e3:8.3f} {np.median(np.array(floors[m]) / t1):8.2f}", flush=True)
            del weights, first, piece


def main(argv=None):
    args = parse_args(argv)
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    print(f"CPU: {runtime.cpu_model()}")
    path = kernels.isa()
    if path is None:
        print(f"kernels unavailable: {kernels.unavailable_reason()}")
        return 1
    bandwidth = kernel_probes.read_bandwidth(2.0, 3)
    print(f"kernels: path {path}, {kernels.threads()} threads; memory read bandwidth {bandwidth:.1f} GB/s "
          "(the machine may be shared: figures are noisy)")
    rng = np.random.default_rng(0)
    if args.paged:
        bench_stack(args, rng)
        return 0
    if args.decode_rows:
        bench_decode_rows(args, rng)
        return 0
    header = f"{'format':9} {'N x K':>12} | {'bw GB/s':>7} {'decode GB/s':>11} {'roofline':>8} {'stock GB/s':>10} {'stock':>6} |"
    header += f" {'peak GOPS':>9} |" if args.prefill else ""
    header += "".join(f" {'M=' + str(m) + ' GFLOPS':>13} {'of peak':>7} {'stock':>7} |" for m in args.prefill)
    print(header)
    for fmt in args.formats:
        op = kernels.linear_op(fmt, GROUP)
        for shape in args.shapes:
            peak = kernel_probes.peak_gops(fmt) if args.prefill else None
            n, k = map(int, shape.lower().split("x"))
            stock = stock_projection(fmt, k)
            first, nbytes = make_weights(fmt, n, k, rng)
            copies = max(1, min(16, math.ceil(MIN_DECODE_BYTES / nbytes)))
            weights = (first,) + tuple(make_weights(fmt, n, k, rng)[0] for _ in range(copies - 1))
            x1 = Tensor(rng.standard_normal((1, k), dtype=np.float32))
            bandwidth = kernel_probes.read_bandwidth(2.0, 2)  # again per row: on a shared machine it drifts
            t = seconds_per_product(Many(op, copies), x1, weights, copies, args.seconds)
            row = f"{fmt:9} {shape:>12} | {bandwidth:7.1f} {nbytes / t / 1e9:11.1f} {nbytes / t / 1e9 / bandwidth:8.0%}"
            if args.no_stock:
                row += f" {'-':>10} {'-':>6} |"
            else:
                # one copy: the stock dequantising paths hold float32/int32 temporaries of the whole weight each
                scopies = copies if fmt == "float32" else 1
                ts = seconds_per_product(Many(stock, scopies), x1, weights[:scopies], scopies, args.seconds)
                row += f" {nbytes / ts / 1e9:10.2f} {nbytes / ts / 1e9 / bandwidth:6.1%} |"
            if args.prefill:
                row += f" {peak:9.0f} |"
            for m in args.prefill:
                x = Tensor(rng.standard_normal((m, k), dtype=np.float32))
                flops = 2 * m * n * k
                t = seconds_per_product(Many(op, 1), x, weights[:1], 1, args.seconds)
                row += f" {flops / t / 1e9:13.1f} {flops / t / 1e9 / peak:7.0%}"
                if args.no_stock:
                    row += f" {'-':>7} |"
                else:
                    ts = seconds_per_product(Many(stock, 1), x, weights[:1], 1, args.seconds)
                    row += f" {flops / ts / 1e9:7.1f} |"
            print(row, flush=True)
            del weights, first
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
