"""Benchmark probes of the CPU kernels (baichuan2.kernels): the memory read bandwidth and prefill's compute roofline,
measured with the kernels' own vector loads and instructions on as many threads, on the instruction-set path the
kernels run now (BAICHUAN_KERNEL_ISA included).

    from baichuan2 import kernel_probes
    kernel_probes.read_bandwidth(2.0, 3)          # GB/s of a fresh 2 GB buffer, best of 3
    kernel_probes.read_bandwidth_of(arrays)       # GB/s reading exactly these arrays (e.g. a model's weights)
    kernel_probes.peak_gops("int8")               # GOPS of the instruction int8 prefill is built on

They are a library of their own (csrc/probes.cc), compiled on the first call into the kernels' cache the same way
(kernels.build_library), so the model library carries none of them. Each function returns None where the kernels
cannot run. For benchmarks and tests: this module stays in the package (model directories do not get it).
"""
import ctypes

from . import kernels

PROBES_SOURCE = "probes.cc"
_state = {}


def library():
    """Path of the compiled probes library (building it on first use), or None where the kernels cannot run."""
    return kernels.build_library(PROBES_SOURCE, "baichuan2_probes") if kernels.isa() else None


_SIGNATURES = {"ReadBandwidth": (ctypes.c_double, (ctypes.c_double, ctypes.c_int)),
               "PeakGops": (ctypes.c_double, (ctypes.c_int, ctypes.c_double)),
               "ReadBandwidthOf": (ctypes.c_double, (ctypes.c_int, ctypes.POINTER(ctypes.c_void_p),
                                                     ctypes.POINTER(ctypes.c_int64), ctypes.c_int))}


def _lib():
    return kernels.load_library(library(), _SIGNATURES, _state)


def peak_gops(fmt, seconds=0.2):
    """Prefill's compute roofline for `fmt` on the path running now: GOPS (2 per multiply-add) of the instruction
    its matrix-matrix kernel is built on, run in independent chains on all the kernels' threads for `seconds`."""
    if fmt not in kernels.FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: expected one of {', '.join(kernels.FORMATS)}")
    lib = _lib()
    if lib is None:
        return None
    return lib.PeakGops(kernels.FORMATS.index(fmt), seconds)


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
    (on a shared virtual machine a separate probe buffer says less: see ReadBandwidth in csrc/probes.cc)."""
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
