"""ASCEND-ONLY CODE: the Ascend fused backend, the only place that calls Ascend fused kernels (FlashAttentionScore,
RmsNorm, RotaryPositionEmbedding) and that holds the semi-auto parallel strategies of the attention op and of the ops
building its inputs (RoPE table gather, ALiBi shift) and the NormHead's normalisation. None of it runs on CPU as it
would on a device, so this backend is checked in two steps:
  1. here, on CPU: tests/test_ascend_emulation.py swaps in tests/ascend_emulators.py, CPU emulators that raise on
     any breach of each kernel's documented input contract (dtypes, layouts, shape rules, mask meaning, where the
     scale applies, the rotary B*N > 8*S restriction, the varlen TND lists) and compute its documented math, builds
     models on this backend and requires the composed backend's logits (training forward, packed rows, prefill,
     KV-cache decode, left padding); the strategy tuples are checked against the recipes' dp/mp there too, but
     CPU cannot compile a semi-auto graph ("Invalid backend: CPU"), so whether MindSpore accepts them is unknown;
  2. on an Ascend host: MindSpore's dry run with the CANN toolkit (docs/ASCEND_TRAINING.md) compiles the N-rank
     graph with these strategies, then a device runs it (docs/ascend-first-run.md). Until then the kernels' real
     behaviour (above all the order of scale and shift in FlashAttentionScore) and the strategies are documented,
     not verified.
Projections, positions and the cache writes are the composed backend's (stock ops, which Ascend runs natively).

Attention paths, chosen per call from what the model hands over:
- causal rows (AscendBackend(config, causal_rows=True), what training/run.py builds on Ascend for unpacked data):
  BNSD, sparse_mode 2 (leftUpCausal) with the compressed causal mask MindFormers passes (2048 x 2048 uint8, 1 above
  the diagonal), so the kernel skips the upper triangle; the ALiBi shift goes as its last min(S, 1024) rows
  ([1, N, R, S]: the documented lower-triangle ALiBi form), built from the slopes (alibi_shift), not sliced from
  [B, N, S, S].
- packed rows of a RoPE model (the ends of the conversations reach `packed_attention_inputs`): TND with
  actual_seq_qlen / actual_seq_kvlen and sparse_mode 3 with the compressed mask, so the kernel skips every block
  across conversations. The docs forbid a zero-length sequence, which the packed column's padding (repeated ends)
  would make; so every conversation (and the row's tail) gets one zero dummy token appended in the kernel's token
  axis: a causal query never sees a key after it, so the real tokens' outputs are exact, and the dummies' outputs
  are dropped. ALiBi models keep the dense mask on packed rows: with TND the docs want the shift as
  [B|1, N, 1024, max_seqlen_k], a data-dependent shape, and a longest conversation over 1024 tokens.
- anything else (padding, a cache, ALiBi packed rows): the dense [B, 1, S, Sk] mask, sparse_mode 0.
"""
import math

import mindspore as ms
import numpy as np
from mindspore import Tensor, ops
from mindspore.ops.operations.nn_ops import FlashAttentionScore

from .backend_composed import ComposedBackend, apply_rotary

COMPRESSED_MASK = 2048  # the compressed mask's side in sparse modes 2, 3, 4
ALIBI_ROWS = 1024  # rows of a lower-triangle ALiBi shift the kernel reads when S > 1024
DENSE, LEFT_UP_CAUSAL, RIGHT_DOWN_CAUSAL = 0, 2, 3  # sparse_mode values used here
# (input_layout, sparse_mode) of each attention path
PATHS = {"dense": ("BNSD", DENSE), "causal": ("BNSD", LEFT_UP_CAUSAL), "varlen": ("TND", RIGHT_DOWN_CAUSAL)}


class LayoutError(ValueError):
    """A parallel layout this backend cannot shard (e.g. model_parallel not dividing the heads)."""


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


def compressed_causal_mask():
    """sparse modes 2/3's attn_mask: [2048, 2048] uint8, 1 (discard) above the diagonal."""
    return Tensor(np.triu(np.ones((COMPRESSED_MASK, COMPRESSED_MASK), np.uint8), 1))


def attention_strategy(path, dp, mp, shift):
    """in_strategy of FlashAttentionScore for one path: one tuple per tensor input passed, in input order (query,
    key, value, real_shift, attn_mask, actual_seq_qlen, actual_seq_kvlen), as MindFormers' FlashAttention builds
    them: batch (or TND's token axis) over dp, heads over mp; a dense mask [B, 1, S, Sk] over dp; the compressed
    mask replicated; a dense shift [B, N, S, Sk] over dp and mp, the causal one [1, N, R, S] over mp only (its batch
    is 1); the varlen lists over dp (each rank's rows)."""
    layout, mode = PATHS[path]
    qkv = (dp, mp, 1) if layout == "TND" else (dp, mp, 1, 1)
    strategy = (qkv, qkv, qkv)
    if shift:
        strategy += ((dp, mp, 1, 1) if mode == DENSE else (1, mp, 1, 1),)
    strategy += ((dp, 1, 1, 1) if mode == DENSE else (1, 1),)
    if layout == "TND":
        strategy += ((dp,), (dp,))
    return strategy


def table_strategies(dp, mp):
    """in_strategy of the ops building the attention inputs and normalising the NormHead (MindFormers' choices):
    the RoPE table gather (table replicated, positions [B, S] over dp), the ALiBi shift (slopes [1, N, 1, 1] over
    mp times distances [B, 1, S, Sk] over dp; the compressed form's relative table [1, 1, R, S] replicated; the
    division by the scale), and the NormHead: the weight's rows (vocabulary) over all dp x mp devices for the
    squares, sums, norms and the product, whose [B*S, H] input is replicated."""
    rows = dp * mp
    return {"rope_gather": ((1, 1), (dp, 1)),
            "alibi_mul": ((1, mp, 1, 1), (dp, 1, 1, 1)),
            "alibi_rel_mul": ((1, mp, 1, 1), (1, 1, 1, 1)),
            "shift_scale": ((dp, mp, 1, 1), ()),
            "causal_shift_scale": ((1, mp, 1, 1), ()),
            "head_square": ((rows, 1),),
            "head_sum": ((rows, 1),),
            "head_sqrt": ((rows,),),
            "head_max": ((rows,), ()),
            "head_inverse": ((rows,),),
            "head_matmul": ((1, 1), (rows, 1)),
            "head_scale": ((1, rows), (rows,))}


def check_layout(config, dp, mp):
    """model_parallel must divide the heads (and the vocabulary rows the NormHead splits over dp x mp)."""
    heads = config.num_attention_heads
    if mp < 1 or dp < 1:
        raise LayoutError(f"data_parallel {dp} and model_parallel {mp} must be >= 1")
    if heads % mp:
        raise LayoutError(f"model_parallel {mp} does not divide the {heads} attention heads: FlashAttentionScore "
                          f"splits heads over model_parallel; choose a divisor of {heads}")
    if config.vocab_size % (dp * mp):
        raise LayoutError(f"data_parallel x model_parallel = {dp * mp} does not divide the vocabulary "
                          f"({config.vocab_size} rows) the NormHead splits over every device; pad the vocabulary "
                          f"or choose another layout")


def varlen_indices(seq_ends, batch, seq_len):
    """For packed rows: (gather_in [B * (S + W + 1)], gather_out [B * S], cumulative ends [B * (W + 1)] int64) of the
    kernel's token axis, in which segment k of row b (tokens [E[k-1], E[k]) with ends E clipped to S and the tail
    [E[W-1], S) as segment W) is followed by one dummy token. gather_in picks each kernel token from the flattened
    [B * S + 1] rows (the last one zero: the dummies), gather_out each real token back. The ends strictly increase,
    so no sequence is empty, as the kernel's docs require."""
    width = seq_ends.shape[1]
    row = seq_len + width + 1
    ends = ops.minimum(seq_ends.astype(ms.int32), seq_len)
    ends = ops.concat((ends, ops.full((batch, 1), seq_len, dtype=ms.int32)), 1)  # [B, W + 1]
    slots = ops.arange(0, seq_len, dtype=ms.int32).reshape(1, seq_len, 1)
    segment = (slots >= ends.reshape(batch, 1, width + 1)).astype(ms.int32).sum(-1)  # [B, S]
    base = ops.arange(0, batch, dtype=ms.int32).reshape(batch, 1)
    gather_out = (base * row + ops.arange(0, seq_len, dtype=ms.int32).reshape(1, seq_len) + segment).reshape(-1)
    source = (base * seq_len + ops.arange(0, seq_len, dtype=ms.int32).reshape(1, seq_len)).reshape(-1)
    gather_in = ops.tensor_scatter_update(ops.full((batch * row,), batch * seq_len, dtype=ms.int32),
                                          gather_out.reshape(-1, 1), source)
    cumulative = base * row + ends + ops.arange(1, width + 2, dtype=ms.int32).reshape(1, width + 1)
    return gather_in, gather_out, cumulative.reshape(-1).astype(ms.int64)


@ms.jit_class
class AscendBackend(ComposedBackend):
    """The fused kernels for norm, rotary and attention, and sharded primitives for what semi-auto parallel splits;
    everything else composed. `config` (the model's) fixes the attention primitives' heads and scale.
    causal_rows=True: every call is causal over whole rows (training on unpacked data: no padding, no segments, no
    cache), so attention takes the sparse causal path; the caller guarantees it. `shard(dp, mp)` sets the
    strategies (training/parallel.apply_ascend_parallel calls it in semi-auto runs)."""
    name = "ascend"

    def __init__(self, config, causal_rows=False):
        heads = config.num_attention_heads
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.alibi = config.position_encoding != "rope"
        self.causal_rows = causal_rows
        self.causal_mask = compressed_causal_mask()
        self.fa = {path: FlashAttentionScore(head_num=heads, scale_value=self.scale, input_layout=layout,
                                             sparse_mode=mode, next_tokens=0 if layout == "TND" else 2147483647)
                   for path, (layout, mode) in PATHS.items()}
        self.fa_dense, self.fa_causal, self.fa_varlen = self.fa["dense"], self.fa["causal"], self.fa["varlen"]
        self.ops = {"rope_gather": ops.Gather(), "alibi_mul": ops.Mul(), "alibi_rel_mul": ops.Mul(),
                    "shift_scale": ops.Mul(), "causal_shift_scale": ops.Mul(),
                    "head_square": ops.Square(), "head_sum": ops.ReduceSum(), "head_sqrt": ops.Sqrt(),
                    "head_max": ops.Maximum(), "head_inverse": ops.Reciprocal(),
                    "head_matmul": ops.MatMul(transpose_b=True), "head_scale": ops.Mul()}
        for key, op in self.ops.items():
            setattr(self, key, op)  # attributes, so that a compiled graph reaches them
        self.config = config

    def shard(self, dp, mp):
        """Sets every strategy for data_parallel dp x model_parallel mp (LayoutError when mp does not divide the
        heads). The primitives are shared by all layers: one strategy each, as every layer has the same shapes."""
        check_layout(self.config, dp, mp)
        for path, primitive in self.fa.items():
            if path == "varlen" and self.alibi:
                continue  # never called: ALiBi packed rows take the dense path
            primitive.shard(attention_strategy(path, dp, mp, self.alibi))
        for key, strategy in table_strategies(dp, mp).items():
            self.ops[key].shard(strategy)

    def norm(self, x, weight, eps, eps_tensor):  # pylint: disable=unused-argument
        return fused_rms_norm(x, weight, eps)

    def rope_inputs(self, cos, sin, num_heads):  # pylint: disable=unused-argument
        return cos, sin

    def gather_rows(self, table, index):
        return self.rope_gather(table, index, 0)

    def alibi_shift(self, slopes, distance):
        """slope x (key - query): [B, N, S, Sk]; on causal rows only the compressed form's last min(S, 1024) query
        rows [1, N, R, S], from the slopes alone (every row of the batch has the same distances)."""
        if not self.causal_rows:
            return self.alibi_mul(slopes, distance.astype(ms.float32))
        seq_len = distance.shape[-1]
        rows = min(seq_len, ALIBI_ROWS)
        relative = ops.arange(0, seq_len, dtype=ms.int32).reshape(1, seq_len) - \
            ops.arange(seq_len - rows, seq_len, dtype=ms.int32).reshape(rows, 1)
        return self.alibi_rel_mul(slopes, relative.astype(ms.float32).reshape(1, 1, rows, seq_len))

    def heads(self, x, rope):
        x = x.swapaxes(1, 2)
        return x if rope is None else fused_rotary(x, rope[0], rope[1])

    def attention_inputs(self, visible, alibi, scale, dtype, num_heads):  # pylint: disable=unused-argument
        """(mask, shift or None): the compressed mask and the shift's last rows on causal rows; else the dense
        discard mask (uint8 [B, 1, S, Sk], 1 = hidden key) and the shift [B, N, S, Sk]. The kernel computes
        softmax(scale * (real_shift + q k^T)), so the ALiBi term is divided by the scale here; it is relative
        (slope * (key - query position)) so half precision holds it at long context."""
        if self.causal_rows:  # the shift, if any, is already the compressed form (alibi_shift)
            if alibi is None:
                return self.causal_mask, None
            return self.causal_mask, self.causal_shift_scale(alibi, 1.0 / scale).astype(kernel_dtype(dtype))
        discard = ops.logical_not(visible).astype(ms.uint8)
        if alibi is None:
            return discard, None
        return discard, self.shift_scale(alibi, 1.0 / scale).astype(kernel_dtype(dtype))

    def packed_attention_inputs(self, visible, seq_ends, scale, dtype, num_heads):
        """Packed rows of a RoPE model: (compressed mask, gather_in, gather_out, cumulative ends) for the varlen
        path (module docstring)."""
        batch, _, seq_len, _ = visible.shape
        return (self.causal_mask,) + varlen_indices(seq_ends, batch, seq_len)

    def attention_core(self, q, k, v, inputs, scale):  # pylint: disable=unused-argument
        if len(inputs) == 4:
            return self.varlen_attention(q, k, v, inputs)
        dtype = kernel_dtype(q.dtype)
        q_in, k_in, v_in = q.astype(dtype), k.astype(dtype), v.astype(dtype)
        mask, shift = inputs
        primitive = self.fa_causal if len(mask.shape) == 2 else self.fa_dense
        return primitive(q_in, k_in, v_in, shift, None, None, mask, None, None, None)[3].astype(q.dtype)

    def varlen_attention(self, q, k, v, inputs):
        """q/k/v [B, N, S, D] -> TND with a dummy after every segment -> the kernel -> [B, N, S, D]."""
        mask, gather_in, gather_out, ends = inputs
        b, n, s, d = q.shape

        dtype = kernel_dtype(q.dtype)

        def tokens(x):  # [B, N, S, D] -> [T, N, D] in the kernel's dtype, picked from the B * S rows and a zero row
            flat = x.swapaxes(1, 2).reshape(b * s, n, d)
            return ops.gather(ops.concat((flat, ops.zeros((1, n, d), x.dtype)), 0), gather_in, 0).astype(dtype)

        out = self.fa_varlen(tokens(q), tokens(k), tokens(v), None, None, None, mask, None, ends, ends)[3]
        return ops.gather(out.astype(q.dtype), gather_out, 0).reshape(b, s, n, d).swapaxes(1, 2)

    def norm_head(self, x, weight, dtype):
        """NormHead in training, (x w^T) / |w| per vocabulary row (ComposedBackend.norm_head), in sharded ops."""
        wc = weight.astype(dtype)
        sums = self.head_sum(self.head_square(wc).astype(ms.float32), (-1,))
        inverse = self.head_inverse(self.head_max(self.head_sqrt(sums), 1e-12)).astype(dtype)
        logits = self.head_matmul(x.reshape(-1, x.shape[-1]).astype(dtype), wc)
        return self.head_scale(logits, inverse).reshape(x.shape[:-1] + (weight.shape[0],))
