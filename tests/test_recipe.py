"""The finetune recipe in process: --set and --seq_length typed by DEFAULTS, one-line errors for malformed recipes and
raw JSON data, the model directory's config.json as the architecture, LoRA continuation from an adapter."""
import argparse
import json
import os

import numpy as np
import pytest

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.training import DEFAULTS, FinetuneError, apply_overrides, load_recipe
from baichuan2.training.monitor import Progress, format_duration
from baichuan2.training.recipe import ADJUSTABLE_FIELDS, apply_set, dataset_hint, model_config
from helpers import REPO, call_script

FINETUNE = os.path.join(REPO, "example", "finetune.py")


@pytest.fixture
def finetune_recipe(monkeypatch):
    """finetune.py's command line run in this process up to the training run, which is stubbed: (exit code, the
    recipe the run would get, stderr)."""
    import baichuan2.training.run as training_run

    def call(*argv):
        recipes = []
        monkeypatch.setattr(training_run, "run", lambda recipe, *args, **kwargs: recipes.append(recipe))
        code, _, err = call_script(FINETUNE, argv)
        return code, (recipes or [None])[-1], err
    return call


def recipe(tmp_path, text="train: {lr: 1.0e-3}\n"):
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return load_recipe(str(path))


def one_line_error(call, *args):
    with pytest.raises(FinetuneError) as exc:
        call(*args)
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------- malformed recipes
@pytest.mark.parametrize("text, where", [("model: baichuan2_7b\n", "section 'model'"),
                                         ("- model\n- data\n", "the recipe"),
                                         ("model: {overrides: 7}\n", "model.overrides")])
def test_a_plain_value_where_a_mapping_belongs_is_one_line(tmp_path, text, where):
    message = one_line_error(recipe, tmp_path, text)
    assert message.startswith(str(tmp_path / "recipe.yaml")) and where in message and "must be a mapping" in message


def test_an_empty_section_is_the_defaults(tmp_path):
    assert recipe(tmp_path, "lora:\ntrain: {epochs: 3}\n")["lora"] == DEFAULTS["lora"]


# ---------------------------------------------------------------------------------------------- --set
def test_set_is_typed_by_the_defaults(tmp_path):
    r = recipe(tmp_path)
    apply_set(r, "train.lr=2e-5")  # yaml would read 2e-5 as a string
    apply_set(r, "train.batch_size=4")
    apply_set(r, "data.shuffle=false")
    apply_set(r, "lora.targets=q_proj,v_proj")
    apply_set(r, "model.preset=7")  # a string key stays a string
    apply_set(r, "train.max_steps=7")  # default None: read as yaml
    apply_set(r, "train.loss_scale={init: 1024, window: 10}")
    apply_set(r, "model.overrides.param_dtype=float16")
    apply_set(r, "model.overrides.max_position_embeddings=null")
    assert r["train"]["lr"] == 2e-5 and isinstance(r["train"]["lr"], float)
    assert r["train"]["batch_size"] == 4 and r["data"]["shuffle"] is False
    assert r["lora"]["targets"] == ["q_proj", "v_proj"] and r["model"]["preset"] == "7"
    assert r["train"]["max_steps"] == 7 and r["train"]["loss_scale"] == {"init": 1024, "window": 10}
    assert r["model"]["overrides"] == {"param_dtype": "float16", "max_position_embeddings": None}
    apply_set(r, "lora.targets=[W_pack]")
    apply_set(r, "train.min_lr=0")  # an integer where a float belongs is fine
    assert r["lora"]["targets"] == ["W_pack"] and r["train"]["min_lr"] == 0.0


def test_set_paths_are_relative_to_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = apply_set(recipe(tmp_path), "model.load_checkpoint=models/base")
    assert r["model"]["load_checkpoint"] == str(tmp_path / "models" / "base")


@pytest.mark.parametrize("item, expected", [
    ("train.batch_size=two", "train.batch_size takes an integer (default 2)"),
    ("train.batch_size=1.5", "takes an integer"),
    ("train.lr=fast", "train.lr takes a number"),
    ("data.shuffle=maybe", "data.shuffle takes true/false"),
    ("train.wieght_decay=0.1", "unknown key train.wieght_decay; valid keys in train: ["),
    ("trian.lr=1", "unknown section 'trian'"),
    ("model.overrides.hidden=64", "unknown key model.overrides.hidden; it must be a BaichuanConfig field"),
    ("model.overrides.hidden_size=big", "takes an integer"),
    ("train.lr", "expected section.key=value"),
    ("lr=1", "expected section.key=value"),
])
def test_set_errors_name_the_key_and_what_it_takes(tmp_path, item, expected):
    message = one_line_error(apply_set, recipe(tmp_path), item)
    assert message.startswith(f"--set {item}") and expected in message


def test_command_line_seq_length_set_and_load_adapter(tmp_path, monkeypatch, finetune_recipe):
    monkeypatch.chdir(tmp_path)
    recipe(tmp_path)
    code, r, err = finetune_recipe("--config", tmp_path / "recipe.yaml", "--seq_length", "512", "--set",
                                   "train.warmup_ratio=0.03", "--set", "train.lr=1e-4", "--lr", "5e-4",
                                   "--load_adapter", "adapter")
    assert code == 0 and r is not None, err
    assert r["data"]["seq_length"] == 512 and r["train"]["warmup_ratio"] == 0.03
    assert r["train"]["lr"] == 1e-4  # --set comes last: it wins over --lr
    assert r["lora"]["load_adapter"] == str(tmp_path / "adapter")
    code, r, err = finetune_recipe("--config", tmp_path / "recipe.yaml", "--set", "data.seq_length=x")
    assert code == 2 and r is None
    assert err.strip().splitlines()[-1].startswith("finetune.py: error: --set data.seq_length=x: "), err


# ---------------------------------------------------------------------------------------------- raw JSON data
@pytest.mark.parametrize("name", ["belle.json", "chat.JSONL"])
def test_json_records_as_train_dataset_point_to_preprocessing(name):
    message = one_line_error(dataset_hint, f"/data/{name}")
    assert name in message and "belle_preprocess.py" in message


def test_a_mindrecord_passes_the_hint():
    assert dataset_hint("/data/rows.mindrecord") is None and dataset_hint(None) is None


# ---------------------------------------------------------------------------------------------- the model's config
@pytest.fixture
def model_dir(tmp_path):
    """A model directory whose architecture differs from the tiny preset (hidden 32, 3 layers)."""
    return write_config(tmp_path / "model", hidden_size=32, num_hidden_layers=3, family="custom")


def write_config(path, **fields):
    """config.json as the model directories (save_pretrained, convert_weight.py) write it."""
    path.mkdir()
    BaichuanConfig.from_preset("tiny", **fields).to_json_file(str(path / "config.json"))
    return path


def model_section(load_checkpoint=None, preset="tiny", **overrides):
    return {"preset": preset, "overrides": overrides, "load_checkpoint": load_checkpoint and str(load_checkpoint)}


def test_the_model_directory_supplies_the_architecture(model_dir):
    config, note = model_config(model_section(model_dir, preset="baichuan2_7b"))
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (32, 3, 1000)
    assert "model.preset 'baichuan2_7b' is not used" in note and str(model_dir / "config.json") in note
    # a preset that agrees with the directory is worth no note
    same = write_config(model_dir.parent / "tiny", family="custom")
    config, note = model_config(model_section(same))
    assert note is None and config.family == "tiny"  # the preset names the model when it describes it
    config, note = model_config(model_section(model_dir, hidden_size=32, num_hidden_layers=3))
    assert note is None and config.family == "tiny"  # overrides included
    config, note = model_config(model_section(same, param_dtype="float16", user_token_id=195), device="Ascend")
    assert note is None and config.family == "tiny"  # fields that may differ do not change what the model is


def test_overrides_over_a_model_directory_set_only_what_may_differ(model_dir):
    section = model_section(model_dir, compute_dtype="bfloat16", param_dtype="float16", model_max_length=32,
                            hidden_size=32)  # a shape equal to the directory's is no contradiction
    config, note = model_config(section, device="Ascend")
    assert (config.compute_dtype, config.param_dtype, config.model_max_length) == ("bfloat16", "float16", 32)
    assert "compute_dtype" not in note  # Ascend computes in bfloat16 (the note is about the unused preset)
    config, note = model_config(section, device="CPU")  # no half-precision MatMul on CPU
    assert config.compute_dtype == "float32" and config.param_dtype == "float16"
    assert "compute_dtype bfloat16 has no CPU kernels" in note
    assert {"compute_dtype", "param_dtype", "model_max_length"} <= set(ADJUSTABLE_FIELDS)


def test_a_contradicting_shape_is_one_clear_error(model_dir):
    message = one_line_error(model_config, model_section(model_dir, hidden_size=64, num_hidden_layers=3,
                                                         rope_theta=500000.0))
    assert "hidden_size: 64 (config.json: 32)" in message and "rope_theta: 500000.0 (config.json: 10000.0)" in message
    assert "num_hidden_layers" not in message.split("Remove")[0]  # equal values are not listed
    assert str(model_dir / "config.json") in message and "compute_dtype" in message


def test_without_a_model_directory_the_preset_applies(model_dir, tmp_path):
    assert model_config(model_section(None, hidden_size=128))[0].hidden_size == 128
    weights = tmp_path / "weights.safetensors"  # a bare weights file has no config: the preset's shape
    weights.write_bytes(b"")
    assert model_config(model_section(weights))[0].hidden_size == 64
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "cannot read" in one_line_error(model_config, model_section(broken))


# ---------------------------------------------------------------------------------------------- progress
def test_progress_percent_epoch_and_eta():
    progress = Progress(total_steps=10, steps_per_epoch=4)
    progress.update(1, 100.0)  # the first step (with compilation) is not a pace
    assert progress.describe(1) == "10% epoch 1/3 ETA --"
    progress.update(3, 104.0)  # 2 s a step after the first
    assert progress.eta_seconds(3) == pytest.approx(14.0)
    assert progress.describe(3) == "30% epoch 1/3 ETA 0:00:14"
    progress.update(5, 108.0)
    assert progress.describe(5) == "50% epoch 2/3 ETA 0:00:10"
    progress.update(10, 118.0)
    assert progress.describe(10) == "100% epoch 3/3 ETA 0:00:00"
    assert Progress(total_steps=3).describe(1) == "33% ETA --"  # no epoch without its length
    assert format_duration(27 * 3600 + 61.4) == "27:01:01"


# ---------------------------------------------------------------------------------------------- LoRA continuation
def write_rows(path, rows, seq):
    from mindspore.mindrecord import FileWriter  # pylint: disable=import-outside-toplevel
    writer = FileWriter(str(path), shard_num=1, overwrite=True)
    writer.add_schema({c: {"type": "int32", "shape": [-1]} for c in ("input_ids", "labels")}, "rows")
    ids = (np.arange(seq + 1) % 990 + 10).astype(np.int32)
    writer.write_raw_data([{"input_ids": ids, "labels": ids} for _ in range(rows)])
    writer.commit()
    return str(path)


def test_lora_continues_an_adapter_and_names_its_base(tmp_path, pynative):
    # pylint: disable=import-outside-toplevel
    import mindspore as ms
    from baichuan2.lora import adapter_params, apply_lora, save_adapter
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.training.run import build_model, validate
    base_dir = tmp_path / "base"
    BaichuanForCausalLM(BaichuanConfig.from_preset("tiny", hidden_size=32)).save_pretrained(str(base_dir))
    trained = BaichuanForCausalLM.from_pretrained(str(base_dir), backend="composed")
    apply_lora(trained, rank=2, alpha=8, targets=["q_proj", "v_proj"])
    rng = np.random.default_rng(0)
    for p in adapter_params(trained):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32)))
    save_adapter(trained, str(tmp_path / "adapter"), base_model_name_or_path="somewhere/else")
    expected = {p.name: p.asnumpy() for p in adapter_params(trained)}

    r = recipe(tmp_path, "train: {batch_size: 1, max_steps: 1}\ndata: {seq_length: 16}\n")
    for item in (f"model.load_checkpoint={base_dir}", f"lora.load_adapter={tmp_path / 'adapter'}",
                 f"data.train_dataset={write_rows(tmp_path / 'rows.mindrecord', 2, 16)}",
                 f"output.output_dir={tmp_path / 'out'}", "lora.dropout=0.1"):
        apply_set(r, item)
    shape = validate(r, 0, 1, "CPU", False)
    assert shape.lora_rank == 2 and shape.config.hidden_size == 32  # rank and architecture from what was given
    assert r["lora"]["alpha"] == 8 and r["lora"]["targets"] == ["q_proj", "v_proj"]
    model = build_model(r, shape)
    got = {p.name: p.asnumpy() for p in adapter_params(model)}
    assert sorted(got) == sorted(expected) and all(np.array_equal(got[n], expected[n]) for n in got)
    assert model.lora_config["dropout"] == 0.1  # a training setting: the recipe's
    save_adapter(model, str(tmp_path / "continued"))
    config = json.loads((tmp_path / "continued" / "adapter_config.json").read_text())
    original = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert original["base_model_name_or_path"] == "somewhere/else"
    assert config["base_model_name_or_path"] == str(base_dir)  # the base it was trained on now
    assert {k: config[k] for k in ("r", "lora_alpha", "target_modules")} == \
        {k: original[k] for k in ("r", "lora_alpha", "target_modules")}

    apply_set(r, "lora.rank=4")
    message = one_line_error(validate, r, 0, 1, "CPU", False)
    assert "lora.rank 4 contradicts the rank 2" in message and "--lora_rank" in message
    apply_set(r, f"lora.load_adapter={tmp_path / 'missing'}")
    assert one_line_error(validate, r, 0, 1, "CPU", False).startswith(f"--load_adapter {tmp_path / 'missing'}")
    (tmp_path / "not_an_adapter.safetensors").write_bytes(b"garbage")
    apply_set(r, f"lora.load_adapter={tmp_path / 'not_an_adapter.safetensors'}")
    assert one_line_error(validate, r, 0, 1, "CPU", False).startswith("--load_adapter ")


def test_argparse_namespace_without_new_flags_still_works(tmp_path):
    # callers that build their own namespace (older scripts) need not know the new flags
    names = ("train_dataset", "load_checkpoint", "output_dir", "max_steps", "epochs", "lr", "batch_size", "seed",
             "save_steps", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")
    r = apply_overrides(recipe(tmp_path), argparse.Namespace(**dict.fromkeys(names)))
    assert r["data"]["seq_length"] == DEFAULTS["data"]["seq_length"] and r["lora"]["load_adapter"] is None
