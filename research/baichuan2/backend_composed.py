"""The composed backend: the decoder's primitives in stock MindSpore ops. Runs everywhere, has gradients (training,
scoring, LoRA), and is the reference the other backends are compared with (tests/test_backends.py).

Every backend offers the same primitives to the neutral definition in modeling_baichuan.py:
    norm(x, weight, eps, eps_tensor)                 RMSNorm over the last axis, x's shape and dtype
    rope_inputs(cos, sin, num_heads)                 what `heads` takes for RoPE (cos/sin [B, 1, S, D]), once a call
    heads(x, rope)                                   x [B, S, N, D] -> [B, N, S, D], RoPE applied when rope is given
    gather_rows(table, index)                        the RoPE tables' rows at the positions (axis 0)
    alibi_shift(slopes, distance)                    slopes [1, N, 1, 1] x (key - query) distance -> float32
    attention_inputs(visible, alibi, scale, dtype, num_heads)
                                                     visibility (bool [B, 1, S, Sk], True = query sees key) and the
                                                     ALiBi term (float32 [B, N, S, Sk] or None) in the form
                                                     `attention` takes; built once a call for every layer
    attention(q, k, v, cache, write, inputs, scale)  q/k/v [B, N, S, D] -> ([B, S, N * D], the cache with the new
                                                     rows written, or None without a cache). The cache is a
                                                     sequence's slots (k, v [B, N, L, D], write from
                                                     BaichuanModel.cache_writes) or a paged pool (k, v [rows, N, D],
                                                     B = 1 and S the step's tokens, write = (slot_rows, key_rows):
                                                     BaichuanModel.paged)
    packed_attention_inputs(visible, seq_ends, scale, dtype, num_heads)
                                                     packed rows of a RoPE model: the same, given the conversations'
                                                     cumulative ends [B, W] too (a backend whose kernel takes them)
    norm_head(x, weight, dtype)                      NormHead in training: x w^T with each row of w L2-normalised
    linear_kernel(config, fmt, count)                at construction: the op projecting `count` weights of one x, or
                                                     None (stock ops: `project`)
Positions and visibility themselves are computed once, backend-neutrally, by BaichuanModel.position_inputs.

No implicit broadcasting between tensors here: MindSpore's CPU kernels for a binary op whose operands differ in shape
keep index tables of ~5-8x the output's size per op instance for the life of the compiled graph (measured: a
[1, 512, 4096] RMSNorm held 66 MB; a broadcast Select of 2 MB, 13 MB), ~0.13 GiB per layer at 7B size. So operands
are brought to one shape first (`expand`, ~no cost), and per-head inputs are built at full shape once per call.
"""
import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from .quantization import from_bf16_bits

MASKED = -1e9  # added to hidden attention scores (computed in float32); finite so fully padded rows stay finite
_STOCK_CHUNK_ROWS = 16384  # stock dequantisation materialises at most this many float32 weight rows at a time
BF16_TO_F32 = from_bf16_bits(np.arange(65536, dtype=np.uint16))  # lookup table: CPU Gather has no bf16 kernel
_UINT8_16, _UINT8_8 = Tensor(16, ms.uint8), Tensor(8, ms.uint8)
_MATMUL_NT = ops.MatMul(transpose_b=True)
_BATCH_MATMUL_NT = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T


def expand(x, like):
    """x broadcast to like's shape, explicitly (see the note on broadcasting above)."""
    return ops.broadcast_to(x, like.shape)


def per_head(x, num_heads):
    """x [B, 1, ...] broadcast to [B, num_heads, ...] (a real copy: see the note on broadcasting above)."""
    return ops.broadcast_to(x, (x.shape[0], num_heads) + x.shape[2:])


def rms_norm(x, weight, eps):
    x32 = x.astype(ms.float32)
    x32 = x32 * expand(ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps), x32)
    x = x32.astype(x.dtype)
    return expand(weight, x) * x


def apply_rotary(x, cos, sin):
    """Half-rotation RoPE (as Hugging Face Llama/Baichuan): x*cos + rotate_half(x)*sin."""
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def attention_bias(visible, alibi, num_heads):
    """One float32 additive bias [B, N, S, Sk]: MASKED on hidden keys, plus the ALiBi term when given."""
    bias = (1.0 - visible.astype(ms.float32)) * MASKED
    return per_head(bias, num_heads) if alibi is None else bias + alibi


def attend(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v, scores in float32."""
    scores = _BATCH_MATMUL_NT(q, k).astype(ms.float32) * scale + bias
    probs = ops.softmax(scores, -1).astype(v.dtype)
    return ops.matmul(probs, v)


def paged_attention(q, k, v, pools, write, bias, scale):
    """Attention over a paged pool (the engine's step): q/k/v [1, N, T, D] for T tokens of any sequences, pools
    (k, v) [rows, N, D] (row = block * block_size + offset), write = (slot_rows [T]: where each token's key/value
    row goes; key_rows [T, K]: the pool rows of the keys each token attends to, in position order), bias
    [T, N, 1, K] (hidden keys and ALiBi, from BaichuanModel.paged_inputs). Returns ([1, T, N * D], new pools)."""
    _, n, t, d = q.shape
    slot_rows, key_rows = write
    new_rows = slot_rows.reshape(t, 1)
    k_pool = ops.tensor_scatter_update(pools[0], new_rows, k.reshape(n, t, d).swapaxes(0, 1).astype(pools[0].dtype))
    v_pool = ops.tensor_scatter_update(pools[1], new_rows, v.reshape(n, t, d).swapaxes(0, 1).astype(pools[1].dtype))
    keys = ops.gather(k_pool, key_rows, 0).swapaxes(1, 2).astype(q.dtype)  # [T, N, K, D]
    values = ops.gather(v_pool, key_rows, 0).swapaxes(1, 2).astype(v.dtype)
    out = attend(q.reshape(n, t, 1, d).swapaxes(0, 1), keys, values, bias, scale)  # [T, N, 1, D]
    return out.reshape(1, t, n * d), (k_pool, v_pool)


def write_cache(cache, new, write_index, write_window):
    """Cache [B, N, L, D] with the S new rows [B, N, S, D] written at slots [p, p + S) (BaichuanModel.cache_writes
    gives the index and window): one formula for prefill (p = 0) and decode (S = 1)."""
    spread = ops.gather(new.astype(cache.dtype), write_index, 2)  # [B, N, L, D]: slot j holds new row j - p
    return ops.where(write_window, spread, cache)


# ---------------------------------------------------------------------------------------------- projections
def linear(x, weight, dtype):
    """x W^T with W [out, in] as in torch. Flattened to 2D: CPU has no broadcasting 3D x 2D BatchMatMul.
    MatMul(transpose_b) reads W as stored: an explicit W.swapaxes copies the whole weight every call, which on CPU
    costs ~50x the matrix-vector product itself at decode time (measured: 240 ms vs 5 ms for a 32000x512 head)."""
    y = _MATMUL_NT(x.reshape(-1, x.shape[-1]).astype(dtype), weight.astype(dtype))
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def dequantize(qweight, scales, bits, group_size, in_features, mins=None):
    """Stock-op dequantisation of int8 / packed int4 rows -> float32 [rows, in_features] (see quantization.py; int4
    with `mins`: w = scale (q + 8) + min)."""
    rows = qweight.shape[0]
    if bits == 4:  # byte 16b + j holds element 32b + j (low nibble) and 32b + j + 16 (high nibble), each q + 8
        packed = qweight.reshape(rows, -1, 16)
        high = ops.floor_div(packed, _UINT8_16)
        # still one byte per element: q + 8 - 8 wraps around in uint8 and reads back as int8 q
        qweight = (ops.concat((packed - high * _UINT8_16, high), 2).reshape(rows, -1) - _UINT8_8).astype(ms.int8)
    q = qweight.astype(ms.float32)
    groups = scales.shape[1]
    width = groups * group_size
    if q.shape[1] < width:
        q = ops.concat((q, ops.zeros((rows, width - q.shape[1]), ms.float32)), 1)
    q = q.reshape(rows, groups, group_size)
    if mins is None:
        w = q * expand(scales.astype(ms.float32).reshape(rows, groups, 1), q)
    else:
        w = (q + 8.0) * expand(scales.astype(ms.float32).reshape(rows, groups, 1), q) + \
            expand(mins.astype(ms.float32).reshape(rows, groups, 1), q)
    w = w.reshape(rows, width)
    return w if width == in_features else w[:, :in_features]


def _float_weight(weights, fmt, group_size, in_features):
    if fmt == "bfloat16":
        return weights[0].astype(ms.float32)
    return dequantize(weights[0], weights[1], 8 if fmt == "int8" else 4, group_size, in_features,
                      weights[2] if len(weights) > 2 else None)


def project(x, weights, fmt, group_size, in_features, kernel=None):
    """x W^T for a stored-format weight: `weights` is (weight,) for bfloat16 (and float32 with a kernel),
    (qweight, scales[, mins]) for int8 / int4. Float32 out [..., out_features]. `kernel` (a backend's linear_kernel)
    computes straight from the stored weights; without it the weight is dequantised by stock ops, a chunk of rows
    at a time so that a large output layer (lm_head: 125696 rows) never holds a whole float32 copy."""
    x2d = x.reshape(-1, in_features).astype(ms.float32)
    out_features = weights[0].shape[0]
    if kernel is not None:
        y = kernel(x2d, *weights)
    elif out_features <= _STOCK_CHUNK_ROWS:
        y = _MATMUL_NT(x2d, _float_weight(weights, fmt, group_size, in_features))
    else:
        pieces = []
        for start in range(0, out_features, _STOCK_CHUNK_ROWS):
            rows = min(_STOCK_CHUNK_ROWS, out_features - start)
            # ops.slice, not w[a:b]: GRAPH mode's StridedSlice has no bf16 CPU kernel, Slice has
            part = tuple(ops.slice(w, (start, 0), (rows, w.shape[1])) for w in weights)
            pieces.append(_MATMUL_NT(x2d, _float_weight(part, fmt, group_size, in_features)))
        y = ops.concat(pieces, 1)
    return y.reshape(x.shape[:-1] + (out_features,))


def project_fused(x, weights, op, in_features, dtype):
    """Outputs of one kernel call projecting x [..., in_features] with several weights (q/k/v, gate/up), one per
    projection, each [..., out] in `dtype`."""
    outs = op(x.reshape(-1, in_features).astype(ms.float32), *weights)
    return tuple(y.reshape(x.shape[:-1] + (y.shape[1],)).astype(dtype) for y in outs)


# ---------------------------------------------------------------------------------------------- the backend
@ms.jit_class
class ComposedBackend:
    """Stock MindSpore ops for every primitive (see the module docstring)."""
    name = "composed"
    trainable = True     # has gradients: training and LoRA build on it
    whole_stack = False  # True where a cached step runs through one op for the whole stack (backend_cpu)

    def linear_kernel(self, config, fmt, count=1):  # pylint: disable=unused-argument
        return None

    def norm(self, x, weight, eps, eps_tensor):  # pylint: disable=unused-argument
        return rms_norm(x, weight, eps)

    def rope_inputs(self, cos, sin, num_heads):
        return per_head(cos, num_heads), per_head(sin, num_heads)

    def heads(self, x, rope):
        x = x.swapaxes(1, 2)
        return x if rope is None else apply_rotary(x, rope[0], rope[1])

    def gather_rows(self, table, index):
        return ops.gather(table, index, 0)

    def alibi_shift(self, slopes, distance):
        return slopes * distance.astype(ms.float32)

    def attention_inputs(self, visible, alibi, scale, dtype, num_heads):  # pylint: disable=unused-argument
        return attention_bias(visible, alibi, num_heads)

    def packed_attention_inputs(self, visible, seq_ends, scale, dtype, num_heads):  # pylint: disable=unused-argument
        return self.attention_inputs(visible, None, scale, dtype, num_heads)  # the mask already holds the ends

    def norm_head(self, x, weight, dtype):
        """x (w / |w|) computed as (x w) / |w|: the same numbers without the V x H temporaries that dividing the
        weight keeps for its backward (~3 x V x H x 4 bytes; memory_budget.py counts the [S, V] product this keeps
        instead). The squares come from the compute-dtype copy the matmul keeps anyway."""
        wc = weight.astype(dtype)
        norms = ops.maximum(ops.sqrt((wc * wc).astype(ms.float32).sum(-1)), 1e-12)
        return linear(x, weight, dtype) * (1.0 / norms).astype(dtype)

    def attention(self, q, k, v, cache, write, inputs, scale):
        if cache is not None and len(cache[0].shape) == 3:
            return paged_attention(q, k, v, cache, write, inputs, scale)
        if cache is not None:
            k = write_cache(cache[0], k, write[0], write[1])
            v = write_cache(cache[1], v, write[0], write[1])
            cache = (k, v)
        out = self.attention_core(q, k, v, inputs, scale)
        b, n, s, d = out.shape
        return self.merge_heads(out).reshape(b, s, n * d), cache

    def attention_core(self, q, k, v, inputs, scale):
        return attend(q, k, v, inputs, scale)

    def merge_heads(self, out):
        """[B, N, S, D] -> [B, S, N, D]."""
        return out.swapaxes(1, 2)
