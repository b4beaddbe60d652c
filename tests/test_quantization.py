"""bfloat16 / int8 / int4 model directories: the formats by hand, streaming conversion, loading, logits, generation.

How close must a bf16 / int8 / int4 model be to float32? Two separate claims are tested:
1. The model computes its stored format exactly: its logits equal (to the float32 parity tolerance, 1e-4) those
   of the float32 model given the same weights dequantised in numpy. This is where a packing, scaling or loading
   bug would show. int8 / int4 with the projection kernels: their prefill (like their decode) quantises x to int8
   per 32 inputs (at most half a step of 1/127 of the chunk's largest |x|; tests/test_kernels.py bounds it per
   projection), and bfloat16 on a kernel path with a bfloat16 dot rounds x to bfloat16 (2^-9 relative), so there
   the logits must agree to X_QUANT of the largest one, far below what a wrong block, scale or row does.
2. The format's own error stays within a first-order bound: with delta = ||W_q - W|| / ||W|| over all matrices
   (measured on the actual weights: ~2^-9 for bf16, ~0.005 for int8 g32, ~0.1 for int4 g32 on these Gaussian
   test weights), rms(logits - float32 logits) / rms(float32 logits) <= (4L + 2) * delta for L layers. To first
   order the relative errors of weight matrices applied in series add, and the longest chain from token to logit
   is the embedding, then per layer the attention scores (W_q and W_k multiplied together), W_v and W_o (the
   MLP's gate * up, then down, is 3), then lm_head: 4L + 2 matrices. Measured ratios on the parity fixtures are
   3.3 to 6 (L = 2, bound 10).
"""
import json
import os

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from baichuan2 import BaichuanConfig, BaichuanForCausalLM, kernels
from baichuan2.configuration_baichuan import to_hf_config
from baichuan2.convert_weight import convert, expected_shapes, main
from baichuan2.generation import Generator
from baichuan2.quantization import (bf16_bits, dequantize, from_bf16_bits, l2_normalize_rows, pack_int4,
                                    quantize, unpack_int4)
from baichuan2.safetensors_io import SafetensorsFile, save_tensors
from helpers import FIXTURES

PARITY = os.path.join(FIXTURES, "parity")
FAMILIES = ["baichuan2_7b", "baichuan_7b", "baichuan2_13b", "xverse_7b"]
FORMATS = {"bfloat16": dict(dtype="bfloat16"), "int8": dict(quantize="int8"), "int4": dict(quantize="int4"),
           "int4_asym": dict(quantize="int4_asym")}
EXACT = 1e-4  # the float32 parity tolerance (test_parity.py)
X_QUANT = 5e-2  # kernels that round x (kernels.rounds_x), relative to the largest logit (claim 1)


# ---------------------------------------------------------------------------------------------- by hand
def test_int8_quantization_by_hand():
    w = np.array([[0.5, -1.0, 0.25, 0.0, 2.0, 1.0]], np.float32)
    qweight, scales = quantize(w, 8, group_size=4, scale_method="absmax")  # groups [0.5 -1 .25 0] and [2 1 (pad) (pad)]
    s0, s1 = np.float16(1.0 / 127), np.float16(2.0 / 127)
    assert scales.dtype == np.float16 and scales.tolist() == [[s0, s1]]
    expected = [round(0.5 / float(s0)), -127, round(0.25 / float(s0)), 0, 127, round(1.0 / float(s1))]
    # float16 scales are a little below 1/127 and 2/127: 0.5 / s0 = 63.504 -> 64, -1 / s0 = -127.008 -> -127
    assert expected == [64, -127, 32, 0, 127, 64]
    assert qweight.dtype == np.int8 and qweight.tolist() == [expected]
    back = dequantize(qweight, scales, 8, 4, 6)
    scale_per_element = np.array([[s0] * 4 + [s1] * 2], np.float32)
    assert np.array_equal(back, np.array([expected], np.float32) * scale_per_element)


def test_int4_quantization_and_packing_by_hand():
    # one row of 40 elements: a full 32-element block and a partial one (8 elements, padded with q = 0)
    w = np.zeros((1, 40), np.float32)
    w[0, 0], w[0, 16], w[0, 1], w[0, 17] = 7.0, -7.0, 3.0, -1.0
    w[0, 32], w[0, 39] = 0.5, -0.25
    qweight, scales = quantize(w, 4, group_size=32, scale_method="absmax")
    assert scales.tolist() == [[1.0, np.float16(0.5 / 7)]]
    assert qweight.dtype == np.uint8 and qweight.shape == (1, 32)  # 2 blocks of 16 bytes
    row = qweight[0].tolist()
    assert row[0] == (7 + 8) | ((-7 + 8) << 4)  # element 0 low nibble, element 16 high nibble
    assert row[1] == (3 + 8) | ((-1 + 8) << 4)
    assert row[2:16] == [8 | (8 << 4)] * 14  # zeros
    assert row[16] == (7 + 8) | (8 << 4)  # element 32 (= 7 * scale), its partner 48 is padding
    assert row[23] == (-4 + 8) | (8 << 4)  # element 39: -0.25 / float16(0.5 / 7) = -3.5009 -> -4
    assert row[24:] == [8 | (8 << 4)] * 8  # padding
    q = unpack_int4(qweight, 40)
    assert q[0, [0, 16, 1, 17, 32, 39]].tolist() == [7, -7, 3, -1, 7, -4]
    assert np.array_equal(pack_int4(q), qweight)


def test_zero_group_and_bf16_rounding_by_hand():
    qweight, scales = quantize(np.zeros((2, 32), np.float32), 4, 32)
    assert scales.tolist() == [[0.0], [0.0]] and np.array_equal(unpack_int4(qweight, 32), np.zeros((2, 32)))
    # 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even -> 1; 1 + 3 * 2^-8 -> 1 + 2^-6
    values = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 65280.0], np.float32)
    assert from_bf16_bits(bf16_bits(values)).tolist() == [1.0, 1.0, 1 + 2 ** -6, -2.5, 65280.0]
    assert bf16_bits(np.array([1.0], np.float32)).tolist() == [0x3F80]


@pytest.mark.parametrize("bits,group", [(8, 32), (8, 48), (4, 32), (4, 64)])
def test_dequantised_error_is_at_most_half_a_step(bits, group):
    w = np.random.default_rng(bits + group).standard_normal((7, 176)).astype(np.float32)  # 176: partial groups
    qweight, scales = quantize(w, bits, group, scale_method="absmax")  # the search may clip: see test_scale_search
    step = np.repeat(scales.astype(np.float32), group, axis=1)[:, :176]
    assert (np.abs(dequantize(qweight, scales, bits, group, 176) - w) <= step / 2 * (1 + 1e-3)).all()


def test_bad_group_sizes_are_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize(np.ones((1, 64), np.float32), 4, 48)
    assert main(["--input_path", os.path.join(PARITY, "baichuan_7b"), "--output_path", str(tmp_path / "q"),
                 "--quantize", "int4", "--group_size", "48"]) == 2
    assert "multiple of 32" in capsys.readouterr().err and not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------- model directories
@pytest.fixture(scope="module")
def directories(tmp_path_factory):
    """(family, format) -> converted model directory, for float32 and every stored format."""
    out = {}
    for family in FAMILIES:
        for fmt, kwargs in dict(FORMATS, float32={}).items():
            path = tmp_path_factory.mktemp("quant") / f"{family}-{fmt}"
            convert(os.path.join(PARITY, family), str(path), show_progress=False, **kwargs)
            out[family, fmt] = str(path)
    return out


def float_weights(model_dir):
    """Every 2-D weight of a directory as float32 (dequantised / widened in numpy), by our `.weight` name."""
    config = BaichuanConfig.from_hf_config(model_dir)
    tensors = {}
    for file in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        reader = SafetensorsFile(os.path.join(model_dir, file))
        tensors.update({n: (reader.read(n), reader.dtype(n)) for n in reader.keys()})
    out = {}
    for name, (array, dtype) in tensors.items():
        if name.endswith((".scales", ".mins")):
            continue
        if name.endswith(".qweight"):
            prefix = name[:-len(".qweight")]
            shape = expected_shapes(config, hf_layout=False)[prefix + ".weight"]
            mins = tensors[prefix + ".mins"][0] if prefix + ".mins" in tensors else None
            out[prefix + ".weight"] = dequantize(array, tensors[prefix + ".scales"][0],
                                                 config.quantization_config["bits"], config.group_size, shape[1],
                                                 mins=mins)
        else:
            out[name] = from_bf16_bits(array) if dtype == "BF16" else array.astype(np.float32)
    return out


def logits(model, ids, mask=None):
    mask = np.ones_like(ids) if mask is None else mask
    return model(ms.Tensor(ids.astype(np.int32)), attention_mask=ms.Tensor(mask.astype(np.int32))).asnumpy()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_stored_formats_load_as_stored_and_compute_exactly(directories, fmt, ms_mode, tmp_path):
    """Claim 1 of the module docstring, on the left-padded parity batch, in PyNative and GRAPH mode."""
    model_dir = directories["baichuan2_7b", fmt]
    model = BaichuanForCausalLM.from_pretrained(model_dir)
    attn = model.model.layers[0].self_attn.q_proj
    if fmt == "bfloat16":
        assert attn.weight.dtype == ms.bfloat16 and model.lm_head.weight.dtype == ms.bfloat16
    else:
        assert attn.qweight.dtype == (ms.int8 if fmt == "int8" else ms.uint8) and attn.scales.dtype == ms.float16
        assert model.model.embed_tokens.qweight.dtype == attn.qweight.dtype
        assert hasattr(attn, "mins") == (fmt == "int4_asym") and hasattr(model.lm_head, "mins") == hasattr(attn, "mins")
    assert not [p.name for p in model.get_parameters() if p.dtype == ms.float32 and len(p.shape) == 2]
    # the same weights, dequantised in numpy, in a float32 directory
    dense = BaichuanForCausalLM.from_pretrained(directories["baichuan2_7b", "float32"])
    weights = float_weights(model_dir)
    for p in dense.get_parameters():
        if p.name in weights:
            p.set_data(ms.Tensor(weights[p.name]))
    ref = load_file(os.path.join(PARITY, "baichuan2_7b", "reference.safetensors"))
    keep = ref["attention_mask"].astype(bool)
    ours, expected = logits(model, ref["input_ids"], ref["attention_mask"]), logits(dense, ref["input_ids"],
                                                                                   ref["attention_mask"])
    error = float(np.abs(ours[keep] - expected[keep]).max())
    if attn.kernel is not None and kernels.rounds_x(fmt):
        assert error <= X_QUANT * float(np.abs(expected[keep]).max())
    else:
        assert error <= EXACT


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_within_the_first_order_bound_of_float32(directories, family, pynative):
    """Claim 2 of the module docstring, for every family and format."""
    ref = load_file(os.path.join(PARITY, family, "reference.safetensors"))
    exact = ref["logits_nopad"]
    reference_weights = float_weights(directories[family, "float32"])
    config = BaichuanConfig.from_hf_config(directories[family, "float32"])
    if config.norm_head:  # stored formats keep lm_head normalised; compare with the rows the model really uses
        reference_weights["lm_head.weight"] = l2_normalize_rows(reference_weights["lm_head.weight"])
    errors = {}
    for fmt in FORMATS:
        weights = float_weights(directories[family, fmt])
        num = sum(float(((weights[n] - w) ** 2).sum()) for n, w in reference_weights.items() if w.ndim == 2)
        den = sum(float((w ** 2).sum()) for w in reference_weights.values() if w.ndim == 2)
        delta = (num / den) ** 0.5
        got = logits(BaichuanForCausalLM.from_pretrained(directories[family, fmt]), ref["input_ids"][:1])
        error = float(np.sqrt(((got - exact) ** 2).mean() / (exact ** 2).mean()))
        assert 0 < error <= (4 * config.num_hidden_layers + 2) * delta, (fmt, error, delta)
        errors[fmt] = (delta, error)
    assert errors["bfloat16"][0] < 2 ** -8 and errors["int8"][0] < errors["int4"][0]  # the formats' own sizes


def test_greedy_generation_on_every_format(directories, graph):
    ref = load_file(os.path.join(PARITY, "baichuan2_7b", "reference.safetensors"))
    prompts = [ref["greedy_prompt_0"].tolist(), ref["greedy_prompt_1"].tolist()]
    for fmt in FORMATS:
        model = BaichuanForCausalLM.from_pretrained(directories["baichuan2_7b", fmt])
        generator = Generator(model)
        cached = generator.generate(prompts, max_new_tokens=8, eos_token_id=-1)
        assert [len(c) for c in cached] == [8, 8]
        assert cached == generator.generate(prompts, max_new_tokens=8, eos_token_id=-1, use_cache=False), fmt


def test_save_pretrained_keeps_the_stored_format(directories, tmp_path, pynative):
    for fmt in FORMATS:
        model = BaichuanForCausalLM.from_pretrained(directories["baichuan_7b", fmt])
        model.save_pretrained(str(tmp_path / fmt))
        again = BaichuanForCausalLM.from_pretrained(str(tmp_path / fmt))
        saved = SafetensorsFile(str(tmp_path / fmt / "model.safetensors"))
        assert saved.dtype("model.layers.0.mlp.up_proj." + ("weight" if fmt == "bfloat16" else "qweight")) == (
            "BF16" if fmt == "bfloat16" else "I8" if fmt == "int8" else "U8")
        for a, b in zip(model.get_parameters(), again.get_parameters()):
            assert a.name == b.name and a.dtype == b.dtype
            assert np.array_equal(a.asnumpy().view(np.uint8), b.asnumpy().view(np.uint8)), a.name


# ---------------------------------------------------------------------------------------------- conversion
def write_bf16_checkpoint(path, config, shards, seed=0):
    """A Hugging Face checkpoint stored in bfloat16 (uint16 bits in memory), sharded with an index."""
    rng = np.random.default_rng(seed)
    tensors = {n: bf16_bits(rng.standard_normal(s).astype(np.float32) * 0.05)
               for n, s in expected_shapes(config, True).items()}
    path.mkdir(parents=True)
    hf = dict(to_hf_config(config), torch_dtype="bfloat16")
    (path / "config.json").write_text(json.dumps(hf))
    names, weight_map = list(tensors), {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        group = names[k::shards]
        save_tensors(str(path / file), {n: tensors[n] for n in group}, bf16_names=group)
        weight_map.update({n: file for n in group})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


def read_dir(path):
    out = {}
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for file in sorted(set(index.values())):
        reader = SafetensorsFile(str(path / file))
        out.update({n: (reader.read(n), reader.dtype(n), file) for n in reader.keys()})
    assert {n: f for n, (_, _, f) in out.items()} == index
    return out


def test_streaming_conversion_of_sharded_bf16(tmp_path):
    config = BaichuanConfig.from_preset("tiny", norm_head=False, chat_format=None, user_token_id=None,
                                        assistant_token_id=None)
    original = write_bf16_checkpoint(tmp_path / "hf", config, shards=3)
    convert(str(tmp_path / "hf"), str(tmp_path / "bf16"), dtype="bfloat16", show_progress=False)
    ours = read_dir(tmp_path / "bf16")
    assert len({f for _, _, f in ours.values()}) == 3  # one output shard per input shard
    h = config.hidden_size
    for name, bits in original.items():
        if "W_pack" in name:
            for j, x in enumerate("qkv"):
                split = ours[name.replace("W_pack", f"{x}_proj")]
                assert split[1] == "BF16" and np.array_equal(split[0], bits[j * h:(j + 1) * h])
        else:
            assert ours[name][1] == "BF16" and np.array_equal(ours[name][0], bits), name
    # back to the Hugging Face layout, still bfloat16 bit for bit
    convert(str(tmp_path / "bf16"), str(tmp_path / "hf2"), reverse=True, dtype="bfloat16", show_progress=False)
    back = read_dir(tmp_path / "hf2")
    assert sorted(back) == sorted(original)
    assert all(back[n][1] == "BF16" and np.array_equal(back[n][0], b) for n, b in original.items())
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # quantised from the same shards: qweight + scales for every matrix, the norms as they were
    convert(str(tmp_path / "hf"), str(tmp_path / "int4"), quantize="int4", group_size=64, show_progress=False)
    quant = read_dir(tmp_path / "int4")
    assert len({f for _, _, f in quant.values()}) == 3
    qkv = original["model.layers.1.self_attn.W_pack.weight"]
    v_proj = quant["model.layers.1.self_attn.v_proj.qweight"][0], quant["model.layers.1.self_attn.v_proj.scales"][0]
    expected = quantize(from_bf16_bits(qkv[2 * h:]), 4, 64)
    assert np.array_equal(v_proj[0], expected[0]) and np.array_equal(v_proj[1], expected[1])
    assert quant["model.norm.weight"][1] == "F32"
    saved = BaichuanConfig.from_hf_config(str(tmp_path / "int4"))
    assert saved.quantization_config == {"quant_method": "rtn", "bits": 4, "group_size": 64, "sym": True,
                                         "scale_method": "search", "embed_tokens": True, "lm_head": True}
    model = BaichuanForCausalLM.from_pretrained(str(tmp_path / "int4"))
    assert model.model.layers[1].mlp.down_proj.scales.shape == (h, 176 // 64 + 1)


def test_norm_head_rows_are_stored_normalised(directories):
    for fmt in FORMATS:
        rows = float_weights(directories["baichuan2_7b", fmt])["lm_head.weight"]
        norms = np.linalg.norm(rows, axis=1)
        assert np.abs(norms - 1).max() < (0.01 if fmt != "int4" else 0.2), fmt
    assert np.abs(np.linalg.norm(float_weights(directories["baichuan_7b", "int8"])["lm_head.weight"], axis=1)
                  - 1).max() > 0.1  # no NormHead: rows as they were


def test_reverse_of_a_quantised_directory_is_refused(directories, tmp_path, capsys):
    code = main(["--reverse", "--input_path", directories["baichuan2_7b", "int8"],
                 "--output_path", str(tmp_path / "hf")])
    assert code == 2 and "cannot be recovered" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_large_output_layers_are_dequantised_in_row_chunks(directories, fmt, graph, monkeypatch):
    """lm_head of a real vocabulary (125696 rows) is dequantised a block of rows at a time by the stock ops;
    the fixtures' 1000 rows are cut into 300-row blocks here to run that path (GRAPH mode: it compiles)."""
    import baichuan2.backend_composed as composed  # pylint: disable=import-outside-toplevel
    ids = load_file(os.path.join(PARITY, "baichuan2_7b", "reference.safetensors"))["input_ids"][:1]
    whole = logits(BaichuanForCausalLM.from_pretrained(directories["baichuan2_7b", fmt]), ids)
    monkeypatch.setattr(composed, "_STOCK_CHUNK_ROWS", 300)
    chunked = logits(BaichuanForCausalLM.from_pretrained(directories["baichuan2_7b", fmt]), ids)
    assert float(np.abs(chunked - whole).max()) <= 1e-5
