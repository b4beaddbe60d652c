"""ASCEND-ONLY CODE: the Ascend fused backend, the only place that calls Ascend fused kernels (FlashAttentionScore,
RmsNorm, RotaryPositionEmbedding). None of them has a CPU kernel, so this backend is checked in two steps:
  1. here, on CPU: tests/test_ascend_emulation.py swaps in tests/ascend_emulators.py, CPU emulators that raise on
     any breach of each kernel's documented input contract (dtypes, layouts, shape rules, mask meaning, where the
     scale applies, the rotary B*N > 8*S restriction) and compute its documented math, builds models on this
     backend and requires the composed backend's logits (training forward, prefill, KV-cache decode, left padding);
  2. on a real Ascend device: docs/ascend-first-run.md lists the commands. Until that has run, the kernels' real
     behaviour (above all the order of scale and shift in FlashAttentionScore) is documented, not verified.
Projections, positions and the cache writes are the composed backend's (stock ops, which Ascend runs natively).

Causal training rows (AscendBackend(causal_rows=True), what training/run.py builds on Ascend for unpacked data):
FlashAttentionScore gets sparse_mode 2 (leftUpCausal) with the compressed causal mask MindFormers passes (2048 x 2048
uint8, 1 above the diagonal), so the kernel skips the upper triangle instead of computing S^2 scores and discarding
half; the ALiBi shift goes as its last min(S, 1024) rows of batch row 0 ([1, N, 1024, S]: the documented form for the
lower-triangle ALiBi case, the kernel extending the rows by the ALiBi rule, shift = f(key - query)). Any other call
(padding, packed rows, a cache) keeps the dense mask with sparse_mode 0. Packed rows through input_layout "TND" with
actual_seq_qlen / actual_seq_kvlen are not used: the model hands the backend a mask, not the conversation ends.
"""
import mindspore as ms
import numpy as np
from mindspore import Tensor, ops

from .backend_composed import ComposedBackend, apply_rotary


def kernel_dtype(dtype):
    """FlashAttentionScore takes float16/bfloat16 only: float32 models run attention in bfloat16."""
    return dtype if dtype in (ms.float16, ms.bfloat16) else ms.bfloat16


def fused_rms_norm(x, weight, eps):
    return ops.rms_norm(x, weight.astype(x.dtype), eps)[0]  # x and gamma must share a dtype


def fused_rotary(x, cos, sin):
    b, n, s, _ = x.shape
    if b * n > 8 * s:  # documented as not callable for BNSD when B*N > 8*S: always the case at decode (S = 1)
        return apply_rotary(x, cos, sin)
    return ops.rotary_position_embedding(x, cos.astype(x.dtype), sin.astype(x.dtype), 0)


def fused_attention_inputs(visible, alibi, scale, dtype):
    """(discard mask uint8 [B, 1, S, Sk] with 1 = hidden key, real_shift [B, N, S, Sk] or None). The kernel computes
    softmax(scale * (real_shift + q k^T)), so the ALiBi term is divided by the scale here; it is relative
    (slope * (key - query position)) so half precision holds it at long context.
    The dense path (sparse_mode 0): padding, a cache, and packed rows (BaichuanModel segment ids), which reach the
    kernel as this same mask, block-diagonal per conversation. For packed rows the kernel's varlen alternative,
    input_layout "TND" with actual_seq_qlen / actual_seq_kvlen = the conversation ends cumulated over the batch and
    sparse_mode 3, would skip the hidden blocks; it is not used (the module docstring says why)."""
    discard = ops.logical_not(visible).astype(ms.uint8)
    if alibi is None:
        return discard, None
    return discard, (alibi / scale).astype(kernel_dtype(dtype))


COMPRESSED_MASK = 2048  # the compressed mask's side in sparse modes 2, 3, 4
ALIBI_ROWS = 1024  # rows of a lower-triangle ALiBi shift the kernel reads when S > 1024
LEFT_UP_CAUSAL = 2  # sparse_mode: query i sees keys 0..i


def compressed_causal_mask():
    """sparse_mode 2's attn_mask: [2048, 2048] uint8, 1 (discard) above the diagonal."""
    return Tensor(np.triu(np.ones((COMPRESSED_MASK, COMPRESSED_MASK), np.uint8), 1))


def causal_attention_inputs(mask, alibi, scale, dtype):
    """(compressed mask, shift [1, N, min(S, 1024), S] or None) for causal rows without padding or packing. ALiBi
    is the same for every row of the batch (relative positions), so batch row 0's last rows carry it."""
    if alibi is None:
        return mask, None
    rows = alibi.shape[2]
    shift = alibi[:1, :, rows - min(rows, ALIBI_ROWS):, :]
    return mask, (shift / scale).astype(kernel_dtype(dtype))


def fused_attention(q, k, v, inputs, scale):
    """A 2-D mask is the compressed causal one (sparse_mode 2); a 4-D one is dense (sparse_mode 0)."""
    discard, shift = inputs
    dtype = kernel_dtype(q.dtype)
    mode = LEFT_UP_CAUSAL if discard.ndim == 2 else 0
    out = ops.flash_attention_score(q.astype(dtype), k.astype(dtype), v.astype(dtype), q.shape[1],
                                    real_shift=shift, attn_mask=discard, scalar_value=scale, input_layout="BNSD",
                                    sparse_mode=mode)
    return out.astype(q.dtype)


@ms.jit_class
class AscendBackend(ComposedBackend):
    """The fused kernels for norm, rotary and attention; everything else composed. causal_rows=True: every call is
    causal over whole rows (training on unpacked data: no padding, no segments, no cache), so attention takes the
    sparse causal path; the caller guarantees it."""
    name = "ascend"

    def __init__(self, causal_rows=False):
        self.causal_rows = causal_rows
        self.causal_mask = compressed_causal_mask() if causal_rows else None

    def norm(self, x, weight, eps, eps_tensor):  # pylint: disable=unused-argument
        return fused_rms_norm(x, weight, eps)

    def rope_inputs(self, cos, sin, num_heads):  # pylint: disable=unused-argument
        return cos, sin

    def heads(self, x, rope):
        x = x.swapaxes(1, 2)
        return x if rope is None else fused_rotary(x, rope[0], rope[1])

    def attention_inputs(self, visible, alibi, scale, dtype, num_heads):  # pylint: disable=unused-argument
        if self.causal_rows:
            return causal_attention_inputs(self.causal_mask, alibi, scale, dtype)
        return fused_attention_inputs(visible, alibi, scale, dtype)

    def attention_core(self, q, k, v, inputs, scale):
        return fused_attention(q, k, v, inputs, scale)
