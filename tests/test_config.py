"""BaichuanConfig: presets, parameter counts, reading Hugging Face config.json files."""
import json

import pytest

from baichuan2 import PRESETS, BaichuanConfig, BaichuanForCausalLM
from baichuan2.configuration_baichuan import to_hf_config

# Fields of the published Hugging Face config.json files of each family.
HF_BAICHUAN2_7B = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": 125696,
                   "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "max_position_embeddings": 4096, "model_max_length": 4096,
                   "rms_norm_eps": 1e-06, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
                   "pad_token_id": 0, "tie_word_embeddings": False}
HF_BAICHUAN2_13B = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "vocab_size": 125696,
                    "hidden_size": 5120, "intermediate_size": 13696, "num_hidden_layers": 40,
                    "num_attention_heads": 40, "model_max_length": 4096, "rms_norm_eps": 1e-06,
                    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
HF_BAICHUAN_7B = {"architectures": ["BaiChuanForCausalLM"], "model_type": "baichuan", "vocab_size": 64000,
                  "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-06,
                  "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
HF_XVERSE_7B = {"architectures": ["XverseForCausalLM"], "model_type": "xverse", "vocab_size": 100534,
                "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-06, "hidden_act": "silu", "bos_token_id": 2,
                "eos_token_id": 3, "pad_token_id": 1}


def test_parameter_counts_of_model_cards():
    assert BaichuanConfig.from_preset("baichuan_7b").num_parameters() == 7_000_559_616
    assert BaichuanConfig.from_preset("baichuan2_7b").num_parameters() == 7_505_973_248
    assert BaichuanConfig.from_preset("oppo_experiemental_7b").num_parameters() == 7_505_973_248


def test_parameter_count_formula_matches_a_built_model():
    for pe in ("rope", "alibi"):
        config = BaichuanConfig.from_preset("tiny", position_encoding=pe)
        model = BaichuanForCausalLM(config)
        assert sum(p.size for p in model.get_parameters()) == config.num_parameters()


@pytest.mark.parametrize("hf, preset", [(HF_BAICHUAN2_7B, "baichuan2_7b"), (HF_BAICHUAN2_13B, "baichuan2_13b"),
                                        (HF_BAICHUAN_7B, "baichuan_7b"), (HF_XVERSE_7B, "xverse_7b")])
def test_hf_config_json_gives_the_family_preset(tmp_path, hf, preset):
    (tmp_path / "config.json").write_text(json.dumps(hf))
    config = BaichuanConfig.from_hf_config(str(tmp_path))
    expected = BaichuanConfig.from_preset(preset)
    for field in ("family", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "position_encoding", "max_position_embeddings", "fused_qkv", "norm_head",
                  "bos_token_id", "eos_token_id", "pad_token_id", "chat_format"):
        assert getattr(config, field) == getattr(expected, field), field
    assert config.num_parameters() == expected.num_parameters()


def test_family_switches():
    assert BaichuanConfig.from_preset("baichuan2_13b").position_encoding == "alibi"
    assert BaichuanConfig.from_preset("baichuan2_13b").max_position_embeddings is None
    assert not BaichuanConfig.from_preset("baichuan_7b").norm_head
    assert not BaichuanConfig.from_preset("xverse_7b").fused_qkv
    assert set(PRESETS) >= {"baichuan2_7b", "baichuan2_13b", "baichuan_7b", "xverse_7b", "oppo_experiemental_7b",
                            "tiny"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_hf_config_round_trip(tmp_path, preset):
    config = BaichuanConfig.from_preset(preset)
    (tmp_path / "config.json").write_text(json.dumps(to_hf_config(config)))
    again = BaichuanConfig.from_hf_config(str(tmp_path))
    assert again.num_parameters() == config.num_parameters()
    assert (again.position_encoding, again.norm_head, again.fused_qkv) == \
        (config.position_encoding, config.norm_head, config.fused_qkv)


def test_our_saved_config_reads_back(tmp_path):
    config = BaichuanConfig.from_preset("tiny", position_encoding="alibi", max_position_embeddings=None)
    config.to_json_file(str(tmp_path / "config.json"))
    again = BaichuanConfig.from_hf_config(str(tmp_path))
    assert again.to_dict() == config.to_dict()


RTN = {"quant_method": "rtn", "bits": 4, "group_size": 32}


@pytest.mark.parametrize("override, message", [
    ({"position_encoding": "learned"}, "position_encoding"),
    ({"num_attention_heads": 5}, "divisible"),
    ({"compute_dtype": "int8"}, "compute_dtype"),
    ({"max_position_embeddings": None}, "max_position_embeddings"),
    ({"quantization_config": dict(RTN, bits=8, sym=False)}, "sym': true"),
    ({"quantization_config": dict(RTN, sym=False, scale_method="absmax")}, "scale_method"),
    ({"quantization_config": dict(RTN, sym=False)}, "scale_method"),  # asymmetric directories always say which
    ({"quantization_config": dict(RTN, scale_method="minmax")}, "scale_method"),
])
def test_bad_fields_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        BaichuanConfig.from_preset("tiny", **override)


def test_asymmetric_int4_is_a_config_field():
    """int4 with a minimum per group: quantization_config sym false (as Hugging Face's GPTQ / AWQ configs say it)."""
    assert not BaichuanConfig.from_preset("tiny", quantization_config=dict(RTN, sym=True)).asymmetric
    assert not BaichuanConfig.from_preset("tiny", quantization_config=RTN).asymmetric  # directories before the field
    config = BaichuanConfig.from_preset("tiny", quantization_config=dict(RTN, sym=False, scale_method="minmax"))
    assert config.asymmetric and config.weight_format() == "int4"


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        BaichuanConfig.from_preset("baichuan3")
