"""LoRA adapters in PEFT's layout: file and key names, config fields, the exact W_pack <-> q/k/v mapping both ways,
adapters trained elsewhere (hand-built here as PEFT writes them), merges, and what is refused. Runs without peft;
tools/parity/check_peft_adapter.py checks the same files against the real peft package."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from baichuan2.lora import LORA_A, LORA_B, adapter_params, apply_lora, load_adapter, merge_into_weights, \
    read_adapter, save_adapter
from helpers import REPO

PREFIX = "base_model.model.model.layers"


def tiny(fused=True):
    from baichuan2.configuration_baichuan import BaichuanConfig
    return BaichuanConfig.from_preset("tiny", max_position_embeddings=64, model_max_length=64, fused_qkv=fused)


def model_with_adapter(rank, alpha, targets, fused=True, seed=0):
    """Tiny model with an adapter whose A and B are all random (a fresh B is zero: nothing would be checked)."""
    import mindspore as ms
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    ms.set_seed(seed)
    model = apply_lora(BaichuanForCausalLM(tiny(fused)), rank, alpha, 0.05, targets)
    rng = np.random.default_rng(seed)
    for p in adapter_params(model):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.1))
    return model


def ours(model):
    return {p.name: p.asnumpy() for p in adapter_params(model)}


def deltas(tensors, lora):
    """Our module path -> B A * alpha / r."""
    s = lora["alpha"] / lora["rank"]
    return {n[:-len(LORA_A) - 1]: tensors[n[:-len(LORA_A)] + LORA_B].astype(np.float64) @ a.astype(np.float64) * s
            for n, a in tensors.items() if n.endswith("." + LORA_A)}


def write_foreign(directory, tensors, **config):
    """An adapter as PEFT saves it (no metadata of ours)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    base = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 16, "lora_dropout": 0.1,
            "target_modules": ["W_pack"], "bias": "none", "fan_in_fan_out": False, "use_dora": False}
    (directory / "adapter_config.json").write_text(json.dumps({**base, **config}))


def test_saved_adapter_is_peft_layout_with_w_pack(pynative, tmp_path):
    config = tiny()
    h, layers = config.hidden_size, config.num_hidden_layers
    model = model_with_adapter(4, 8, ["W_pack", "o_proj", "gate_proj"])
    save_adapter(model, str(tmp_path / "adapter_model.safetensors"), base_model_name_or_path="/models/base")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    # our q/k/v each have their own A: packed block-wise, rank 3 x 4; alpha scaled with it (alpha / r unchanged)
    assert {k: cfg[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                "base_model_name_or_path", "bias", "fan_in_fan_out", "use_dora", "use_rslora")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 12, "lora_alpha": 24.0, "lora_dropout": 0.05,
        "target_modules": ["W_pack", "gate_proj", "o_proj"], "base_model_name_or_path": "/models/base",
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "use_rslora": False}
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(f"{PREFIX}.{n}.{block}.{proj}.lora_{ab}.weight" for n in range(layers)
                                   for block, proj in (("self_attn", "W_pack"), ("self_attn", "o_proj"),
                                                       ("mlp", "gate_proj")) for ab in "AB")
    assert saved[f"{PREFIX}.0.self_attn.W_pack.lora_A.weight"].shape == (12, h)
    assert saved[f"{PREFIX}.0.self_attn.W_pack.lora_B.weight"].shape == (3 * h, 12)
    # PEFT's update on W_pack, B A * lora_alpha / r, is exactly q, k and v's updates stacked
    mine = deltas(ours(model), model.lora_config)
    for n in range(layers):
        a, b = (saved[f"{PREFIX}.{n}.self_attn.W_pack.lora_{x}.weight"].astype(np.float64) for x in "AB")
        stacked = np.concatenate([mine[f"model.layers.{n}.self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj")])
        np.testing.assert_allclose(b @ a * cfg["lora_alpha"] / cfg["r"], stacked, rtol=1e-12, atol=1e-12)
        a, b = (saved[f"{PREFIX}.{n}.self_attn.o_proj.lora_{x}.weight"].astype(np.float64) for x in "AB")
        np.testing.assert_allclose(b @ a * cfg["lora_alpha"] / cfg["r"], mine[f"model.layers.{n}.self_attn.o_proj"],
                                   rtol=1e-12, atol=1e-12)
    # and it reads back as exactly what was saved (rank, alpha, targets, matrices)
    tensors, lora = read_adapter(str(tmp_path))
    assert (lora["rank"], lora["alpha"], lora["targets"]) == (4, 8.0, model.lora_config["targets"])
    assert sorted(tensors) == sorted(ours(model))
    for name, array in ours(model).items():
        np.testing.assert_array_equal(tensors[name], array, err_msg=name)


def test_xverse_keeps_separate_q_k_v_names(pynative, tmp_path):
    model = model_with_adapter(2, 4, ["q_proj", "v_proj"], fused=False)
    save_adapter(model, str(tmp_path))
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"]) == (2, 4.0, ["q_proj", "v_proj"])
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert all(".W_pack." not in name for name in saved)
    for name, array in ours(model).items():  # same matrices, PEFT names
        module, ab = name[:-len(LORA_A) - 1], "A" if name.endswith(LORA_A) else "B"
        np.testing.assert_array_equal(saved[f"base_model.model.{module}.lora_{ab}.weight"], array)


def foreign_w_pack_adapter(config, rank=2):
    """A W_pack adapter as PEFT / LLaMA-Factory train it on Baichuan: one A [r, h], one B [3h, r] per layer."""
    rng = np.random.default_rng(7)
    h = config.hidden_size
    tensors = {}
    for n in range(config.num_hidden_layers):
        tensors[f"{PREFIX}.{n}.self_attn.W_pack.lora_A.weight"] = rng.standard_normal((rank, h)).astype(np.float32)
        tensors[f"{PREFIX}.{n}.self_attn.W_pack.lora_B.weight"] = rng.standard_normal((3 * h, rank)).astype(
            np.float32)
    return tensors


def test_a_peft_w_pack_adapter_loads_exactly_and_round_trips(pynative, tmp_path):
    import mindspore as ms
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    config = tiny()
    h = config.hidden_size
    foreign = foreign_w_pack_adapter(config)
    write_foreign(tmp_path / "peft", foreign)
    tensors, lora = read_adapter(str(tmp_path / "peft"))
    assert (lora["rank"], lora["alpha"], lora["targets"], lora["dropout"]) == (
        2, 16.0, ["q_proj", "k_proj", "v_proj"], 0.1)
    a = foreign[f"{PREFIX}.1.self_attn.W_pack.lora_A.weight"]
    b = foreign[f"{PREFIX}.1.self_attn.W_pack.lora_B.weight"]
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):  # A shared, B split into its row blocks
        np.testing.assert_array_equal(tensors[f"model.layers.1.self_attn.{proj}.{LORA_A}"], a)
        np.testing.assert_array_equal(tensors[f"model.layers.1.self_attn.{proj}.{LORA_B}"], b[i * h:(i + 1) * h])
    # finetune continuation: load_adapter puts the adapters on a plain model, then saves PEFT's own file back
    ms.set_seed(0)
    model = load_adapter(BaichuanForCausalLM(config), str(tmp_path / "peft"))
    assert model.lora_config["rank"] == 2 and model.lora_config["dropout"] == 0.1
    save_adapter(model, str(tmp_path / "back"))
    back = load_file(str(tmp_path / "back" / "adapter_model.safetensors"))
    assert sorted(back) == sorted(foreign)
    for name, array in foreign.items():  # q/k/v still share A: the same rank-2 W_pack, bit for bit
        np.testing.assert_array_equal(back[name], array, err_msg=name)
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["r"] == 2


def test_merge_of_a_peft_adapter_equals_merge_of_ours(pynative, tmp_path):
    config = tiny()
    h = config.hidden_size
    model = model_with_adapter(4, 8, ["W_pack", "down_proj"], seed=3)
    weights = {p.name: p.asnumpy() for p in model.get_parameters() if not p.name.endswith((LORA_A, LORA_B))}
    # the earlier layout (our names, rank/alpha in the metadata) and the PEFT layout of the same adapter
    lora = model.lora_config
    save_file(ours(model), str(tmp_path / "old.safetensors"), metadata={
        "format": "np", "lora_rank": "4", "lora_alpha": "8.0", "lora_targets": json.dumps(lora["targets"])})
    save_adapter(model, str(tmp_path / "peft"))
    old = merge_into_weights(weights, *read_adapter(str(tmp_path / "old.safetensors"))[:2])
    new = merge_into_weights(weights, *read_adapter(str(tmp_path / "peft")))
    assert sorted(old) == sorted(new)
    for name in old:
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)
    assert np.abs(new["model.layers.0.self_attn.k_proj.weight"] - weights["model.layers.0.self_attn.k_proj.weight"]
                  ).max() > 1e-3
    # an adapter trained elsewhere: W_pack += B A * alpha / r, read on the fused matrix
    foreign = foreign_w_pack_adapter(config)
    write_foreign(tmp_path / "foreign", foreign, lora_alpha=6)
    merged = merge_into_weights(weights, *read_adapter(str(tmp_path / "foreign")))
    a = foreign[f"{PREFIX}.0.self_attn.W_pack.lora_A.weight"].astype(np.float64)
    b = foreign[f"{PREFIX}.0.self_attn.W_pack.lora_B.weight"].astype(np.float64)
    w_pack = np.concatenate([weights[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    expected = w_pack + b @ a * 6 / 2
    got = np.concatenate([merged[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got.shape == (3 * h, h)


def test_rank_pattern_and_rslora_keep_every_update(tmp_path):
    rng = np.random.default_rng(1)
    h, i = 8, 12
    tensors = {f"{PREFIX}.0.self_attn.W_pack.lora_A.weight": rng.standard_normal((2, h)).astype(np.float32),
               f"{PREFIX}.0.self_attn.W_pack.lora_B.weight": rng.standard_normal((3 * h, 2)).astype(np.float32),
               f"{PREFIX}.0.mlp.up_proj.lora_A.weight": rng.standard_normal((4, h)).astype(np.float32),
               f"{PREFIX}.0.mlp.up_proj.lora_B.weight": rng.standard_normal((i, 4)).astype(np.float32)}
    write_foreign(tmp_path, tensors, target_modules=["W_pack", "up_proj"], rank_pattern={"up_proj": 4},
                  alpha_pattern={"up_proj": 3}, use_rslora=True)
    got, lora = read_adapter(str(tmp_path))
    assert lora["rank"] == 4 and lora["targets"] == ["q_proj", "k_proj", "v_proj", "up_proj"]
    d = deltas(got, lora)
    a, b = (tensors[f"{PREFIX}.0.mlp.up_proj.lora_{x}.weight"].astype(np.float64) for x in "AB")
    np.testing.assert_allclose(d["model.layers.0.mlp.up_proj"], b @ a * 3 / np.sqrt(4), rtol=1e-6, atol=1e-6)
    a, b = (tensors[f"{PREFIX}.0.self_attn.W_pack.lora_{x}.weight"].astype(np.float64) for x in "AB")
    np.testing.assert_allclose(d["model.layers.0.self_attn.v_proj"], (b @ a)[2 * h:] * 16 / np.sqrt(2), rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("change, tensors_extra, message", [
    ({"use_dora": True}, {}, "use_dora"),
    ({"bias": "lora_only"}, {}, "bias 'lora_only'"),
    ({"modules_to_save": ["lm_head"]}, {}, "modules_to_save"),
    ({"fan_in_fan_out": True}, {}, "fan_in_fan_out"),
    ({"peft_type": "IA3"}, {}, "not LORA"),
    ({}, {"lm_head": (4, 2)}, "lora_A matrix of a projection|cannot be adapted here"),
    ({}, {"model.layers.0.self_attn.q_proj": (16, 2)}, "W_pack and q/k/v separately"),
])
def test_what_cannot_be_expressed_is_refused(tmp_path, change, tensors_extra, message):
    rng = np.random.default_rng(0)
    tensors = {f"{PREFIX}.0.self_attn.W_pack.lora_A.weight": rng.standard_normal((2, 16)).astype(np.float32),
               f"{PREFIX}.0.self_attn.W_pack.lora_B.weight": rng.standard_normal((48, 2)).astype(np.float32)}
    for module, (out, r) in tensors_extra.items():
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ones((r, 16), np.float32)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ones((out, r), np.float32)
    write_foreign(tmp_path, tensors, **change)
    with pytest.raises(ValueError, match=message):
        read_adapter(str(tmp_path))


def test_loaded_adapter_gives_the_saved_models_logits(pynative, tmp_path):
    import mindspore as ms
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    model = model_with_adapter(3, 6, ["W_pack", "up_proj"], seed=5)
    model.set_train(False)
    ids = ms.Tensor(np.random.default_rng(2).integers(3, 900, (1, 12)).astype(np.int32))
    expected = model(ids).asnumpy()
    save_adapter(model, str(tmp_path))
    base = {p.name: p.asnumpy() for p in model.get_parameters() if not p.name.endswith((LORA_A, LORA_B))}
    fresh = BaichuanForCausalLM(tiny())
    for p in fresh.get_parameters():
        p.set_data(ms.Tensor(base[p.name]))
    load_adapter(fresh, str(tmp_path))
    fresh.set_train(False)
    np.testing.assert_array_equal(fresh(ids).asnumpy(), expected)


@pytest.mark.slow
def test_merge_lora_py_merges_a_peft_directory(pynative, tmp_path):
    import mindspore as ms
    from baichuan2.model_dir import write_servable_dir
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    config = tiny()
    ms.set_seed(1)
    write_servable_dir(str(tmp_path / "base"), config, model=BaichuanForCausalLM(config),
                       tokenizer_dir=os.path.join(REPO, "dataset"))
    foreign = foreign_w_pack_adapter(config)
    write_foreign(tmp_path / "peft", foreign, lora_alpha=4)
    merge = os.path.join(REPO, "research", "baichuan2", "merge_lora.py")
    proc = subprocess.run([sys.executable, merge, "--base", str(tmp_path / "base"), "--adapter",
                           str(tmp_path / "peft"), "--output_path", str(tmp_path / "merged")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, merged = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("base", "merged"))
    for n in range(config.num_hidden_layers):
        a = foreign[f"{PREFIX}.{n}.self_attn.W_pack.lora_A.weight"].astype(np.float64)
        b = foreign[f"{PREFIX}.{n}.self_attn.W_pack.lora_B.weight"].astype(np.float64)
        qkv = [f"model.layers.{n}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj")]
        np.testing.assert_allclose(np.concatenate([merged[q] for q in qkv]),
                                   np.concatenate([base[q] for q in qkv]) + b @ a * 4 / 2, rtol=0, atol=1e-6)
    assert np.array_equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    # a PEFT directory whose LoRA cannot be expressed here: one line, exit status 2
    write_foreign(tmp_path / "dora", foreign, use_dora=True)
    proc = subprocess.run([sys.executable, merge, "--base", str(tmp_path / "base"), "--adapter",
                           str(tmp_path / "dora"), "--output_path", str(tmp_path / "x")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "use_dora" in proc.stderr and not (tmp_path / "x").exists()
