"""The projection kernels (baichuan2.kernels) against numpy, every format, every instruction-set path, GRAPH mode.

Reference: the weights dequantised exactly as QUANT_FORMAT.md defines (w = float(scale) * q) and multiplied with the
float32 x in float64. Tolerance, per output element: |y - y_ref| <= sum_k |w_k| e_k + (K + 2 group + 16) u
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
import math
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from baichuan2 import kernels

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
    """(stored qweight, float16 scales, q, the dequantised weight in float64) in QUANT_FORMAT.md's layout, written
    here independently of the project's quantizer."""
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


@pytest.fixture(params=kernels.ISA_PATHS)
def forced_isa(request, monkeypatch):
    if request.param not in kernels.available_isas():
        pytest.skip(f"this CPU cannot run the {request.param} path (it has {', '.join(kernels.available_isas())})")
    monkeypatch.setenv("BAICHUAN_KERNEL_ISA", request.param)
    assert kernels.isa() == request.param
    return request.param


@pytest.mark.parametrize("fmt,group", CASES, ids=[f"{f}-g{g}" if g else f for f, g in CASES])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_projection_matches_numpy(fmt, group, shape, forced_isa, graph):
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


@pytest.mark.slow
def test_build_goes_to_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("BAICHUAN_KERNEL_CACHE", str(tmp_path))
    path = kernels.library()
    assert os.path.dirname(path) == str(tmp_path) and os.path.isfile(path)
    built = os.stat(path).st_mtime_ns
    assert kernels.library() == path and os.stat(path).st_mtime_ns == built  # keyed by the source hash: no rebuild
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary files left


def test_memory_bandwidth_probe_is_plausible():
    gbs = kernels.read_bandwidth(0.25, 1)
    assert 0.5 < gbs < 2000


def test_compute_peak_is_plausible(forced_isa):
    """Prefill's roofline per format on every path: within what two 512-bit units a core at 6 GHz could issue
    (ops a cycle: float32 FMA 64, bfloat16 dot 128, byte dot 256), and the byte dot (4 products a 32-bit lane)
    above the float32 FMA (1 a lane; on the paths without VNNI three instructions for 4x the products: 1.9x the
    FMA's rate on a Zen 4 EPYC). Each figure is the best of three short runs, so that one run slowed by a
    neighbour's time slice (these virtual machines are shared) does not decide the comparison."""
    peaks = {fmt: max(kernels.peak_gops(fmt, 0.05) for _ in range(3)) for fmt in kernels.FORMATS}
    per_cycle = {"float32": 64, "bfloat16": 128, "int8": 256, "int4": 256}
    for fmt, gops in peaks.items():
        assert 1 < gops <= per_cycle[fmt] * 6 * kernels.threads(), (fmt, gops)
    assert peaks["int8"] > 1.2 * peaks["float32"], peaks


def test_bandwidth_of_given_arrays_reads_them_all():
    """read_bandwidth_of reads the arrays it is given (a model's weights), split over the threads: its time grows
    with the bytes (a probe that skipped a buffer, or read one twice, would not scale), and bad input is refused."""
    rng = np.random.default_rng(0)
    small = [rng.integers(0, 255, (1 << 20) + 37, dtype=np.uint8) for _ in range(3)]  # edges off the 64-byte lines
    big = [rng.integers(0, 255, 1 << 26, dtype=np.uint8) for _ in range(4)]  # 256 MB: past any cache
    assert 0.5 < kernels.read_bandwidth_of(small, reps=1) < 5000
    seconds_small = 4 * (1 << 26) / (kernels.read_bandwidth_of(big[:1], reps=2) * 1e9)
    seconds_big = 4 * (1 << 26) / (kernels.read_bandwidth_of(big, reps=2) * 1e9)
    assert 0.5 < seconds_big / seconds_small < 2  # the same GB/s on 4x the bytes
    with pytest.raises(ValueError, match="C-contiguous"):
        kernels.read_bandwidth_of([big[0].reshape(1 << 13, 1 << 13)[:, ::2]])
    with pytest.raises(ValueError, match="nothing to read"):
        kernels.read_bandwidth_of([np.zeros(0, np.uint8)])


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


# ---------------------------------------------------------------------------------------------- in the model
MODEL_SHAPE = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=352,
                   vocab_size=300, max_position_embeddings=128, model_max_length=128)


def random_model(weights, shape=None):
    """A small model in `weights` format with random weights (example/bench_generate.py's builder)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "example", "bench_generate.py")
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.build_model(shape or MODEL_SHAPE, weights, "float32")


@pytest.mark.parametrize("weights", kernels.FORMATS)
def test_model_with_kernels_matches_stock_ops(weights, graph, monkeypatch):
    """Every projection and the lm_head through the kernels (q/k/v and gate/up fused) gives the stock ops' logits
    for a 12-token forward (the prefill path). float32 / bfloat16 where x is not rounded: float32 accumulation in
    another order only (1e-4 of the largest logit); int8 / int4: the kernels quantise x to int8 per 32 inputs (half a
    step of 1/127 of the chunk's largest |x| at most; ~0.5% of the largest output a projection, exact otherwise: see
    the projection test), which through this random model's layers moved the logits by up to 2.3% (int8) and 0.6%
    (int4) of the largest; bfloat16 on a path with a bfloat16 dot rounds x to 8 significant bits (2^-9 relative),
    smaller still: 5e-2 for all three, far below what a wrong row, block or scale does (O(1))."""
    ids = Tensor(np.arange(3, 15, dtype=np.int32).reshape(1, 12))
    fast = random_model(weights)
    attn, mlp = fast.model.layers[0].self_attn, fast.model.layers[0].mlp
    assert attn.qkv_op is not None and mlp.gate_up_op is not None and fast.lm_head.kernel is not None
    assert None not in (attn.swap_op, attn.rope_swap_op, attn.decode_op, fast.model.layers[0].input_layernorm.op,
                        fast.model.norm.op)
    tolerance = 5e-2 if kernels.rounds_x(weights) else 1e-4  # asked before the kernels are switched off
    monkeypatch.setenv("BAICHUAN_KERNELS", "0")
    stock = random_model(weights)
    stock_attn = stock.model.layers[0].self_attn
    assert stock_attn.qkv_op is None and stock.lm_head.kernel is None
    assert stock_attn.swap_op is None and stock_attn.rope_swap_op is None and stock.model.norm.op is None
    want = stock(ids).asnumpy()
    got = fast(ids).asnumpy()
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want)), np.max(np.abs(got - want)) / np.max(np.abs(want))


def cached_decode_logits(model, steps=4):
    """Logits of a left-padded batch of 3 (prompts of 5, 2 and 7 tokens): the prefill, then `steps` decode steps
    through the model's own cells; also every layer's key cache after the last step, [layers, B, N, L, D] (the
    in-place ones when they are)."""
    prefill, decode = model.cached_step_cells()
    prompt, slots = 7, 7 + steps
    tokens = np.arange(10, 10 + 3 * slots, dtype=np.int32).reshape(3, slots) % 290 + 3
    mask = np.zeros((3, slots), np.int32)
    for row, length in enumerate((5, 2, 7)):
        mask[row, prompt - length:prompt] = 1
    k, v = model.empty_caches(3, slots)
    logits, k, v = prefill.step(Tensor(tokens[:, :prompt]), Tensor(mask), k, v)
    out = [logits.asnumpy()]
    for slot in range(prompt, slots):
        mask[:, slot] = 1
        logits, k, v = decode.step(Tensor(tokens[:, slot:slot + 1]), Tensor(mask), Tensor(slot, ms.int32), k, v)
        out.append(logits.asnumpy())
    keys = k.asnumpy() if isinstance(k, Tensor) else np.stack([layer.asnumpy() for layer in k])
    return np.stack(out), keys


# float32 + RoPE in the quick tier, the rest (~5 s each: two models compiled) in the slow one
CACHED_STACK_CASES = [(w, e) if (w, e) == ("float32", "rope") else pytest.param(w, e, marks=pytest.mark.slow)
                      for w in kernels.FORMATS for e in ("rope", "alibi")]


@pytest.mark.parametrize("weights,encoding", CACHED_STACK_CASES)
def test_cached_stack_op_matches_the_per_op_kernels(weights, encoding, graph):
    """Prefill and decode steps through CachedStackLogits (one op for all layers and the lm_head, caches written in
    place) and CachedStack (the lm_head's own kernel after it) give the logits and caches of the same kernels called
    op by op (projections, layout ops, DecodeAttention, stock attention at prefill). Float32 weights: float32
    rounding only (1e-4 of the largest value). The other formats' decode projections round x (bfloat16: to 8 bits;
    int8 / int4: to int8 per 32 inputs), so a last-bit difference upstream (the op's own SiLU and RMSNorm against
    MindSpore's) can flip a rounding: 1e-2 there, still far below what a wrong position, slot or head does (the
    ALiBi sign reversed: 76%). The caches the caller passed in hold the new rows afterwards (the op writes into the
    caller's buffers)."""
    shape = dict(MODEL_SHAPE, position_encoding=encoding)
    fused = random_model(weights, shape)
    assert fused.model.stack_op is not None and fused.caches_in_place()
    layers = fused.config.num_hidden_layers
    assert len(fused.model.stack_inputs) == layers * (2 + 7 * (2 if weights.startswith("int") else 1))
    split = random_model(weights, shape)
    split.model.use_layer_kernels(enabled=False)
    assert not split.caches_in_place() and split.model.layers[0].self_attn.decode_op is not None
    got, got_k = cached_decode_logits(fused)
    want, want_k = cached_decode_logits(split)
    assert np.abs(got_k).min(axis=(1, 2, 4))[:, -1].min() > 0  # every layer holds the last step's row
    tolerance = 1e-4 if weights == "float32" else 1e-2
    assert np.max(np.abs(got_k - want_k)) <= tolerance * np.max(np.abs(want_k))
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want))
    assert fused.model.stack_logits_op is not None  # the lm_head ran inside the op: now without it (CachedStack)
    fused.model.stack_logits_op = None
    alone = cached_decode_logits(fused)[0]
    assert np.max(np.abs(alone - want)) <= tolerance * np.max(np.abs(want))


@pytest.mark.slow
def test_cached_stack_op_on_every_isa_path(forced_isa, graph):
    """CachedStack's attention and SiLU loops are compiled per instruction-set path like the projections: on each,
    prefill and decode logits equal the per-op kernels' (float32 weights, RoPE; see the test above)."""
    fused, split = random_model("float32"), random_model("float32")
    split.model.use_layer_kernels(enabled=False)
    got, want = cached_decode_logits(fused)[0], cached_decode_logits(split)[0]
    assert np.max(np.abs(got - want)) <= 1e-4 * np.max(np.abs(want))


def test_lora_wrapped_projections_are_not_fused(graph):
    """A LoRA wrapper computes more than its weight: q/k/v stay separate calls once it is in (gate/up still fuse)."""
    from baichuan2.lora import apply_lora  # pylint: disable=import-outside-toplevel
    model = random_model("float32")
    apply_lora(model, rank=2, alpha=4, targets=("W_pack",))
    model.prepare_for_inference()
    assert model.model.layers[0].self_attn.qkv_op is None and model.model.layers[0].mlp.gate_up_op is not None
    model(Tensor(np.arange(3, 9, dtype=np.int32).reshape(1, 6))).asnumpy()
