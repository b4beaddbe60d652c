"""The projection kernels (baichuan2.kernels) against numpy, every format, every instruction-set path, GRAPH mode.

Reference: the weights dequantised exactly as docs/WEIGHT_FORMATS.md defines (w = float(scale) * q) and multiplied
with the float32 x in float64. Tolerance, per output element: |y - y_ref| <= sum_k |w_k| e_k + (K + 2 group + 16) u
sum_k (|x_k| + e_k) a_k, u = 2^-24, a_k = |w_k| (float32, bfloat16, int8) or s_k (q_k + 16) (int4), where e_k bounds
what the kernel does to x before multiplying:
- int8 / int4 (decode and prefill): x is quantised per 32-element chunk to x_q = scale round(x / scale), scale =
  absmax(chunk) / 127, so |x - x_q| <= scale / 2; float32 rounding of the scale and of x / scale moves that by at
  most ~3 * 127 u relative to the scale, hence e_k = (1 + 2^-12) scale / 2. The integer dots are exact.
- bfloat16 on the avx512vnni path (decode and prefill): x rounded to bfloat16 (8 significant bits, nearest even),
  e_k = 2^-8 |x_k|; the bfloat16 products are exact in float32.
- otherwise e_k = 0.
The second term is float32 accumulation: any order of K products puts at most K + few roundings on each term (the
classic gamma_n sum |terms|); the int4 paths sum the stored q + 8 and take off 8 s (sum of x over the group) at the
end, so their terms are s (q + 8) x and 8 s x (sums of up to `group` and G = K / group terms): hence a_k and the
2 group. The test fails on a wrong block/nibble/group index, a dropped tail, a wrong scale or row: those are O(|y|).
"""
import ctypes
import importlib.util
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from baichuan2 import kernel_probes, kernels
from baichuan2.quantization import pack_int4

pytestmark = pytest.mark.skipif(kernels.isa() is None, reason=f"kernels unavailable: {kernels.unavailable_reason()}")

# (M, N, K): K off the group (32, 64) and vector widths (8, 16); N = 1, 3 and the Baichuan2 vocabulary (small K);
# 13 x 37 x 2100: prefill with M and N off its register blocks and K over several passes of its tiles; 1 x 37 x 2100
# and 4 x 9 x 1000: decode over several whole blocks of scales (16 chunks on AVX-512, 8 on AVX2) and a partial one.
SHAPES = [(1, 125696, 40), (3, 125696, 36), (64, 3, 100), (1, 1, 77), (3, 3, 300), (64, 1, 33), (4, 7, 64),
          (64, 125696, 20), (13, 37, 2100), (1, 37, 2100), (4, 9, 1000)]
CASES = [("float32", None), ("bfloat16", None), ("int8", 32), ("int8", 64), ("int4", 32), ("int4", 64)]
U = 2.0 ** -24


class Projection(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, x, weights):
        return self.op(x, *weights)


def quantize(w, bits, group):
    """(stored qweight, float16 scales, q, the dequantised weight in float64) in docs/WEIGHT_FORMATS.md's layout,
    written here independently of the project's quantizer."""
    n, k = w.shape
    groups = math.ceil(k / group)
    padded = np.zeros((n, groups * group), np.float32)
    padded[:, :k] = w
    qmax = 127 if bits == 8 else 7
    scales = (np.abs(padded.reshape(n, groups, group)).max(-1) / qmax).astype(np.float16)
    s = scales.astype(np.float32)
    q = np.round(padded.reshape(n, groups, group) / np.where(s == 0, 1, s)[..., None])
    q = np.clip(q, -qmax - 1, qmax).reshape(n, -1)[:, :k].astype(np.int8)
    dequant = np.repeat(s.astype(np.float64), group, axis=1)[:, :k] * q
    if bits == 8:
        return q, scales, q, dequant
    blocks = math.ceil(k / 32)
    stored = np.full((n, blocks * 32), 8, np.uint8)
    stored[:, :k] = q + 8
    stored = stored.reshape(n, blocks, 2, 16)
    packed = (stored[:, :, 0] | (stored[:, :, 1] << 4)).reshape(n, blocks * 16)
    return packed, scales, q.astype(np.float64), dequant


def x_error(fmt, x, isa):
    """e_k of the docstring: what the kernel may change x by before multiplying."""
    m, k = x.shape
    if fmt.startswith("int"):
        chunks = math.ceil(k / 32)
        padded = np.zeros((m, chunks * 32))
        padded[:, :k] = np.abs(x)
        scale = padded.reshape(m, chunks, 32).max(-1) / 127
        return np.repeat(scale, 32, axis=1)[:, :k] * (1 + 2.0 ** -12) / 2
    if fmt == "bfloat16" and isa == "avx512vnni":
        return np.abs(x) * 2.0 ** -8
    return np.zeros_like(x)


def weights_for(fmt, group, w):
    """(weight tensors for the op, the weight the kernel should use in float64, the magnitudes a_k of the bound)."""
    if fmt == "float32":
        return (Tensor(w),), w.astype(np.float64), np.abs(w.astype(np.float64))
    if fmt == "bfloat16":
        wb = Tensor(w).astype(ms.bfloat16)
        w64 = wb.astype(ms.float32).asnumpy().astype(np.float64)
        return (wb,), w64, np.abs(w64)
    stored, scales, q, dequant = quantize(w, int(fmt[3:]), group)
    if fmt == "int8":
        return (Tensor(stored), Tensor(scales)), dequant, np.abs(dequant)
    s = np.repeat(scales.astype(np.float64), group, axis=1)[:, : w.shape[1]]
    return (Tensor(stored), Tensor(scales)), dequant, s * (q + 16)


_cells = {}  # one compiled graph per case, shared by both instruction-set paths


@pytest.mark.parametrize("fmt,group", CASES, ids=[f"{f}-g{g}" if g else f for f, g in CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_projection_matches_numpy(fmt, group, shape, forced_isa, graph):
    check_against_numpy(fmt, group, shape, forced_isa)


def check_against_numpy(fmt, group, shape, forced_isa):
    m, n, k = shape
    rng = np.random.default_rng(m * 1000003 + n * 101 + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = rng.standard_normal((n, k), dtype=np.float32)
    if fmt.startswith("int"):
        w[0, : min(k, group)] = 0  # an all-zero group: scale 0
    weights, w64, magnitude = weights_for(fmt, group, w)
    key = (fmt, group, shape)
    if key not in _cells:
        _cells[key] = Projection(kernels.linear_op(fmt, group))
    y = _cells[key](Tensor(x), weights).asnumpy()
    assert y.shape == (m, n) and y.dtype == np.float32
    x64 = x.astype(np.float64)
    want = x64 @ w64.T
    err = x_error(fmt, x64, forced_isa)
    bound = err @ np.abs(w64).T + (k + 2 * (group or 0) + 16) * U * ((np.abs(x64) + err) @ magnitude.T)
    worst = np.max(np.abs(y - want) - bound)
    assert worst <= 0, f"{fmt} {forced_isa} {shape}: error exceeds the float32 bound by {worst:.3g}"


# Small batches (a server's batch, speculative verification's K + 1 rows): decode's kernels (M = 2: gemv_q; 3..6:
# gemv_qm, whole blocks two steps at a time on AVX2, the last block one) and the rows past them (prefill), K odd (a
# partial chunk and a partial block of scales) or whole blocks only (4128), N odd and off every register block of rows.
SMALL_BATCHES = [(2, 37, 1001), (3, 5, 4128), (4, 9, 333), (5, 37, 1001), (6, 3, 4128), (7, 19, 333), (16, 9, 1001)]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("group", kernels.GROUP_SIZES)
@pytest.mark.parametrize("shape", SMALL_BATCHES, ids=["x".join(map(str, s)) for s in SMALL_BATCHES])
def test_small_batch_decode_matches_numpy(fmt, group, shape, forced_isa):
    check_against_numpy(fmt, group, shape, forced_isa)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_small_batch_rows_match_single_rows(fmt, forced_isa):
    """Every row of a call on M = 2..6 rows (one pass over W) equals, bit for bit, the same row computed alone (and
    in any other position): a row's sums run in one order whatever the batch, so a sequence's greedy tokens cannot
    depend on what shares its step (speculation's verify rows included). Odd K and N, a partial last block."""
    rng = np.random.default_rng(5)
    k, group = 1001, 32
    x = rng.standard_normal((6, k), dtype=np.float32)
    weights = weights_for(fmt, group, rng.standard_normal((37, k), dtype=np.float32))[0]
    cell = Projection(kernels.linear_op(fmt, group))
    single = np.concatenate([cell(Tensor(x[i:i + 1]), weights).asnumpy() for i in range(6)])
    for m in range(2, 7):
        order = rng.permutation(6)[:m]
        batch = cell(Tensor(x[order]), weights).asnumpy()
        assert np.array_equal(batch, single[order]), f"M = {m}: rows differ from the same rows alone"


@pytest.mark.parametrize("shape", [(1, 37, 2100), (13, 37, 2100), (3, 3, 300), (64, 1, 33)],
                         ids=lambda s: "x".join(map(str, s)))
def test_int4_full_range_and_signed_scales(shape, forced_isa, graph):
    """int4 as the "search" scale method stores it: q over all 16 levels (-8 too: stored nibble 0) and scales of
    either sign, on decode and prefill shapes of every path; the same bound as test_projection_matches_numpy."""
    m, n, k = shape
    rng = np.random.default_rng(m + n + k)
    x = rng.standard_normal((m, k), dtype=np.float32)
    q = rng.integers(-8, 8, (n, k))
    q[:, ::32] = -8  # every group holds a -8
    scales = (rng.standard_normal((n, math.ceil(k / 32))) * 0.05).astype(np.float16)
    s = np.repeat(scales.astype(np.float64), 32, axis=1)[:, :k]
    w64 = s * q
    key = ("int4", 32, shape)
    if key not in _cells:
        _cells[key] = Projection(kernels.linear_op("int4", 32))
    y = _cells[key](Tensor(x), (Tensor(pack_int4(q)), Tensor(scales))).asnumpy()
    x64 = x.astype(np.float64)
    err = x_error("int4", x64, forced_isa)
    bound = err @ np.abs(w64).T + (k + 2 * 32 + 16) * U * ((np.abs(x64) + err) @ (np.abs(s) * (q + 16)).T)
    worst = np.max(np.abs(y - x64 @ w64.T) - bound)
    assert worst <= 0, f"int4 {forced_isa} {shape}: error exceeds the float32 bound by {worst:.3g}"


# int4 asymmetric (w = s (q + 8) + mn, a float16 minimum per group): decode M = 1..6 and prefill (7, 13, 64 rows) on
# every path, groups of one chunk and of several (their minimums cover several chunks), K and N off every block.
ASYMMETRIC_SHAPES = [(1, 37, 2100), (2, 5, 1001), (4, 9, 333), (5, 37, 1001), (6, 3, 4128), (7, 19, 333),
                     (13, 37, 2100), (64, 3, 100)]


def asymmetric_weights(rng, n, k, group):
    """(stored tensors qweight, scales, mins; w in float64; the a_k of the bound) with nibbles over all 16 levels and
    scales and minimums of either sign."""
    q = rng.integers(-8, 8, (n, k))
    groups = math.ceil(k / group)
    scales = (rng.standard_normal((n, groups)) * 0.05).astype(np.float16)
    mins = (rng.standard_normal((n, groups)) * 0.3).astype(np.float16)
    s = np.repeat(scales.astype(np.float64), group, axis=1)[:, :k]
    mn = np.repeat(mins.astype(np.float64), group, axis=1)[:, :k]
    stored = (Tensor(pack_int4(q)), Tensor(scales), Tensor(mins))
    return stored, s * (q + 8) + mn, np.abs(s) * (q + 16) + np.abs(mn)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("shape", ASYMMETRIC_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int4_asymmetric_matches_numpy(shape, group, forced_isa):
    """The minimums' share (decode: the offset pass over them instead of the scales; prefill: the tile's sums start
    at 0 and the minimums are added per chunk) against numpy, within the same bound as every format (a_k = |s|
    (q + 16) + |mn|: the minimums' products are float32 sums too). A minimum read from the wrong group, row or chunk,
    or the symmetric offset left in, is O(|y|)."""
    m, n, k = shape
    rng = np.random.default_rng(m * 7 + n * 11 + k + group)
    x = rng.standard_normal((m, k), dtype=np.float32)
    weights, w64, magnitude = asymmetric_weights(rng, n, k, group)
    y = Projection(kernels.linear_op("int4", group, mins=True))(Tensor(x), weights).asnumpy()
    x64 = x.astype(np.float64)
    err = x_error("int4", x64, forced_isa)
    bound = err @ np.abs(w64).T + (k + 2 * group + 16) * U * ((np.abs(x64) + err) @ magnitude.T)
    worst = np.max(np.abs(y - x64 @ w64.T) - bound)
    assert worst <= 0, f"int4 asymmetric {forced_isa} {shape} g{group}: error exceeds the bound by {worst:.3g}"


def test_int4_asymmetric_rows_match_single_rows(forced_isa):
    """As test_small_batch_rows_match_single_rows, with minimums: decode's rows of M = 2..6 equal each row alone."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((6, 1001), dtype=np.float32)
    weights = asymmetric_weights(rng, 37, 1001, 32)[0]
    cell = Projection(kernels.linear_op("int4", 32, mins=True))
    single = np.concatenate([cell(Tensor(x[i:i + 1]), weights).asnumpy() for i in range(6)])
    for m in range(2, 7):
        order = rng.permutation(6)[:m]
        assert np.array_equal(cell(Tensor(x[order]), weights).asnumpy(), single[order]), f"M = {m}"


def test_minimums_of_the_wrong_shape_are_refused():
    """Minimums must be float16 [N, G] like the scales: another shape is the kernel's bad-value error, not a read
    past the tensor."""
    rng = np.random.default_rng(3)
    qweight, scales, mins = asymmetric_weights(rng, 5, 64, 32)[0]
    op = Projection(kernels.linear_op("int4", 32, mins=True))
    x = Tensor(rng.standard_normal((1, 64), dtype=np.float32))
    assert np.isfinite(op(x, (qweight, scales, mins)).asnumpy()).all()
    with pytest.raises(RuntimeError):
        op(x, (qweight, scales, Tensor(np.ones((5, 3), np.float16)))).asnumpy()


def test_decode_quantises_x_within_half_a_step(graph):
    """The int8 decode path really quantises x (a float32 product would be ~1e-6 close), and by no more than the
    half step per element the bound allows."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 256), dtype=np.float32)
    w = rng.standard_normal((64, 256), dtype=np.float32)
    weights, w64, _ = weights_for("int8", 32, w)
    y = Projection(kernels.linear_op("int8", 32))(Tensor(x), weights).asnumpy().astype(np.float64)
    x64 = x.astype(np.float64)
    error = np.abs(y - x64 @ w64.T)
    assert np.max(error) > 1e-4 * np.max(np.abs(x64 @ w64.T))
    assert np.all(error <= x_error("int8", x64, None) @ np.abs(w64).T * 1.01)


def test_paths_are_reported(monkeypatch):
    available = kernels.available_isas()
    assert "avx2" in available and set(available) <= set(kernels.ISA_PATHS)
    for path in available:
        monkeypatch.setenv("BAICHUAN_KERNEL_ISA", path)
        assert kernels.isa() == path


def test_wrong_shapes_raise(graph):
    op = Projection(kernels.linear_op("float32"))
    with pytest.raises(RuntimeError):
        op(Tensor(np.ones((2, 8), np.float32)), (Tensor(np.ones((3, 9), np.float32)),)).asnumpy()


def test_unavailable_cases_give_none(monkeypatch):
    assert kernels.linear_op("int8", 48) is None  # no kernel for that group size: stock ops
    with pytest.raises(ValueError, match="unknown weight format"):
        kernels.linear_op("int3", 32)
    monkeypatch.setenv("BAICHUAN_KERNELS", "0")
    assert kernels.linear_op("bfloat16") is None
    assert "BAICHUAN_KERNELS=0" in kernels.unavailable_reason()


def test_build_goes_to_the_cache_once(tmp_path, monkeypatch):
    """The build pipeline (compile into a temporary file, rename into the cache, reuse while the sources hash the
    same) on a one-function stand-in for model.cc: the real library takes ~30 s to compile, and set-up builds it."""
    source = tmp_path / "csrc"
    source.mkdir()
    shutil.copy(os.path.join(kernels.SOURCE_DIR, "tables.h"), source)
    (source / kernels.MODEL_SOURCE).write_text('extern "C" int KernelThreads() { return 7; }\n')
    monkeypatch.setattr(kernels, "SOURCE_DIR", str(source))
    monkeypatch.setenv("BAICHUAN_KERNEL_CACHE", str(tmp_path / "cache"))
    path = kernels.library()
    assert os.path.dirname(path) == str(tmp_path / "cache") and ctypes.CDLL(path).KernelThreads() == 7
    built = os.stat(path).st_mtime_ns
    assert kernels.library() == path and os.stat(path).st_mtime_ns == built  # keyed by the source hash: no rebuild
    assert os.listdir(tmp_path / "cache") == [os.path.basename(path)]  # no temporary files left, no probes library


def test_cache_key_covers_every_source_file(tmp_path, monkeypatch):
    """The library is one translation unit including the other csrc files: a change to any of them (a header, a
    per-path .inc) must give a new library, a change elsewhere must not."""
    source = tmp_path / "csrc"
    shutil.copytree(kernels.SOURCE_DIR, source, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(kernels, "SOURCE_DIR", str(source))
    key = kernels.library_path(kernels.MODEL_SOURCE, "baichuan2_kernels")
    assert kernels.library_path("probes.cc", "baichuan2_probes") != key
    (source / "notes.txt").write_text("not a source file")
    assert kernels.library_path(kernels.MODEL_SOURCE, "baichuan2_kernels") == key
    names = sorted(os.listdir(source))
    assert {"model.cc", "probes.cc", "tables.h", "attention.inc"} <= set(names)
    for name in names:
        if name.endswith((".cc", ".h", ".inc")):
            original = (source / name).read_text()
            (source / name).write_text(original + "\n")
            assert kernels.library_path(kernels.MODEL_SOURCE, "baichuan2_kernels") != key, name
            (source / name).write_text(original)


def test_tables_are_read_from_the_cpp_source():
    """FORMATS, ISA_PATHS and GROUP_SIZES come from csrc/tables.h, the lists the C++ generates its enums and
    exported symbols from: every format / group size / weight count has its symbol in the library, and nothing
    else does."""
    with open(os.path.join(kernels.SOURCE_DIR, "tables.h"), encoding="utf-8") as f:
        tables = f.read()
    assert "X(kI4, int4, uint8)" in tables and "X(16384)" in tables and "X(kAvx512Vnni, avx512vnni)" in tables
    assert kernels.FORMATS == ("float32", "bfloat16", "int8", "int4")
    assert kernels.ISA_PATHS == ("avx2", "avxvnni", "avx512", "avx512vnni")
    assert kernels.GROUP_SIZES[0] == 32 and all(g % 32 == 0 for g in kernels.GROUP_SIZES)
    lib = ctypes.CDLL(kernels.library())
    for fmt in kernels.FORMATS:
        for group in kernels.GROUP_SIZES:
            for count in (1, 2, 3):
                assert hasattr(lib, kernels.symbol(fmt, group, count)), (fmt, group, count)
    assert not hasattr(lib, "LinearInt8G48") and kernels.symbol("int8", 48) is None
    assert not lib.KernelHasIsa(b"sse2")


def test_model_code_copy_finds_the_source(tmp_path):
    """kernels.py copied into a model directory uses the csrc folder beside it; a copy moved away from it (a loader's
    module cache) falls back to the installed package's."""
    def load(directory):
        spec = importlib.util.spec_from_file_location(f"kernels_copy_{directory.name}", directory / "kernels.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    with_source, alone = tmp_path / "model_dir", tmp_path / "module_cache"
    for directory in (with_source, alone):
        directory.mkdir()
        shutil.copy(kernels.__file__, directory)
    shutil.copytree(kernels.SOURCE_DIR, with_source / "csrc")
    assert load(with_source).SOURCE_DIR == str(with_source / "csrc")
    copy = load(alone)
    assert os.path.samefile(copy.SOURCE_DIR, kernels.SOURCE_DIR)
    assert (copy.FORMATS, copy.GROUP_SIZES) == (kernels.FORMATS, kernels.GROUP_SIZES)


def test_build_without_a_compiler_says_so_in_one_line(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), BAICHUAN_KERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("CXX", None)
    run = subprocess.run([sys.executable, "-m", "baichuan2.kernels", "--build"], env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["[kernels] no C++ compiler (g++ or $CXX) found: projections use stock MindSpore "
                                       "ops (slower decode)"]
    assert not os.path.exists(tmp_path / "cache")


def test_probes_are_their_own_library():
    """The benchmark probes run from a library of their own, built on demand: the model library exports none of
    them. Their figures are positive on every format (how large is for the perf checks below), and bad input is
    refused."""
    model = ctypes.CDLL(kernels.library())
    for name in ("ReadBandwidth", "ReadBandwidthOf", "PeakGops"):
        assert not hasattr(model, name), name
    assert os.path.basename(kernel_probes.library()).startswith("baichuan2_probes_")
    assert all(kernel_probes.peak_gops(fmt, 0.001) > 0 for fmt in kernels.FORMATS)
    with pytest.raises(ValueError, match="unknown weight format"):
        kernel_probes.peak_gops("int3")
    assert kernel_probes.read_bandwidth_of([np.ones((1 << 16) + 37, np.uint8)], reps=1) > 0
    with pytest.raises(ValueError, match="C-contiguous"):
        kernel_probes.read_bandwidth_of([np.ones((64, 64), np.uint8)[:, ::2]])
    with pytest.raises(ValueError, match="nothing to read"):
        kernel_probes.read_bandwidth_of([np.zeros(0, np.uint8)])


@pytest.mark.perf
def test_memory_bandwidth_probe_is_plausible():
    gbs = kernel_probes.read_bandwidth(0.25, 1)
    assert 0.5 < gbs < 2000


@pytest.mark.perf
def test_compute_peak_is_plausible(forced_isa):
    """Prefill's roofline per format on every path: within what two 512-bit units a core at 6 GHz could issue
    (ops a cycle: float32 FMA 64, bfloat16 dot 128, byte dot 256), and the byte dot (4 products a 32-bit lane)
    above the float32 FMA (1 a lane; on the paths without VNNI three instructions for 4x the products: 1.9x the
    FMA's rate on a Zen 4 EPYC). Each figure is the best of three short runs, so that one run slowed by a
    neighbour's time slice (these virtual machines are shared) does not decide the comparison."""
    peaks = {fmt: max(kernel_probes.peak_gops(fmt, 0.05) for _ in range(3)) for fmt in kernels.FORMATS}
    per_cycle = {"float32": 64, "bfloat16": 128, "int8": 256, "int4": 256}
    for fmt, gops in peaks.items():
        assert 1 < gops <= per_cycle[fmt] * 6 * kernels.threads(), (fmt, gops)
    assert peaks["int8"] > 1.2 * peaks["float32"], peaks


@pytest.mark.perf
def test_bandwidth_of_given_arrays_reads_them_all():
    """read_bandwidth_of reads the arrays it is given (a model's weights), split over the threads: its time grows
    with the bytes (a probe that skipped a buffer, or read one twice, would not scale)."""
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 255, (1 << 20) + 37, dtype=np.uint8) for _ in range(3)]  # edges off the 64-byte lines
    big = [rng.integers(0, 255, 1 << 26, dtype=np.uint8) for _ in range(4)]  # 256 MB: past any cache
    assert 0.5 < kernel_probes.read_bandwidth_of(small, reps=1) < 5000
    seconds_small = 4 * (1 << 26) / (kernel_probes.read_bandwidth_of(big[:1], reps=2) * 1e9)
    seconds_big = 4 * (1 << 26) / (kernel_probes.read_bandwidth_of(big, reps=2) * 1e9)
    assert 0.5 < seconds_big / seconds_small < 2  # the same GB/s on 4x the bytes


@pytest.mark.parametrize("fmt", kernels.FORMATS)
@pytest.mark.parametrize("m", [1, 3, 9])
def test_several_weights_in_one_call_equal_separate_calls(fmt, m, graph):
    """q/k/v (3) and gate/up (2) in one call: the same numbers, bit for bit, as one call per weight (the rows of
    every weight are split over the threads separately; x is prepared once)."""
    rng = np.random.default_rng(m)
    k, group = 100, 32
    x = Tensor(rng.standard_normal((m, k), dtype=np.float32))
    weights = [weights_for(fmt, group, rng.standard_normal((n, k), dtype=np.float32))[0] for n in (7, 64, 3)]
    single = Projection(kernels.linear_op(fmt, group))
    for count in (2, 3):
        outs = Projection(kernels.linear_op(fmt, group, weights=count))(x, sum(weights[:count], ()))
        assert len(outs) == count
        for out, w in zip(outs, weights):
            assert np.array_equal(out.asnumpy(), single(x, w).asnumpy())


class Call(nn.Cell):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def construct(self, *args):
        return self.op(*args)


def rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], -1)


@pytest.mark.parametrize("shape", [(1, 7, 3, 10), (2, 1, 5, 128), (3, 4, 1, 2)], ids=str)
def test_layout_ops_match_numpy(shape, graph):
    """The head transposes (with RoPE for q/k) and RMSNorm that replace several stock ops at inference."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape, dtype=np.float32)
    swapped = x.swapaxes(1, 2)
    assert np.array_equal(Call(kernels.swap_axes12_op())(Tensor(x)).asnumpy(), swapped)
    cos, sin = (rng.standard_normal(swapped.shape, dtype=np.float32) for _ in range(2))
    got = Call(kernels.rope_swap_axes12_op())(Tensor(x), Tensor(cos), Tensor(sin)).asnumpy()
    np.testing.assert_allclose(got, swapped * cos + rotate_half(swapped) * sin, rtol=1e-6, atol=1e-6)
    rows = x.reshape(-1, shape[-1])
    w = rng.standard_normal(shape[-1], dtype=np.float32)
    got = Call(kernels.rms_norm_op())(Tensor(rows), Tensor(w), Tensor([1e-6], ms.float32)).asnumpy()
    want = w * rows / np.sqrt((rows.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch,heads,slots,dim,slot", [(1, 3, 5, 8, 0), (2, 2, 7, 6, 6), (3, 1, 1, 4, 0)])
def test_decode_attention_matches_numpy(batch, heads, slots, dim, slot, graph):
    """One decode step: the new k/v row lands at `slot` of a copy of the caches; attention over every slot."""
    rng = np.random.default_rng(slots + slot)
    q, k, v = (rng.standard_normal((batch, heads, 1, dim), dtype=np.float32) for _ in range(3))
    kc, vc = (rng.standard_normal((batch, heads, slots, dim), dtype=np.float32) for _ in range(2))
    bias = np.where(rng.random((batch, heads, 1, slots)) < 0.3, -1e9, rng.standard_normal((batch, heads, 1, slots)))
    bias[..., slot] = 0.0  # the new token always sees itself
    bias = bias.astype(np.float32)
    out, ko, vo = Call(kernels.decode_attention_op())(*map(Tensor, (q, k, v, kc, vc)), Tensor(slot, ms.int32),
                                                       Tensor(bias))
    want_k, want_v = kc.copy(), vc.copy()
    want_k[:, :, slot], want_v[:, :, slot] = k[:, :, 0], v[:, :, 0]
    assert np.array_equal(ko.asnumpy(), want_k) and np.array_equal(vo.asnumpy(), want_v)
    scores = q @ want_k.swapaxes(-1, -2) / np.sqrt(dim) + bias
    p = np.exp(scores - scores.max(-1, keepdims=True))
    want = (p / p.sum(-1, keepdims=True)) @ want_v  # [B, N, 1, D]
    np.testing.assert_allclose(out.asnumpy(), want.swapaxes(1, 2), rtol=1e-5, atol=1e-5)
