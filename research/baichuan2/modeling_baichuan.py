"""Baichuan-family causal LM in MindSpore cells (Baichuan2-7B/13B, Baichuan-7B, XVERSE-7B): the neutral definition.

Read top to bottom: backend choice -> projections and embedding -> RMSNorm -> attention (RoPE or ALiBi) -> SwiGLU
MLP -> decoder layer -> BaichuanModel (positions and visibility, once a call) -> NormHead -> BaichuanForCausalLM (loss,
generation steps, weight loading). The cells hold the parameters and say what is computed; the backend given to them
when the model is built (backend_composed / backend_ascend / backend_cpu) says how each primitive runs.

Parameter names are the interface (see docs/DESIGN.md): Hugging Face Llama names with separate q/k/v projections,
so `convert_weight.py` maps a Baichuan checkpoint onto them by splitting `W_pack`.

This file and the flat modules it imports are copied into model directories and loaded with
`trust_remote_code=True`, so it imports nothing from the project outside model_dir.MODEL_CODE_FILES.
"""
import math
import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, Zero, initializer
from mindspore.nn.utils import no_init_parameters

from . import mindspore_compat  # noqa: F401  (before mindformers: MindSpore 2.10's deprecation line, see there)
from mindformers.models.modeling_utils import PreTrainedModel
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from .configuration_baichuan import BaichuanConfig
from .mindspore_compat import CompiledCall
from .backend_composed import BF16_TO_F32, ComposedBackend, dequantize, linear, project, project_fused
from .quantization import qweight_shape, scales_shape
# mindformers' trust_remote_code copies into its module cache only the files this module imports itself, so each
# module that weights_io and the CPU backend need is imported here too (safetensors_io: the reader and writer;
# kernels: the CPU kernels' loader)
from .kernels import FORMATS as _KERNEL_FORMATS  # noqa: F401  pylint: disable=unused-import
from .safetensors_io import SafetensorsFile  # noqa: F401  pylint: disable=unused-import
from .weights_check import WEIGHTS_NAME, check_model_dir
from .weights_io import load_safetensors_into, load_weights_checked, save_parameters

_DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


# ---------------------------------------------------------------------------------------------- backends
# The neutral definition below says WHAT a decoder computes; a backend says HOW each primitive runs (norm, rotary,
# attention with its cache, projections): backend_composed (stock MindSpore ops, everywhere, trainable),
# backend_ascend (Ascend fused kernels) and backend_cpu (this project's C++ kernels, op by op or the whole stack in
# one op). The backend is chosen once, when the model is built, and handed to every cell.
BACKENDS = ("composed", "ascend", "cpu-kernels", "cpu-stack")


def select_backend(config, name="auto", inference=False):
    """The backend object for `name` (one of BACKENDS, or "auto"). auto: ascend where MindSpore's device is Ascend;
    on CPU for inference the whole-stack kernels where this config can run them, else the kernels op by op, else
    composed; composed for training on CPU. An explicit name that cannot run here raises ValueError saying why."""
    # pylint: disable=import-outside-toplevel
    from .backend_cpu import CpuKernelBackend, CpuStackBackend, unavailable_reason
    if name == "auto":
        if ms.get_context("device_target") == "Ascend":
            name = "ascend"
        elif not inference or unavailable_reason(config) is not None:
            name = "composed"
        else:
            name = "cpu-stack" if unavailable_reason(config, whole_stack=True) is None else "cpu-kernels"
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: choose one of auto, {', '.join(BACKENDS)}")
    if name == "composed":
        return ComposedBackend()
    if name == "ascend":
        from .backend_ascend import AscendBackend
        return AscendBackend(config)
    reason = unavailable_reason(config, whole_stack=name == "cpu-stack")
    if reason:
        raise ValueError(f"backend {name!r} cannot run this model: {reason}; use backend='auto' or 'composed'")
    return CpuStackBackend() if name == "cpu-stack" else CpuKernelBackend()


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
def normal_weight(shape, config):
    return Parameter(initializer(Normal(config.initializer_range), shape, _DTYPES[config.param_dtype]), name="weight")


# A module's weight format comes from config.weight_format(module): "dense" (param_dtype, trainable; the reference),
# "bfloat16", "int8" or "int4" (inference only; layouts in quantization.py and docs/WEIGHT_FORMATS.md). Weights stay
# in that format in memory; a backend's kernel projects from it directly, stock ops dequantise per call.
def add_stored_weights(cell, out_features, in_features, fmt, group_size, asymmetric=False):
    """Creates the (uninitialised) parameters of a bf16 / int8 / int4 weight on `cell` (int4 `asymmetric`: with
    float16 `mins` beside the scales); returns their tuple."""
    if fmt == "bfloat16":
        cell.weight = Parameter(initializer("zeros", [out_features, in_features], ms.bfloat16), name="weight",
                                requires_grad=False)
        return (cell.weight,)
    bits = 8 if fmt == "int8" else 4
    cell.qweight = Parameter(initializer("zeros", list(qweight_shape(out_features, in_features, bits)),
                                         ms.int8 if bits == 8 else ms.uint8), name="qweight", requires_grad=False)
    cell.scales = Parameter(initializer("zeros", list(scales_shape(out_features, in_features, group_size)),
                                        ms.float16), name="scales", requires_grad=False)
    if not asymmetric:
        return (cell.qweight, cell.scales)
    cell.mins = Parameter(initializer("zeros", list(scales_shape(out_features, in_features, group_size)),
                                      ms.float16), name="mins", requires_grad=False)
    return (cell.qweight, cell.scales, cell.mins)


class Linear(nn.Cell):
    """Bias-free projection; weight [out, in] so checkpoints map one to one. Dense (trainable) or a stored format:
    then `weight` is bfloat16, or `qweight` + `scales` (+ `mins`: int4 asymmetric) hold int8 / int4. `kernel`: the
    backend's op for it, or None (stock ops)."""

    def __init__(self, in_features, out_features, config, backend, module="linear"):
        super().__init__()
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.in_features = in_features
        self.format = config.weight_format(module)
        self.group_size = config.group_size
        self.asymmetric = config.asymmetric and self.format == "int4"
        if self.format == "dense":
            self.weight = normal_weight([out_features, in_features], config)
        else:
            add_stored_weights(self, out_features, in_features, self.format, self.group_size,
                               config.asymmetric)
        self.kernel = backend.linear_kernel(config, self.format)

    def stored_weights(self):
        if self.format not in ("int8", "int4"):
            return (self.weight,)
        return (self.qweight, self.scales, self.mins) if self.asymmetric else (self.qweight, self.scales)

    def construct(self, x):
        if self.format == "dense" and self.kernel is None:
            return linear(x, self.weight, self.compute_dtype)
        fmt = "float32" if self.format == "dense" else self.format
        return project(x, self.stored_weights(), fmt, self.group_size, self.in_features, self.kernel).astype(
            self.compute_dtype)


def project_together(x, linears, op):
    """The projections of one x by several Linears (q/k/v, gate/up): one kernel call where the backend has `op`,
    else one projection each."""
    if op is None:
        return tuple(cell(x) for cell in linears)
    weights = ()
    for cell in linears:
        weights += cell.stored_weights()
    return project_fused(x, weights, op, linears[0].in_features, linears[0].compute_dtype)


class Embedding(nn.Cell):
    """Token embedding. Stored formats gather the rows first, then widen only those: bfloat16 is kept as its uint16
    bit patterns (CPU Gather has no bf16 kernel) and widened through a 65536-entry table; int8 / int4 rows are
    dequantised like a projection's."""

    def __init__(self, config):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.format = config.weight_format("embed_tokens")
        self.group_size = config.group_size
        self.asymmetric = config.asymmetric and self.format == "int4"
        shape = [config.vocab_size, config.hidden_size]
        if self.format == "dense":
            self.weight = normal_weight(shape, config)
        elif self.format == "bfloat16":
            self.weight = Parameter(initializer("zeros", shape, ms.uint16), name="weight", requires_grad=False)
            self.bf16_table = Tensor(BF16_TO_F32)
        else:
            add_stored_weights(self, config.vocab_size, config.hidden_size, self.format, self.group_size,
                               config.asymmetric)

    def construct(self, input_ids):
        if self.format == "dense":
            return ops.gather(self.weight, input_ids, 0)
        ids = input_ids.reshape(-1)
        if self.format == "bfloat16":
            rows = ops.gather(self.bf16_table, ops.gather(self.weight, ids, 0).astype(ms.int32), 0)
        else:
            rows = dequantize(ops.gather(self.qweight, ids, 0), ops.gather(self.scales, ids, 0),
                              8 if self.format == "int8" else 4, self.group_size, self.hidden_size,
                              ops.gather(self.mins, ids, 0) if self.asymmetric else None)
        return rows.reshape(input_ids.shape + (self.hidden_size,))


class RMSNorm(nn.Cell):
    def __init__(self, hidden_size, eps, config, backend):
        super().__init__()
        self.eps = eps
        self.backend = backend
        self.weight = Parameter(initializer("ones", [hidden_size], _DTYPES[config.param_dtype]), name="weight")
        self.eps_tensor = Tensor([eps], ms.float32)

    def construct(self, x):
        return self.backend.norm(x, self.weight, self.eps, self.eps_tensor)


class Attention(nn.Cell):
    """Multi-head attention, RoPE or ALiBi (the ALiBi term comes in with the attention inputs).

    One forward for training, prefill and decode: with a cache, the new keys/values are written into it and the
    queries attend over the whole cache (the attention inputs hide empty and padded slots)."""

    def __init__(self, config, backend):
        super().__init__()
        h = config.hidden_size
        self.backend = backend
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = Linear(h, h, config, backend)
        self.k_proj = Linear(h, h, config, backend)
        self.v_proj = Linear(h, h, config, backend)
        self.o_proj = Linear(h, h, config, backend)
        self.qkv_op = backend.linear_kernel(config, self.q_proj.format, 3)  # q, k and v in one call, or None

    def construct(self, x, rope, attn_inputs, cache=None, write=None):
        """x [B, S, H]; rope (cos, sin) or None; cache (k [B, N, L, D], v) or None; write (index, window, slot) of
        BaichuanModel.cache_writes. Returns (output [B, S, H], the updated cache or None)."""
        q, k, v = project_together(x, (self.q_proj, self.k_proj, self.v_proj), self.qkv_op)
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        q = self.backend.heads(q.reshape(shape), rope)
        k = self.backend.heads(k.reshape(shape), rope)
        v = self.backend.heads(v.reshape(shape), None)
        out, cache = self.backend.attention(q, k, v, cache, write, attn_inputs, self.scale)
        return self.o_proj(out), cache


class MLP(nn.Cell):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config, backend):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, config, backend)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, config, backend)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config, backend)
        self.gate_up_op = backend.linear_kernel(config, self.gate_proj.format, 2)  # gate and up in one call, or None

    def construct(self, x):
        gate, up = project_together(x, (self.gate_proj, self.up_proj), self.gate_up_op)
        return self.down_proj(ops.silu(gate) * up)


class DecoderLayer(nn.Cell):
    def __init__(self, config, backend):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, backend)
        self.self_attn = Attention(config, backend)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, backend)
        self.mlp = MLP(config, backend)

    def stack_weights(self):
        """This layer's inputs to the whole-stack op (ln1, ln2, then every projection's stored weights)."""
        attn, mlp = self.self_attn, self.mlp
        weights = (self.input_layernorm.weight, self.post_attention_layernorm.weight)
        for cell in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj):
            weights += cell.stored_weights()
        return weights

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
    a real token, the new ones included. Positions, RoPE tables / ALiBi terms and visibility are built here once per
    call, for all layers, and handed to the backend as data. On a whole-stack backend (cpu-stack) a cached step
    through all layers and the final norm is one op that writes the given caches in place: the caches are then one
    tensor [layers, B, N, L, D] each for keys and values (see BaichuanForCausalLM.empty_caches), and the same ones
    come back.
    """

    def __init__(self, config, backend):
        super().__init__()
        self.config = config
        self.backend = backend
        self.num_heads = config.num_attention_heads
        self.use_rope = config.position_encoding == "rope"
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.head_scale = 1.0 / math.sqrt(config.head_dim)
        self.embed_tokens = Embedding(config)
        self.layers = nn.CellList([DecoderLayer(config, backend) for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, backend)
        if self.use_rope:
            cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
            self.cos_table, self.sin_table = Tensor(cos), Tensor(sin)
            self.position_tables = (self.cos_table, self.sin_table, Tensor(np.zeros(1, np.float32)))
        else:
            self.slopes = Tensor(alibi_slopes(config.num_attention_heads).reshape(1, -1, 1, 1))
            unused = Tensor(np.zeros((1, 1), np.float32))
            self.position_tables = (unused, unused, self.slopes.reshape(-1))
        self.whole_stack = backend.whole_stack
        if self.whole_stack:
            self.stack_op = backend.stack_op()
            self.stack_inputs = sum((layer.stack_weights() for layer in self.layers), ())
            self.stack_spec = Tensor([config.group_size or 0, int(self.use_rope)], ms.int32)

    def position_inputs(self, key_mask, query_slots, segment_ids=None, seq_ends=None):
        """key_mask [B, Sk] (1 = real token), query_slots [S] (the key slot of each query).
        Position ids = cumsum(mask) - 1, so left padding does not shift real tokens. A query sees the real keys up to
        its own slot, and always itself (so a padding row is never fully masked: the fused kernel leaves such rows
        undefined). Packed rows (segment_ids [B, S], no cache, so keys = queries): a query sees only keys of its own
        segment (block-diagonal causal mask) and positions restart at 0 in each segment, so RoPE angles and ALiBi
        distances are those of the conversation alone; their ends seq_ends [B, W] (the segments' source) also go
        to a RoPE model's backend, whose kernel can take them instead of the mask (backend_ascend's varlen path).
        Returns (rope inputs or None, attention inputs for every layer), in the backend's form."""
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
            cos = self.backend.gather_rows(self.cos_table, query_positions).reshape(batch, 1, seq_len, -1)
            sin = self.backend.gather_rows(self.sin_table, query_positions).reshape(batch, 1, seq_len, -1)
            rope = self.backend.rope_inputs(cos.astype(self.compute_dtype), sin.astype(self.compute_dtype),
                                            self.num_heads)
            if seq_ends is not None:
                return rope, self.backend.packed_attention_inputs(visible, seq_ends, self.head_scale,
                                                                  self.compute_dtype, self.num_heads)
            return rope, self.backend.attention_inputs(visible, None, self.head_scale, self.compute_dtype,
                                                       self.num_heads)
        # ALiBi as slope * (key position - query position): relative, so it stays small in half precision
        distance = key_positions.reshape(batch, 1, 1, keys) - query_positions.reshape(batch, 1, seq_len, 1)
        alibi = self.backend.alibi_shift(self.slopes, distance)  # [B, N, S, Sk]
        return None, self.backend.attention_inputs(visible, alibi, self.head_scale, self.compute_dtype,
                                                   self.num_heads)

    @staticmethod
    def cache_writes(cache_slot, new_tokens, cache_shape):
        """(index [L], window bool at the cache's shape [B, N, L, D], slot p as an int32 tensor) that put new row
        j - p at cache slot j for j in [p, p + S). The window is broadcast here, once for all layers (see the note
        on broadcasting in backend_composed.py)."""
        slots = cache_shape[2]
        offset = ops.arange(0, slots, dtype=ms.int32) - cache_slot
        window = ((offset >= 0) & (offset < new_tokens)).reshape(1, 1, slots, 1)
        slot = ops.scalar_to_tensor(cache_slot, ms.int32) if isinstance(cache_slot, int) else cache_slot
        return ops.minimum(ops.maximum(offset, 0), new_tokens - 1), ops.broadcast_to(window, cache_shape), slot

    def stack_step(self, input_ids, attention_mask, k_caches, v_caches, cache_slot=None, head_op=None, head=()):
        """A cached step through the whole-stack op: the final-normed hidden states [B, S, H], or with `head_op`
        (and the lm_head's stored weights `head`) the float32 logits [B, V] of each sequence's last new token."""
        slot = 0 if cache_slot is None else cache_slot
        if isinstance(slot, int):
            slot = ops.scalar_to_tensor(slot, ms.int32)
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        cos, sin, slopes = self.position_tables
        inputs = (x.reshape(-1, x.shape[-1]), self.norm.weight, self.norm.eps_tensor, self.stack_spec,
                  attention_mask.astype(ms.int32), slot, cos, sin, slopes, k_caches, v_caches) + self.stack_inputs
        if head_op is not None:
            return head_op(*inputs, *head)
        return self.stack_op(*inputs).reshape(x.shape)

    def paged(self, input_ids, positions, slot_rows, key_rows, key_valid, k_pools, v_pools):
        """A step of the generation engine over paged pools (kv_pool.py): input_ids [1, T] new tokens of any
        sequences, positions [T] each one's position in its sequence, slot_rows [T] the pool row its key/value go
        to, key_rows [T, K] the pool rows of its sequence's positions 0 .. K - 1, key_valid [T, K] which of those it
        sees (positions <= its own). k_pools / v_pools: one [rows, N, D] per layer. Returns (hidden [1, T, H], new
        pools)."""
        t, keys = key_rows.shape
        visible = key_valid.reshape(t, 1, 1, keys)
        if self.use_rope:
            cos = ops.gather(self.cos_table, positions, 0).reshape(1, 1, t, -1).astype(self.compute_dtype)
            sin = ops.gather(self.sin_table, positions, 0).reshape(1, 1, t, -1).astype(self.compute_dtype)
            rope, alibi = self.backend.rope_inputs(cos, sin, self.num_heads), None
        else:  # key k holds position k: ALiBi's distance is k - position
            distance = ops.arange(0, keys, dtype=ms.int32).reshape(1, keys) - positions.reshape(t, 1)
            alibi = self.slopes.reshape(1, -1, 1, 1) * distance.astype(ms.float32).reshape(t, 1, 1, keys)
            rope = None
        attn_inputs = self.backend.attention_inputs(visible, alibi, self.head_scale, self.compute_dtype,
                                                    self.num_heads)
        x = self.embed_tokens(input_ids).astype(self.compute_dtype)
        new_k, new_v = (), ()
        for i in range(len(self.layers)):
            x, pools = self.layers[i](x, rope, attn_inputs, (k_pools[i], v_pools[i]), (slot_rows, key_rows))
            new_k += (pools[0],)
            new_v += (pools[1],)
        return self.norm(x), new_k, new_v

    def construct(self, input_ids, attention_mask, k_caches=None, v_caches=None, cache_slot=None, segment_ids=None,
                  seq_ends=None):
        """Returns (hidden [B, S, H], new k caches, new v caches); the caches are None without a cache.
        segment_ids [B, S] (packed rows, without a cache; see segments_from_ends): which conversation each token
        belongs to; attention and positions then stay within a conversation. seq_ends [B, W]: the ends they come
        from, for a backend that takes them (see position_inputs)."""
        seq_len = input_ids.shape[1]
        attention_mask = attention_mask.astype(ms.int32)
        if self.whole_stack and k_caches is not None:
            return self.stack_step(input_ids, attention_mask, k_caches, v_caches, cache_slot), k_caches, v_caches
        query_slots = ops.arange(0, seq_len, dtype=ms.int32)
        write = None
        if k_caches is not None:
            cache_slot = 0 if cache_slot is None else cache_slot
            query_slots = query_slots + cache_slot
            write = self.cache_writes(cache_slot, seq_len, k_caches[0].shape)
        rope, attn_inputs = self.position_inputs(attention_mask, query_slots, segment_ids, seq_ends)
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

    A model built for training normalises the rows every call (gradients flow through the normalisation); one built
    for inference stores the normalised rows when its weights are loaded (`normalize_rows`), so decoding does not
    recompute them per token. bfloat16 / int8 / int4 lm_heads are stored with their rows already normalised
    (convert_weight.py normalises in float32 before rounding), so they are used as they are.
    """

    def __init__(self, config, backend):
        super().__init__()
        self.norm = config.norm_head
        self.compute_dtype = _DTYPES[config.compute_dtype]
        self.in_features = config.hidden_size
        self.format = config.weight_format("lm_head")
        self.group_size = config.group_size
        self.asymmetric = config.asymmetric and self.format == "int4"
        if self.format == "dense":
            self.weight = normal_weight([config.vocab_size, config.hidden_size], config)
        else:
            add_stored_weights(self, config.vocab_size, config.hidden_size, self.format, self.group_size,
                               config.asymmetric)
        self.normalized = self.format != "dense"  # whether the stored rows are normalised already
        self.kernel = backend.linear_kernel(config, self.format)
        self.backend = backend

    stored_weights = Linear.stored_weights  # (weight,), or (qweight, scales[, mins]) for int8 / int4: as a Linear's

    @staticmethod
    def l2_normalize(w):
        w32 = w.astype(ms.float32)
        norms = ops.maximum(ops.sqrt((w32 * w32).sum(-1, keepdims=True)), 1e-12)
        return (w32 / ops.broadcast_to(norms, w32.shape)).astype(w.dtype)

    def normalize_rows(self):
        """Stores the rows normalised (inference): after any change of the weights, before the first call."""
        if self.norm and not self.normalized:
            self.weight.set_data(self.l2_normalize(self.weight.value()))
            self.normalized = True

    def construct(self, x):
        if self.format != "dense":
            y = project(x, self.stored_weights(), self.format, self.group_size, self.in_features, self.kernel)
            return y.astype(self.compute_dtype)
        w = self.weight
        if self.norm and not self.normalized:  # training: normalised every call (backend_composed.norm_head)
            return self.backend.norm_head(x, w, self.compute_dtype)
        if self.kernel is not None:
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

    `backend` (a name of BACKENDS, "auto" or a backend object; see select_backend) and `inference` are fixed when
    the model is built: `BaichuanForCausalLM(config)` trains (composed, or ascend on Ascend);
    `from_pretrained(dir)` builds for inference on the fastest backend that runs here.
    """

    config_class = BaichuanConfig
    base_model_prefix = "model"

    def __init__(self, config, backend="auto", inference=False):
        super().__init__(config)
        if isinstance(backend, str):
            backend = select_backend(config, backend, inference)
        if not backend.trainable and not inference:
            raise ValueError(f"backend {backend.name!r} has no gradients: build with inference=True, or choose "
                             "'composed' (or 'ascend') to train")
        self.backend = backend
        self.inference = inference
        self.model = BaichuanModel(config, backend)
        self.lm_head = NormHead(config, backend)
        self.vocab_size = config.vocab_size
        # on a whole-stack backend, the lm_head inside the cached step's op too (its rows are normalised at load)
        self.head_stack_op = self.paged_stack_op = None
        if backend.whole_stack and self.lm_head.kernel is not None:
            self.head_weights = self.lm_head.stored_weights()
            self.head_stack_op = backend.stack_op(len(self.head_weights))
            self.paged_stack_op = backend.paged_stack_op(len(self.head_weights))
        if inference:
            self.set_train(False)

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
        # only the hidden states: unpacking the two None cache outputs too made GRAPH mode warn "Some side effect
        # nodes were eliminated by mistake" (their tuple_getitem nodes, dropped as unused) at every finetune
        hidden = self.model(input_ids, attention_mask, segment_ids=segment_ids, seq_ends=seq_ends)[0]
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
        recompiled every step)."""
        config = self.config
        shape = (batch, config.num_attention_heads, slots, config.head_dim)
        dtype = _DTYPES[config.compute_dtype]
        if self.caches_in_place():
            return tuple(ops.zeros((config.num_hidden_layers,) + shape, dtype) for _ in range(2))
        make = lambda: tuple(ops.zeros(shape, dtype) for _ in range(config.num_hidden_layers))  # noqa: E731
        return ms.mutable(make()), ms.mutable(make())

    def kv_cache_dtypes(self):
        """The key/value pool dtypes the engine can use with this model, the default ("auto") first: the whole-stack
        op stores bfloat16, int8 (a scale per token and head) or float32 rows; stock ops the compute dtype."""
        if self.paged_stack_op is not None:
            return ("bfloat16", "int8", "float32")
        return (self.config.compute_dtype,)

    def empty_pools(self, num_blocks, block_size, dtype="auto"):
        """Zeroed paged key/value pools for the engine (kv_pool.py), in the form the model's paged step takes: with
        the whole-stack op (k_pool, v_pool [layers, num_blocks, heads, block_size, head_dim] in `dtype`, k_scales,
        v_scales float32 [layers, num_blocks, heads, block_size]), written in place; else (k pools, v pools), one
        [num_blocks * block_size, heads, head_dim] tensor per layer each in the compute dtype, wrapped in
        `ms.mutable` (see empty_caches)."""
        config = self.config
        dtype = self.kv_cache_dtypes()[0] if dtype == "auto" else dtype
        if dtype not in self.kv_cache_dtypes():
            raise ValueError(f"kv_cache_dtype {dtype!r} is not available with the {self.backend.name} backend: "
                             f"choose one of auto, {', '.join(self.kv_cache_dtypes())}")
        heads, head_dim, layers = config.num_attention_heads, config.head_dim, config.num_hidden_layers
        if self.paged_stack_op is not None:
            rows = (layers, num_blocks, heads, block_size)
            pool_dtype = {"bfloat16": ms.bfloat16, "int8": ms.int8, "float32": ms.float32}[dtype]
            scales = rows if dtype == "int8" else (1,)
            return (_zeros(rows + (head_dim,), pool_dtype), _zeros(rows + (head_dim,), pool_dtype),
                    _zeros(scales, ms.float32), _zeros(scales, ms.float32))
        shape = (num_blocks * block_size, heads, head_dim)
        make = lambda: tuple(ops.zeros(shape, _DTYPES[dtype]) for _ in range(layers))  # noqa: E731
        return ms.mutable(make()), ms.mutable(make())

    def paged_step_cell(self):
        """The model's step cell for the generation engine, one per model (its graphs compile once): the
        whole-stack op's (PagedStackStep) where the backend has it, else the stock-op form (PagedStep)."""
        if "_paged_step" not in self.__dict__:  # a plain attribute: as a sub-cell it would make a cycle of cells
            cell = PagedStackStep(self) if self.paged_stack_op is not None else PagedStep(self)
            object.__setattr__(self, "_paged_step", cell)
        return self.__dict__["_paged_step"]

    def cached_step_cells(self):
        """New (prefill, decode) cells for cached generation; the Generator keeps them so graphs compile once."""
        return CachedPrefill(self), CachedDecode(self)

    def generate(self, input_ids, **kwargs):  # pylint: disable=arguments-differ
        """Text generation with this project's generator (static KV cache, host-side sampling) instead of
        mindformers' (which needs `mint.argmax`, absent on CPU). Accepts the mindformers/Hugging Face keywords
        (max_new_tokens, max_length, do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id,
        pad_token_id, return_dict_in_generate); see generation.generate_for_pipeline."""
        # mindformers' remote-code loader copies into its module cache only the relative imports of this file
        # itself, so the modules generation.py imports are named here too
        # pylint: disable-next=import-outside-toplevel,unused-import
        from .chat_format import get as _chat_format  # noqa: F401
        # pylint: disable-next=import-outside-toplevel,unused-import
        from .generation_settings import resolve as _resolve  # noqa: F401
        # pylint: disable-next=import-outside-toplevel,unused-import
        from .engine import Engine as _Engine  # noqa: F401
        # pylint: disable-next=import-outside-toplevel,unused-import
        from .kv_pool import BlockPool as _BlockPool  # noqa: F401
        # pylint: disable-next=import-outside-toplevel,unused-import
        from .sampling import RowSampler as _RowSampler  # noqa: F401
        from .generation import generate_for_pipeline  # pylint: disable=import-outside-toplevel
        return generate_for_pipeline(self, input_ids, **kwargs)

    # ------------------------------------------------------------------ weights
    def caches_in_place(self):
        """Whether cached steps write the caches in place (a whole-stack backend)."""
        return self.backend.whole_stack

    def load_weights(self, model_dir_or_file, strict=True, files=None):
        """The weights of a model directory or safetensors file, tensor by tensor (weights_io): a missing or damaged
        file raises WeightsFileError (one line naming it), mismatched names or shapes a ValueError listing them.
        `files`: the directory's weight files when they are checked already (from_pretrained)."""
        if files is None:
            load_weights_checked(self, model_dir_or_file, strict=strict)
        else:
            load_safetensors_into(self, model_dir_or_file, strict=strict, files=files)
        self.weights_changed()
        return self

    def weights_changed(self):
        """To call after the weights were set from outside (load_weights calls it): an inference model stores its
        NormHead rows normalised; a training model normalises them every call."""
        if self.lm_head.format == "dense":
            self.lm_head.normalized = False
            if self.inference:
                self.lm_head.normalize_rows()

    def save_pretrained(self, save_directory, **kwargs):  # pylint: disable=arguments-differ
        """config.json + model.safetensors (our parameter names, each weight in its stored format), written one
        tensor at a time (weights_io.save_parameters). A servable directory (tokenizer, generation defaults, model
        code, written atomically) is model_dir.write_servable_dir's."""
        os.makedirs(save_directory, exist_ok=True)
        self.config.to_json_file(os.path.join(save_directory, "config.json"))
        save_parameters(self, os.path.join(save_directory, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_dir, **kwargs):  # pylint: disable=arguments-differ
        """Builds the model from a directory with config.json + model.safetensors, ready for inference.

        `backend`: one of BACKENDS or "auto" (select_backend). Keyword arguments that are config fields (e.g.
        compute_dtype) override the saved config. The model is
        built without initialising its parameters (MindSpore's `no_init_parameters`), then each one is set from
        the checkpoint in its stored format, tensor by tensor: no random weights and no float32 copy of
        bfloat16 / int8 / int4 weights ever exist.

        config.json and every weights file are checked first (weights_check.check_model_dir, headers and sizes),
        before anything is built: a missing, truncated or damaged one raises WeightsFileError, one line naming the
        file, the same as runtime.load_model_dir; the openmind pipeline reaches this method too.
        """
        model_dir = pretrained_model_name_or_dir
        backend = kwargs.pop("backend", "auto")
        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory {model_dir!r} does not exist (expected config.json and "
                                    f"{WEIGHTS_NAME} in it; make one with convert_weight.py)")
        files = check_model_dir(model_dir)
        config = kwargs.pop("config", None) or BaichuanConfig.from_hf_config(model_dir)
        for key in list(kwargs):
            if hasattr(config, key) and key != "name_or_path":
                setattr(config, key, kwargs.pop(key))
        config.name_or_path = model_dir
        with no_init_parameters():
            model = cls(config, backend=backend, inference=True)
        return model.load_weights(model_dir, files=files)

    @classmethod
    def from_pretrained_experimental_mode(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """What mindformers' AutoModel calls for `trust_remote_code` models (its own version looks for
        mindspore_model.ckpt): our from_pretrained, with the config it already read. Hub keywords are ignored."""
        del args, kwargs
        return cls.from_pretrained(pretrained_model_name_or_path, config=config)


class _CachedStep(nn.Cell):
    """A compiled step of cached generation. When the model's caches_in_place() (a whole-stack backend) the graph
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
        lm, model = self.lm, self.lm.model
        if lm.head_stack_op is not None:  # embedding, then one op: the stack, the final norm and the lm_head
            logits = model.stack_step(input_ids, attention_mask, k_caches, v_caches, cache_slot, lm.head_stack_op,
                                      lm.head_weights)
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


def _zeros(shape, dtype):
    """A zeroed tensor made by its initializer: CPU's Zeros op has no bfloat16 kernel, and a float32 tensor cast
    down would hold twice the pool's memory for a moment."""
    tensor = Tensor(shape=shape, dtype=dtype, init=Zero())
    tensor.init_data()
    return tensor


class PagedStep(nn.Cell):
    """The generation engine's step over paged pools: step(input_ids [1, T], positions [T], slot_rows [T],
    key_rows [T, K], key_valid [T, K], out_rows [R], k_pools, v_pools) -> (float32 logits [R, V] of the tokens at
    out_rows, new k pools, new v pools); see BaichuanModel.paged. On the composed backend its inputs are declared
    with dynamic sizes, so GRAPH mode compiles it once for every T, K, R and pool size (measured on a 2-core EPYC,
    tiny model: 8 s for the first call, then none, against ~2 s for each padded shape); the kernel backends' custom
    ops need static shapes (`dynamic` False: the engine pads to powers of two, one compile each)."""

    def __init__(self, lm):
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm
        self.graph_call = CompiledCall(self)
        self.dynamic = lm.backend.name == "composed"
        if not self.dynamic:
            return
        config = lm.config
        dtype = _DTYPES[config.compute_dtype]
        pools = lambda: ms.mutable(tuple(  # noqa: E731
            Tensor(shape=[None, config.num_attention_heads, config.head_dim], dtype=dtype)
            for _ in range(config.num_hidden_layers)))
        vector = lambda: Tensor(shape=[None], dtype=ms.int32)  # noqa: E731
        self.set_inputs(Tensor(shape=[1, None], dtype=ms.int32), vector(), vector(),
                        Tensor(shape=[None, None], dtype=ms.int32), Tensor(shape=[None, None], dtype=ms.bool_),
                        vector(), pools(), pools())

    def construct(self, input_ids, positions, slot_rows, key_rows, key_valid, out_rows, k_pools, v_pools):
        hidden, k_pools, v_pools = self.lm.model.paged(input_ids, positions, slot_rows, key_rows, key_valid,
                                                       k_pools, v_pools)
        logits = self.lm.lm_head(ops.gather(hidden.reshape(hidden.shape[1], -1), out_rows, 0))
        return logits.astype(ms.float32), k_pools, v_pools

    whole_stack = False

    def step(self, inputs, pools):
        """(float32 logits [R, V], new pools)."""
        logits, k_pools, v_pools = self.graph_call(*inputs, ms.mutable(pools[0]), ms.mutable(pools[1]))
        return logits, (k_pools, v_pools)


class PagedStackStep(nn.Cell):
    """The generation engine's step on the whole-stack op (kernels.paged_stack_op, csrc/paged_stack.h):
    step((input_ids [T], tokens [T, 2] = (sequence, position) per token, out_rows [R], block_tables [B, MB]),
    pools) -> (float32 logits [R, V], the same pools, written in place). Compiled per shape: the engine pads T, B,
    MB and R to powers of two (`dynamic` False)."""
    whole_stack = True
    dynamic = False

    def __init__(self, lm):
        super().__init__(auto_prefix=False)  # keep the model's parameter names
        self.lm = lm
        self.graph_call = CompiledCall(self)

    def construct(self, input_ids, tokens, out_rows, block_tables, k_pool, v_pool, k_scales, v_scales):
        lm, model = self.lm, self.lm.model
        x = model.embed_tokens(input_ids).astype(model.compute_dtype)
        cos, sin, slopes = model.position_tables
        return lm.paged_stack_op(x, model.norm.weight, model.norm.eps_tensor, model.stack_spec, tokens, out_rows,
                                 block_tables, cos, sin, slopes, k_pool, v_pool, k_scales, v_scales,
                                 *model.stack_inputs, *lm.head_weights)

    def step(self, inputs, pools):
        return self.graph_call(*inputs, *pools), pools


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
