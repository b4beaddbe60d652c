"""Fast CPU kernels as `mindspore.ops.Custom(func_type="aot")` ops: projections y = x W^T in every weight format,
the whole cached decoder stack in one op, and the per-op path's layout / attention / norm ops. C++ source: the csrc/
folder beside this file (csrc/model.cc says which file holds what).

The weight formats are those of docs/WEIGHT_FORMATS.md: float32 / bfloat16 `[out, in]`, int8 `[out, in]` and int4
(q4_0 style blocks of 32, uint8 `[out, ceil(in / 32) * 16]`), both with float16 scales `[out, ceil(in / group)]`.

    op = linear_op("int8", 32)       # None when the kernels cannot run here: use the stock ops then
    y = op(x, qweight, scales)       # inside a Cell's construct; x float32 [M, K] -> y float32 [M, N]

cached_stack_op() runs a whole cached step through every decoder layer in one op (see BaichuanModel in
modeling_baichuan.py), paged_stack_op() the same for a serving batch over a paged block pool, the other *_op()
functions single layout / attention steps of the per-op path.
FORMATS, ISA_PATHS and GROUP_SIZES are read from csrc/tables.h, the one list the C++ is generated from too.

The shared library is compiled with the system C++ compiler (g++, or $CXX) on first use into a cache directory
keyed by the hash of every source file and the flags ($BAICHUAN_KERNEL_CACHE, default ~/.cache/baichuan2/kernels),
built in a temporary file and renamed into place so concurrent processes never load half a library. `python -m
baichuan2.kernels --build` does it ahead of time (scripts/setup_env.sh). The benchmark probes (memory bandwidth,
compute peaks) are a library of their own: baichuan2.kernel_probes. Environment:
    BAICHUAN_KERNELS=0          never use the kernels (linear_op returns None)
    BAICHUAN_KERNEL_ISA=PATH    force one of ISA_PATHS the CPU has (tests); default: the best it has, in the order
                                avx512vnni (+ VNNI and BF16 dot products), avx512, avxvnni, avx2
    BAICHUAN_KERNEL_THREADS=N   the kernels' own threads; default: the CPUs in the process's affinity mask (not
                                OMP_NUM_THREADS, which importing mindspore sets to 1)
This module is copied into model directories with modeling_baichuan.py (and the csrc folder with it), so it imports
only the standard library, numpy and mindspore.
"""
import argparse
import ctypes
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

SOURCE_SUFFIXES = (".cc", ".h", ".inc")  # what the libraries are built from: every such file of csrc/ is hashed
MODEL_SOURCE = "model.cc"  # the model library's translation unit; the others in csrc/ are its parts


def _find_source():
    """The csrc folder beside this file (the package, or a model directory it was copied into), else the installed
    baichuan2 package's (loaders that move the .py files of a model directory into a module cache)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
    if os.path.isfile(os.path.join(here, MODEL_SOURCE)):
        return here
    spec = importlib.util.find_spec("baichuan2")
    if spec and spec.origin:
        installed = os.path.join(os.path.dirname(spec.origin), "csrc")
        if os.path.isfile(os.path.join(installed, MODEL_SOURCE)):
            return installed
    return here


SOURCE_DIR = _find_source()


def _read_tables(source_dir):
    """{list name: [entry, ...]} from tables.h's X-macro lists (`#define BAICHUAN_<NAME>(X) X(a, b) X(c, d) ...`),
    each entry the tuple of an X(...)'s arguments; {} when the file is missing (the kernels are unavailable then)."""
    try:
        with open(os.path.join(source_dir, "tables.h"), encoding="utf-8") as f:
            text = f.read().replace("\\\n", " ")
    except OSError:
        return {}
    return {name: [tuple(arg.strip() for arg in args.split(",")) for args in re.findall(r"\bX\(([^)]*)\)", body)]
            for name, body in re.findall(r"^#define BAICHUAN_(\w+)\(X\)(.*)$", text, re.M)}


_TABLES = _read_tables(SOURCE_DIR)
FORMATS = tuple(entry[1] for entry in _TABLES.get("FORMATS", ()))  # in the order of the C++ enum Fmt (PeakGops)
ISA_PATHS = tuple(entry[1] for entry in _TABLES.get("ISA_PATHS", ()))  # the instruction-set paths compiled in
GROUP_SIZES = tuple(int(entry[0]) for entry in _TABLES.get("GROUP_SIZES", ()))  # one exported symbol each
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
    if not os.path.isfile(os.path.join(SOURCE_DIR, MODEL_SOURCE)) or not FORMATS:
        return f"kernel source {SOURCE_DIR} is missing"
    if not _compiler():
        return "no C++ compiler (g++ or $CXX) found"
    return None


def _sources():
    return sorted(name for name in os.listdir(SOURCE_DIR) if name.endswith(SOURCE_SUFFIXES))


def _compile(compiler, source, target):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=os.path.dirname(target))
    os.close(fd)
    try:
        run = subprocess.run([compiler, *CXXFLAGS, "-o", tmp, source], capture_output=True, text=True, check=False)
        if run.returncode != 0:
            raise RuntimeError(f"compiling {source} with {compiler} failed:\n{run.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def library_path(main, prefix):
    """Where the library built from csrc/<main> is cached: <prefix>_<key>.so, the key a hash over every csrc source
    file, the compiler and the flags."""
    digest = hashlib.sha256(repr((main, _compiler(), CXXFLAGS)).encode())
    for name in _sources():
        with open(os.path.join(SOURCE_DIR, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    return os.path.join(cache_dir(), f"{prefix}_{digest.hexdigest()[:16]}.so")


def build_library(main, prefix):
    """Path of the library compiled from csrc/<main> (one translation unit including the other csrc files it needs,
    cached at library_path), built on first use; None when the kernels are unavailable. A compile error raises: the
    source is ours, so that is a bug to see, not to hide. kernel_probes builds the benchmark probes' library with
    it."""
    reason = _unavailable()
    if reason:
        _state["reason"] = reason
        return None
    target = library_path(main, prefix)
    if not os.path.isfile(target):
        _compile(_compiler(), os.path.join(SOURCE_DIR, main), target)
    _state.pop("reason", None)
    return target


def library():
    """Path of the compiled model library (building it on first use), or None when unavailable; the reason is in
    `unavailable_reason()`. A compile error raises."""
    return build_library(MODEL_SOURCE, "baichuan2_kernels")


def unavailable_reason():
    return _unavailable()


def load_library(path, signatures, state):
    """The ctypes handle of the library at `path` (None stays None), its functions typed by `signatures`
    {name: (restype, argtypes)}; kept in `state` and reloaded only when the path changes (a rebuilt library)."""
    if path is None:
        return None
    if state.get("path") != path:
        lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in signatures.items():
            getattr(lib, name).restype = restype
            getattr(lib, name).argtypes = argtypes
        state.update(path=path, lib=lib)
    return state["lib"]


_SIGNATURES = {"KernelIsa": (ctypes.c_char_p, ()), "KernelThreads": (ctypes.c_int, ()),
               "KernelHasIsa": (ctypes.c_int, (ctypes.c_char_p,))}


def _lib():
    return load_library(library(), _SIGNATURES, _state)


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


def symbol(fmt, group_size=None, weights=1):
    """The exported name of the projection kernel for `fmt`, `group_size` and `weights`, or None where there is none
    (a group size not in GROUP_SIZES; no kernel source, so no tables)."""
    if not FORMATS:
        return None
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


def linear_op(fmt, group_size=None, weights=1, mins=False):
    """The projection op for weights in `fmt` ("float32", "bfloat16", "int8", "int4"; `group_size` for the last two),
    or None when the kernels cannot run here (no compiler, not x86-64, no AVX2, BAICHUAN_KERNELS=0) or the group
    size has no kernel (GROUP_SIZES): the caller then uses stock MindSpore ops.
        float32 / bfloat16:  op(x, weight)          int8 / int4:  op(x, qweight, scales)
        int4 with `mins` (asymmetric groups):      op(x, qweight, scales, mins)
    x float32 [M, K] -> float32 [M, N], called in a Cell's construct (GRAPH or PyNative mode).
    `weights` = 2 or 3: one call projects the same x with that many weights of the same format and K (q/k/v,
    gate/up), op(x, w1, w2[, w3]) or op(x, q1, s1, q2, s2[, q3, s3]) -> a tuple of outputs, in one thread region
    (decode: one preparation of x, no weight copied or concatenated)."""
    if isa() is None:
        return None
    name = symbol(fmt, group_size, weights)
    if name is None:
        return None
    if mins and fmt != "int4":
        raise ValueError(f"only int4 has minimums (asymmetric groups), not {fmt!r}")
    per = (3 if mins else 2) if fmt.startswith("int") else 1
    if weights == 1:
        return _custom_op(name, lambda x, w, *scales: [x[0], w[0]])
    return _custom_op(name, lambda x, *ws: tuple([x[0], w[0]] for w in ws[::per]), outputs=weights)


def _custom_op(name, out_shape, outputs=1):
    """A custom op of the model library with `outputs` float32 outputs, or None when the kernels cannot run. The
    projections have one symbol per format, the layout / attention / stack ops one for every instruction-set path
    (each picks its own path inside)."""
    if isa() is None:
        return None
    from mindspore import ops  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    out_dtype = (lambda *args: (ms.float32,) * outputs) if outputs > 1 else (lambda *args: ms.float32)
    return ops.Custom(f"{_state['path']}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def swap_axes12_op():
    """op(x) = x.swapaxes(1, 2) for float32 4D x, without the per-element index table MindSpore's CPU Transpose
    keeps (see SwapAxes12 in csrc/layer_ops.h); None when the kernels cannot run here. No gradient: inference only.
    Attention's head transposes, [B, S, N, D] <-> [B, N, S, D]."""
    return _custom_op("SwapAxes12", lambda x: [x[0], x[2], x[1], x[3]])


def rope_swap_axes12_op():
    """op(x, cos, sin) = RoPE (half rotation) of x.swapaxes(1, 2); x [B, S, N, D], cos / sin [B, N, S, D], float32.
    One op for the query / key heads at inference; None when the kernels cannot run here."""
    return _custom_op("RopeSwapAxes12", lambda x, cos, sin: [x[0], x[2], x[1], x[3]])


def decode_attention_op():
    """op(q, k, v, k_cache, v_cache, slot, bias) -> (out [B, 1, N, D], k_cache', v_cache'): one decode step of
    attention with its cache writes (see DecodeAttention in csrc/layer_ops.h); float32, slot int32. None when
    unavailable."""
    return _custom_op("DecodeAttention", lambda q, k, v, kc, vc, slot, bias: ([q[0], 1, q[1], q[3]], kc, vc),
                      outputs=3)


def cached_stack_op(head_tensors=0):
    """op(x, norm, eps, spec, mask, slot, cos, sin, slopes, k_caches, v_caches, *per_layer[, *head]) -> y: a cached
    step (prefill or decode) of S new tokens per sequence through every decoder layer (each: RMSNorm, q/k/v,
    positions and visibility from the mask, RoPE or ALiBi, the cache writes and attention, o_proj, residual, RMSNorm,
    SwiGLU MLP, residual) and the final RMSNorm, in one launch, the caches [layers, B, N, L, D] written in place (see
    csrc/stack.h for the layout). `per_layer`: each layer's ln1, ln2, then q, k, v, o, gate, up, down,
    each (weight,) or (qweight, scales), one format for all. y: the hidden states [B * S, H]; with `head_tensors`
    1 or 2 the lm_head's weight (or qweight, scales) comes last and y is the logits [B, V] of each sequence's last
    new token (int4 asymmetric: qweight, scales, mins, everywhere). None when the kernels cannot run."""
    if head_tensors:
        return _custom_op("CachedStackLogits", lambda x, norm, eps, spec, mask, *rest: [mask[0],
                                                                                      rest[-head_tensors][0]])
    return _custom_op("CachedStack", lambda x, *rest: x)


def paged_stack_op(head_tensors):
    """op(x, norm, eps, spec, tokens, out_rows, block_tables, cos, sin, slopes, k_pool, v_pool, k_scales, v_scales,
    *per_layer, *head) -> y: cached_stack_op's step for a serving batch whose keys and values live in a block pool
    (csrc/paged_stack.h has the contract): x float32 [T, H] the new tokens of several sequences, tokens int32 [T, 2]
    (sequence, position) per row, block_tables int32 [B, blocks], the pools [layers, blocks, heads, block size,
    head_dim] in float32, bfloat16 or int8 (with float32 scales [layers, blocks, heads, block size]) written in
    place; y float32 [R, V] the logits of the rows out_rows int32 [R] names. `head_tensors`: 1 or 2, the lm_head's
    (weight,) or (qweight, scales). None when the kernels cannot run."""
    if head_tensors not in (1, 2, 3):
        raise ValueError(f"paged_stack_op takes the lm_head as 1, 2 or 3 tensors, not {head_tensors!r}")
    return _custom_op("PagedStackLogits", lambda x, norm, eps, spec, tokens, out_rows, *rest: [
        out_rows[0], rest[-head_tensors][0]])


def rms_norm_op():
    """op(x, weight, eps) = RMSNorm of x [M, H] over H; weight [H], eps [1]; float32. None when unavailable."""
    return _custom_op("RmsNormF32", lambda x, w, eps: x)


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
