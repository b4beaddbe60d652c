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
from .mindspore_compat import CompiledCall
from .quantization import bf16_bits, from_bf16_bits, qweight_shape, scales_shape
from .safetensors_io import SafetensorsFile, SafetensorsWriter

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}
_MASKED = -1e9  # added to masked attention scores (computed in float32); finite so fully padded rows stay finite
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------- kernels
# Two implementations of the same four kernels, chosen once per model (`select_kernels`) and handed to the cells
# when they are built: the composed ops below run everywhere; the Ascend fused kernels (see the Ascend section at
# the end of this file) run where `use_fused_kernels()` says so.
#   rms_norm(x, weight, eps)                       -> x's shape and dtype
#   rope_inputs(cos, sin, num_heads)               -> what `rotary` takes; built ONCE per forward
#       cos/sin [B, 1, S, D] in the compute dtype
#   rotary(x, cos, sin)                            x [B, N, S, D]; cos/sin from rope_inputs -> x's shape and dtype
#   attention_inputs(visible, alibi, scale, dtype, num_heads) -> what `attention` takes; built ONCE per forward
#       visible: bool [B, 1, S, Sk] (True = query may see key); alibi: float32 [B, N, S, Sk] or None
#   attention(q, k, v, inputs, scale)              q [B, N, S, D], k/v [B, N, Sk, D] -> [B, N, S, D]
# No implicit broadcasting between tensors in the composed ops: MindSpore's CPU kernels for a binary op whose
# operands differ in shape keep index tables of ~5-8x the output's size per op instance, for the life of the
# compiled graph (measured: a [1, 512, 4096] RMSNorm holds 66 MB; a broadcast Select of 2 MB, 13 MB), which at 7B
# size added ~0.13 GiB per layer to inference. So operands are brought to one shape first (`expand`, ~no cost),
# and per-head inputs are built at their full shape once per forward, not in every layer.
def use_fused_kernels():
    return ms.get_context("device_target") == "Ascend"


def expand(x, like):
    """x broadcast to like's shape, explicitly (see the note on broadcasting above)."""
    return ops.broadcast_to(x, like.shape)


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


def per_head(x, num_heads):
    """x [B, 1, ...] broadcast to [B, num_heads, ...] (a real copy: see the note on broadcasting above)."""
    return ops.broadcast_to(x, (x.shape[0], num_heads) + x.shape[2:])


def rope_tables_per_head(cos, sin, num_heads):
    return per_head(cos, num_heads), per_head(sin, num_heads)


def attention_bias(visible, alibi, scale, dtype, num_heads):  # pylint: disable=unused-argument
    """The composed form of the attention inputs: one float32 additive bias [B, N, S, Sk], _MASKED on hidden keys."""
    bias = (1.0 - visible.astype(ms.float32)) * _MASKED
    return per_head(bias, num_heads) if alibi is None else bias + alibi


_BATCH_MATMUL_NT = ops.BatchMatMul(transpose_b=True)  # q k^T without materialising k^T


def attention(q, k, v, bias, scale):
    """softmax(q k^T * scale + bias) v, scores in float32."""
    scores = _BATCH_MATMUL_NT(q, k).astype(ms.float32) * scale + bias
    probs = ops.softmax(scores, -1).astype(v.dtype)
    return ops.matmul(probs, v)


COMPOSED_KERNELS = {"rms_norm": rms_norm, "rope_inputs": rope_tables_per_head, "rotary": apply_rotary,
                    "attention_inputs": attention_bias, "attention": attention}


def select_kernels():
    """The kernel set for the current device: the Ascend fused one there, the composed one elsewhere."""
    return ascend_kernels() if use_fused_kernels() else COMPOSED_KERNELS


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


def kernels_module():
    """kernels.py beside this file, or None where it does not ship (a model directory copied without it)."""
    if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.py")):
        return None
    from . import kernels  # pylint: disable=import-outside-toplevel
    return kernels


def kernel_linear_op(fmt, group_size, weights=1):
    """The fast projection op for `fmt` from kernels.py, or None: stock ops then (kernels.py missing or unusable).
    Looked up once per projection at construction; `weights` = 2 or 3: one call for that many projections of the
    same x (see fuse_projections)."""
    kernels = kernels_module()
    return None if kernels is None else kernels.linear_op(fmt, group_size, weights)


def layout_op(name):
    """kernels.<name>() (swap_axes12_op, rope_swap_axes12_op, decode_attention_op, rms_norm_op: float32 inference ops
    that replace several stock ones, each of which costs per-op memory and launch time in a compiled graph), or None."""
    kernels = kernels_module()
    return None if kernels is None else getattr(kernels, name)()


def dense_kernel_op(config):
    """The float32 kernel for dense projections at inference, or None (half-precision dense weights, or no
    kernels). Measured side by side (example/bench_kernels.py), it beats the stock MatMul at every Baichuan shape
    on these CPUs, decode and prefill, so it is used wherever it can run; training keeps the stock MatMul (the
    kernel has no gradient)."""
    if config.param_dtype != "float32" or config.compute_dtype != "float32":
        return None
    return kernel_linear_op("float32", None)


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
    q = q.reshape(rows, groups, group_size)
    w = (q * expand(scales.astype(ms.float32).reshape(rows, groups, 1), q)).reshape(rows, width)
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
            self.kernel = dense_kernel_op(config)
        else:
            add_stored_weights(self, out_features, in_features, self.format, self.group_size)
            self.kernel = kernel_linear_op(self.format, self.group_size)

    def stored_weights(self):
        return (self.qweight, self.scales) if self.format in ("int8", "int4") else (self.weight,)

    def construct(self, x):
        if self.format == "dense" and (self.kernel is None or self.training):
            return linear(x, self.weight, self.compute_dtype)
        return project(x, self.stored_weights(), self.format, self.group_size, self.in_features, self.kernel).astype(
            self.compute_dtype)


def fusable(linears):
    """Every one a plain Linear (a LoRA wrapper computes more than its weight) with a kernel, all in one format."""
    first = linears[0]
    return all(type(cell) is Linear and cell.kernel is not None and cell.format == first.format for cell in linears)


def fused_op(linears):
    """One kernel call for projections of the same x (q/k/v, gate/up), or None unless they are `fusable`."""
    if not fusable(linears):
        return None
    first = linears[0]
    return kernel_linear_op("float32" if first.format == "dense" else first.format, first.group_size, len(linears))


def project_fused(x, weights, op, in_features, dtype):
    """Outputs of `op` (from fused_op) on x [..., in_features], one per projection, each [..., out] in `dtype`."""
    outs = op(x.reshape(-1, in_features).astype(ms.float32), *weights)
    return tuple(y.reshape(x.shape[:-1] + (y.shape[1],)).astype(dtype) for y in outs)


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
    def __init__(self, hidden_size, eps, config, kernels=None):
        super().__init__()
        self.eps = eps
        self.rms_norm = (kernels or COMPOSED_KERNELS)["rms_norm"]
        self.weight = Parameter(initializer("ones", [hidden_size], _DTYPES[config.param_dtype]), name="weight")
        self.op = None  # one kernels.py op at float32 inference: set by use_kernel()
        self.eps_tensor = Tensor([eps], ms.float32)

    def use_kernel(self):
        if self.weight.dtype == ms.float32 and not use_fused_kernels():
            self.op = layout_op("rms_norm_op")

    def construct(self, x):
        if self.op is not None and not self.training and x.dtype == ms.float32:
            return self.op(x.reshape(-1, x.shape[-1]), self.weight, self.eps_tensor).reshape(x.shape)
        return self.rms_norm(x, self.weight, self.eps)


def write_cache(cache, new, write_index, write_window):
    """Cache [B, N, L, D] with the S new rows [B, N, S, D] written at slots [p, p + S) (see
    BaichuanModel.cache_writes for the index/window): one formula for prefill (p = 0) and decode (S = 1)."""
    spread = ops.gather(new.astype(cache.dtype), write_index, 2)  # [B, N, L, D]: slot j holds new row j - p
    return ops.where(write_window, spread, cache)


class Attention(nn.Cell):
    """Multi-head attention, RoPE or ALiBi (the ALiBi term comes in with the attention inputs).

    One forward for training, prefill and decode: with a cache, the new keys/values are written into it and the
    queries attend over the whole cache (the attention inputs hide empty and padded slots)."""

    def __init__(self, config, kernels=None):
        super().__init__()
        kernels = kernels or COMPOSED_KERNELS
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.rotary = kernels["rotary"]
        self.attend = kernels["attention"]
        self.q_proj = Linear(h, h, config)
        self.k_proj = Linear(h, h, config)
        self.v_proj = Linear(h, h, config)
        self.o_proj = Linear(h, h, config)
        self.qkv_op = None  # one kernel call for q, k and v at inference: set by fuse_projections()
        # at float32 inference on CPU, kernels.py ops for the head transposes (with RoPE for q and k) and for a decode
        # step's cache writes + attention: set by fuse_projections()
        self.swap_op = self.rope_swap_op = self.decode_op = None

    def fuse_projections(self):
        self.qkv_op = fused_op((self.q_proj, self.k_proj, self.v_proj))
        if self.q_proj.compute_dtype == ms.float32 and not use_fused_kernels():
            self.swap_op, self.rope_swap_op = layout_op("swap_axes12_op"), layout_op("rope_swap_axes12_op")
            self.decode_op = layout_op("decode_attention_op")

    def _swap_heads(self, x):
        """[B, S, N, D] <-> [B, N, S, D]."""
        if self.swap_op is not None and not self.training:
            return self.swap_op(x)
        return x.swapaxes(1, 2)

    def _heads(self, x, rope=None):
        """[B, S, H] -> [B, N, S, D], with RoPE applied when `rope` (cos, sin) is given."""
        b, s, _ = x.shape
        x = x.reshape(b, s, self.num_heads, self.head_dim)
        if rope is not None and self.rope_swap_op is not None and not self.training:
            return self.rope_swap_op(x, rope[0], rope[1])
        x = self._swap_heads(x)
        return x if rope is None else self.rotary(x, rope[0], rope[1])

    def construct(self, x, rope, attn_inputs, cache=None, write=None):
        """x [B, S, H]; rope (cos, sin) or None; cache (k [B, N, L, D], v) or None; write (index, window, slot) of
        BaichuanModel.cache_writes. Returns (output [B, S, H], the updated cache or None)."""
        if self.qkv_op is not None and not self.training:
            q, k, v = project_fused(x, self.q_proj.stored_weights() + self.k_proj.stored_weights() +
                                    self.v_proj.stored_weights(), self.qkv_op, self.q_proj.in_features,
                                    self.q_proj.compute_dtype)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = self._heads(q, rope), self._heads(k, rope), self._heads(v)
        b, _, s, _ = q.shape
        if cache is not None and s == 1 and self.decode_op is not None and not self.training:
            out, k, v = self.decode_op(q, k, v, cache[0], cache[1], write[2], attn_inputs)
            return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim)), (k, v)
        if cache is not None:
            k = write_cache(cache[0], k, write[0], write[1])
            v = write_cache(cache[1], v, write[0], write[1])
            cache = (k, v)
        out = self.attend(q, k, v, attn_inputs, self.scale)
        return self.o_proj(self._swap_heads(out).reshape(b, s, self.num_heads * self.head_dim)), cache


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, config)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, config)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config)
        self.gate_up_op = None  # one kernel call for gate and up at inference: set by fuse_projections()

    def fuse_projections(self):
        self.gate_up_op = fused_op((self.gate_proj, self.up_proj))

    def construct(self, x):
        if self.gate_up_op is not None and not self.training:
            gate, up = project_fused(x, self.gate_proj.stored_weights() + self.up_proj.stored_weights(),
                                     self.gate_up_op, self.gate_proj.in_features, self.gate_proj.compute_dtype)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ops.silu(gate) * up)


class DecoderLayer(nn.Cell):
    def __init__(self, config, kernels=None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, kernels)
        self.self_attn = Attention(config, kernels)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, kernels)
        self.mlp = MLP(config)

    def projections(self):
        attn, mlp = self.self_attn, self.mlp
        return (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)

    def stack_kernel_inputs(self):
        """This layer's inputs to kernels.cached_stack_op (ln1, ln2, then every projection's stored weights), or None
        where that op cannot run it: it needs float32 compute and norms and every projection a plain Linear with a
        kernel (not LoRA-wrapped), all in one format."""
        linears = self.projections()
        norms = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        if use_fused_kernels() or not fusable(linears) or linears[0].compute_dtype != ms.float32 or \
                any(w.dtype != ms.float32 for w in norms):
            return None
        weights = ()
        for cell in linears:
            weights += cell.stored_weights()
        return norms + weights

    def construct(self, x, rope, attn_inputs, cache=None, write=None):
        h, cache = self.self_attn(self.input_layernorm(x), rope, attn_inputs, cache, write)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class BaichuanModel(nn.Cell):
    """Embedding + decoder stack + final norm: one forward, with or without a key/value cache.

    Without a cache (training, scoring) `attention_mask` [B, S] marks the real tokens of `input_ids` [B, S].
    With a cache (k_caches, v_caches: one [B, N, L, D] per layer) the S new tokens are written into slots
    [cache_slot, cache_slot + S) (prefill: cache_slot 0 and S prompt tokens; decode: S = 1 and cache_slot an int32
    tensor, so the step number does not recompile the graph), and `attention_mask` [B, L] marks every slot holding
    a real token, the new ones included. Position ids, RoPE tables / ALiBi terms and the attention inputs are built
    here once per call, for all layers. At float32 inference on CPU with the kernels (`in_place_cache`, see
    use_layer_kernels) a cached step through all layers and the final norm is one op that does all of that itself
    and writes the given caches in place: the caches are then one tensor [layers, B, N, L, D] each for keys and
    values (see empty_caches), and the same ones come back.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.use_rope = config.position_encoding == "rope"
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.head_scale = 1.0 / math.sqrt(config.head_dim)
        kernels = select_kernels()  # the one backend choice
        self.attention_inputs = kernels["attention_inputs"]
        self.rope_inputs = kernels["rope_inputs"]
        self.in_place_cache = False  # set by use_layer_kernels()
        self.stack_op = self.stack_logits_op = self.stack_inputs = self.stack_head = None
        self.stack_spec = Tensor([config.group_size or 0, int(self.use_rope)], ms.int32)
        self.embed_tokens = Embedding(config)
        self.layers = nn.CellList([DecoderLayer(config, kernels) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, kernels)
        if self.use_rope:
            cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
            self.cos_table, self.sin_table = Tensor(cos), Tensor(sin)
            self.position_tables = (self.cos_table, self.sin_table, Tensor(np.zeros(1, np.float32)))
        else:
            self.slopes = Tensor(alibi_slopes(config.num_attention_heads).reshape(1, -1, 1, 1))
            unused = Tensor(np.zeros((1, 1), np.float32))
            self.position_tables = (unused, unused, self.slopes.reshape(-1))

    def use_layer_kernels(self, enabled=True, head=None):
        """Cached steps (prefill and decode) through kernels.cached_stack_op when every layer can run on it (see
        DecoderLayer.stack_kernel_inputs) and the final norm is float32: one op that writes the caches in place and
        builds positions and visibility from the mask itself; `head` (NormHead.kernel_weights()) puts the lm_head
        into that op too (stack_step(logits=True)). enabled=False: op by op (the projection and attention kernels),
        as when some layer cannot."""
        layers = [layer.stack_kernel_inputs() for layer in self.layers] if enabled else [None]
        usable = all(inputs is not None for inputs in layers) and self.norm.weight.dtype == ms.float32
        kernels = kernels_module() if usable else None
        self.stack_op = None if kernels is None else kernels.cached_stack_op()
        self.stack_inputs = None if self.stack_op is None else sum(layers, ())
        self.stack_logits_op = None if self.stack_op is None or head is None else kernels.cached_stack_op(len(head))
        self.stack_head = None if self.stack_logits_op is None else tuple(head)
        self.in_place_cache = self.stack_op is not None

    def position_inputs(self, key_mask, query_slots, segment_ids=None):
        """key_mask [B, Sk] (1 = real token), query_slots [S] (the key slot of each query).
        Position ids = cumsum(mask) - 1, so left padding does not shift real tokens. A query sees the real keys up to
        its own slot, and always itself (so a padding row is never fully masked: the fused kernel leaves such rows
        undefined). Packed rows (segment_ids [B, S], no cache, so keys = queries): a query sees only keys of its own
        segment (block-diagonal causal mask) and positions restart at 0 in each segment, so RoPE angles and ALiBi
        distances are those of the conversation alone.
        Returns (rope (cos, sin) [B, 1, S, D] or None, attention inputs for every layer)."""
        batch, keys = key_mask.shape
        key_positions = ops.maximum(ops.cumsum(key_mask, 1) - 1, 0)  # [B, Sk]
        query_positions = ops.gather(key_positions, query_slots, 1)  # [B, S]
        seq_len = query_slots.shape[0]
        key_slots = ops.arange(0, keys, dtype=ms.int32).reshape(1, keys)
        query_slots = query_slots.reshape(seq_len, 1)
        own = key_slots == query_slots  # [S, Sk]
        visible = (key_slots <= query_slots).reshape(1, 1, seq_len, keys) & \
            ((key_mask.reshape(batch, 1, 1, keys) > 0) | own.reshape(1, 1, seq_len, keys))
        if segment_ids is not None:
            visible = visible & (segment_ids.reshape(batch, 1, 1, keys) == segment_ids.reshape(batch, 1, seq_len, 1))
            # position in the conversation = visible earlier keys (contiguous segments, all real tokens)
            key_positions = visible.astype(ms.float32).sum(-1).reshape(batch, keys).astype(ms.int32) - 1
            query_positions = key_positions
        if self.use_rope:
            cos = ops.gather(self.cos_table, query_positions, 0).reshape(batch, 1, seq_len, -1)
            sin = ops.gather(self.sin_table, query_positions, 0).reshape(batch, 1, seq_len, -1)
            rope = self.rope_inputs(cos.astype(self.compute_dtype), sin.astype(self.compute_dtype), self.num_heads)
            return rope, self.attention_inputs(visible, None, self.head_scale, self.compute_dtype, self.num_heads)
        # ALiBi as slope * (key position - query position): relative, so it stays small in half precision
        distance = key_positions.reshape(batch, 1, 1, keys) - query_positions.reshape(batch, 1, seq_len, 1)
        alibi = self.slopes * distance.astype(ms.float32)  # [B, N, S, Sk]
        return None, self.attention_inputs(visible, alibi, self.head_scale, self.compute_dtype, self.num_heads)

    @staticmethod
    def cache_writes(cache_slot, new_tokens, cache_shape):
        """(index [L], window bool at the cache's shape [B, N, L, D], slot p as an int32 tensor) that put new row
        j - p at cache slot j for j in [p, p + S). The window is broadcast here, once for all layers (see the note
        on broadcasting above)."""
        slots = cache_shape[2]
        offset = ops.arange(0, slots, dtype=ms.int32) - cache_slot
        window = ((offset >= 0) & (offset < new_tokens)).reshape(1, 1, slots, 1)
        slot = ops.scalar_to_tensor(cache_slot, ms.int32) if isinstance(cache_slot, int) else cache_slot
        return ops.minimum(ops.maximum(offset, 0), new_tokens - 1), ops.broadcast_to(window, cache_shape), slot

    def stack_step(self, input_ids, attention_mask, k_caches, v_caches, cache_slot=None, logits=False):
        """A cached step through the stack op (in_place_cache; see use_layer_kernels): the final-normed hidden
        states [B, S, H], or with `logits` the float32 logits [B, V] of each sequence's last new token (the lm_head
        in the op as well: stack_logits_op)."""
        slot = 0 if cache_slot is None else cache_slot
        if isinstance(slot, int):
            slot = ops.scalar_to_tensor(slot, ms.int32)
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        cos, sin, slopes = self.position_tables
        inputs = (x.reshape(-1, x.shape[-1]), self.norm.weight, self.norm.eps_tensor, self.stack_spec,
                  attention_mask.astype(ms.int32), slot, cos, sin, slopes, k_caches, v_caches) + self.stack_inputs
        if logits:
            return self.stack_logits_op(*inputs, *self.stack_head)
        return self.stack_op(*inputs).reshape(x.shape)

    def construct(self, input_ids, attention_mask, k_caches=None, v_caches=None, cache_slot=None, segment_ids=None):
        """Returns (hidden [B, S, H], new k caches, new v caches); the caches are None without a cache.
        segment_ids [B, S] (packed rows, without a cache; see segments_from_ends): which conversation each token
        belongs to; attention and positions then stay within a conversation."""
        seq_len = input_ids.shape[1]
        attention_mask = attention_mask.astype(ms.int32)
        if self.in_place_cache and k_caches is not None:
            return self.stack_step(input_ids, attention_mask, k_caches, v_caches, cache_slot), k_caches, v_caches
        query_slots = ops.arange(0, seq_len, dtype=ms.int32)
        write = None
        if k_caches is not None:
            cache_slot = 0 if cache_slot is None else cache_slot
            query_slots = query_slots + cache_slot
            write = self.cache_writes(cache_slot, seq_len, k_caches[0].shape)
        rope, attn_inputs = self.position_inputs(attention_mask, query_slots, segment_ids)
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        new_k, new_v = (), ()
        for i in range(len(self.layers)):
            cache = None if k_caches is None else (k_caches[i], v_caches[i])
            x, cache = self.layers[i](x, rope, attn_inputs, cache, write)
            if cache is not None:
                new_k += (cache[0],)
                new_v += (cache[1],)
        if k_caches is None:
            return self.norm(x), None, None
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
            self.kernel = dense_kernel_op(config)
            self.normalized = False
        else:
            add_stored_weights(self, config.vocab_size, config.hidden_size, self.format, self.group_size)
            self.kernel = kernel_linear_op(self.format, self.group_size)
            self.normalized = True

    stored_weights = Linear.stored_weights  # (weight,), or (qweight, scales) for int8 / int4: as a Linear's

    @staticmethod
    def l2_normalize(w):
        w32 = w.astype(ms.float32)
        return (w32 / expand(ops.maximum(ops.sqrt((w32 * w32).sum(-1, keepdims=True)), 1e-12), w32)).astype(w.dtype)

    def kernel_weights(self):
        """The stored weights for the cached steps' one-op path (BaichuanModel.use_layer_kernels), which projects
        with them as they are; None where this head has no kernel, or its Baichuan2 rows are not normalised yet."""
        if self.kernel is None or (self.format == "dense" and self.norm and not self.normalized):
            return None
        return self.stored_weights()

    def normalize_once(self):
        if self.norm and not self.normalized:
            self.weight.set_data(self.l2_normalize(self.weight.value()))
            self.normalized = True

    def construct(self, x):
        if self.format != "dense":
            y = project(x, self.stored_weights(), self.format, self.group_size, self.in_features, self.kernel)
            return y.astype(self.compute_dtype)
        w = self.weight
        if self.norm and (self.training or not self.normalized):
            w = self.l2_normalize(w)
        elif self.kernel is not None and not self.training:
            return project(x, (w,), "float32", None, self.in_features, self.kernel)
        return linear(x, w, self.compute_dtype)


# ---------------------------------------------------------------------------------------------- causal LM
@MindFormerRegister.register(MindFormerModuleType.MODELS)
class BaichuanForCausalLM(PreTrainedModel):
    """Causal LM for every Baichuan family (see BaichuanConfig).

    `model(input_ids)` -> float32 logits [B, S, V]. `model(input_ids, labels)` -> scalar loss, where rows are
    `seq_length + 1` tokens: inputs are `input_ids[:, :-1]`, targets `labels[:, 1:]`, -100 is ignored.
    `attention_mask` ([B, S], 1 = token, 0 = padding) supports left-padded batches.
    `seq_ends` ([B, W] int32, packed rows: the MindRecord column actual_seq_len, see data/packing.py) are the
    cumulative conversation ends in each row of seq_length + 1 tokens: attention, positions and targets then stay
    within each conversation, so the loss equals that of the conversations trained one by one (token-weighted).
    """

    config_class = BaichuanConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = NormHead(config)
        self.vocab_size = config.vocab_size

    def construct(self, input_ids, labels=None, attention_mask=None, seq_ends=None):
        segment_ids = None if seq_ends is None else segments_from_ends(seq_ends, input_ids.shape[1])
        if labels is not None:  # rows of seq_length + 1 tokens (the mask too, when given)
            input_ids = input_ids[:, :-1]
            labels = labels[:, 1:]
            if attention_mask is not None:
                attention_mask = attention_mask[:, :-1]
            if segment_ids is not None:  # a conversation's last token does not predict the next one's first
                crossing = segment_ids[:, :-1] != segment_ids[:, 1:]
                labels = ops.where(crossing, ops.full_like(labels, -100), labels)
                segment_ids = segment_ids[:, :-1]
        if attention_mask is None:
            attention_mask = ops.ones(input_ids.shape, ms.int32)
        hidden, _, _ = self.model(input_ids, attention_mask, segment_ids=segment_ids)
        logits = self.lm_head(hidden).astype(ms.float32)
        if labels is None:
            return logits
        return causal_lm_loss(logits, labels)

    # ------------------------------------------------------------------ generation
    def empty_caches(self, batch, slots):
        """Zeroed key and value caches for `batch` sequences of `slots` tokens, in the form the model's cached steps
        take: one [layers, B, heads, slots, head_dim] tensor each where the steps write them in place
        (caches_in_place(): one op for the whole stack), else a tuple of [B, heads, slots, head_dim] per layer each,
        wrapped in `ms.mutable` so GRAPH mode treats them as variable inputs (a constant tuple would be folded and
        recompiled every step). Make them after any change of the model's kernels (prepare_for_inference, LoRA)."""
        config = self.config
        shape = (batch, config.num_attention_heads, slots, config.head_dim)
        dtype = _DTYPES[config.compute_dtype]
        if self.caches_in_place():
            return tuple(ops.zeros((config.num_hidden_layers,) + shape, dtype) for _ in range(2))
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
        """Eval mode with NormHead rows normalised once, and q/k/v and gate/up each projected in one kernel call
        where the kernels run (after any LoRA wrapping: wrapped projections stay separate)."""
        self.set_train(False)
        self.lm_head.normalize_once()
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()
            layer.input_layernorm.use_kernel()
            layer.post_attention_layernorm.use_kernel()
        self.model.use_layer_kernels(head=self.lm_head.kernel_weights())
        self.model.norm.use_kernel()
        return self

    def caches_in_place(self):
        """Whether cached steps write the caches in place (the whole stack on kernels.cached_stack_op)."""
        return self.model.in_place_cache

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


class _CachedStep(nn.Cell):
    """A compiled step of cached generation. When the model's caches_in_place() (the stack on one kernel) the graph
    writes the given caches in place and returns only the logits (returning the input caches would copy every one
    of them); otherwise it returns (logits, new k caches, new v caches). `step` returns (logits, k caches, v caches)
    either way: call that."""

    def __init__(self, lm):
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm
        self.in_place = lm.caches_in_place()
        self.graph_call = CompiledCall(self)  # step() runs the compiled graph without MindSpore's per-call overhead

    def outputs(self, input_ids, attention_mask, k_caches, v_caches, cache_slot=None):
        """Float32 logits [B, V] of each sequence's last new token, and the new caches unless written in place."""
        model = self.lm.model
        if model.stack_logits_op is not None:  # embedding, then one op: the stack, the final norm and the lm_head
            logits = model.stack_step(input_ids, attention_mask, k_caches, v_caches, cache_slot, True)
        else:
            hidden, k_caches, v_caches = model(input_ids, attention_mask, k_caches, v_caches, cache_slot)
            logits = self.lm.lm_head(hidden[:, -1]).astype(ms.float32)
        if self.in_place:
            return logits
        return logits, k_caches, v_caches

    def step(self, *args):
        *inputs, k_caches, v_caches = args
        if isinstance(k_caches, tuple):  # per-layer caches: variable inputs, not constants (see empty_caches)
            k_caches, v_caches = ms.mutable(k_caches), ms.mutable(v_caches)
        out = self.graph_call(*inputs, k_caches, v_caches)
        return (out, k_caches, v_caches) if self.in_place else out


class CachedPrefill(_CachedStep):
    """Prompt step: step(input_ids, attention_mask, k_caches, v_caches); the prompt's keys/values go into cache
    slots [0, S). attention_mask [B, S] (prompt) or [B, L] (every cache slot; slots past the prompt are empty).
    Logits of the last position [B, V] (left padding: the last column is real). A graph is compiled once per
    (batch, prompt bucket, cache length)."""

    def construct(self, input_ids, attention_mask, k_caches, v_caches):
        slots = k_caches.shape[3] if isinstance(k_caches, Tensor) else k_caches[0].shape[2]
        if attention_mask.shape[1] < slots:
            empty = ops.zeros((attention_mask.shape[0], slots - attention_mask.shape[1]), attention_mask.dtype)
            attention_mask = ops.concat((attention_mask, empty), 1)
        return self.outputs(input_ids, attention_mask, k_caches, v_caches)


class CachedDecode(_CachedStep):
    """One-token step: step(input_ids, attention_mask, slot, k_caches, v_caches); input_ids [B, 1] go into cache
    slot `slot` (an int32 scalar tensor, so the step number does not trigger a recompilation); attention_mask
    [B, L] marks every slot holding a real token, the new one included. Logits [B, V]."""

    def construct(self, input_ids, attention_mask, slot, k_caches, v_caches):
        return self.outputs(input_ids, attention_mask, k_caches, v_caches, slot)


def segments_from_ends(seq_ends, length):
    """Segment id of each of `length` slots from cumulative ends seq_ends [B, W] (padded with values >= length):
    the number of ends at or before the slot. [B, length] int32."""
    slots = ops.arange(0, length, dtype=ms.int32).reshape(1, length, 1)
    reached = slots >= seq_ends.astype(ms.int32).reshape(seq_ends.shape[0], 1, seq_ends.shape[1])
    return reached.astype(ms.int32).sum(-1)


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


# ---------------------------------------------------------------------------------------------- Ascend only
# ASCEND-ONLY CODE: the only place that calls Ascend fused kernels (FlashAttentionScore, RmsNorm,
# RotaryPositionEmbedding). None of them has a CPU kernel, so this section is checked in two steps:
#   1. here, on CPU: tests/test_ascend_emulation.py swaps in tests/ascend_emulators.py, CPU emulators that raise on
#      any breach of each kernel's documented input contract (dtypes, layouts, shape rules, mask meaning, where
#      the scale applies, the rotary B*N > 8*S restriction) and compute its documented math, selects this branch
#      and requires the composed branch's logits (training forward, prefill, KV-cache decode, left padding);
#   2. on a real Ascend device: docs/ascend-first-run.md lists the commands. Until that has run, the kernels'
#      real behaviour (above all the order of scale and shift in FlashAttentionScore) is documented, not verified.
def _kernel_dtype(dtype):
    """FlashAttentionScore takes float16/bfloat16 only: float32 models run attention in bfloat16."""
    return dtype if dtype in (ms.float16, ms.bfloat16) else ms.bfloat16


def fused_rms_norm(x, weight, eps):
    return ops.rms_norm(x, weight.astype(x.dtype), eps)[0]  # x and gamma must share a dtype


def fused_rotary(x, cos, sin):
    b, n, s, _ = x.shape
    if b * n > 8 * s:  # documented as not callable for BNSD when B*N > 8*S: always the case at decode (S = 1)
        return apply_rotary(x, cos, sin)
    return ops.rotary_position_embedding(x, cos.astype(x.dtype), sin.astype(x.dtype), 0)


def fused_attention_inputs(visible, alibi, scale, dtype, num_heads):  # pylint: disable=unused-argument
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
    return discard, (alibi / scale).astype(_kernel_dtype(dtype))


def fused_attention(q, k, v, inputs, scale):
    discard, shift = inputs
    dtype = _kernel_dtype(q.dtype)
    out = ops.flash_attention_score(q.astype(dtype), k.astype(dtype), v.astype(dtype), q.shape[1],
                                    real_shift=shift, attn_mask=discard, scalar_value=scale, input_layout="BNSD")
    return out.astype(q.dtype)


def ascend_kernels():
    return {"rms_norm": fused_rms_norm, "rope_inputs": lambda cos, sin, num_heads: (cos, sin),
            "rotary": fused_rotary, "attention_inputs": fused_attention_inputs, "attention": fused_attention}
