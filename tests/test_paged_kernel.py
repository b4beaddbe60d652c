"""PagedStackLogits (kernels.paged_stack_op, csrc/paged_stack.h) against a numpy reference written here.

A tiny random decoder (2 layers, hidden 64, 4 heads of 16, MLP 96, vocabulary 50) runs one serving step of three
sequences at different depths: a prefill chunk of 7 tokens from position 5, decodes at positions 0 and 12, their
blocks scattered over the pool (shuffled, non-contiguous ids), the earlier positions holding random rows already.
The reference computes in float32 (float64 for the quantised projections) what the op's contract says, including
what the kernels do on purpose: int8 / int4 projections round x to int8 per 32 inputs (test_kernels.py), and the
pool rows are stored (bfloat16: nearest even; int8: absmax / 127 per row) before attention reads them back.
Checked: (a) that step's logits and pool writes for every weight format, encoding, pool dtype and block size (the
rows written where they belong, every other row and scale untouched, in the caller's own tensors); (b) one prefill
against a shorter prefill then decode steps; (c) every instruction-set path the CPU has; two sequences sharing prefix
blocks; the errors the op returns for bad inputs, before it writes anything.
"""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from baichuan2 import kernels
from baichuan2.quantization import bf16_bits, dequantize, from_bf16_bits, quantize

pytestmark = pytest.mark.skipif(kernels.isa() is None, reason=f"kernels unavailable: {kernels.unavailable_reason()}")

LAYERS, H, N, D, I, V, P = 2, 64, 4, 16, 96, 50, 40  # P: RoPE table rows
GROUP, EPS = 32, 1e-6
POOLS = {"float32": ms.float32, "bfloat16": ms.bfloat16, "int8": ms.int8}
# The step of (a): (sequence, first position, new tokens), rows in this order; B = 3.
STEP = ((1, 0, 1), (0, 5, 7), (2, 12, 1))
OUT_ROWS = np.array([7, 0, 8, 3], np.int32)  # each sequence's last new token, and one row inside the chunk
# Bounds on |logit error| / max |logit| (LOGIT_BOUND) and on a written row's |error| / its largest value (ROW_BOUND),
# from the largest measured over 15 seeds of (a) on an AMD EPYC (Zen 3, avx2 path). Float32 weights: float32 pool
# 5e-7 (rows 1e-6); bfloat16 pool 1.3e-4 (rows 2.0e-3: an upstream last-bit difference can flip a stored element's
# rounding, one bfloat16 step); int8 pool 6e-6 (rows 7.9e-3, one int8 step). Quantised weights: the projections
# round x to int8 per 32 inputs, so such a difference can flip an input's rounding too: up to 8.7e-3 (rows 1.6e-2,
# two int8 steps). Asserted with 3x margin or more; a wrong block, row, head, position or scale is O(1).
LOGIT_BOUND = {"float32": 1e-4, "bfloat16": 1e-3, "int8": 1e-3}
ROW_BOUND = {"float32": 1e-5, "bfloat16": 8e-3, "int8": 3e-2}
QUANTISED_BOUND = 3e-2  # logits and rows, any pool, int8 / int4 weights


def bounds(weights, pool_dtype):
    """(logit bound, row bound) of a case."""
    if weights == "float32":
        return LOGIT_BOUND[pool_dtype], ROW_BOUND[pool_dtype]
    return QUANTISED_BOUND, max(QUANTISED_BOUND, ROW_BOUND[pool_dtype])


def rms(x, w):
    return (w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(EPS)))).astype(np.float32)


def rope(x, pos, cos, sin):
    half = D // 2
    rotated = np.concatenate([-x[half:], x[:half]])
    return (x * cos[pos] + rotated * sin[pos]).astype(np.float32)


def round_x(x):
    """What an int8 / int4 projection does to x first: int8 per 32 inputs, scale absmax / 127, ties to even."""
    chunks = x.reshape(x.shape[0], -1, 32)
    amax = np.abs(chunks).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.clip(np.rint(chunks * inv), -127, 127)
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)).reshape(x.shape)


class Model:
    """Random weights in one format: the op's tensors and the weights the reference multiplies with."""

    def __init__(self, fmt, rng):
        self.fmt = fmt
        self.tensors, self.ref = [], []  # per layer: ln1, ln2, then 7 projections; then the lm_head
        shapes = [(H, H)] * 4 + [(I, H), (I, H), (H, I)]
        for _ in range(LAYERS):
            ln = [(1 + 0.1 * rng.standard_normal(H)).astype(np.float32) for _ in range(2)]
            self.tensors += [Tensor(w) for w in ln]
            self.ref.append(ln + [self.weight(rng, shape) for shape in shapes])
        self.head = self.weight(rng, (V, H))
        self.norm = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)

    def weight(self, rng, shape):
        w = (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        if self.fmt == "float32":
            self.tensors.append(Tensor(w))
            return w
        bits = int(self.fmt[3:])
        qweight, scales = quantize(w, bits, GROUP)
        self.tensors += [Tensor(qweight), Tensor(scales)]
        return dequantize(qweight, scales, bits, GROUP, shape[1]).astype(np.float64)

    def project(self, x, w):
        if self.fmt == "float32":
            return (x @ w.T).astype(np.float32)
        return (round_x(x) @ w.T).astype(np.float32)

    @property
    def head_tensors(self):
        return 1 if self.fmt == "float32" else 2


class Pool:
    """A block pool in numpy, in the stored format (float32 values, bfloat16 bits, int8 q + float32 scales)."""

    def __init__(self, dtype, blocks, bs, rng):
        self.dtype, self.bs = dtype, bs
        shape = (LAYERS, blocks, N, bs, D)
        self.scales = [np.ones(shape[:4], np.float32) for _ in range(2)]
        if dtype == "int8":
            self.rows = [rng.integers(-127, 128, shape).astype(np.int8) for _ in range(2)]
            self.scales = [(rng.random(shape[:4]) * 0.03 + 0.005).astype(np.float32) for _ in range(2)]
        elif dtype == "bfloat16":
            self.rows = [bf16_bits(rng.standard_normal(shape)) for _ in range(2)]
        else:
            self.rows = [rng.standard_normal(shape).astype(np.float32) for _ in range(2)]

    def copy(self):
        other = Pool.__new__(Pool)
        other.dtype, other.bs = self.dtype, self.bs
        other.rows = [r.copy() for r in self.rows]
        other.scales = [s.copy() for s in self.scales]
        return other

    def values(self, which):
        """k (0) or v (1) rows as float32 values."""
        if self.dtype == "int8":
            return self.rows[which].astype(np.float32) * self.scales[which][..., None]
        if self.dtype == "bfloat16":
            return from_bf16_bits(self.rows[which])
        return self.rows[which]

    def store(self, which, at, x):
        if self.dtype == "int8":
            scale = np.abs(x).max() / np.float32(127)
            self.rows[which][at] = np.clip(np.rint(x / scale), -127, 127) if scale > 0 else 0
            self.scales[which][at] = scale
        elif self.dtype == "bfloat16":
            self.rows[which][at] = bf16_bits(x)
        else:
            self.rows[which][at] = x

    def read(self, which, layer, table, head, positions):
        values = self.values(which)
        return np.stack([values[layer, table[p // self.bs], head, p % self.bs] for p in positions])

    def tensors(self):
        """(k_pool, v_pool, k_scales, v_scales) for the op."""
        if self.dtype == "bfloat16":
            pools = [Tensor(from_bf16_bits(r)).astype(ms.bfloat16) for r in self.rows]
        else:
            pools = [Tensor(r.copy()) for r in self.rows]
        return pools + [Tensor(s.copy()) for s in self.scales]


def pool_state(k_pool, v_pool, k_scales, v_scales):
    """The op's pool tensors as float32 numpy (bfloat16 values exactly), for comparisons."""
    return [t.astype(ms.float32).asnumpy() if t.dtype == ms.bfloat16 else t.asnumpy()
            for t in (k_pool, v_pool, k_scales, v_scales)]


def reference(model, x, tokens, out_rows, tables, pool, encoding, cos, sin, slopes):
    """Logits [R, V] of the step; `pool` (a Pool) gets the new rows."""
    x = x.copy()
    scale = np.float32(1 / np.sqrt(D))
    for layer, (ln1, ln2, wq, wk, wv, wo, wg, wu, wd) in enumerate(model.ref):
        n = rms(x, ln1)
        q, k, v = (model.project(n, w) for w in (wq, wk, wv))
        att = np.zeros_like(x)
        for t, (b, p) in enumerate(tokens):  # rows in order: a sequence's earlier tokens are stored first
            for head in range(N):
                cols = slice(head * D, (head + 1) * D)
                if encoding == "rope":
                    q[t, cols], k[t, cols] = rope(q[t, cols], p, cos, sin), rope(k[t, cols], p, cos, sin)
                at = (layer, tables[b][p // pool.bs], head, p % pool.bs)
                pool.store(0, at, k[t, cols])
                pool.store(1, at, v[t, cols])
        for t, (b, p) in enumerate(tokens):
            for head in range(N):
                cols = slice(head * D, (head + 1) * D)
                keys = pool.read(0, layer, tables[b], head, range(p + 1))
                values = pool.read(1, layer, tables[b], head, range(p + 1))
                scores = keys @ q[t, cols] * scale
                if encoding == "alibi":
                    scores = scores + slopes[head] * (np.arange(p + 1) - p).astype(np.float32)
                e = np.exp(scores - scores.max())
                att[t, cols] = (e / e.sum()) @ values
        h = x + model.project(att, wo)
        n = rms(h, ln2)
        g, u = model.project(n, wg), model.project(n, wu)
        x = h + model.project((g / (1 + np.exp(-g)) * u).astype(np.float32), wd)
    return model.project(rms(x[out_rows], model.norm), model.head)


def tables_for(step, bs, rng, spare=2):
    """Block tables [B, MB] over a pool of shuffled block ids (`spare` blocks never used); unused entries -1."""
    need = [(first + count - 1) // bs + 1 for _, first, count in sorted(step)]
    ids = rng.permutation(sum(need) + spare)
    tables = np.full((len(need), max(need)), -1, np.int32)
    used = 0
    for b, count in enumerate(need):
        tables[b, :count] = ids[used:used + count]
        used += count
    return tables, len(ids)


def tokens_for(step):
    return np.array([(b, first + i) for b, first, count in step for i in range(count)], np.int32)


def tables_and_inputs(rng):
    inv = 1.0 / 10000 ** (np.arange(0, D, 2) / D)
    freqs = np.outer(np.arange(P), inv)
    emb = np.concatenate([freqs, freqs], -1)
    slopes = (2.0 ** (-8.0 * np.arange(1, N + 1) / N)).astype(np.float32)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32), slopes


def run_op(model, x, tokens, out_rows, tables, pool_tensors, encoding, cos, sin, slopes):
    op = kernels.paged_stack_op(model.head_tensors)
    spec = np.array([GROUP, 1 if encoding == "rope" else 0], np.int32)
    args = [Tensor(x), Tensor(model.norm), Tensor(np.array([EPS], np.float32)), Tensor(spec), Tensor(tokens),
            Tensor(out_rows), Tensor(tables), Tensor(cos), Tensor(sin), Tensor(slopes), *pool_tensors, *model.tensors]
    return op(*args).asnumpy()


def step_case(weights, encoding, pool_dtype, bs, seed=0):
    """(logits, reference logits, pools after the op, reference pools, pools before) of the step of (a)."""
    rng = np.random.default_rng(seed)
    model = Model(weights, rng)
    cos, sin, slopes = tables_and_inputs(rng)
    tokens = tokens_for(STEP)
    tables, blocks = tables_for(STEP, bs, rng)
    before = Pool(pool_dtype, blocks, bs, rng)
    x = rng.standard_normal((len(tokens), H)).astype(np.float32)
    pool_tensors = before.tensors()
    got = run_op(model, x, tokens, OUT_ROWS, tables, pool_tensors, encoding, cos, sin, slopes)
    want_pool = before.copy()
    want = reference(model, x, tokens, OUT_ROWS, tables, want_pool, encoding, cos, sin, slopes)
    return got, want, pool_state(*pool_tensors), want_pool, before, tables, tokens


def written_rows(tables, tokens, bs, blocks):
    """[LAYERS, blocks, N, bs] True where the step writes a row."""
    mask = np.zeros((LAYERS, blocks, N, bs), bool)
    for b, p in tokens:
        mask[:, tables[b][p // bs], :, p % bs] = True
    return mask


def check_step(weights, encoding, pool_dtype, bs):
    got, want, (k, v, ks, vs), want_pool, before, tables, tokens = step_case(weights, encoding, pool_dtype, bs)
    logit_bound, row_bound = bounds(weights, pool_dtype)
    assert got.shape == (len(OUT_ROWS), V)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= logit_bound, f"{weights} {encoding} {pool_dtype} bs {bs}: logit error {err:.3g}"
    mask = written_rows(tables, tokens, bs, before.rows[0].shape[1])
    old = [before.values(0), before.values(1)]
    for which, (now, pool_now_scales) in enumerate(((k, ks), (v, vs))):
        now_values = now * pool_now_scales[..., None] if pool_dtype == "int8" else now
        # untouched rows: bit for bit what was there (and their scales)
        assert np.array_equal(now_values[~mask], old[which][~mask])
        assert np.array_equal(pool_now_scales[~mask], before.scales[which][~mask])
        # written rows: changed, and the reference's stored rows within one storage step of a row's largest value
        assert (now_values[mask] != old[which][mask]).any(axis=-1).all()
        ref = want_pool.values(which)[mask]
        row_err = np.abs(now_values[mask] - ref).max(-1) / np.abs(ref).max(-1)
        assert row_err.max() <= row_bound, f"{weights} {encoding} {pool_dtype} bs {bs}: row error {row_err.max():.3g}"
    return err


STEP_CASES = [(w, e, p, bs) for w in ("float32", "int8", "int4") for e in ("rope", "alibi") for p in POOLS
              for bs in (4, 16)]


@pytest.mark.parametrize("weights,encoding,pool_dtype,bs", STEP_CASES, ids=["-".join(map(str, c)) for c in STEP_CASES])
def test_step_matches_reference(weights, encoding, pool_dtype, bs, pynative):
    """(a) Three sequences at different depths over shuffled blocks: the reference's logits, its rows written into the
    caller's pools at the right (block, head, row), every other row (and scale) untouched."""
    check_step(weights, encoding, pool_dtype, bs)


@pytest.mark.parametrize("encoding", ["rope", "alibi"])
def test_prefill_equals_prefix_then_decode(encoding, pynative):
    """(b) One sequence as a single prefill of 10 tokens (logits of every row) and as a prefill of 6 then 4 decode
    steps: the same logits per position and the same pools (float32 weights and pool: float32 rounding only)."""
    rng = np.random.default_rng(1)
    model = Model("float32", rng)
    cos, sin, slopes = tables_and_inputs(rng)
    bs, length = 4, 10
    tables, blocks = tables_for(((0, 0, length),), bs, rng)
    empty = Pool("float32", blocks, bs, rng)
    x = rng.standard_normal((length, H)).astype(np.float32)
    whole = empty.tensors()
    tokens = tokens_for(((0, 0, length),))
    once = run_op(model, x, tokens, np.arange(length, dtype=np.int32), tables, whole, encoding, cos, sin, slopes)
    parts = empty.tensors()
    steps = [run_op(model, x[:6], tokens[:6], np.array([5], np.int32), tables, parts, encoding, cos, sin, slopes)]
    for p in range(6, length):
        steps.append(run_op(model, x[p:p + 1], tokens[p:p + 1], np.array([0], np.int32), tables, parts, encoding, cos,
                            sin, slopes))
    stepped = np.concatenate(steps)
    assert np.abs(stepped - once[5:]).max() <= 1e-5 * np.abs(once[5:]).max()
    for a, b in zip(pool_state(*whole), pool_state(*parts)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()


@pytest.mark.parametrize("pool_dtype", list(POOLS))
def test_sequences_sharing_prefix_blocks(pool_dtype, pynative):
    """Two sequences whose tables share their first two blocks (a common prompt prefix of 8 positions, bs 4), each
    decoding its own token at position 9 into its own third block: each reads the shared rows, the shared blocks
    stay as they were, and the logits are the reference's."""
    rng = np.random.default_rng(4)
    model = Model("float32", rng)
    cos, sin, slopes = tables_and_inputs(rng)
    tables = np.array([[3, 0, 5], [3, 0, 1]], np.int32)
    before = Pool(pool_dtype, 6, 4, rng)
    tokens = np.array([[0, 9], [1, 9]], np.int32)
    out_rows = np.array([0, 1], np.int32)
    x = rng.standard_normal((2, H)).astype(np.float32)
    pools = before.tensors()
    got = run_op(model, x, tokens, out_rows, tables, pools, "alibi", cos, sin, slopes)
    want_pool = before.copy()
    want = reference(model, x, tokens, out_rows, tables, want_pool, "alibi", cos, sin, slopes)
    assert np.abs(got - want).max() <= LOGIT_BOUND[pool_dtype] * np.abs(want).max()
    k = pool_state(*pools)[0]
    k = k * pool_state(*pools)[2][..., None] if pool_dtype == "int8" else k
    mask = np.zeros(k.shape[:4], bool)
    mask[:, [5, 1], :, 9 % 4] = True  # each sequence's own third block, row 1: the only rows written
    assert np.array_equal(k[~mask], before.values(0)[~mask])  # the shared blocks included
    assert (k[mask] != before.values(0)[mask]).any(axis=-1).all()


DEEP_STEP = ((0, 99, 1), (1, 29, 3))  # a decode over 100 positions; a 3-token chunk over 30 to 32


@pytest.mark.parametrize("pool_dtype", list(POOLS))
def test_deep_queries_match_reference(pool_dtype, pynative):
    """Queries over 100 and 30-32 positions in blocks of 16 (attention's 8-key groups over several blocks, a partial
    group at the end, prefetches clamped at the last position): the reference's logits, ALiBi (no RoPE table limit)."""
    rng = np.random.default_rng(5)
    model = Model("float32", rng)
    cos, sin, slopes = tables_and_inputs(rng)
    tokens = tokens_for(DEEP_STEP)
    tables, blocks = tables_for(DEEP_STEP, 16, rng)
    before = Pool(pool_dtype, blocks, 16, rng)
    x = rng.standard_normal((len(tokens), H)).astype(np.float32)
    out_rows = np.array([0, 2, 3], np.int32)
    got = run_op(model, x, tokens, out_rows, tables, before.tensors(), "alibi", cos, sin, slopes)
    want = reference(model, x, tokens, out_rows, tables, before.copy(), "alibi", cos, sin, slopes)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= LOGIT_BOUND[pool_dtype], f"{pool_dtype}: logit error {err:.3g}"


@pytest.mark.parametrize("weights,pool_dtype", [("float32", "float32"), ("int8", "int8"), ("int4", "bfloat16")])
def test_every_isa_path_matches_reference(weights, pool_dtype, forced_isa, pynative):
    """(c) Each instruction-set path (its projections and attention loop) gives the reference's step."""
    check_step(weights, "rope", pool_dtype, 4)
    check_step(weights, "alibi", pool_dtype, 16)


def test_graph_mode_writes_the_callers_pools(graph):
    """In a compiled graph too the op writes the pools it is given (what an engine's step cell relies on)."""
    from mindspore import nn  # pylint: disable=import-outside-toplevel

    class Step(nn.Cell):
        def __init__(self, op):
            super().__init__()
            self.op = op

        def construct(self, *args):
            return self.op(*args)

    rng = np.random.default_rng(2)
    model = Model("float32", rng)
    cos, sin, slopes = tables_and_inputs(rng)
    tokens = tokens_for(STEP)
    tables, blocks = tables_for(STEP, 4, rng)
    before = Pool("bfloat16", blocks, 4, rng)
    x = rng.standard_normal((len(tokens), H)).astype(np.float32)
    pools = before.tensors()
    spec = np.array([GROUP, 1], np.int32)
    got = Step(kernels.paged_stack_op(1))(
        Tensor(x), Tensor(model.norm), Tensor(np.array([EPS], np.float32)), Tensor(spec), Tensor(tokens),
        Tensor(OUT_ROWS), Tensor(tables), Tensor(cos), Tensor(sin), Tensor(slopes), *pools, *model.tensors).asnumpy()
    want_pool = before.copy()
    want = reference(model, x, tokens, OUT_ROWS, tables, want_pool, "rope", cos, sin, slopes)
    assert np.abs(got - want).max() <= LOGIT_BOUND["bfloat16"] * np.abs(want).max()
    k = pool_state(*pools)[0]
    mask = written_rows(tables, tokens, 4, blocks)
    assert np.array_equal(k[~mask], before.values(0)[~mask])
    assert np.abs(k[mask] - want_pool.values(0)[mask]).max() <= ROW_BOUND["bfloat16"] * np.abs(k[mask]).max()


def bad_calls():
    """(name, change to the step's inputs) for each error the op reports instead of running."""
    def set_token(t, b=None, p=None):
        def change(inputs):
            if b is not None:
                inputs["tokens"][t, 0] = b
            if p is not None:
                inputs["tokens"][t, 1] = p
        return change

    def put(key, value):
        def change(inputs):
            inputs[key] = value(inputs[key])
        return change

    bad_value, bad_shape = 5, 4  # csrc/common.h's Status codes kBadValue, kShape
    return [
        ("block id past the pool", bad_value, put("tables", lambda t: np.where(t == t.max(), 999, t).astype(np.int32))),
        ("negative block id read", bad_value, put("tables", lambda t: np.where(t == t[1, 0], -1, t).astype(np.int32))),
        ("sequence index past B", bad_value, set_token(0, b=3)),
        ("position past the block table", bad_value, set_token(8, p=16 * 4)),
        ("position past the RoPE tables", bad_value,
         lambda inputs: inputs.update(cos=inputs["cos"][:10], sin=inputs["sin"][:10])),
        ("positions not consecutive", bad_value, set_token(3, p=9)),
        ("a sequence in two runs", bad_value, set_token(8, b=1)),
        ("out row past T", bad_value, put("out_rows", lambda r: np.array([0, 9], np.int32))),
        ("tokens not [T, 2]", bad_shape, put("tokens", lambda t: t[:, :1].copy())),
        ("x rows and tokens disagree", bad_shape, put("x", lambda x: x[:5].copy())),
    ]


@pytest.mark.parametrize("name,status,change", bad_calls(), ids=[name.replace(" ", "-") for name, _, _ in bad_calls()])
def test_bad_inputs_raise_and_write_nothing(name, status, change, pynative):
    """Each bad input makes the op return its error status (MindSpore raises, naming it), and no pool row is
    written."""
    rng = np.random.default_rng(3)
    model = Model("float32", rng)
    cos, sin, slopes = tables_and_inputs(rng)
    tables, blocks = tables_for(STEP, 4, rng)
    pool = Pool("float32", blocks, 4, rng)
    inputs = dict(x=rng.standard_normal((9, H)).astype(np.float32), tokens=tokens_for(STEP), out_rows=OUT_ROWS.copy(),
                  tables=tables, cos=cos, sin=sin)
    change(inputs)
    pools = pool.tensors()
    with pytest.raises(RuntimeError, match=rf"PagedStackLogits\)? is {status}\b"):
        run_op(model, inputs["x"], inputs["tokens"], inputs["out_rows"], inputs["tables"], pools, "rope",
               inputs["cos"], inputs["sin"], slopes)
    assert np.array_equal(pool_state(*pools)[0], pool.rows[0])


def test_head_tensors_must_be_one_to_three():
    with pytest.raises(ValueError, match="1, 2 or 3"):
        kernels.paged_stack_op(0)
