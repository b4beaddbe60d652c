"""The CPU kernel backends: the decoder's primitives on this project's C++ kernels (kernels.py, csrc/), inference only
(the kernels have no gradients).

    cpu-kernels  op by op: every projection from its stored format (q/k/v and gate/up each in one call), RMSNorm,
                 the head transposes with RoPE, and a decode step's cache writes + attention; prefill attention is
                 the composed backend's
    cpu-stack    as cpu-kernels, and a cached step (prefill or decode) through every layer, the final norm and the
                 lm_head in ONE op (CachedStackLogits) that writes the caches in place: the decode graph is the
                 embedding gather and that op

Each kernel is float32 in and out; a primitive falls back to the composed backend's for other dtypes. Which backend
runs is chosen when the model is built (modeling_baichuan.select_backend), never switched afterwards.
"""
import mindspore as ms

from .backend_composed import ComposedBackend, apply_rotary, paged_attention, rms_norm
# `from .kernels import` (not `from . import kernels`): mindformers' remote-code loader copies the modules it finds
# imported in that form into its module cache, so a model directory's kernels.py travels with this file
from .kernels import (cached_stack_op, decode_attention_op, isa, linear_op, paged_stack_op, rms_norm_op,
                      rope_swap_axes12_op, swap_axes12_op, symbol)
from .kernels import unavailable_reason as kernels_unavailable_reason


def unavailable_reason(config, whole_stack=False):
    """Why this config cannot run on the cpu-kernels (or, with whole_stack, the cpu-stack) backend, or None."""
    if isa() is None:
        return f"the CPU kernels cannot run here ({kernels_unavailable_reason() or 'no AVX2'})"
    if not whole_stack:
        return None
    fmt = config.weight_format("linear")
    if config.compute_dtype != "float32" or config.param_dtype != "float32":
        return "the whole-stack op computes in float32 with float32 norms (compute_dtype / param_dtype)"
    if fmt != "dense" and symbol(fmt, config.group_size) is None:
        return f"no kernel for {fmt} weights in groups of {config.group_size} (kernels.GROUP_SIZES)"
    return None


@ms.jit_class
class CpuKernelBackend(ComposedBackend):
    """Kernels op by op (see the module docstring)."""
    name = "cpu-kernels"
    trainable = False

    def __init__(self):
        self.rms_norm_op = rms_norm_op()
        self.swap_op = swap_axes12_op()
        self.rope_swap_op = rope_swap_axes12_op()
        self.decode_op = decode_attention_op()

    def linear_kernel(self, config, fmt, count=1):
        """The projection op for `count` weights of one x in `fmt`; dense weights only where they and the compute
        are float32 (the kernels are float32 in and out). None: stock ops."""
        if fmt == "dense":
            if config.param_dtype != "float32" or config.compute_dtype != "float32":
                return None
            return linear_op("float32", None, count)
        return linear_op(fmt, config.group_size, count, mins=config.asymmetric and fmt == "int4")

    def norm(self, x, weight, eps, eps_tensor):
        if x.dtype == ms.float32 and weight.dtype == ms.float32:
            return self.rms_norm_op(x.reshape(-1, x.shape[-1]), weight, eps_tensor).reshape(x.shape)
        return rms_norm(x, weight, eps)

    def heads(self, x, rope):
        if x.dtype != ms.float32:
            x = x.swapaxes(1, 2)
            return x if rope is None else apply_rotary(x, rope[0], rope[1])
        if rope is None:
            return self.swap_op(x)
        return self.rope_swap_op(x, rope[0], rope[1])

    def attention(self, q, k, v, cache, write, inputs, scale):
        b, n, s, d = q.shape
        if cache is not None and len(cache[0].shape) == 3:  # a paged pool (the engine's step): stock ops
            return paged_attention(q, k, v, cache, write, inputs, scale)
        if cache is not None and s == 1 and q.dtype == ms.float32:
            out, k, v = self.decode_op(q, k, v, cache[0], cache[1], write[2], inputs)
            return out.reshape(b, s, n * d), (k, v)
        return ComposedBackend.attention(self, q, k, v, cache, write, inputs, scale)  # with this merge_heads

    def merge_heads(self, out):
        return self.swap_op(out) if out.dtype == ms.float32 else out.swapaxes(1, 2)


@ms.jit_class
class CpuStackBackend(CpuKernelBackend):
    """Kernels op by op for uncached forwards (scoring), the whole stack in one op for cached steps."""
    name = "cpu-stack"
    whole_stack = True

    def stack_op(self, head_tensors=0):
        """kernels.cached_stack_op: the stack and final norm, with `head_tensors` (1 or 2) the lm_head too."""
        return cached_stack_op(head_tensors)

    def paged_stack_op(self, head_tensors):
        """kernels.paged_stack_op: the generation engine's step over a block pool (bf16 / int8 / float32 rows)."""
        return paged_stack_op(head_tensors)
