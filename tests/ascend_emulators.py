"""CPU emulators of the three Ascend fused kernels that the ascend backend (backend_ascend.py) calls.

    FlashAttentionScore      mindspore.ops.flash_attention_score and its Primitive (the backend calls the latter)
    RmsNorm                  mindspore.ops.rms_norm
    RotaryPositionEmbedding  mindspore.ops.rotary_position_embedding

None of them has a CPU kernel, so the fused branch could never run here. Each emulator first ENFORCES the kernel's
documented input contract (MindSpore 2.7 API docs of the three functions; CANN's aclnnFlashAttentionScore for the
formula) by raising KernelContractError, then computes the documented math in float32 and returns the documented
dtype. Where the documentation leaves a result undefined (a query row whose keys are all discarded) the emulator
returns NaN, so a model relying on it fails loudly. What the emulators cannot tell is whether the real kernels
behave as documented: docs/ascend-first-run.md lists the checks for a real device.

`install(monkeypatch)` puts them in place of the mindspore.ops functions, so a model built with backend="ascend"
runs on CPU; `CALLS` counts emulator calls so a test can tell the fused kernels really ran.
PyNative only (the contract checks are Python code on concrete shapes and dtypes).
"""
from collections import Counter

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

CALLS = Counter()
HALF = (ms.float16, ms.bfloat16)
COMPRESSED = 2048  # side of the compressed mask of sparse modes 2, 3 and 4
COMPRESSED_SHIFT_ROWS = 1024  # rows of a lower-triangle ALiBi real_shift when S1 > 1024
FLOATS = (ms.float16, ms.bfloat16, ms.float32)


class KernelContractError(ValueError):
    """An input the real Ascend kernel documents as unsupported."""


def _require(condition, kernel, message):
    if not condition:
        raise KernelContractError(f"{kernel}: {message}")


def flash_attention_score(query, key, value, head_num, real_shift=None, drop_mask=None, padding_mask=None,
                          attn_mask=None, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None, keep_prob=1.0,
                          scalar_value=1.0, pre_tokens=2147483647, next_tokens=2147483647, inner_precise=0,
                          input_layout="BSH", sparse_mode=0):
    """attention_out = softmax(mask(scale * (real_shift + query key^T), attn_mask)) value, attn_mask 1 = discard.

    Contract enforced (BNSD, the layout the model uses): query/key/value float16 or bfloat16, all one dtype;
    query [B, N1, S1, D], key = value [B, N2, S2, D], N2 divides N1, head_num = N1, D a multiple of 16 up to 512;
    real_shift of query's dtype; attn_mask bool or uint8 (0/1).
    sparse_mode 0: attn_mask [B, N1, S1, S2], [B, 1, S1, S2] or [S1, S2]; real_shift [B|1, N1, S1, S2].
    sparse_mode 2 (leftUpCausal: query i sees keys j <= i) and 3 (rightDownCausal: j <= i + S2 - S1): the
    compressed attn_mask is required, [2048, 2048] with 1 above the diagonal (the documented "optimized" mask,
    which MindFormers builds as triu(ones, 1)); pre_tokens / next_tokens do not take effect; a real_shift is the
    lower-triangle ALiBi case: [B|1, N1, S1, S2] up to S1 = 1024, else its last 1024 rows [B|1, N1, 1024, S2], and
    it must follow the ALiBi rule (each row the same function of key - query on the visible part), which is how
    the rows above the last 1024 are known: here from the last row.
    input_layout "TND" (varlen, see _varlen): the documented TND rules.
    Modes 6-8 are documented as not implemented and raise; 1, 4 and 5, dropout, padding_mask and prefix are not
    emulated (the model passes none of them) and raise."""
    name = "FlashAttentionScore"
    CALLS[name] += 1
    if input_layout == "TND":
        return _varlen(query, key, value, head_num, real_shift, drop_mask, padding_mask, attn_mask, prefix,
                       actual_seq_qlen, actual_seq_kvlen, keep_prob, scalar_value, pre_tokens, next_tokens,
                       sparse_mode)
    _require(input_layout == "BNSD", name, f"emulated for input_layout 'BNSD' and 'TND' only, got {input_layout!r}")
    _require(query.dtype in HALF, name, f"query must be float16 or bfloat16, got {query.dtype}")
    _require(key.dtype == query.dtype and value.dtype == query.dtype, name,
             f"key/value dtype must equal query's ({query.dtype}), got {key.dtype}/{value.dtype}")
    _require(query.ndim == 4 and key.ndim == 4, name, f"BNSD tensors are 4-D, got {query.shape} / {key.shape}")
    b, n1, s1, d = query.shape
    _, n2, s2, _ = key.shape
    _require(key.shape[0] == b and key.shape[3] == d and n2 > 0 and n1 % n2 == 0, name,
             f"key {key.shape} does not fit query {query.shape}")
    _require(value.shape == key.shape, name, f"value {value.shape} must have key's shape {key.shape}")
    _require(head_num == n1, name, f"head_num {head_num} must equal query's N ({n1})")
    _require(d % 16 == 0 and d <= 512, name, f"head size D must be a multiple of 16 up to 512, got {d}")
    _require(1 <= b <= 2048 and 1 <= n1 <= 256, name, f"B must be 1..2k and N 1..256, got B={b}, N={n1}")
    _require(sparse_mode not in (6, 7, 8), name, f"sparse_mode {sparse_mode} is documented as not implemented")
    _require(sparse_mode in (0, 2, 3), name, f"sparse_mode {sparse_mode} is not emulated (0, 2 and 3 are)")
    _require(drop_mask is None and padding_mask is None and prefix is None and actual_seq_qlen is None
             and actual_seq_kvlen is None and keep_prob == 1.0, name,
             "dropout, padding_mask, prefix and varlen are not emulated")
    causal = sparse_mode in (2, 3)
    shift_rows = min(s1, COMPRESSED_SHIFT_ROWS) if causal else s1
    if real_shift is not None:
        _require(real_shift.dtype == query.dtype, name,
                 f"real_shift must have query's dtype {query.dtype}, got {real_shift.dtype}")
        _require(tuple(real_shift.shape) in ((b, n1, shift_rows, s2), (1, n1, shift_rows, s2)), name,
                 f"real_shift must be [B|1, N1, {'min(S1, 1024)' if causal else 'S1'}, S2] = "
                 f"[{b}|1, {n1}, {shift_rows}, {s2}] with sparse_mode {sparse_mode}, got {tuple(real_shift.shape)}")
    n_rep = n1 // n2
    q32 = query.astype(ms.float32)
    k32 = ops.repeat_interleave(key.astype(ms.float32), n_rep, 1) if n_rep > 1 else key.astype(ms.float32)
    v32 = ops.repeat_interleave(value.astype(ms.float32), n_rep, 1) if n_rep > 1 else value.astype(ms.float32)
    scores = ops.matmul(q32, k32.swapaxes(-1, -2))
    if causal:
        _require(attn_mask is not None and tuple(attn_mask.shape) == (COMPRESSED, COMPRESSED), name,
                 f"sparse_mode {sparse_mode} requires the compressed attn_mask [2048, 2048], got "
                 f"{None if attn_mask is None else tuple(attn_mask.shape)}")
        _require(attn_mask.dtype in (ms.bool_, ms.uint8), name,
                 f"attn_mask must be bool or uint8, got {attn_mask.dtype}")
        upper = np.triu(np.ones((COMPRESSED, COMPRESSED), np.uint8), 1)
        _require(bool((attn_mask.asnumpy().astype(np.uint8) == upper).all()), name,
                 "the compressed attn_mask must be 1 exactly above the diagonal (triu(ones, 1))")
        offset = 0 if sparse_mode == 2 else s2 - s1
        keep = Tensor(np.arange(s2)[None, :] <= np.arange(s1)[:, None] + offset).broadcast_to(scores.shape)
        if real_shift is not None:
            scores = scores + Tensor(_alibi_rows(real_shift.astype(ms.float32).asnumpy(), s1, offset, name))
        scores = scores * scalar_value
        attn_mask = None
    elif real_shift is not None:
        scores = scores + real_shift.astype(ms.float32)
    if not causal:
        scores = scores * scalar_value  # the scale multiplies the shift too
        keep = ops.ones(scores.shape, ms.bool_)
    if attn_mask is not None:
        _require(attn_mask.dtype in (ms.bool_, ms.uint8), name,
                 f"attn_mask must be bool or uint8, got {attn_mask.dtype}")
        _require(tuple(attn_mask.shape) in ((b, n1, s1, s2), (b, 1, s1, s2), (s1, s2)), name,
                 f"attn_mask must be [B, N1|1, S1, S2] or [S1, S2] = [{b}, {n1}|1, {s1}, {s2}], "
                 f"got {tuple(attn_mask.shape)}")
        as_int = attn_mask.astype(ms.int32)
        _require(bool(((as_int == 0) | (as_int == 1)).all()), name, "attn_mask values must be 0 or 1 (1 = discard)")
        keep = ops.logical_not(attn_mask.astype(ms.bool_)).broadcast_to(scores.shape)
    scores = ops.where(keep, scores, ops.full(scores.shape, float("-inf"), dtype=ms.float32))
    probs = ops.softmax(scores, -1)  # NaN on rows with every key discarded: undefined in the kernel's docs
    probs = ops.where(keep.any(-1, keep_dims=True), probs, ops.full(probs.shape, float("nan"), dtype=ms.float32))
    return ops.matmul(probs, v32).astype(query.dtype)


def _lengths(cumulative, total, which, name):
    """Per-sequence lengths from a cumulative list (Tensor, tuple or list), checked against the documented rules."""
    _require(cumulative is not None, name, f"input_layout 'TND' requires {which} (the cumulative sequence ends)")
    ends = np.asarray(cumulative.asnumpy() if isinstance(cumulative, Tensor) else cumulative).reshape(-1)
    _require(ends.dtype.kind == "i", name, f"{which} must hold integers, got {ends.dtype}")
    _require(1 <= ends.size <= 1024, name, f"{which} lists the batch's sequences: 1..1024 of them, got {ends.size}")
    lengths = np.diff(np.concatenate([[0], ends]))
    _require(bool((lengths >= 0).all()), name, f"{which} must be non-decreasing, got {ends.tolist()}")
    _require(int(ends[-1]) == total, name, f"{which}'s last value must equal T ({total}), got {int(ends[-1])}")
    return lengths


def _varlen(query, key, value, head_num, real_shift, drop_mask, padding_mask, attn_mask, prefix, actual_seq_qlen,
            actual_seq_kvlen, keep_prob, scalar_value, pre_tokens, next_tokens, sparse_mode):
    """input_layout "TND": query [T1, N1, D], key = value [T2, N2, D], the batch's sequences end to end, their
    cumulative ends in actual_seq_qlen / actual_seq_kvlen (required, non-decreasing, last = T, 1..1024 sequences,
    no zero-length key sequence); the mask lower-triangular: sparse_mode 2 or 3 with the compressed [2048, 2048]
    mask; next_tokens 0 and pre_tokens >= the longest query sequence; with mode 3 every S1 <= its S2; prefix none.
    A real_shift (documented only for sequences over 1024 tokens, [B|1, N1, 1024, max S2]) is not emulated."""
    name = "FlashAttentionScore"
    _require(query.dtype in HALF, name, f"query must be float16 or bfloat16, got {query.dtype}")
    _require(key.dtype == query.dtype and value.dtype == query.dtype, name,
             f"key/value dtype must equal query's ({query.dtype}), got {key.dtype}/{value.dtype}")
    _require(query.ndim == 3 and key.ndim == 3 and value.shape == key.shape, name,
             f"TND tensors are 3-D with value = key, got {query.shape} / {key.shape} / {value.shape}")
    t1, n1, d = query.shape
    t2, n2, _ = key.shape
    _require(head_num == n1 and n2 > 0 and n1 % n2 == 0 and key.shape[2] == d, name,
             f"key {key.shape} does not fit query {query.shape} with head_num {head_num}")
    _require(d % 16 == 0 and d <= 512, name, f"head size D must be a multiple of 16 up to 512, got {d}")
    _require(sparse_mode in (2, 3), name, f"TND needs a lower-triangular mask: sparse_mode 2 or 3, got {sparse_mode}")
    _require(attn_mask is not None and tuple(attn_mask.shape) == (COMPRESSED, COMPRESSED)
             and attn_mask.dtype in (ms.bool_, ms.uint8), name,
             "TND requires the compressed bool/uint8 attn_mask [2048, 2048]")
    upper = np.triu(np.ones((COMPRESSED, COMPRESSED), np.uint8), 1)
    _require(bool((attn_mask.asnumpy().astype(np.uint8) == upper).all()), name,
             "the compressed attn_mask must be 1 exactly above the diagonal (triu(ones, 1))")
    _require(prefix is None and padding_mask is None, name, "TND takes no prefix or padding_mask")
    _require(drop_mask is None and keep_prob == 1.0, name, "dropout is not emulated")
    _require(real_shift is None, name, "a TND real_shift (sequences over 1024 tokens only) is not emulated")
    q_len = _lengths(actual_seq_qlen, t1, "actual_seq_qlen", name)
    k_len = _lengths(actual_seq_kvlen, t2, "actual_seq_kvlen", name)
    _require(q_len.size == k_len.size, name, f"actual_seq_qlen and actual_seq_kvlen must list as many sequences, got "
             f"{q_len.size} and {k_len.size}")
    _require(bool((k_len > 0).all()), name, "a zero-length key/value sequence (0 in list_seq_k) is not allowed")
    _require(next_tokens == 0 and pre_tokens >= int(q_len.max()), name,
             f"TND needs next_tokens 0 and pre_tokens >= the longest query sequence ({int(q_len.max())}), got "
             f"{next_tokens} / {pre_tokens}")
    _require(sparse_mode == 2 or bool((q_len <= k_len).all()), name, "sparse_mode 3 needs every S1 <= its S2")
    q32, k32, v32 = (x.astype(ms.float32).asnumpy() for x in (query, key, value))
    n_rep = n1 // n2
    out = np.zeros((t1, n1, d), np.float32)
    q_start = k_start = 0
    for s1, s2 in zip(q_len.tolist(), k_len.tolist()):
        q_seq = q32[q_start:q_start + s1].transpose(1, 0, 2)  # [N1, S1, D]
        k_seq = np.repeat(k32[k_start:k_start + s2].transpose(1, 0, 2), n_rep, 0)
        v_seq = np.repeat(v32[k_start:k_start + s2].transpose(1, 0, 2), n_rep, 0)
        scores = scalar_value * (q_seq @ k_seq.transpose(0, 2, 1))
        offset = 0 if sparse_mode == 2 else s2 - s1
        keep = np.arange(s2)[None, :] <= np.arange(s1)[:, None] + offset
        scores = np.where(keep, scores, -np.inf)
        with np.errstate(invalid="ignore"):  # a row with every key hidden: undefined, NaN
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs = probs / probs.sum(-1, keepdims=True)
        out[q_start:q_start + s1] = (probs @ v_seq).transpose(1, 0, 2)
        q_start, k_start = q_start + s1, k_start + s2
    return Tensor(out).astype(query.dtype)


def _alibi_rows(shift, s1, offset, name):
    """The full [B|1, N, S1, S2] shift from the lower-triangle ALiBi form (its last R = min(S1, 1024) rows): row i
    holds f(j - i) for the visible keys j <= i + offset, so any row is the last row moved right by S1 - 1 - i.
    Raises when the given rows break that rule."""
    rows, s2 = shift.shape[2], shift.shape[3]
    last = shift[:, :, -1, :]
    full = np.zeros(shift.shape[:2] + (s1, s2), np.float32)
    for i in range(s1):
        visible = min(s2, i + offset + 1)
        full[:, :, i, :visible] = last[:, :, s1 - 1 - i:s1 - 1 - i + visible]
    _require(np.allclose(np.tril(full[:, :, s1 - rows:, :], offset + s1 - rows),
                         np.tril(shift, offset + s1 - rows), rtol=1e-3, atol=1e-2), name,
             "real_shift does not follow the ALiBi rule (each row the same function of key - query)")
    return full


def rms_norm(x, gamma, epsilon=1e-6):
    """(x / sqrt(mean(x^2) + epsilon) * gamma, rstd). Contract: x and gamma float16/float32/bfloat16 of ONE dtype
    (else TypeError on the device), 0 < epsilon <= 1, gamma's rank <= x's, gamma = x's trailing dims."""
    name = "RmsNorm"
    CALLS[name] += 1
    _require(x.dtype in FLOATS and gamma.dtype in FLOATS, name, f"dtypes must be float16/float32/bfloat16, got "
             f"x {x.dtype}, gamma {gamma.dtype}")
    _require(x.dtype == gamma.dtype, name, f"x ({x.dtype}) and gamma ({gamma.dtype}) must share a dtype")
    _require(isinstance(epsilon, float) and 0 < epsilon <= 1, name, f"epsilon must be a float in (0, 1], got {epsilon}")
    g = gamma.ndim
    _require(g <= x.ndim and tuple(x.shape[x.ndim - g:]) == tuple(gamma.shape), name,
             f"gamma {tuple(gamma.shape)} must match x's trailing dims {tuple(x.shape)}")
    x32 = x.astype(ms.float32)
    axes = tuple(range(x.ndim - g, x.ndim))
    rstd = ops.rsqrt((x32 * x32).mean(axes, keep_dims=True) + epsilon)
    return (x32 * rstd * gamma.astype(ms.float32)).astype(x.dtype), rstd


def rotary_position_embedding(x, cos, sin, mode=0):
    """x * cos + rotate_half(x) * sin (mode 0). Contract (x taken as BNSD, the layout the model passes): x 4-D
    float16/bfloat16/float32; cos and sin of x's dtype and one shape, [1, 1, S, D], [B, 1, S, D] or [B, N, S, D];
    D even and < 896; B, N < 1000; and not callable when B * N > 8 * S with D 32-byte aligned."""
    name = "RotaryPositionEmbedding"
    CALLS[name] += 1
    _require(isinstance(mode, int) and mode in (0, 1), name, f"mode must be 0 or 1, got {mode!r}")
    _require(mode == 0, name, "only mode 0 (rotate_half) is emulated")
    _require(x.ndim == 4 and x.dtype in FLOATS, name,
             f"x must be 4-D float16/bfloat16/float32, got {x.shape} {x.dtype}")
    _require(cos.dtype == x.dtype and sin.dtype == x.dtype, name,
             f"cos/sin must have x's dtype {x.dtype}, got {cos.dtype}/{sin.dtype}")
    b, n, s, d = x.shape
    _require(tuple(cos.shape) == tuple(sin.shape) and tuple(cos.shape) in ((1, 1, s, d), (b, 1, s, d), (b, n, s, d)),
             name, f"cos/sin must be 11SD, B1SD or BNSD for x {tuple(x.shape)}, got {tuple(cos.shape)}")
    _require(d % 2 == 0 and d < 896 and b < 1000 and n < 1000, name,
             f"needs D even < 896 and B, N < 1000, got {x.shape}")
    aligned = (d * (4 if x.dtype == ms.float32 else 2)) % 32 == 0
    _require(not (aligned and b * n > 8 * s), name, f"BNSD with B*N ({b * n}) > 8*S ({8 * s}) is documented as not "
             "callable (use the composed rotation)")
    x32, cos32, sin32 = x.astype(ms.float32), cos.astype(ms.float32), sin.astype(ms.float32)
    rotated = ops.concat((-x32[..., d // 2:], x32[..., :d // 2]), -1)
    return (x32 * cos32 + rotated * sin32).astype(x.dtype)


def _primitive_call(prim, query, key, value, real_shift=None, drop_mask=None, padding_mask=None, attn_mask=None,
                    prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None):
    """FlashAttentionScore (the Primitive, which backend_ascend calls so that it can carry shard strategies):
    its init arguments and inputs through the emulator; (softmax_max, softmax_sum, softmax_out, attention_out) with
    only attention_out computed."""
    a = prim.init_attrs
    out = flash_attention_score(query, key, value, a["head_num"], real_shift=real_shift, drop_mask=drop_mask,
                                padding_mask=padding_mask, attn_mask=attn_mask, prefix=prefix,
                                actual_seq_qlen=actual_seq_qlen, actual_seq_kvlen=actual_seq_kvlen,
                                keep_prob=a["keep_prob"], scalar_value=a["scale_value"], pre_tokens=a["pre_tokens"],
                                next_tokens=a["next_tokens"], inner_precise=a["inner_precise"],
                                input_layout=a["input_layout"], sparse_mode=a["sparse_mode"])
    return None, None, None, out


def install(monkeypatch):
    """Emulators in place of the fused mindspore.ops functions and the FlashAttentionScore primitive, for models
    built with backend="ascend"."""
    monkeypatch.setattr(ops, "flash_attention_score", flash_attention_score)
    monkeypatch.setattr(FlashAttentionScore, "__call__", _primitive_call)
    monkeypatch.setattr(ops, "rms_norm", rms_norm)
    monkeypatch.setattr(ops, "rotary_position_embedding", rotary_position_embedding)
    CALLS.clear()
