"""baichuan2.random_model: a small model built directly in each stored weight format, with random weights of the
documented magnitudes, the same for the same seed."""
import numpy as np
import pytest

from baichuan2.random_model import build_random_model, stored_format_fields

SHAPE = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96, vocab_size=128,
             max_position_embeddings=64, model_max_length=64)


def test_format_fields_declare_the_stored_format():
    assert stored_format_fields("float32") == {}
    assert stored_format_fields("bfloat16") == {"torch_dtype": "bfloat16"}
    assert stored_format_fields("int4", group_size=64)["quantization_config"] == {
        "quant_method": "rtn", "bits": 4, "group_size": 64, "sym": True, "scale_method": "search"}
    assert stored_format_fields("int4_asym")["quantization_config"] == {
        "quant_method": "rtn", "bits": 4, "group_size": 32, "sym": False, "scale_method": "search"}
    with pytest.raises(ValueError, match="weight format must be one of"):
        stored_format_fields("int3")


@pytest.mark.parametrize("weights, linear", [("float32", "dense"), ("bfloat16", "bfloat16"), ("int8", "int8"),
                                             ("int4", "int4"), ("int4_asym", "int4")])
def test_each_format_is_built_as_stored(weights, linear, monkeypatch):
    import mindspore as ms
    monkeypatch.setenv("BAICHUAN_KERNELS", "0")  # the stock ops: this checks the parameters, not the kernels
    model = build_random_model(SHAPE, weights, "float32", seed=3)
    assert model.config.weight_format() == linear
    params = {p.name: p for p in model.get_parameters()}
    norm = next(p for name, p in params.items() if name.endswith("input_layernorm.weight"))
    assert norm.dtype == ms.float32 and np.all(norm.asnumpy() == 1.0)
    if weights.startswith("int"):
        qweights = [p for name, p in params.items() if name.endswith(".qweight")]
        scales = [p for name, p in params.items() if name.endswith(".scales")]
        mins = [p for name, p in params.items() if name.endswith(".mins")]
        assert qweights and scales and {p.dtype for p in qweights} == {ms.int8 if weights == "int8" else ms.uint8}
        assert all(1e-4 <= float(s.asnumpy().min()) and float(s.asnumpy().max()) <= 2.1e-3 for s in scales)
        assert len(mins) == (len(scales) if weights == "int4_asym" else 0)  # -8 x a scale's range: centred weights
        assert all(-1.7e-2 <= float(m.asnumpy().min()) and float(m.asnumpy().max()) <= -8e-4 for m in mins)
    else:
        matrix = next(p for name, p in params.items() if name.endswith("mlp.down_proj.weight"))
        values = matrix.astype(ms.float32).asnumpy()
        assert matrix.dtype == (ms.float32 if weights == "float32" else ms.bfloat16)
        assert 0.005 < float(np.abs(values).mean()) < 0.05  # ~0.02: N(0, 0.02) or +-[2^-8, 2^-4)
    stored = lambda p: p.astype(ms.float32).asnumpy() if p.dtype == ms.bfloat16 else p.asnumpy()  # noqa: E731
    again = build_random_model(SHAPE, weights, "float32", seed=3)  # the same seed: the same weights
    for param in again.get_parameters():
        np.testing.assert_array_equal(stored(param), stored(params[param.name]), err_msg=param.name)
