"""convert_weight.py: Hugging Face layout <-> ours, shard by shard, with every mismatch named."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from baichuan2 import BaichuanConfig, BaichuanForCausalLM
from baichuan2.configuration_baichuan import to_hf_config
from baichuan2.convert_weight import ConversionError, convert, expected_shapes, main, read_safetensors


def make_hf_checkpoint(path, config, shards=1, seed=0):
    """Random weights in the Hugging Face layout of `config`'s family, written like `save_pretrained` does."""
    rng = np.random.default_rng(seed)
    tensors = {n: rng.standard_normal(s).astype(np.float32) for n, s in expected_shapes(config, True).items()}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(to_hf_config(config)))
    names = list(tensors)
    groups = [names[i::shards] for i in range(shards)]
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
    else:
        weight_map = {}
        for k, group in enumerate(groups, start=1):
            file = f"model-{k:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in group}, str(path / file))
            weight_map.update({n: file for n in group})
        (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return tensors


@pytest.fixture(params=["tiny", "xverse"])
def tiny_config(request):
    if request.param == "xverse":
        return BaichuanConfig.from_preset("tiny", fused_qkv=False, norm_head=False, chat_format="xverse",
                                          bos_token_id=2, eos_token_id=3, pad_token_id=1)
    return BaichuanConfig.from_preset("tiny")


def test_round_trip_is_bit_exact(tmp_path, tiny_config):
    original = make_hf_checkpoint(tmp_path / "hf", tiny_config, shards=2)
    convert(str(tmp_path / "hf"), str(tmp_path / "ms"), show_progress=False)
    convert(str(tmp_path / "ms"), str(tmp_path / "hf2"), reverse=True, show_progress=False)
    back = {}
    for file in sorted((tmp_path / "hf2").glob("*.safetensors")):
        back.update(load_file(str(file)))
    assert sorted(back) == sorted(original)
    for name, array in original.items():
        assert back[name].dtype == array.dtype and np.array_equal(back[name], array), name
    assert json.loads((tmp_path / "hf2" / "config.json").read_text()) == to_hf_config(tiny_config)


def test_role_tokens_come_from_generation_config(tmp_path):
    config = BaichuanConfig.from_preset("tiny")
    make_hf_checkpoint(tmp_path / "hf", config)
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"user_token_id": 3, "assistant_token_id": 4}))
    convert(str(tmp_path / "hf"), str(tmp_path / "ms"), show_progress=False)
    read_back = BaichuanConfig.from_hf_config(str(tmp_path / "ms"))
    assert (read_back.user_token_id, read_back.assistant_token_id) == (3, 4)
    convert(str(tmp_path / "ms"), str(tmp_path / "hf2"), reverse=True, show_progress=False)
    assert json.loads((tmp_path / "hf2" / "generation_config.json").read_text())["user_token_id"] == 3


def test_w_pack_is_split_into_q_k_v_and_loads_into_the_model(tmp_path):
    config = BaichuanConfig.from_preset("tiny")
    original = make_hf_checkpoint(tmp_path / "hf", config)
    convert(str(tmp_path / "hf"), str(tmp_path / "ms"), show_progress=False, variant="chat")
    ours = load_file(str(tmp_path / "ms" / "model.safetensors"))
    h = config.hidden_size
    packed = original["model.layers.1.self_attn.W_pack.weight"]
    for j, x in enumerate("qkv"):
        assert np.array_equal(ours[f"model.layers.1.self_attn.{x}_proj.weight"], packed[j * h:(j + 1) * h])
    assert "model.layers.1.self_attn.W_pack.weight" not in ours
    model = BaichuanForCausalLM(config).load_weights(str(tmp_path / "ms"))
    assert np.array_equal(model.model.layers[1].self_attn.k_proj.weight.asnumpy(), packed[h:2 * h])
    read_back = BaichuanConfig.from_hf_config(str(tmp_path / "ms"))
    assert read_back.num_parameters() == config.num_parameters()
    assert (read_back.family, read_back.user_token_id) == ("baichuan2_7b", 195)  # no tokenizer: family defaults


def test_every_mismatch_is_named_and_nothing_is_written(tmp_path):
    config = BaichuanConfig.from_preset("tiny")
    tensors = make_hf_checkpoint(tmp_path / "hf", config)
    del tensors["model.layers.0.mlp.up_proj.weight"]
    tensors["model.layers.1.self_attn.W_pack.weight"] = np.zeros((3 * 64, 32), np.float32)
    tensors["model.layers.9.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConversionError) as err:
        convert(str(tmp_path / "hf"), str(tmp_path / "ms"), show_progress=False)
    text = str(err.value)
    assert "missing tensor model.layers.0.mlp.up_proj.weight (176, 64)" in text
    assert "mis-shaped tensor model.layers.1.self_attn.W_pack.weight: expected (192, 64), found (192, 32)" in text
    assert "unexpected tensor model.layers.9.extra.weight" in text
    assert not (tmp_path / "ms").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left either


def test_existing_output_needs_overwrite(tmp_path, capsys):
    make_hf_checkpoint(tmp_path / "hf", BaichuanConfig.from_preset("tiny"))
    (tmp_path / "ms").mkdir()
    (tmp_path / "ms" / "keep.txt").write_text("mine")
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ms")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "ms" / "keep.txt").read_text() == "mine"
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ms"), "--overwrite"]) == 0
    assert not (tmp_path / "ms" / "keep.txt").exists()


def test_reversed_is_an_alias_of_reverse(tmp_path):
    make_hf_checkpoint(tmp_path / "hf", BaichuanConfig.from_preset("tiny"))
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ms")]) == 0
    assert main(["--reversed", "--input_path", str(tmp_path / "ms"), "--output_path", str(tmp_path / "a")]) == 0
    assert main(["--reverse", "--input_path", str(tmp_path / "ms"), "--output_path", str(tmp_path / "b")]) == 0
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert "model.layers.0.self_attn.W_pack.weight" in a  # the Hugging Face layout, not ours
    assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == \
        json.loads((tmp_path / "b" / "config.json").read_text())


def test_missing_weights_and_bin_without_torch_are_explained(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(to_hf_config(BaichuanConfig.from_preset("tiny"))))
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ms")]) == 2
    assert "no weights found" in capsys.readouterr().err
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not a real pickle")
    try:
        import torch  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        pytest.skip("torch is installed here; the message is for machines without it")
    except ImportError:
        pass
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "ms")]) == 2
    assert "torch is not installed" in capsys.readouterr().err
    assert not (tmp_path / "ms").exists()


def test_bfloat16_tensors_are_read_exactly(tmp_path):
    values = np.array([[1.0, -2.5, 3.140625], [0.0078125, 65280.0, -0.5]], np.float32)  # exact in bfloat16
    raw = (values.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, len(raw)]}}).encode()
    (tmp_path / "bf16.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + raw)
    [(name, array)] = list(read_safetensors(str(tmp_path / "bf16.safetensors")))
    assert name == "w" and array.dtype == np.float32 and np.array_equal(array, values)


# ---------------------------------------------------------------------------------------------- Base vs Chat
CHAT_SHIPPED = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 3, "assistant_token_id": 4,
                "max_new_tokens": 2048, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05,
                "do_sample": True}


def _converted(tmp_path, name, generation=None, **kwargs):
    """A tiny Baichuan2 checkpoint directory called `name` (optionally with a generation_config.json), converted;
    returns (our config read back, our generation_config.json)."""
    make_hf_checkpoint(tmp_path / name, BaichuanConfig.from_preset("tiny"))
    if generation is not None:
        (tmp_path / name / "generation_config.json").write_text(json.dumps(generation))
    out = tmp_path / (name + "-ms")
    convert(str(tmp_path / name), str(out), show_progress=False, **kwargs)
    return BaichuanConfig.from_hf_config(str(out)), json.loads((out / "generation_config.json").read_text())


def assert_chat(config, generation):
    assert config.chat_format == "baichuan2" and (config.user_token_id, config.assistant_token_id) == (3, 4)
    assert {k: generation[k] for k in CHAT_SHIPPED} == CHAT_SHIPPED


def assert_base(config, generation):
    from baichuan2.chat import build_chat_input  # pylint: disable=import-outside-toplevel
    assert config.chat_format is None and config.user_token_id is None and config.assistant_token_id is None
    assert generation == {"do_sample": False, "max_new_tokens": 512, "bos_token_id": 1, "eos_token_id": 2,
                          "pad_token_id": 0}
    with pytest.raises(ValueError, match="has no chat format"):  # chat.py refuses a base model
        build_chat_input(config, lambda text: [5], [{"role": "user", "content": "hi"}])


def test_auto_variant_chat_from_generation_config(tmp_path):
    assert_chat(*_converted(tmp_path, "Baichuan2-7B", generation=CHAT_SHIPPED))


def test_auto_variant_chat_from_directory_name(tmp_path):
    # role ids from the preset here (no tokenizer, no generation_config.json): 195/196 as the real Chat
    config, generation = _converted(tmp_path, "baichuan2-7b-CHAT")
    assert config.chat_format == "baichuan2" and (generation["user_token_id"], generation["temperature"]) == (195, 0.3)


def test_auto_variant_base_without_either(tmp_path):
    assert_base(*_converted(tmp_path, "Baichuan2-7B-Base"))


def test_explicit_variant_wins(tmp_path):
    assert_base(*_converted(tmp_path, "Baichuan2-7B-Chat", generation=CHAT_SHIPPED, variant="base"))
    config, generation = _converted(tmp_path, "plain", generation={"user_token_id": 3, "assistant_token_id": 4},
                                    variant="chat")
    assert_chat(config, generation)


def test_variant_flag_and_reverse_keeps_the_variant(tmp_path, capsys):
    make_hf_checkpoint(tmp_path / "hf", BaichuanConfig.from_preset("tiny"))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps(CHAT_SHIPPED))
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "base"),
                 "--variant", "base"]) == 0
    assert "baichuan2_7b, base" in capsys.readouterr().out
    assert main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "chat")]) == 0
    assert "baichuan2_7b, chat" in capsys.readouterr().out
    # back to the Hugging Face layout: Chat gets its generation_config.json again, Base none (as Base ships)
    convert(str(tmp_path / "chat"), str(tmp_path / "chat-hf"), reverse=True, show_progress=False)
    shipped = json.loads((tmp_path / "chat-hf" / "generation_config.json").read_text())
    assert {k: shipped[k] for k in CHAT_SHIPPED} == CHAT_SHIPPED
    convert(str(tmp_path / "base"), str(tmp_path / "base-hf"), reverse=True, show_progress=False)
    assert not (tmp_path / "base-hf" / "generation_config.json").exists()
    with pytest.raises(SystemExit):
        main(["--input_path", str(tmp_path / "hf"), "--output_path", str(tmp_path / "x"), "--variant", "big"])


def test_variant_does_not_touch_xverse(tmp_path):
    config = BaichuanConfig.from_preset("tiny", fused_qkv=False, norm_head=False, chat_format="xverse",
                                        bos_token_id=2, eos_token_id=3, pad_token_id=1)
    make_hf_checkpoint(tmp_path / "hf", config)
    convert(str(tmp_path / "hf"), str(tmp_path / "ms"), show_progress=False, variant="base")
    assert BaichuanConfig.from_hf_config(str(tmp_path / "ms")).chat_format == "xverse"


@pytest.mark.parametrize("with_head", [False, True])
def test_tied_embeddings_convert_without_a_lm_head(tmp_path, with_head):
    """A checkpoint with tie_word_embeddings (SmolLM2 and other small Llama models) needs no lm_head: the converter
    writes the embedding as our lm_head (a stored copy is ignored) and the directory says it is untied."""
    config = BaichuanConfig.from_preset("tiny", fused_qkv=False, norm_head=False, chat_format="xverse",
                                        tie_word_embeddings=True)
    original = make_hf_checkpoint(tmp_path / "hf", config)
    if not with_head:
        del original["lm_head.weight"]
        save_file(original, str(tmp_path / "hf" / "model.safetensors"))
    for fmt in ({}, {"quantize": "int8"}):
        out = tmp_path / f"ms{len(fmt)}"
        convert(str(tmp_path / "hf"), str(out), show_progress=False, **fmt)
        ours = load_file(str(out / "model.safetensors"))
        assert not BaichuanConfig.from_hf_config(str(out)).tie_word_embeddings
        if not fmt:
            assert np.array_equal(ours["lm_head.weight"], original["model.embed_tokens.weight"])
        else:
            assert np.array_equal(ours["lm_head.qweight"], ours["model.embed_tokens.qweight"])
        BaichuanForCausalLM.from_pretrained(str(out))
