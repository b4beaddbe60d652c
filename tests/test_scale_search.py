"""The "search" scale method of quantization.py (the default for int8 / int4): against a per-group numpy reference
written here on odd shapes, never worse than the absmax rule on any group, the full int4 range (q = -8) through the
stock-op dequantisation, and old directories (no "scale_method" in config.json) loading as the absmax rule they
were written with.

The reference follows docs/WEIGHT_FORMATS.md's text one group at a time, in plain Python loops over the candidates,
so it shares no code (and no vectorisation trick) with the quantiser."""
import json
import os

import mindspore as ms
import numpy as np
import pytest

from baichuan2 import BaichuanConfig, BaichuanForCausalLM
from baichuan2 import backend_composed
from baichuan2.convert_weight import convert
from baichuan2.quantization import SEARCH_DIVISORS, dequantize, pack_int4, quantize, unpack_int4
from baichuan2.safetensors_io import SafetensorsFile
from helpers import FIXTURES

RANGE = {4: (-8, 7), 8: (-127, 127)}


def error_weights(x):
    x = x.astype(np.float64)
    return np.abs(x) + np.sqrt(np.mean(x * x))


def reference_group(x, bits):
    """(float16 scale, q) of one group by the documented search: candidates m / divisor, then 2 weighted
    least-squares refits; a candidate replaces the best only when its weighted squared error is strictly lower."""
    lo, hi = RANGE[bits]
    x = x.astype(np.float32)
    c = error_weights(x)
    m = x[np.argmax(np.abs(x))]

    def trial(scale16):
        s = np.float32(scale16)
        if not np.isfinite(s):
            return None
        q = np.zeros_like(x) if s == 0 else np.clip(np.rint(x / s), lo, hi)
        diff = (x - s * q).astype(np.float64)
        return float(np.sum(c * diff * diff)), q

    best = (float(np.sum(c * x.astype(np.float64) ** 2)), np.float16(0), np.zeros_like(x))
    candidates = [np.float16(m / np.float32(d)) for d in SEARCH_DIVISORS[bits]]
    for scale16 in candidates:
        got = trial(scale16)
        if got is not None and got[0] < best[0]:
            best = (got[0], scale16, got[1])
    for _ in range(2):
        q = best[2]
        qq = float(np.sum(c * q * q))
        fit = np.float16(np.sum(c * x * q) / (qq if qq > 0 else 1.0))
        got = trial(fit)
        if got is not None and got[0] < best[0]:
            best = (got[0], fit, got[1])
    return best[1], best[2]


def group_error(x, scale, q):
    """The weighted squared error the search minimises."""
    diff = x.astype(np.float64) - np.float64(np.float32(scale)) * q
    return float(np.sum(error_weights(x) * diff * diff))


@pytest.mark.parametrize("bits,group,shape", [(4, 32, (3, 40)), (4, 64, (5, 100)), (8, 32, (7, 33)),
                                              (8, 48, (2, 177)), (4, 32, (1, 7))])
def test_search_matches_the_per_group_reference(bits, group, shape):
    rng = np.random.default_rng(sum(shape) + bits)
    w = (rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
    w[0, : min(shape[1], group)] = 0  # an all-zero group: scale 0, q 0
    qweight, scales = quantize(w, bits, group)
    q = unpack_int4(qweight, shape[1]) if bits == 4 else qweight
    groups = -(-shape[1] // group)
    padded = np.zeros((shape[0], groups * group), np.float32)
    padded[:, : shape[1]] = w
    for r in range(shape[0]):
        for g in range(groups):
            scale, ref_q = reference_group(padded[r, g * group:(g + 1) * group], bits)
            got_q = np.zeros(group)
            got_q[: min(group, shape[1] - g * group)] = q[r, g * group:(g + 1) * group]
            assert scales[r, g] == scale or (scale == 0 and scales[r, g] == 0), (r, g)
            assert np.array_equal(got_q[: shape[1] - g * group], ref_q[: shape[1] - g * group]), (r, g)
    assert scales[0, 0] == 0 and not q[0, : min(shape[1], group)].any()


@pytest.mark.parametrize("bits", [4, 8])
def test_search_is_never_worse_than_the_absmax_rule_on_any_group(bits):
    """A property over many groups of different kinds: Gaussian, heavy-tailed, one outlier, constant, tiny (float16
    subnormal scales), a single non-zero."""
    rng = np.random.default_rng(bits)
    rows = [rng.standard_normal(32), rng.standard_t(2, 32), np.r_[rng.standard_normal(31) * 0.01, 5.0],
            np.full(32, -0.3), rng.standard_normal(32) * 1e-6, np.r_[np.zeros(31), -2.0]]
    rows += list(rng.standard_normal((300, 32)) * rng.uniform(1e-3, 10, (300, 1)) ** 2)
    w = np.stack(rows).astype(np.float32)
    searched, search_scales = quantize(w, bits, 32)
    plain, plain_scales = quantize(w, bits, 32, scale_method="absmax")
    unpacked = (lambda p: unpack_int4(p, 32)) if bits == 4 else (lambda p: p)
    q_search, q_plain = unpacked(searched).astype(np.float64), unpacked(plain).astype(np.float64)
    worse = [r for r in range(len(w)) if group_error(w[r], search_scales[r, 0], q_search[r])
             > group_error(w[r], plain_scales[r, 0], q_plain[r])]
    assert not worse, f"the search's weighted error is above the absmax rule's on groups {worse}"
    better = sum(group_error(w[r], search_scales[r, 0], q_search[r])
                 < group_error(w[r], plain_scales[r, 0], q_plain[r]) for r in range(len(w)))
    assert better > len(w) // 2  # and it does find something better on most groups
    if bits == 4:  # the search uses the full int4 range, both signs of scale
        assert (q_search == -8).any() and (search_scales < 0).any() and (search_scales > 0).any()


def test_full_int4_range_through_stock_op_dequantisation(pynative):
    """q = -8 (stored nibble 0) and negative scales read back exactly by the composed backend's dequantisation
    (the CPU kernels' side: tests/test_kernels.py::test_int4_full_range_and_signed_scales)."""
    rng = np.random.default_rng(3)
    q = rng.integers(-8, 8, (6, 70))
    q[:, 0] = -8
    scales = (rng.standard_normal((6, 3)) * 0.1).astype(np.float16)
    packed = pack_int4(q)
    got = backend_composed.dequantize(ms.Tensor(packed), ms.Tensor(scales), 4, 32, 70).asnumpy()
    assert np.array_equal(got, dequantize(packed, scales, 4, 32, 70))


def test_old_directories_load_as_the_absmax_rule(tmp_path, pynative):
    """A directory written before scale_method existed (config.json without it) loads, its stored weights are the
    absmax rule's, and its logits are those of an absmax directory written now; a searched directory says so."""
    source = os.path.join(FIXTURES, "parity", "xverse_7b")
    convert(source, str(tmp_path / "old"), quantize="int4", scale_method="absmax", show_progress=False)
    convert(source, str(tmp_path / "new"), quantize="int4", show_progress=False)
    with open(tmp_path / "old" / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    assert config["quantization_config"]["scale_method"] == "absmax"
    del config["quantization_config"]["scale_method"]
    with open(tmp_path / "old" / "config.json", "w", encoding="utf-8") as f:
        json.dump(config, f)
    assert BaichuanConfig.from_hf_config(str(tmp_path / "new")).quantization_config["scale_method"] == "search"
    assert "scale_method" not in BaichuanConfig.from_hf_config(str(tmp_path / "old")).quantization_config
    convert(source, str(tmp_path / "again"), quantize="int4", scale_method="absmax", show_progress=False)
    old, again = (SafetensorsFile(str(tmp_path / d / "model.safetensors")) for d in ("old", "again"))
    assert all(np.array_equal(old.read(n), again.read(n)) for n in again.keys())
    reader = SafetensorsFile(os.path.join(source, "model.safetensors"))
    w = reader.read("model.layers.0.mlp.down_proj.weight")
    qweight, scales = quantize(w, 4, 32, scale_method="absmax")
    assert np.array_equal(old.read("model.layers.0.mlp.down_proj.qweight"), qweight)
    assert np.array_equal(old.read("model.layers.0.mlp.down_proj.scales"), scales)
    ids = ms.Tensor(np.array([[5, 17, 300, 42, 9]], np.int32))
    logits = [BaichuanForCausalLM.from_pretrained(str(tmp_path / d))(ids).asnumpy() for d in ("old", "again")]
    assert np.array_equal(logits[0], logits[1])
