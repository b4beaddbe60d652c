"""ASCEND-ONLY CODE: the Ascend fused backend, the only place that calls Ascend fused kernels (FlashAttentionScore,
RmsNorm, RotaryPositionEmbedding). None of them has a CPU kernel, so this backend is checked in two steps:
  1. here, on CPU: tests/test_ascend_emulation.py swaps in tests/ascend_emulators.py, CPU emulators that raise on
     any breach of each kernel's documented input contract (dtypes, layouts, shape rules, mask meaning, where the
     scale applies, the rotary B*N > 8*S restriction) and compute its documented math, builds models on this
     backend and requires the composed backend's logits (training forward, prefill, KV-cache decode, left padding);
  2. on a real Ascend device: docs/ascend-first-run.md lists the commands. Until that has run, the kernels' real
     behaviour (above all the order of scale and shift in FlashAttentionScore) is documented, not verified.
Projections, positions and the cache writes are the composed backend's (stock ops, which Ascend runs natively).
"""
import mindspore as ms
from mindspore import ops

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
    Packed rows (BaichuanModel segment ids) reach the kernel as this same dense mask, block-diagonal per
    conversation: one code path, checked by the emulator test on packed rows. The kernel's sparse alternative,
    input_layout "TND" with actual_seq_qlen / actual_seq_kvlen = the conversation ends cumulated over the batch
    (B x seq_ends offset by b x S) and sparse_mode 3 (causal, compressed 2048 x 2048 mask), would skip the hidden
    blocks instead of computing and discarding them; it is not used because no emulator or device here can check
    its contract (see docs/ascend-first-run.md)."""
    discard = ops.logical_not(visible).astype(ms.uint8)
    if alibi is None:
        return discard, None
    return discard, (alibi / scale).astype(kernel_dtype(dtype))


def fused_attention(q, k, v, inputs, scale):
    discard, shift = inputs
    dtype = kernel_dtype(q.dtype)
    out = ops.flash_attention_score(q.astype(dtype), k.astype(dtype), v.astype(dtype), q.shape[1],
                                    real_shift=shift, attn_mask=discard, scalar_value=scale, input_layout="BNSD")
    return out.astype(q.dtype)


@ms.jit_class
class AscendBackend(ComposedBackend):
    """The fused kernels for norm, rotary and attention; everything else composed."""
    name = "ascend"

    def norm(self, x, weight, eps, eps_tensor):  # pylint: disable=unused-argument
        return fused_rms_norm(x, weight, eps)

    def rope_inputs(self, cos, sin, num_heads):  # pylint: disable=unused-argument
        return cos, sin

    def heads(self, x, rope):
        x = x.swapaxes(1, 2)
        return x if rope is None else fused_rotary(x, rope[0], rope[1])

    def attention_inputs(self, visible, alibi, scale, dtype, num_heads):  # pylint: disable=unused-argument
        return fused_attention_inputs(visible, alibi, scale, dtype)

    def attention_core(self, q, k, v, inputs, scale):
        return fused_attention(q, k, v, inputs, scale)
