"""Checkpoints of a sharded (Ascend semi-auto) run, on CPU: MindSpore's gathering save is replaced by a fake that
writes what the gather would (whole arrays, by Parameter name, as safetensors), and the ranks are called one after
another in this process. What is checked: who takes part, who writes, and that the result reads back like an
unsharded run's checkpoint (verify, export, resume). The gather itself is Ascend-only (checkpoint.gather_to_files)."""
import copy
import os

import numpy as np
import pytest

import mindspore as ms

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.modeling_baichuan import BaichuanForCausalLM
from baichuan2.training import load_recipe
from baichuan2.training.checkpoint import (OPTIMIZER_FILE, WEIGHTS_FILE, checkpoint_dirs, checkpoint_root,
                                           export_checkpoint, restore_checkpoint, train_cell_state,
                                           verify_checkpoint, write_outputs_from_checkpoint)
from baichuan2.training.recipe import DEFAULT_CONFIG
from baichuan2.training.run import RunShape, build_model, build_train_cell, checkpoint_saver
from baichuan2.training.schedule import lr_schedule
from baichuan2.weights_io import load_weights_checked
from safetensors.numpy import load_file, save_file

WORLD = 4


def tiny_run(output_dir):
    """(recipe, model, train cell) of a 2-layer tiny model, built by run.py's builders on CPU."""
    recipe = copy.deepcopy(load_recipe(DEFAULT_CONFIG))
    recipe["output"].update(output_dir=str(output_dir), keep_checkpoints=2)
    config = BaichuanConfig.from_preset("tiny", num_hidden_layers=2)
    model = build_model(recipe, shape_of(config, 0, False))
    cell = build_train_cell(model, recipe["train"], lr_schedule(4, 1e-3, 1e-3, 0.0), shape_of(config, 0, False))
    return recipe, model, cell


def shape_of(config, rank, semi_auto, stages=1):
    parallel = {"data_parallel": WORLD // stages, "model_parallel": 1, "pipeline_stage": stages,
                "micro_batch_num": stages} if semi_auto else None
    return RunShape(rank=rank, world_size=WORLD if semi_auto or rank else 1, device="Ascend" if semi_auto else "CPU",
                    config=config, seq_length=16, num_samples=64, batch=1, accum=1, total_steps=4,
                    parallel=parallel, semi_auto=semi_auto)


def stage_of(name):
    """The fake pipeline's split of a 2-layer model: layer 1, the final norm and lm_head on stage 1."""
    return 1 if any(part in name for part in ("layers.1.", "model.norm.", "lm_head.")) else 0


class FakeGather:
    """Stands in for mindspore.save_checkpoint: records each call (with the rank being simulated) and writes the
    whole arrays the gather would; with `stages`, only the simulated rank's stage's parameters (names without a
    stage, such as global_step, in every stage), as pipeline ranks do."""

    def __init__(self, stages=1):
        self.stages, self.rank, self.calls = stages, None, []

    def __call__(self, cell, path, integrated_save=True, format="ckpt", choice_func=None, **_):
        self.calls.append((self.rank, os.path.basename(path), integrated_save, format))
        stage = self.rank // (WORLD // self.stages)
        arrays = {p.name: p.asnumpy() for p in cell.get_parameters() if choice_func(p.name) and (
            self.stages == 1 or "." not in p.name or stage_of(p.name) == stage)}
        save_file(arrays, path, metadata={"format": "ms"})
        os.chmod(path, 0o400)  # as MindSpore leaves its files


def save_on_every_rank(recipe, model, cell, fake, stages=1, order=(3, 2, 1, 0)):
    """Each simulated rank's save of step 2 (rank 0 last: it reads what the stage leaders wrote); returns
    {rank: what save returned}."""
    got = {}
    for rank in order:
        fake.rank = rank
        got[rank] = checkpoint_saver(recipe, shape_of(model.config, rank, True, stages), model, cell)(2)
        if rank:
            assert not checkpoint_dirs(recipe["output"]["output_dir"])  # only rank 0 writes the directory
    return got


def whole(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


@pytest.mark.parametrize("stages", [1, 2])
def test_every_rank_gathers_and_rank_0_writes_a_checkpoint_that_exports(tmp_path, monkeypatch, stages):
    recipe, model, cell = tiny_run(tmp_path / "out")
    fake = FakeGather(stages)
    monkeypatch.setattr(ms, "save_checkpoint", fake)
    got = save_on_every_rank(recipe, model, cell, fake, stages)

    assert sorted({c[0] for c in fake.calls}) == list(range(WORLD)) and len(fake.calls) == 2 * WORLD
    assert all(integrated and fmt == "safetensors" for _, _, integrated, fmt in fake.calls)
    assert [got[r] for r in range(1, WORLD)] == [None] * (WORLD - 1)
    ckpt = got[0]
    assert checkpoint_dirs(recipe["output"]["output_dir"]) == [ckpt]
    assert sorted(os.listdir(checkpoint_root(recipe["output"]["output_dir"]))) == ["step_000002"]  # no temp left
    assert verify_checkpoint(ckpt)["step"] == 2
    saved = load_file(os.path.join(ckpt, WEIGHTS_FILE))
    assert saved.keys() == whole(model).keys()  # with 2 stages: both halves merged
    for name, array in whole(model).items():
        np.testing.assert_array_equal(saved[name], array)
    assert set(load_file(os.path.join(ckpt, OPTIMIZER_FILE))) == set(train_cell_state(cell, model))

    exported = export_checkpoint(ckpt, str(tmp_path / "exported"), None)
    again = load_weights_checked(BaichuanForCausalLM(model.config), os.path.join(exported, WEIGHTS_FILE))
    np.testing.assert_array_equal(whole(again)["lm_head.weight"], whole(model)["lm_head.weight"])

    # resume: the whole tensors load into a fresh (here unsharded) model and train cell
    _, model2, cell2 = tiny_run(tmp_path / "other")
    assert restore_checkpoint(ckpt, model2, cell2)["step"] == 2
    np.testing.assert_array_equal(whole(model2)["model.layers.1.mlp.down_proj.weight"],
                                  whole(model)["model.layers.1.mlp.down_proj.weight"])


def test_final_model_dir_is_copied_from_the_gathered_checkpoint(tmp_path, monkeypatch):
    recipe, model, cell = tiny_run(tmp_path / "out")
    fake = FakeGather()
    monkeypatch.setattr(ms, "save_checkpoint", fake)
    ckpt = save_on_every_rank(recipe, model, cell, fake)[0]
    model_dir = write_outputs_from_checkpoint(str(tmp_path / "out"), ckpt, model.config, None, lora=False)
    assert sorted(n for n in os.listdir(model_dir) if n in ("config.json", WEIGHTS_FILE, OPTIMIZER_FILE)) == [
        "config.json", WEIGHTS_FILE]
    loaded = BaichuanForCausalLM.from_pretrained(model_dir)
    np.testing.assert_array_equal(whole(loaded)["model.embed_tokens.weight"], whole(model)["model.embed_tokens.weight"])


def test_plain_data_parallel_never_gathers(tmp_path, monkeypatch):
    recipe, model, cell = tiny_run(tmp_path / "out")
    fake = FakeGather()
    monkeypatch.setattr(ms, "save_checkpoint", fake)
    assert checkpoint_saver(recipe, shape_of(model.config, 1, False), model, cell)(2) is None
    assert not os.path.exists(checkpoint_root(recipe["output"]["output_dir"]))  # rank 1 touches nothing
    ckpt = checkpoint_saver(recipe, shape_of(model.config, 0, False), model, cell)(2)
    assert fake.calls == []
    verify_checkpoint(ckpt)
    assert load_file(os.path.join(ckpt, WEIGHTS_FILE)).keys() == whole(model).keys()
