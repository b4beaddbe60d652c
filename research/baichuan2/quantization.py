"""Weight formats in numpy: bfloat16 bits and round-to-nearest int8 / int4 with per-group scales (and mins).

The layouts are the contract of docs/WEIGHT_FORMATS.md (shared with the C++ kernels); in short, for w [out, in]:
  int8  qweight int8 [out, in],                        scales float16 [out, ceil(in / group)]
  int4  qweight uint8 [out, ceil(in / 32) * 16] packed, scales float16 [out, ceil(in / group)]
  w[o, i] ~= float(scales[o, i // group]) * q[o, i]    (symmetric: no zero point)
int4 packing follows llama.cpp's q4_0 block: the input dimension is cut into blocks of 32; byte 16b + j of a row
holds element 32b + j in its low nibble and element 32b + j + 16 in its high nibble, each stored as q + 8.

Quantising a group, two scale methods (config.json's quantization_config "scale_method"):
  "absmax" (the first one, and what a directory without "scale_method" holds): scale = float16(absmax / qmax) with
    qmax 127 (int8) or 7 (int4), then q = round(w / scale) with that float16 scale (so dequantisation reproduces
    exactly what was rounded), ties to even, clipped to [-qmax, qmax].
  "search" (the default): the float16 scale, possibly negative, that gives the group the least weighted squared
    error sum_i c_i (w_i - scale q_i)^2, c_i = |w_i| + rms(group) (larger weights count more, as in llama.cpp's
    k-quants without an importance matrix), among candidates: the group's signed extreme m over each divisor of
    SEARCH_DIVISORS (m / -8 is llama.cpp's q4_0 rule, m / 7 the absmax rule, |divisor| > 8 clips the extreme),
    then two weighted least-squares refits of the best one's scale to its q; with each scale q = round(w / scale)
    clipped to [-8, 7] (int4: all 16 levels) or [-127, 127] (int8). The absmax rule is one of the candidates and
    a candidate only replaces a strictly better one, so no group's weighted error is ever above the absmax rule's.
An all-zero group (or one whose scale underflows float16) gets scale 0 and q 0.

Asymmetric int4 (symmetric=False, as llama.cpp's q4_1): qweight packed as above, with scales and mins float16
[out, ceil(in / group)]:  w[o, i] ~= float(scales[o, g]) * u[o, i] + float(mins[o, g]),  u = q + 8 the stored
nibble (0..15), g = i // group (mins is what nibble 0 stands for). A group's padding (in not a multiple of the
group) takes no part in its min, max or fit; the padding nibbles hold 8. Two methods (ASYMMETRIC_METHODS):
  "minmax": mins = float16(group min), scales = float16((max - min) / 15), u = round((w - mins) / scales) with
    those float16 values in float32, clipped to 0..15. A constant group (max == min): scale 0, u 0.
  "search" (the default): the float16 (scale, min) of least weighted squared error
    sum_i c_i (w_i - scale u_i - min)^2, c_i = |w_i| + rms of the group's elements, among candidates: the min/max
    rule first; then for each inverse scale r = (15 + step) / (max - min), step in ASYMMETRIC_STEPS, u =
    round((w - min) * r) clipped to 0..15 and the weighted least-squares (scale, min) for that u (2x2 normal
    equations); then two such refits of the best u. Each candidate is rounded to float16 and u recomputed with
    the rounded values as in "minmax"; it replaces the best only when strictly lower (by more than float32
    rounding), so no group's error is above the min/max rule's and a constant group keeps the rule's result.

numpy has no bfloat16: bfloat16 tensors travel as their uint16 bit patterns.

Pure numpy, no MindSpore: the converter and the tests use it, and the model code imports it (it is copied into
model directories with modeling_baichuan.py).
"""
import numpy as np

BITS = (8, 4)
DEFAULT_GROUP_SIZE = 32
INT4_BLOCK = 32  # elements per packed int4 block (16 bytes)
_QMAX = {8: 127, 4: 7}
SCALE_METHODS = ("search", "absmax")  # the first is the default
_QRANGE = {8: (-127, 127), 4: (-8, 7)}  # q the search may use (int4: the 16 levels the nibble stores)
# scale = m / divisor, m the group's signed extreme: int4 from q4_0's -8 (m at -8) through clipping (|divisor| > 8)
# to the absmax rule's 7; int8 near 127 only (its rounding error is already ~1/250 of the group's range)
SEARCH_DIVISORS = {4: (-9.0, -8.5, -8.25, -8.0, -7.75, -7.5, 7.0, 7.25, 7.5, 7.75),
                   8: (127.0, 126.0, 125.0, 123.0)}
_REFITS = 2  # weighted least-squares refits of the best candidate's scale
_FLOAT16_MAX = float(np.finfo(np.float16).max)
ASYMMETRIC_METHODS = ("search", "minmax")  # int4 with symmetric=False; the first is the default
_ULEVELS = 15  # the asymmetric nibble u runs 0..15
# the asymmetric search's inverse scales (15 + step) / (max - min), each giving u for a (scale, min) refit: -2 .. +1
# by 0.3 lowered the mean weighted error (Gaussian, t(3), lognormal groups) a little more than llama.cpp's -1 .. +1
# by 0.1 (make_qkx2_quants) in half the candidates
ASYMMETRIC_STEPS = tuple(round(-2.0 + 0.3 * k, 1) for k in range(11))
_ASYMMETRIC_CHUNK = 1 << 17  # weights per block of rows the asymmetric search works on (~0.5 MB per array)


def check_group_size(bits, group_size):
    """Raises ValueError unless (bits, group_size) is a valid format."""
    if bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    if bits == 4 and group_size % INT4_BLOCK:
        raise ValueError(f"int4 needs a group_size that is a multiple of {INT4_BLOCK} (the packing block), "
                         f"got {group_size}")


def num_groups(in_features, group_size):
    return -(-in_features // group_size)


def qweight_shape(out_features, in_features, bits):
    if bits == 8:
        return (out_features, in_features)
    return (out_features, num_groups(in_features, INT4_BLOCK) * INT4_BLOCK // 2)


def scales_shape(out_features, in_features, group_size):
    return (out_features, num_groups(in_features, group_size))


# ---------------------------------------------------------------------------------------------- bfloat16 bits
def bf16_bits(w):
    """float32 (or float16/float64) -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even."""
    bits = np.ascontiguousarray(w, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(w)
    if nan.any():  # rounding could carry a NaN's payload into the exponent: keep it a quiet NaN
        rounded[nan] = 0x7FC0
    return rounded


def from_bf16_bits(bits):
    """bfloat16 bit patterns (uint16) -> float32, exactly."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------------------------------------- int4 packing
def pack_int4(q):
    """int q in [-8, 7], [out, in] -> uint8 [out, ceil(in / 32) * 16] (see the module docstring)."""
    out_features, in_features = q.shape
    blocks = num_groups(in_features, INT4_BLOCK)
    stored = np.full((out_features, blocks * INT4_BLOCK), 8, np.uint8)  # padding: q = 0
    stored[:, :in_features] = (q.astype(np.int16) + 8).astype(np.uint8)
    stored = stored.reshape(out_features, blocks, 2, INT4_BLOCK // 2)  # [.., low half / high half, 16]
    return (stored[:, :, 0] | (stored[:, :, 1] << 4)).reshape(out_features, blocks * INT4_BLOCK // 2)


def unpack_int4(packed, in_features):
    """uint8 packed [out, blocks * 16] -> int8 q [out, in_features]."""
    out_features = packed.shape[0]
    blocks = packed.reshape(out_features, -1, INT4_BLOCK // 2)
    q = np.stack([blocks & 0x0F, blocks >> 4], axis=2).reshape(out_features, -1)
    return (q[:, :in_features].astype(np.int16) - 8).astype(np.int8)


# ---------------------------------------------------------------------------------------------- quantisation
def check_scale_method(method, symmetric=True):
    """Raises ValueError unless `method` is a scale method of the symmetric (or asymmetric) form."""
    if symmetric not in (True, False):
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
    methods = SCALE_METHODS if symmetric else ASYMMETRIC_METHODS
    if method not in methods:
        form = "symmetric" if symmetric else "asymmetric (symmetric=False)"
        raise ValueError(f"scale_method of the {form} form must be one of {methods}, got {method!r}")


def check_symmetric(bits, symmetric):
    """Raises ValueError unless `bits` has a form with symmetric=`symmetric` (asymmetric: int4 only)."""
    if not symmetric and bits != 4:
        raise ValueError(f"the asymmetric form (symmetric=False) exists for int4 only, got bits={bits!r}")


class _Search:
    """The "search" method's state over groups x [..., g] (float32): the best float16 scale, q and (weighted)
    error so far. Working arrays are reused (the search runs over every weight of a model several times)."""

    def __init__(self, x, bits, weight):
        self.x, self.weight, self.lo, self.hi = x, weight, *_QRANGE[bits]
        self.scale = np.zeros(x.shape[:-1] + (1,), np.float16)
        self.q = np.zeros_like(x)
        self.err = np.einsum("...i,...i->...", x * x, weight)  # scale 0: every q 0
        self.trial, self.diff = np.empty_like(x), np.empty_like(x)

    def offer(self, scale16):
        """Takes float16 `scale16` [..., 1] in the groups where it gives a strictly lower error."""
        finite = np.isfinite(scale16)
        scale = np.where(finite, scale16, 0).astype(np.float32)
        # q = round(x / scale) in range; a scale of 0 divides by infinity: q 0
        np.divide(self.x, np.where(scale != 0, scale, np.inf), out=self.trial)
        np.rint(self.trial, out=self.trial)
        np.clip(self.trial, self.lo, self.hi, out=self.trial)
        np.multiply(self.trial, scale, out=self.diff)
        np.subtract(self.x, self.diff, out=self.diff)
        np.multiply(self.diff, self.diff, out=self.diff)
        err = np.einsum("...i,...i->...", self.diff, self.weight)
        better = (err < self.err) & finite[..., 0]
        np.copyto(self.scale, scale16, where=better[..., None])
        np.copyto(self.q, self.trial, where=better[..., None])
        np.copyto(self.err, err, where=better)


def search_scales(x, bits):
    """The "search" method on groups x [..., g] (float32): (float16 scales [...], float q [..., g])."""
    extreme = np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)  # signed, [..., 1]
    weight = np.abs(x) + np.sqrt((x * x).mean(axis=-1, keepdims=True))  # error weights: |w| + rms(group)
    search = _Search(x, bits, weight)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for divisor in SEARCH_DIVISORS[bits]:
            search.offer((extreme / divisor).astype(np.float16))
        for _ in range(_REFITS):  # the weighted least-squares scale for the best q so far
            wq = search.q * weight
            qq = np.einsum("...i,...i->...", wq, search.q)[..., None]
            xq = np.einsum("...i,...i->...", x, wq)[..., None]
            search.offer((xq / np.where(qq > 0, qq, 1.0)).astype(np.float16))
    return search.scale[..., 0], search.q


class _AsymmetricSearch:
    """The asymmetric methods' state over groups x [..., g] (float32) with error weights [..., g] (0 on padding)
    and group minima lo [..., 1]: the best float16 (scale, min), u and weighted error so far."""

    def __init__(self, x, weight, lo):
        self.x, self.weight, self.lo = x, weight, lo.astype(np.float64)
        self.scale = np.zeros(x.shape[:-1] + (1,), np.float16)
        self.min = np.zeros_like(self.scale)
        self.u = np.zeros_like(x)
        self.err = np.full(x.shape[:-1], np.inf, np.float32)
        self.trial, self.diff = np.empty_like(x), np.empty_like(x)
        # float32 errors are off by up to ~(g + 3) * 2^-24 of themselves (summed terms all >= 0): a candidate must
        # beat the best by more than that, so float64 errors agree that it is better
        self.keep = 1.0 - 4 * (x.shape[-1] + 4) * 2.0 ** -24
        self.xl = self.sc = self.sx = None  # the fit's fixed parts (fit_setup)

    def offer(self, scale16, min16):
        """Takes float16 `scale16`, `min16` [..., 1] in the groups where they give a lower error."""
        finite = np.isfinite(scale16) & np.isfinite(min16)
        scale = np.where(finite, scale16, 0).astype(np.float32)
        low = np.where(finite, min16, 0).astype(np.float32)
        # u = round((x - min) / scale) in 0..15; a scale of 0 divides by infinity: u 0
        np.subtract(self.x, low, out=self.trial)
        np.divide(self.trial, np.where(scale != 0, scale, np.inf), out=self.trial)
        np.rint(self.trial, out=self.trial)
        np.clip(self.trial, 0, _ULEVELS, out=self.trial)
        np.multiply(self.trial, scale, out=self.diff)
        np.add(self.diff, low, out=self.diff)  # the dequantised weight, as dequantize() computes it
        np.subtract(self.x, self.diff, out=self.diff)
        np.multiply(self.diff, self.diff, out=self.diff)
        err = np.einsum("...i,...i->...", self.diff, self.weight)
        better = (err < self.err * self.keep) & finite[..., 0]
        np.copyto(self.scale, scale16, where=better[..., None])
        np.copyto(self.min, min16, where=better[..., None])
        np.copyto(self.u, self.trial, where=better[..., None])
        np.copyto(self.err, err, where=better)

    def fit_setup(self):
        self.xl = self.x - self.lo.astype(np.float32)  # x - min >= 0: the fit without the groups' offsets
        self.sc = self.weight.sum(axis=-1, dtype=np.float64)
        self.sx = np.einsum("...i,...i->...", self.xl, self.weight).astype(np.float64)

    def fit(self, u):
        """The weighted least-squares (scale, min) of x ~ scale * u + min (2x2 normal equations), in float16; NaN
        where u takes one value over the group (no unique fit)."""
        cu = u * self.weight
        su = cu.sum(axis=-1, dtype=np.float64)
        suu = np.einsum("...i,...i->...", cu, u).astype(np.float64)
        sxu = np.einsum("...i,...i->...", cu, self.xl).astype(np.float64)
        det = self.sc * suu - su * su
        unique = det > 1e-6 * self.sc * suu
        det = np.where(unique, det, 1.0)
        scale = np.where(unique, (self.sc * sxu - su * self.sx) / det, np.nan)
        low = self.lo[..., 0] + (suu * self.sx - su * sxu) / det
        return scale.astype(np.float16)[..., None], low.astype(np.float16)[..., None]


def asymmetric_scales(x, valid, method):
    """The asymmetric int4 methods on groups x [..., g] (float32) whose elements beyond `valid` [..., 1] (count)
    are padding (a copy of a valid element, so min and max hold): (float16 scales [...], float16 mins [...],
    float u [..., g])."""
    lo, hi = x.min(axis=-1, keepdims=True), x.max(axis=-1, keepdims=True)
    inside = np.arange(x.shape[-1]) < valid  # [..., g]
    if method == "minmax":
        weight = inside.astype(np.float32)
    else:  # error weights |w| + rms(group) over the valid elements, 0 on padding
        rms = np.sqrt(np.einsum("...i,...i->...", x * inside, x)[..., None] / valid)
        weight = (np.abs(x) + rms) * inside
    search = _AsymmetricSearch(x, weight, lo)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # the min/max rule first (a constant group: scale 0, u 0, min its value; nothing below replaces it)
        search.offer(((hi - lo) / _ULEVELS).astype(np.float16), lo.astype(np.float16))
        if method == "search":
            search.fit_setup()
            spread = hi - lo
            u = np.empty_like(x)
            for step in ASYMMETRIC_STEPS:
                np.multiply(search.xl, np.where(spread > 0, (_ULEVELS + step) / spread, 0), out=u)
                np.rint(u, out=u)
                np.clip(u, 0, _ULEVELS, out=u)
                search.offer(*search.fit(u))
            for _ in range(_REFITS):
                search.offer(*search.fit(search.u))
    return search.scale[..., 0], search.min[..., 0], search.u


def quantize(w, bits, group_size=DEFAULT_GROUP_SIZE, scale_method=SCALE_METHODS[0], symmetric=True):
    """w [out, in] (float) -> (qweight, float16 scales) in the format of `bits`, scales chosen by `scale_method`
    (see the module docstring); symmetric=False (int4 only) -> (qweight, float16 scales, float16 mins)."""
    check_group_size(bits, group_size)
    check_symmetric(bits, symmetric)
    check_scale_method(scale_method, symmetric)
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D weight [out, in], got shape {w.shape}")
    out_features, in_features = w.shape
    groups = num_groups(in_features, group_size)
    padded = np.zeros((out_features, groups * group_size), np.float32)
    padded[:, :in_features] = w
    padded = padded.reshape(out_features, groups, group_size)
    if not symmetric:
        return _quantize_asymmetric(padded, in_features, scale_method)
    qmax = _QMAX[bits]
    absmax = np.abs(padded).max(axis=2)
    if not np.isfinite(absmax).all() or absmax.max(initial=0.0) / qmax > _FLOAT16_MAX:
        raise ValueError(f"weight holds values ({absmax.max()}) that float16 scales cannot represent")
    if scale_method == "search":
        scales, q = search_scales(padded, bits)
    else:
        scales = (absmax / qmax).astype(np.float16)
        scale = scales.astype(np.float32)[:, :, None]
        safe = np.where(scale > 0, scale, 1.0)
        q = np.where(scale > 0, np.clip(np.rint(padded / safe), -qmax, qmax), 0.0)
    q = q.reshape(out_features, groups * group_size)[:, :in_features].astype(np.int8)
    return (q if bits == 8 else pack_int4(q)), scales


def _quantize_asymmetric(padded, in_features, scale_method):
    """quantize()'s symmetric=False form on the zero-padded groups [out, G, g]: (qweight, scales, mins)."""
    out_features, groups, group_size = padded.shape
    valid = np.minimum(in_features - np.arange(groups) * group_size, group_size)[:, None]  # elements per group
    if groups and valid[-1, 0] < group_size:  # padding copies a valid element: the min and max stay the group's
        padded[:, -1, valid[-1, 0]:] = padded[:, -1, :1]
    absmax = np.abs(padded).max(axis=2)
    if not np.isfinite(absmax).all() or absmax.max(initial=0.0) > _FLOAT16_MAX:
        raise ValueError(f"weight holds values ({absmax.max()}) that float16 mins cannot represent")
    scales, mins = (np.empty((out_features, groups), np.float16) for _ in range(2))
    q = np.empty((out_features, groups * group_size), np.int8)
    step = max(1, _ASYMMETRIC_CHUNK // max(1, groups * group_size))
    for first in range(0, out_features, step):  # blocks of rows whose working arrays stay in the CPU's cache
        rows = slice(first, first + step)
        scales[rows], mins[rows], u = asymmetric_scales(padded[rows], valid, scale_method)
        q[rows] = u.reshape(u.shape[0], groups * group_size) - 8
    return pack_int4(q[:, :in_features]), scales, mins


def dequantize(qweight, scales, bits, group_size, in_features, mins=None):
    """(qweight, scales) -> float32 w [out, in_features]: w[o, i] = scales[o, i // group] * q[o, i]; with
    `mins` (asymmetric int4): w[o, i] = scales[o, g] * u[o, i] + mins[o, g], u = q + 8 the stored nibble."""
    check_group_size(bits, group_size)
    if mins is not None:
        check_symmetric(bits, False)
        u = unpack_int4(qweight, in_features).astype(np.float32) + 8
        scale, low = (np.repeat(np.asarray(a, np.float32), group_size, axis=1)[:, :in_features]
                      for a in (scales, mins))
        return u * scale + low
    q = np.asarray(qweight, np.int8) if bits == 8 else unpack_int4(qweight, in_features)
    scale = np.repeat(np.asarray(scales, np.float32), group_size, axis=1)[:, :in_features]
    return q[:, :in_features].astype(np.float32) * scale


def l2_normalize_rows(w):
    """Each row divided by its L2 norm (NormHead), in float32; the model's NormHead uses the same 1e-12 floor."""
    w = np.asarray(w, np.float32)
    return w / np.maximum(np.sqrt((w * w).sum(axis=-1, keepdims=True)), 1e-12)
