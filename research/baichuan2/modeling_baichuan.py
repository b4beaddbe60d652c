"""Baichuan-family causal LM in plain MindSpore cells (Baichuan2-7B/13B, Baichuan-7B, XVERSE-7B).

Read top to bottom: kernels (one backend switch) -> RMSNorm -> attention (RoPE or ALiBi) -> SwiGLU MLP ->
decoder layer -> BaichuanModel -> NormHead -> BaichuanForCausalLM (loss, weight loading).

Parameter names are the interface (see docs/DESIGN.md): Hugging Face Llama names with separate q/k/v projections,
so `convert_weight.py` maps a Baichuan checkpoint onto them by splitting `W_pack`.

This file imports nothing from the project but `configuration_baichuan`, so it can be copied into a model
directory and loaded with `trust_remote_code=True`.
"""
import json
import math
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common import np_dtype
from mindspore.common.initializer import Normal, initializer
from mindspore.nn.utils import no_init_parameters

from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .configuration_baichuan import BaichuanConfig
from .quantization import bf16_bits, from_bf16_bits, qweight_shape, scales_shape
from .safetensors_io import SafetensorsFile, SafetensorsWriter

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_MASKED = -1e9  # added to masked attention scores (computed in float32); finite so fully padded rows stay finite
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- kernels
# The one backend switch. Ascend has fused RmsNorm, rotary and FlashAttentionScore kernels; CPU (and GPU) have
# none of them (see shared facts), so everywhere else the composed ops below run. The fused branches are kept thin
# and are NOT exercised on the CPU machines this project is tested on.
def use_fused_kernels():
    return ms.get_context("device_target") == "Ascend"


def rms_norm(x, weight, eps, fused):
    if fused:
        return ops.rms_norm(x, weight, eps)[0]
    x32 = x.astype(ms.float32)
    x32 = x32 * ops.rsqrt((x32 * x32).mean(-1, keep_dims=True) + eps)
    return weight * x32.astype(x.dtype)


def apply_rotary(x, cos, sin, fused):
    """Half-rotation RoPE (as Hugging Face Llama/Baichuan): x*cos + rotate_half(x)*sin. x: [B, N, S, D]."""
    if fused:
        return ops.rotary_position_embedding(x, cos, sin, 0)
    half = x.shape[-1] // 2
    rotated = ops.concat((-x[..., half:], x[..., :half]), -1)
    return x * cos + rotated * sin


def attention(q, k, v, bias, scale, fused):
    """softmax(q k^T * scale + bias) v. q,k,v: [B, N, S, D]; bias: float32 [B, 1 or N, S, Sk] holding _MASKED where a
    key is hidden plus the ALiBi term where the model uses it."""
    if fused:
        # FlashAttentionScore wants the hidden keys as a 0/1 "discard" mask and the ALiBi part as real_shift.
        discard = bias < _MASKED / 2
        shift = ops.where(discard, ops.zeros_like(bias), bias).astype(q.dtype)
        return ops.flash_attention_score(q, k, v, q.shape[1], real_shift=shift, attn_mask=discard.astype(ms.uint8),
                                         scalar_value=scale, input_layout="BNSD")
    scores = ops.matmul(q, k.swapaxes(-1, -2)).astype(ms.float32) * scale + bias
    probs = ops.softmax(scores, -1).astype(v.dtype)
    return ops.matmul(probs, v)


def alibi_slopes(num_heads):
    """ALiBi head slopes (Press et al.): 2^(-8i/n) for n a power of two; otherwise the slopes of the closest lower
    power of two, followed by every other slope of twice that power (the interleaved extension Baichuan2-13B uses)."""
    def power_of_two_slopes(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start ** (i + 1) for i in range(n)]
    closest = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two_slopes(closest)
    if closest != num_heads:
        slopes += power_of_two_slopes(2 * closest)[0::2][:num_heads - closest]
    return np.array(slopes, dtype=np.float32)


def rope_tables(head_dim, max_positions, base):
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    freqs = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    emb = np.concatenate([freqs, freqs], axis=-1)
    return np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)


# ---------------------------------------------------------------------------------------------- cells
_MATMUL_NT = ops.MatMul(transpose_b=True)


def linear(x, weight, dtype):
    """x W^T with W [out, in] as in torch. Flattened to 2D: CPU has no broadcasting 3D x 2D BatchMatMul.
    MatMul(transpose_b) reads W as stored: an explicit W.swapaxes copies the whole weight every call, which on CPU
    cost ~50x the matrix-vector product itself at decode time (measured: 240 ms vs 5 ms for a 32000x512 head)."""
    y = _MATMUL_NT(x.reshape(-1, x.shape[-1]).astype(dtype), weight.astype(dtype))
    return y.reshape(x.shape[:-1] + (weight.shape[0],))


def normal_weight(shape, config):
    return Parameter(initializer(Normal(config.initializer_range), shape, _DTYPES[config.param_dtype]), name="weight")


# ------------------------------------------------------------------ stored weight formats (bf16, int8, int4)
# A module's format comes from config.weight_format(module): "dense" (param_dtype, trainable; the reference),
# "bfloat16", "int8" or "int4" (inference only; layouts in quantization.py / QUANT_FORMAT.md). The weights stay in
# that format in memory. Stock MindSpore ops dequantise them per call (CPU MatMul has no bf16 kernel, so bf16 is
# cast to float32 and int8/int4 are unpacked and scaled to float32 just before the MatMul); `project` is the one
# place where a faster kernel (kernels.linear_op, when kernels.py ships) replaces that.
_STOCK_CHUNK_ROWS = 16384  # stock dequantisation materialises at most this many float32 weight rows at a time
_BF16_TO_F32 = from_bf16_bits(np.arange(65536, dtype=np.uint16))  # lookup table: CPU Gather has no bf16 kernel
_UINT8_16, _UINT8_8 = Tensor(16, ms.uint8), Tensor(8, ms.uint8)


def kernel_linear_op(fmt, group_size):
    """The fast projection op for `fmt` from kernels.py, or None: stock ops then (kernels.py missing or unusable).
    Looked up once per projection at construction."""
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py")):
        return None
    from . import kernels  # pylint: disable=import-outside-toplevel
    return kernels.linear_op(fmt, group_size)


def dequantize(qweight, scales, bits, group_size, in_features):
    """Stock-op dequantisation of int8 / packed int4 rows -> float32 [rows, in_features] (see quantization.py)."""
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
    w = (q.reshape(rows, groups, group_size) * scales.astype(ms.float32).reshape(rows, groups, 1)).reshape(rows, width)
    return w if width == in_features else w[:, :in_features]


def _float_weight(weights, fmt, group_size, in_features):
    if fmt == "bfloat16":
        return weights[0].astype(ms.float32)
    return dequantize(weights[0], weights[1], 8 if fmt == "int8" else 4, group_size, in_features)


def project(x, weights, fmt, group_size, in_features, kernel=None):
    """x W^T for a stored-format weight: `weights` is (weight,) for bfloat16, (qweight, scales) for int8/int4.
    Float32 out [..., out_features]. `kernel` (from kernel_linear_op) computes straight from the stored weights;
    without it the weight is dequantised by stock ops, a chunk of rows at a time so that a large output layer
    (lm_head: 125696 rows) never holds a whole float32 copy."""
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


def add_stored_weights(cell, out_features, in_features, fmt, group_size):
    """Creates the (uninitialised) parameters of a bf16 / int8 / int4 weight on `cell`; returns their tuple."""
    if fmt == "bfloat16":
        cell.weight = Parameter(initializer("zeros", [out_features, in_features], ms.bfloat16), name="weight",
                                requires_grad=False)
        return (cell.weight,)
    bits = 8 if fmt == "int8" else 4
    cell.qweight = Parameter(initializer("zeros", list(qweight_shape(out_features, in_features, bits)),
                                         ms.int8 if bits == 8 else ms.uint8), name="qweight", requires_grad=False)
    cell.scales = Parameter(initializer("zeros", list(scales_shape(out_features, in_features, group_size)),
                                        ms.float16), name="scales", requires_grad=False)
    return (cell.qweight, cell.scales)


class Linear(nn.Cell):
    """Bias-free projection; weight [out, in] so checkpoints map one to one. Dense (trainable) or a stored format
    (see above): then `weight` is bfloat16, or `qweight` + `scales` hold int8 / int4."""

    def __init__(self, in_features, out_features, config, module="linear"):
        super().__init__()
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.in_features = in_features
        self.format = config.weight_format(module)
        self.group_size = config.group_size
        if self.format == "dense":
            self.weight = normal_weight([out_features, in_features], config)
        else:
            add_stored_weights(self, out_features, in_features, self.format, self.group_size)
            self.kernel = kernel_linear_op(self.format, self.group_size)

    def construct(self, x):
        if self.format == "dense":
            return linear(x, self.weight, self.compute_dtype)
        weights = (self.weight,) if self.format == "bfloat16" else (self.qweight, self.scales)
        return project(x, weights, self.format, self.group_size, self.in_features, self.kernel).astype(
            self.compute_dtype)


class Embedding(nn.Cell):
    """Token embedding. Stored formats gather the rows first, then widen only those: bfloat16 is kept as its uint16
    bit patterns (CPU Gather has no bf16 kernel) and widened through a 65536-entry table; int8 / int4 rows are
    dequantised like a projection's."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.format = config.weight_format("embed_tokens")
        self.group_size = config.group_size
        shape = [config.vocab_size, config.hidden_size]
        if self.format == "dense":
            self.weight = normal_weight(shape, config)
        elif self.format == "bfloat16":
            self.weight = Parameter(initializer("zeros", shape, ms.uint16), name="weight", requires_grad=False)
            self.bf16_table = Tensor(_BF16_TO_F32)
        else:
            add_stored_weights(self, config.vocab_size, config.hidden_size, self.format, self.group_size)

    def construct(self, input_ids):
        if self.format == "dense":
            return ops.gather(self.weight, input_ids, 0)
        ids = input_ids.reshape(-1)
        if self.format == "bfloat16":
            rows = ops.gather(self.bf16_table, ops.gather(self.weight, ids, 0).astype(ms.int32), 0)
        else:
            rows = dequantize(ops.gather(self.qweight, ids, 0), ops.gather(self.scales, ids, 0),
                              8 if self.format == "int8" else 4, self.group_size, self.hidden_size)
        return rows.reshape(input_ids.shape + (self.hidden_size,))


class RMSNorm(nn.Cell):
    def __init__(self, hidden_size, eps, config):
        super().__init__()
        self.eps = eps
        self.fused = use_fused_kernels()
        self.weight = Parameter(initializer("ones", [hidden_size], _DTYPES[config.param_dtype]), name="weight")

    def construct(self, x):
        return rms_norm(x, self.weight, self.eps, self.fused)


class Attention(nn.Cell):
    def __init__(self, config):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.use_rope = config.position_encoding == "rope"
        self.fused = use_fused_kernels()
        self.q_proj = Linear(h, h, config)
        self.k_proj = Linear(h, h, config)
        self.v_proj = Linear(h, h, config)
        self.o_proj = Linear(h, h, config)

    def _heads(self, x):
        b, s, _ = x.shape
        return x.reshape(b, s, self.num_heads, self.head_dim).swapaxes(1, 2)

    def _qkv(self, x, cos, sin):
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        if self.use_rope:
            q = apply_rotary(q, cos, sin, self.fused)
            k = apply_rotary(k, cos, sin, self.fused)
        return q, k, v

    def _out(self, q, k, v, bias):
        b, _, s, _ = q.shape
        out = attention(q, k, v, bias, self.scale, self.fused)
        return self.o_proj(out.swapaxes(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def construct(self, x, cos, sin, bias):
        q, k, v = self._qkv(x, cos, sin)
        return self._out(q, k, v, bias)

    def prefill(self, x, cos, sin, bias, k_cache, v_cache):
        """Full attention over the S prompt tokens; their keys/values fill cache slots [0, S) (static slice: the
        rest of the cache keeps its shape, so one graph serves every step)."""
        q, k, v = self._qkv(x, cos, sin)
        s = x.shape[1]
        k_cache = ops.concat((k.astype(k_cache.dtype), k_cache[:, :, s:]), 2)
        v_cache = ops.concat((v.astype(v_cache.dtype), v_cache[:, :, s:]), 2)
        return self._out(q, k, v, bias), k_cache, v_cache

    def decode(self, x, cos, sin, bias, k_cache, v_cache, write_slot):
        """One new token per row: written into cache slot `write_slot` (bool [1, 1, L, 1]), then attends over the
        whole cache; `bias` hides empty and padded slots."""
        q, k, v = self._qkv(x, cos, sin)
        k_cache = ops.where(write_slot, k.astype(k_cache.dtype), k_cache)
        v_cache = ops.where(write_slot, v.astype(v_cache.dtype), v_cache)
        return self._out(q, k_cache, v_cache, bias), k_cache, v_cache


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, config)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, config)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config)

    def construct(self, x):
        return self.down_proj(ops.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Cell):
    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        self.mlp = MLP(config)

    def construct(self, x, cos, sin, bias):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x, cos, sin, bias, k_cache, v_cache):
        h, k_cache, v_cache = self.self_attn.prefill(self.input_layernorm(x), cos, sin, bias, k_cache, v_cache)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache

    def decode(self, x, cos, sin, bias, k_cache, v_cache, write_slot):
        h, k_cache, v_cache = self.self_attn.decode(self.input_layernorm(x), cos, sin, bias, k_cache, v_cache,
                                                    write_slot)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


class BaichuanModel(nn.Cell):
    """Embedding + decoder stack + final norm. Builds the position inputs (RoPE tables or ALiBi bias) once."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.use_rope = config.position_encoding == "rope"
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.embed_tokens = Embedding(config)
        self.layers = nn.CellList([DecoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config)
        if self.use_rope:
            cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
            self.cos_table, self.sin_table = Tensor(cos), Tensor(sin)
        else:
            self.slopes = Tensor(alibi_slopes(config.num_attention_heads).reshape(1, -1, 1, 1))

    def position_inputs(self, attention_mask, seq_len):
        """Position ids = cumsum(mask) - 1 (so left padding does not shift real tokens), the causal + padding bias,
        and the RoPE cos/sin for those positions (or the ALiBi bias added to the causal bias)."""
        batch = attention_mask.shape[0]
        positions = ops.maximum(ops.cumsum(attention_mask, 1) - 1, 0)  # [B, S]
        causal = ops.tril(ops.ones((seq_len, seq_len), ms.float32))  # [S, S]
        allowed = causal.reshape(1, 1, seq_len, seq_len) * attention_mask.astype(ms.float32).reshape(batch, 1, 1, seq_len)
        bias = (1.0 - allowed) * _MASKED
        if self.use_rope:
            cos = ops.gather(self.cos_table, positions, 0).reshape(batch, 1, seq_len, -1).astype(self.compute_dtype)
            sin = ops.gather(self.sin_table, positions, 0).reshape(batch, 1, seq_len, -1).astype(self.compute_dtype)
            return cos, sin, bias
        # ALiBi: slope * key position; softmax makes this equal to slope * (key - query) for each query row.
        bias = bias + self.slopes * positions.astype(ms.float32).reshape(batch, 1, 1, seq_len)
        return None, None, bias

    def construct(self, input_ids, attention_mask):
        seq_len = input_ids.shape[1]
        cos, sin, bias = self.position_inputs(attention_mask, seq_len)
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, bias)
        return self.norm(x)

    def decode_position_inputs(self, positions, slot_mask):
        """Inputs of a one-token decode step. positions [B, 1]: the new token's position id; slot_mask [B, L]:
        1 for cache slots holding a real token (the new one included). Key position ids are recounted from the
        slot mask, exactly as the no-cache forward counts them from the attention mask."""
        batch, slots = slot_mask.shape
        bias = ((1.0 - slot_mask.astype(ms.float32)) * _MASKED).reshape(batch, 1, 1, slots)
        if self.use_rope:
            cos = ops.gather(self.cos_table, positions, 0).reshape(batch, 1, 1, -1).astype(self.compute_dtype)
            sin = ops.gather(self.sin_table, positions, 0).reshape(batch, 1, 1, -1).astype(self.compute_dtype)
            return cos, sin, bias
        key_positions = ops.maximum(ops.cumsum(slot_mask, 1) - 1, 0).astype(ms.float32)
        return None, None, bias + self.slopes * key_positions.reshape(batch, 1, 1, slots)

    def prefill(self, input_ids, attention_mask, k_caches, v_caches):
        """Prompt pass that also fills the caches. Returns (hidden [B, S, H], new k caches, new v caches)."""
        cos, sin, bias = self.position_inputs(attention_mask, input_ids.shape[1])
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        new_k, new_v = (), ()
        for i in range(len(self.layers)):
            x, k, v = self.layers[i].prefill(x, cos, sin, bias, k_caches[i], v_caches[i])
            new_k += (k,)
            new_v += (v,)
        return self.norm(x), new_k, new_v

    def decode(self, input_ids, positions, slot_mask, write_slot, k_caches, v_caches):
        """One token per row ([B, 1]) against the caches. Returns (hidden [B, 1, H], new k caches, new v caches)."""
        cos, sin, bias = self.decode_position_inputs(positions, slot_mask)
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        new_k, new_v = (), ()
        for i in range(len(self.layers)):
            x, k, v = self.layers[i].decode(x, cos, sin, bias, k_caches[i], v_caches[i], write_slot)
            new_k += (k,)
            new_v += (v,)
        return self.norm(x), new_k, new_v


class NormHead(nn.Cell):
    """Baichuan2's output layer: each vocabulary row is L2-normalised before the matmul.

    In training the rows are normalised every step (gradients flow through the normalisation); for inference
    `normalize_once()` stores the normalised rows in place so decoding does not recompute them per token.
    bfloat16 / int8 / int4 lm_heads are stored with their rows already normalised (convert_weight.py normalises
    in float32 before rounding), so they are used as they are.
    """

    def __init__(self, config):
        super().__init__()
        self.norm = config.norm_head
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.in_features = config.hidden_size
        self.format = config.weight_format("lm_head")
        self.group_size = config.group_size
        if self.format == "dense":
            self.weight = normal_weight([config.vocab_size, config.hidden_size], config)
            self.normalized = False
        else:
            add_stored_weights(self, config.vocab_size, config.hidden_size, self.format, self.group_size)
            self.kernel = kernel_linear_op(self.format, self.group_size)
            self.normalized = True

    @staticmethod
    def l2_normalize(w):
        w32 = w.astype(ms.float32)
        return (w32 / ops.maximum(ops.sqrt((w32 * w32).sum(-1, keepdims=True)), 1e-12)).astype(w.dtype)

    def normalize_once(self):
        if self.norm and not self.normalized:
            self.weight.set_data(self.l2_normalize(self.weight.value()))
            self.normalized = True

    def construct(self, x):
        if self.format != "dense":
            weights = (self.weight,) if self.format == "bfloat16" else (self.qweight, self.scales)
            return project(x, weights, self.format, self.group_size, self.in_features, self.kernel).astype(
                self.compute_dtype)
        w = self.weight
        if self.norm and (self.training or not self.normalized):
            w = self.l2_normalize(w)
        return linear(x, w, self.compute_dtype)


# ---------------------------------------------------------------------------------------------- causal LM
@MindFormerRegister.register(MindFormerModuleType.MODELS)
class BaichuanForCausalLM(PreTrainedModel):
    """Causal LM for every Baichuan family (see BaichuanConfig).

    `model(input_ids)` -> float32 logits [B, S, V]. `model(input_ids, labels)` -> scalar loss, where rows are
    `seq_length + 1` tokens: inputs are `input_ids[:, :-1]`, targets `labels[:, 1:]`, -100 is ignored.
    `attention_mask` ([B, S], 1 = token, 0 = padding) supports left-padded batches.
    """

    config_class = BaichuanConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config)
        self.vocab_size = config.vocab_size

    def construct(self, input_ids, labels=None, attention_mask=None):
        if labels is not None:
            input_ids = input_ids[:, :-1]
            labels = labels[:, 1:]
        if attention_mask is None:
            attention_mask = ops.ones(input_ids.shape, ms.int32)
        hidden = self.model(input_ids, attention_mask.astype(ms.int32))
        logits = self.lm_head(hidden).astype(ms.float32)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels)

    # ------------------------------------------------------------------ generation
    def empty_caches(self, batch, slots):
        """Zeroed per-layer key and value caches [B, heads, slots, head_dim], wrapped in `ms.mutable` so GRAPH
        mode treats them as variable inputs (a constant tuple would be folded and recompiled every step)."""
        config = self.config
        shape = (batch, config.num_attention_heads, slots, config.head_dim)
        dtype = _DTYPES[config.compute_dtype]
        make = lambda: tuple(ops.zeros(shape, dtype) for _ in range(config.num_hidden_layers))  # noqa: E731
        return ms.mutable(make()), ms.mutable(make())

    def cached_step_cells(self):
        """New (prefill, decode) cells for cached generation; the Generator keeps them so graphs compile once."""
        return CachedPrefill(self), CachedDecode(self)

    def generate(self, input_ids, **kwargs):  # pylint: disable=arguments-differ
        """Text generation with this project's generator (static KV cache, host-side sampling) instead of
        mindformers' (which needs `mint.argmax`, absent on CPU). Accepts the mindformers/Hugging Face keywords
        (max_new_tokens, max_length, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id,
        pad_token_id, return_dict_in_generate); see generation.generate_for_pipeline."""
        from .generation import generate_for_pipeline  # pylint: disable=import-outside-toplevel
        return generate_for_pipeline(self, input_ids, **kwargs)

    # ------------------------------------------------------------------ inference preparation and weights
    def prepare_for_inference(self):
        """Eval mode with NormHead rows normalised once."""
        self.set_train(False)
        self.lm_head.normalize_once()
        return self

    def load_weights(self, model_dir_or_file, strict=True):
        load_safetensors_into(self, model_dir_or_file, strict=strict)
        if self.lm_head.format == "dense":
            self.lm_head.normalized = False
        return self

    def save_pretrained(self, save_directory, **kwargs):  # pylint: disable=arguments-differ
        """config.json + model.safetensors (our parameter names, each weight in its stored format), written one
        tensor at a time."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.to_json_file(os.path.join(save_directory, "config.json"))
        params = list(self.get_parameters())
        entries = [(p.name, _SAFETENSORS_DTYPE[p.dtype], tuple(p.shape)) for p in params]
        with SafetensorsWriter(os.path.join(save_directory, WEIGHTS_NAME), entries, {"format": "np"}) as writer:
            for p in params:
                array = p.asnumpy()
                writer.write(array.view(np.uint16) if p.dtype == ms.bfloat16 else array)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir, **kwargs):  # pylint: disable=arguments-differ
        """Builds the model from a directory with config.json + model.safetensors, ready for inference.

        Keyword arguments that are config fields (e.g. compute_dtype) override the saved config. The model is
        built without initialising its parameters (MindSpore's `no_init_parameters`), then each one is set from
        the checkpoint in its stored format, tensor by tensor: no random weights and no float32 copy of
        bfloat16 / int8 / int4 weights ever exist.
        """
        model_dir = pretrained_model_name_or_dir
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist (expected config.json and "
                                    f"{WEIGHTS_NAME} in it; make one with convert_weight.py)")
        config = kwargs.pop("config", None) or BaichuanConfig.from_hf_config(model_dir)
        for key in list(kwargs):
            if hasattr(config, key) and key != "name_or_path":
                setattr(config, key, kwargs.pop(key))
        config.name_or_path = model_dir
        with no_init_parameters():
            model = cls(config)
        model.load_weights(model_dir)
        return model.prepare_for_inference()

    @classmethod
    def from_pretrained_experimental_mode(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """What mindformers' AutoModel calls for `trust_remote_code` models (its own version looks for
        mindspore_model.ckpt): our from_pretrained, with the config it already read. Hub keywords are ignored."""
        del args, kwargs
        return cls.from_pretrained(pretrained_model_name_or_path, config=config)


class CachedPrefill(nn.Cell):
    """Graph-mode prompt step of cached generation: logits of the last position [B, V] + filled caches.

    The caches are inputs and outputs (pass them wrapped in `ms.mutable`), so a graph is compiled once per
    (batch, prompt bucket, cache length) and never per token."""

    def __init__(self, lm):
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm

    def construct(self, input_ids, attention_mask, k_caches, v_caches):
        hidden, k_caches, v_caches = self.lm.model.prefill(input_ids, attention_mask, k_caches, v_caches)
        logits = self.lm.lm_head(hidden[:, -1:]).astype(ms.float32)  # left padding: the last column is real
        return logits.squeeze(1), k_caches, v_caches


class CachedDecode(nn.Cell):
    """Graph-mode one-token step of cached generation (see BaichuanModel.decode). `slot` is an int32 scalar
    tensor (a tensor, not a Python int, so the step number does not trigger a recompilation)."""

    def __init__(self, lm):
        super().__init__(auto_prefix=False)
        self.lm = lm

    def construct(self, input_ids, positions, slot_mask, slot, k_caches, v_caches):
        slots = slot_mask.shape[1]
        write_slot = (ops.arange(0, slots, dtype=ms.int32) == slot).reshape(1, 1, slots, 1)
        hidden, k_caches, v_caches = self.lm.model.decode(input_ids, positions, slot_mask, write_slot,
                                                          k_caches, v_caches)
        logits = self.lm.lm_head(hidden).astype(ms.float32)
        return logits.squeeze(1), k_caches, v_caches


def causal_lm_loss(logits, labels):
    """Mean token cross entropy over labels != -100. logits [B, S, V] float32, labels [B, S]."""
    valid = labels != -100
    safe_labels = ops.where(valid, labels, ops.zeros_like(labels)).astype(ms.int32)
    log_probs = ops.log_softmax(logits, -1)
    picked = ops.gather_elements(log_probs, -1, safe_labels.expand_dims(-1)).squeeze(-1)
    valid = valid.astype(ms.float32)
    return -(picked * valid).sum() / ops.maximum(valid.sum(), 1.0)


def weight_files(path):
    """The safetensors files of a model directory (single file or sharded with an index), or the file itself."""
    if os.path.isfile(path):
        return [path]
    index = os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, s) for s in shards]
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"no weights in {path!r}: expected {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} "
                            "(convert a Hugging Face checkpoint with convert_weight.py first)")


_SAFETENSORS_DTYPE = {ms.float32: "F32", ms.float16: "F16", ms.bfloat16: "BF16", ms.uint16: "BF16",
                      ms.int8: "I8", ms.uint8: "U8"}  # uint16 parameters hold bfloat16 bits (Embedding)


def _parameter_tensor(array, stored, param):
    """A numpy tensor read from a file (dtype `stored`, BF16 as uint16 bits) as a Tensor of `param`'s dtype, or
    None when it cannot be (an int8/int4 tensor needs exactly the parameter's integer dtype)."""
    if param.dtype in (ms.bfloat16, ms.uint16):  # bfloat16 bits, exactly as stored when stored as BF16
        bits = array if stored == "BF16" else bf16_bits(array.astype(np.float32))
        return Tensor(bits.view(np_dtype.bfloat16)) if param.dtype == ms.bfloat16 else Tensor(bits)
    if param.dtype in (ms.int8, ms.uint8):
        return Tensor(array) if _SAFETENSORS_DTYPE[param.dtype] == stored else None
    if stored == "BF16":
        array = from_bf16_bits(array)
    return Tensor(array).astype(param.dtype)


def load_safetensors_into(model, path, strict=True):
    """Copies safetensors tensors into the model's parameters one by one, checking names, shapes and (for
    quantised weights) dtypes. bfloat16 tensors go into bfloat16 parameters bit for bit.

    Raises ValueError listing every missing, unexpected or mis-shaped tensor (with expected and found shapes).
    """
    params = {p.name: p for p in model.get_parameters()}
    seen, unexpected, wrong_shape = set(), [], []
    for file in weight_files(path):
        reader = SafetensorsFile(file)
        for name in reader.keys():
            if name not in params:
                unexpected.append(name)
                continue
            param = params[name]
            if reader.shape(name) != tuple(param.shape):
                wrong_shape.append(f"{name}: expected {tuple(param.shape)}, found {reader.shape(name)}")
                continue
            tensor = _parameter_tensor(reader.read(name), reader.dtype(name), param)
            if tensor is None:
                wrong_shape.append(f"{name}: expected dtype {_SAFETENSORS_DTYPE[param.dtype]}, found "
                                   f"{reader.dtype(name)} (is config.json's quantization_config the one the "
                                   "weights were made with?)")
                continue
            param.set_data(tensor)
            seen.add(name)
    missing = sorted(set(params) - seen - {w.split(":")[0] for w in wrong_shape})
    problems = []
    if wrong_shape:
        problems.append("mis-shaped tensors:\n  " + "\n  ".join(wrong_shape))
    if missing and strict:
        problems.append("missing tensors: " + ", ".join(missing))
    if unexpected and strict:
        problems.append("unexpected tensors: " + ", ".join(sorted(unexpected)))
    if problems:
        raise ValueError(f"weights in {path!r} do not match the model "
                         f"({model.config.family}, hidden {model.config.hidden_size}):\n" + "\n".join(problems))
