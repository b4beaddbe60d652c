"""Fast CPU projections y = x W^T as `mindspore.ops.Custom(func_type="aot")` ops (C++ source: kernels.cc beside
this file).

The weight formats are those of QUANT_FORMAT.md: float32 / bfloat16 `[out, in]`, int8 `[out, in]` and int4 (q4_0
style blocks of 32, uint8 `[out, ceil(in / 32) * 16]`), both with float16 scales `[out, ceil(in / group)]`.

    op = linear_op("int8", 32)       # None when the kernels cannot run here: use the stock ops then
    y = op(x, qweight, scales)       # inside a Cell's construct; x float32 [M, K] -> y float32 [M, N]

cached_stack_op() runs a whole cached step through every decoder layer in one op (see BaichuanModel in
modeling_baichuan.py), the other *_op() functions single layout / attention steps of the per-op path.

The shared library is compiled with the system C++ compiler (g++, or $CXX) on first use into a cache directory
keyed by the hash of the source and flags ($BAICHUAN_KERNEL_CACHE, default ~/.cache/baichuan2/kernels), built in a
temporary file and renamed into place so concurrent processes never load half a library. `python -m
baichuan2.kernels --build` does it ahead of time (scripts/setup_env.sh). Environment:
    BAICHUAN_KERNELS=0          never use the kernels (linear_op returns None)
    BAICHUAN_KERNEL_ISA=PATH    force one of ISA_PATHS the CPU has (tests); default: the best it has, in the order
                                avx512vnni (+ VNNI and BF16 dot products), avx512, avxvnni, avx2
    BAICHUAN_KERNEL_THREADS=N   the kernels' own threads; default: the CPUs in the process's affinity mask (not
                                OMP_NUM_THREADS, which importing mindspore sets to 1)
This module is copied into model directories with modeling_baichuan.py, so it imports only the standard library,
numpy and mindspore.
"""
import argparse
import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import tempfile

FORMATS = ("float32", "bfloat16", "int8", "int4")  # in the order of kernels.cc's enum Fmt (PeakGops)
ISA_PATHS = ("avx2", "avxvnni", "avx512", "avx512vnni")  # the instruction-set paths kernels.cc is compiled for
GROUP_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # one exported symbol each in kernels.cc


def _find_source():
    """kernels.cc beside this file (the package, or a model directory it was copied into), else the installed
    baichuan2 package's copy (loaders that move the .py files of a model directory into a module cache)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.cc")
    if os.path.isfile(here):
        return here
    spec = importlib.util.find_spec("baichuan2")
    if spec and spec.origin:
        installed = os.path.join(os.path.dirname(spec.origin), "kernels.cc")
        if os.path.isfile(installed):
            return installed
    return here


SOURCE = _find_source()
# Baseline x86-64 code generation: the AVX2 / AVX-512 bodies get their instructions from function-level target
# pragmas, so one library runs on every x86-64 machine and picks its path at run time.
CXXFLAGS = ("-O3", "-std=c++17", "-pthread", "-fPIC", "-shared", "-w")

_state = {}  # path of the built library, or the reason there is none


def cache_dir():
    return os.environ.get("BAICHUAN_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "baichuan2",
                                                                   "kernels")


def _compiler():
    return os.environ.get("CXX") or shutil.which("g++")


def _unavailable():
    """Why the kernels cannot be used here, or None."""
    if os.environ.get("BAICHUAN_KERNELS", "1") == "0":
        return "disabled by BAICHUAN_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"no kernels for {platform.machine()} (x86-64 only)"
    if not os.path.isfile(SOURCE):
        return f"kernel source {SOURCE} is missing"
    if not _compiler():
        return "no C++ compiler (g++ or $CXX) found"
    return None


def _compile(compiler, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(target))
    os.close(fd)
    try:
        run = subprocess.run([compiler, *CXXFLAGS, "-o", tmp, SOURCE], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {SOURCE} with {compiler} failed:\n{run.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library():
    """Path of the compiled kernel library (building it on first use), or None when unavailable; the reason is
    in `unavailable_reason()`. A compile error raises: the source is ours, so that is a bug to see, not to hide."""
    reason = _unavailable()
    if reason:
        _state["reason"] = reason
        return None
    compiler = _compiler()
    with open(SOURCE, "rb") as f:
        key = hashlib.sha256(f.read() + repr((compiler, CXXFLAGS)).encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), f"baichuan2_kernels_{key}.so")
    if not os.path.isfile(target):
        _compile(compiler, target)
    _state.pop("reason", None)
    return target


def unavailable_reason():
    return _unavailable()


def _lib():
    path = library()
    if path is None:
        return None
    if _state.get("path") != path:
        lib = ctypes.CDLL(path)
        lib.KernelIsa.restype = ctypes.c_char_p
        lib.KernelThreads.restype = ctypes.c_int
        lib.KernelHasIsa.restype = ctypes.c_int
        lib.KernelHasIsa.argtypes = (ctypes.c_char_p,)
        lib.ReadBandwidth.restype = ctypes.c_double
        lib.ReadBandwidth.argtypes = (ctypes.c_double, ctypes.c_int)
        lib.PeakGops.restype = ctypes.c_double
        lib.PeakGops.argtypes = (ctypes.c_int, ctypes.c_double)
        lib.ReadBandwidthOf.restype = ctypes.c_double
        lib.ReadBandwidthOf.argtypes = (ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                        ctypes.POINTER(ctypes.c_int64), ctypes.c_int)
        _state.update(path=path, lib=lib)
    return _state["lib"]


def isa():
    """The instruction-set path the kernels run now (one of ISA_PATHS), or None when they cannot run."""
    lib = _lib()
    if lib is None:
        return None
    name = lib.KernelIsa().decode()
    return None if name == "none" else name


def available_isas():
    """The paths of ISA_PATHS this CPU can run (empty when the kernels cannot run here)."""
    lib = _lib()
    return () if lib is None else tuple(name for name in ISA_PATHS if lib.KernelHasIsa(name.encode()))


def rounds_x(fmt):
    """Whether the projections for `fmt` on the path running now round x before multiplying: int8 / int4 always
    (to int8 per 32 inputs), bfloat16 where the path has a bfloat16 dot (avx512vnni: to bfloat16)."""
    return fmt.startswith("int") or (fmt == "bfloat16" and isa() == "avx512vnni")


def threads():
    lib = _lib()
    return None if lib is None else lib.KernelThreads()


def peak_gops(fmt, seconds=0.2):
    """Prefill's compute roofline for `fmt` on the path running now: GOPS (2 per multiply-add) of the instruction
    its matrix-matrix kernel is built on, run in independent chains on all the kernels' threads for `seconds`."""
    lib = _lib()
    if lib is None:
        return None
    return lib.PeakGops(FORMATS.index(fmt), seconds)


def read_bandwidth(gigabytes=2.0, reps=3):
    """Memory read bandwidth in GB/s measured with the kernels' own vector loads on their threads (best of reps)."""
    lib = _lib()
    if lib is None:
        return None
    gbs = lib.ReadBandwidth(gigabytes, reps)
    if gbs < 0:
        raise MemoryError(f"could not allocate {gigabytes} GB to measure the memory bandwidth")
    return gbs


def read_bandwidth_of(arrays, reps=2):
    """GB/s reading these arrays (numpy, C-contiguous; e.g. a model's weights) with the kernels' vector loads on
    their threads, best of reps: the bandwidth that bounds a decode step reading exactly those bytes, where they lie
    (on a shared virtual machine a separate probe buffer says less: see ReadBandwidth in kernels.cc)."""
    lib = _lib()
    if lib is None:
        return None
    arrays = [a for a in arrays if a.nbytes]
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("read_bandwidth_of reads C-contiguous arrays only")
    ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    sizes = (ctypes.c_int64 * len(arrays))(*[a.nbytes for a in arrays])
    gbs = lib.ReadBandwidthOf(len(arrays), ptrs, sizes, reps)
    if gbs < 0:
        raise ValueError("read_bandwidth_of: nothing to read")
    return gbs


def symbol(fmt, group_size=None, weights=1):
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if weights not in (1, 2, 3):
        raise ValueError(f"a kernel call takes 1, 2 or 3 weights, not {weights!r}")
    suffix = "" if weights == 1 else f"x{weights}"
    if fmt == "float32":
        return "LinearF32" + suffix
    if fmt == "bfloat16":
        return "LinearBF16" + suffix
    if group_size not in GROUP_SIZES:
        return None
    return f"LinearInt{fmt[3:]}G{group_size}{suffix}"


def linear_op(fmt, group_size=None, weights=1):
    """The projection op for weights in `fmt` ("float32", "bfloat16", "int8", "int4"; `group_size` for the last two),
    or None when the kernels cannot run here (no compiler, not x86-64, no AVX2, BAICHUAN_KERNELS=0) or the group
    size has no kernel (GROUP_SIZES): the caller then uses stock MindSpore ops.
        float32 / bfloat16:  op(x, weight)          int8 / int4:  op(x, qweight, scales)
    x float32 [M, K] -> float32 [M, N], called in a Cell's construct (GRAPH or PyNative mode).
    `weights` = 2 or 3: one call projects the same x with that many weights of the same format and K (q/k/v,
    gate/up), op(x, w1, w2[, w3]) or op(x, q1, s1, q2, s2[, q3, s3]) -> a tuple of outputs, in one thread region
    (decode: one preparation of x, no weight copied or concatenated)."""
    name = symbol(fmt, group_size, weights)
    if name is None or isa() is None:
        return None
    from mindspore import ops  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    per = 2 if fmt.startswith("int") else 1
    if weights == 1:
        out_shape = lambda x, w, *scales: [x[0], w[0]]  # noqa: E731
        out_dtype = lambda x, *rest: ms.float32  # noqa: E731
    else:
        out_shape = lambda x, *ws: tuple([x[0], w[0]] for w in ws[::per])  # noqa: E731
        out_dtype = lambda x, *rest: (ms.float32,) * weights  # noqa: E731
    return ops.Custom(f"{_state['path']}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def _layout_op(name, out_shape, outputs=1):
    """A float32 custom op of kernels.cc with one symbol for every instruction-set path (it picks its own inside),
    or None when the kernels cannot run."""
    if isa() is None:
        return None
    from mindspore import ops  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    out_dtype = (lambda *args: (ms.float32,) * outputs) if outputs > 1 else (lambda *args: ms.float32)
    return ops.Custom(f"{_state['path']}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def swap_axes12_op():
    """op(x) = x.swapaxes(1, 2) for float32 4D x, without the per-element index table MindSpore's CPU Transpose
    keeps (see SwapAxes12 in kernels.cc); None when the kernels cannot run here. No gradient: inference only.
    Attention's head transposes, [B, S, N, D] <-> [B, N, S, D]."""
    return _layout_op("SwapAxes12", lambda x: [x[0], x[2], x[1], x[3]])


def rope_swap_axes12_op():
    """op(x, cos, sin) = RoPE (half rotation) of x.swapaxes(1, 2); x [B, S, N, D], cos / sin [B, N, S, D], float32.
    One op for the query / key heads at inference; None when the kernels cannot run here."""
    return _layout_op("RopeSwapAxes12", lambda x, cos, sin: [x[0], x[2], x[1], x[3]])


def decode_attention_op():
    """op(q, k, v, k_cache, v_cache, slot, bias) -> (out [B, 1, N, D], k_cache', v_cache'): one decode step of
    attention with its cache writes (see DecodeAttention in kernels.cc); float32, slot int32. None when unavailable."""
    return _layout_op("DecodeAttention", lambda q, k, v, kc, vc, slot, bias: ([q[0], 1, q[1], q[3]], kc, vc),
                      outputs=3)


def cached_stack_op(head_tensors=0):
    """op(x, norm, eps, spec, mask, slot, cos, sin, slopes, k_caches, v_caches, *per_layer[, *head]) -> y: a cached
    step (prefill or decode) of S new tokens per sequence through every decoder layer (each: RMSNorm, q/k/v,
    positions and visibility from the mask, RoPE or ALiBi, the cache writes and attention, o_proj, residual, RMSNorm,
    SwiGLU MLP, residual) and the final RMSNorm, in one launch, the caches [layers, B, N, L, D] written in place (see
    CachedStack in kernels.cc for the layout). `per_layer`: each layer's ln1, ln2, then q, k, v, o, gate, up, down,
    each (weight,) or (qweight, scales), one format for all. y: the hidden states [B * S, H]; with `head_tensors`
    1 or 2 the lm_head's weight (or qweight, scales) comes last and y is the logits [B, V] of each sequence's last
    new token. None when the kernels cannot run."""
    if head_tensors:
        return _layout_op("CachedStackLogits", lambda x, norm, eps, spec, mask, *rest: [mask[0],
                                                                                      rest[-head_tensors][0]])
    return _layout_op("CachedStack", lambda x, *rest: x)


def rms_norm_op():
    """op(x, weight, eps) = RMSNorm of x [M, H] over H; weight [H], eps [1]; float32. None when unavailable."""
    return _layout_op("RmsNormF32", lambda x, w, eps: x)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m baichuan2.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build", action="store_true", help="compile the kernel library into the cache now")
    args = parser.parse_args(argv)
    if not args.build:
        parser.print_help()
        return 0
    try:
        path = library()
    except RuntimeError as e:
        print(f"[kernels] error: {e}", file=sys.stderr)
        return 1
    if path is None:
        print(f"[kernels] {unavailable_reason()}: projections use stock MindSpore ops (slower decode)")
        return 0
    print(f"[kernels] built {path} (path {isa()}, {threads()} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
