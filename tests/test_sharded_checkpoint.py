"""Checkpoints of a sharded (Ascend semi-auto) run, on CPU, through MindSpore's own save and merge.

Each simulated rank calls the real mindspore.save_checkpoint (integrated_save=False, what pipeline stages require;
on CPU every parameter is whole, so a rank's file holds whole tensors), and rank 0 merges the files with
mindspore.parallel.merge_pipeline_strategys and transform_checkpoints. The strategy files, which MindSpore writes
when a semi-auto graph compiles (impossible on CPU: "Invalid backend: CPU"), are written here in MindSpore's own
protobuf schema (mindspore.train.node_strategy_pb2) with the layout the recipe implies. A second test slices the
tensors as MindSpore's parallel optimizer does and checks that the merge reassembles them. What only a device run
shows: that MindSpore's real strategy files and slices match these (docs/ASCEND_TRAINING.md)."""
import copy
import dataclasses
import os

import numpy as np
import pytest

import mindspore as ms
from mindspore.train import node_strategy_pb2

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.modeling_baichuan import BaichuanForCausalLM
from baichuan2.training import load_recipe
from baichuan2.training.checkpoint import (OPTIMIZER_FILE, SHARD_FILE, STRATEGY_FILE, WEIGHTS_FILE,
                                           CheckpointDamaged, Sharding, checkpoint_dirs, checkpoint_root,
                                           export_checkpoint, merge_rank_shards, rank_strategy_file,
                                           restore_checkpoint, resume_from_shards, shard_names, train_cell_state,
                                           verify_checkpoint, write_outputs_from_checkpoint)
from baichuan2.training.recipe import DEFAULT_CONFIG, FinetuneError
from baichuan2.training.run import RunShape, build_model, build_train_cell, checkpoint_saver, restore
from baichuan2.training.schedule import lr_schedule
from baichuan2.weights_io import load_weights_checked
from safetensors.numpy import load_file

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
    """The pipeline split of a 2-layer model: layer 1, the final norm and lm_head on stage 1."""
    return 1 if any(part in name for part in ("layers.1.", "model.norm.", "lm_head.")) else 0


def write_strategy(path, stage, shapes, data_parallel, opt_shard=False):
    """A rank's strategy file as MindSpore writes it (ParallelStrategyMap protobuf): every parameter of `shapes`
    ({name: shape}) replicated over the stage's data_parallel devices (tensor_map -1: no model-parallel split),
    with opt_shard: split on its first axis over them as the parallel optimizer does (opt_weight_shard_size)."""
    strategy = node_strategy_pb2.ParallelStrategyMap()
    strategy.current_stage = stage
    item = strategy.parallel_strategy_item.add()
    item.node_name = "MatMul-op0"
    item.parallel_strategys.stage = stage
    for name, shape in shapes.items():
        layout = strategy.parallel_layout_item.add()
        layout.param_name = name
        layouts = layout.parallel_layouts
        layouts.dev_matrix.add().dim.extend([data_parallel])
        layouts.tensor_map.add().dim.extend([-1] * len(shape))
        layouts.param_split_shape.add()
        layouts.indices_offset.add()
        layouts.field = 0
        sliced = opt_shard and len(shape) > 1 and shape[0] % data_parallel == 0
        layouts.opt_weight_shard_step = 1 if sliced else 0
        layouts.opt_weight_shard_size = data_parallel if sliced else 0
    with open(path, "wb") as f:
        f.write(strategy.SerializeToString())


def write_rank_strategies(output_dir, model, cell, stages, opt_shard=False):
    """What compiling a stages-way pipeline writes: each rank its stage's layouts (the stage leaders suffice)."""
    names = shard_names(model, cell)
    shapes = {p.name: tuple(p.shape) for p in cell.get_parameters() if p.name in names and "." in p.name}
    per_stage = WORLD // stages
    os.makedirs(os.path.dirname(rank_strategy_file(output_dir, 0)), exist_ok=True)
    for rank in range(WORLD):
        stage = rank // per_stage
        mine = {n: s for n, s in shapes.items() if stages == 1 or stage_of(n) == stage}
        write_strategy(rank_strategy_file(output_dir, rank), stage, mine, per_stage, opt_shard)


class SaveSpy:
    """Records each call of mindspore.save_checkpoint (with the simulated rank) and then makes the real call."""

    def __init__(self, real):
        self.real, self.rank, self.calls = real, None, []

    def __call__(self, cell, path, *args, **kwargs):
        self.calls.append((self.rank, os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.dirname(path)))),
                           kwargs.get("integrated_save", True), kwargs.get("format")))
        return self.real(cell, path, *args, **kwargs)


def save_on_every_rank(recipe, model, cell, spy, stages=1, order=(3, 2, 1, 0)):
    """Each simulated rank's save of step 2 (rank 0 last: it merges what every rank wrote); returns
    {rank: what save returned}."""
    got = {}
    for rank in order:
        spy.rank = rank
        got[rank] = checkpoint_saver(recipe, shape_of(model.config, rank, True, stages), model, cell)(2)
        if rank:
            assert not checkpoint_dirs(recipe["output"]["output_dir"])  # only rank 0 writes the directory
    return got


def whole(model):
    return {p.name: p.asnumpy() for p in model.get_parameters()}


@pytest.mark.parametrize("stages", [1, 2])
def test_every_rank_saves_its_shard_and_rank_0_merges_them_into_a_checkpoint_that_exports(tmp_path, monkeypatch,
                                                                                           stages):
    recipe, model, cell = tiny_run(tmp_path / "out")
    output_dir = recipe["output"]["output_dir"]
    write_rank_strategies(output_dir, model, cell, stages)
    spy = SaveSpy(ms.save_checkpoint)
    monkeypatch.setattr(ms, "save_checkpoint", spy)
    got = save_on_every_rank(recipe, model, cell, spy, stages)

    # MindSpore's real per-rank save, never the integrated one (pipeline stages refuse it)
    assert [(r, p) for r, p, _, _ in spy.calls] == [
        (r, os.path.join(".tmp_shards_step_000002", f"rank_{r}", SHARD_FILE)) for r in (3, 2, 1, 0)]
    assert all(integrated is False and fmt == "safetensors" for _, _, integrated, fmt in spy.calls)
    assert [got[r] for r in range(1, WORLD)] == [None] * (WORLD - 1)
    ckpt = got[0]
    assert checkpoint_dirs(output_dir) == [ckpt]
    assert sorted(os.listdir(checkpoint_root(output_dir))) == ["step_000002"]  # shards merged and removed
    assert verify_checkpoint(ckpt)["step"] == 2
    merged_strategy = ms.parallel.build_searched_strategy(os.path.join(ckpt, STRATEGY_FILE))
    prefix = "1-" if stages == 2 else ""  # merge_pipeline_strategys prefixes a stage's names with the stage
    assert f"{prefix}lm_head.weight" in merged_strategy
    saved = load_file(os.path.join(ckpt, WEIGHTS_FILE))
    assert saved.keys() == whole(model).keys()
    for name, array in whole(model).items():
        np.testing.assert_array_equal(saved[name], array)
    optimizer = load_file(os.path.join(ckpt, OPTIMIZER_FILE))
    assert set(optimizer) == set(train_cell_state(cell, model))
    np.testing.assert_array_equal(optimizer["adam_m.lm_head.weight"],
                                  train_cell_state(cell, model)["adam_m.lm_head.weight"].asnumpy())

    exported = export_checkpoint(ckpt, str(tmp_path / "exported"), None)
    again = load_weights_checked(BaichuanForCausalLM(model.config), os.path.join(exported, WEIGHTS_FILE))
    np.testing.assert_array_equal(whole(again)["lm_head.weight"], whole(model)["lm_head.weight"])

    # resume: the merged tensors load into a fresh (here unsharded) model and train cell
    _, model2, cell2 = tiny_run(tmp_path / "other")
    assert restore_checkpoint(ckpt, model2, cell2)["step"] == 2
    np.testing.assert_array_equal(whole(model2)["model.layers.1.mlp.down_proj.weight"],
                                  whole(model)["model.layers.1.mlp.down_proj.weight"])


def test_merge_reassembles_parallel_optimizer_slices_of_a_pipeline(tmp_path):
    """2 stages x dp 2, parallel optimizer: each rank holds half (first axis) of each of its stage's matrices. The
    shards are cut here as MindSpore's optimizer sharding cuts them and saved with mindspore.save_checkpoint; the
    merge must give back the whole tensors."""
    recipe, model, cell = tiny_run(tmp_path / "out")
    output_dir = recipe["output"]["output_dir"]
    write_rank_strategies(output_dir, model, cell, stages=2, opt_shard=True)
    names = shard_names(model, cell)
    params = {p.name: p.asnumpy() for p in cell.get_parameters() if p.name in names}
    shards = str(tmp_path / "shards")
    for rank in range(WORLD):
        stage, index = divmod(rank, 2)
        tensors = []
        for name, array in params.items():
            if "." in name and stage_of(name) != stage:
                continue
            if "." in name and array.ndim > 1:
                array = np.split(array, 2)[index]
            tensors.append({"name": name, "data": ms.Tensor(array)})
        os.makedirs(os.path.join(shards, f"rank_{rank}"))
        ms.save_checkpoint(tensors, os.path.join(shards, f"rank_{rank}", SHARD_FILE), format="safetensors")
    target = tmp_path / "ckpt"
    target.mkdir()
    merge_rank_shards(model, cell, shards, output_dir, Sharding.of_run(0, WORLD, 2), str(target))
    saved = load_file(str(target / WEIGHTS_FILE))
    for name, array in whole(model).items():
        np.testing.assert_array_equal(saved[name], array)
    optimizer = load_file(str(target / OPTIMIZER_FILE))
    np.testing.assert_array_equal(optimizer["adam_v.model.embed_tokens.weight"],
                                  params["adam_v.model.embed_tokens.weight"])


def test_a_missing_strategy_file_is_one_line_naming_it(tmp_path, monkeypatch):
    recipe, model, cell = tiny_run(tmp_path / "out")
    output_dir = recipe["output"]["output_dir"]
    write_rank_strategies(output_dir, model, cell, stages=2)
    os.remove(rank_strategy_file(output_dir, 2))  # stage 1's leader never compiled
    monkeypatch.setattr("baichuan2.training.checkpoint.SHARD_TIMEOUT_S", 0)
    with pytest.raises(FinetuneError, match=r"rank_2\.ckpt did not appear within 0 s") as caught:
        save_on_every_rank(recipe, model, cell, SaveSpy(ms.save_checkpoint), stages=2)
    assert "\n" not in str(caught.value)
    assert checkpoint_dirs(output_dir) == []


def test_final_model_dir_is_copied_from_the_merged_checkpoint(tmp_path, monkeypatch):
    recipe, model, cell = tiny_run(tmp_path / "out")
    write_rank_strategies(recipe["output"]["output_dir"], model, cell, stages=1)
    spy = SaveSpy(ms.save_checkpoint)
    monkeypatch.setattr(ms, "save_checkpoint", spy)
    ckpt = save_on_every_rank(recipe, model, cell, spy)[0]
    model_dir = write_outputs_from_checkpoint(str(tmp_path / "out"), ckpt, model.config, None, lora=False)
    assert sorted(n for n in os.listdir(model_dir) if n in ("config.json", WEIGHTS_FILE, OPTIMIZER_FILE,
                                                              STRATEGY_FILE)) == ["config.json", WEIGHTS_FILE]
    loaded = BaichuanForCausalLM.from_pretrained(model_dir)
    np.testing.assert_array_equal(whole(loaded)["model.embed_tokens.weight"], whole(model)["model.embed_tokens.weight"])


def test_plain_data_parallel_never_saves_shards(tmp_path, monkeypatch):
    recipe, model, cell = tiny_run(tmp_path / "out")
    spy = SaveSpy(ms.save_checkpoint)
    monkeypatch.setattr(ms, "save_checkpoint", spy)
    assert checkpoint_saver(recipe, shape_of(model.config, 1, False), model, cell)(2) is None
    assert not os.path.exists(checkpoint_root(recipe["output"]["output_dir"]))  # rank 1 touches nothing
    ckpt = checkpoint_saver(recipe, shape_of(model.config, 0, False), model, cell)(2)
    assert spy.calls == []
    verify_checkpoint(ckpt)
    assert load_file(os.path.join(ckpt, WEIGHTS_FILE)).keys() == whole(model).keys()


def test_resume_with_the_same_layout_loads_each_ranks_own_shard(tmp_path, monkeypatch):
    """The checkpoint keeps every rank's shard with its strategy file and layout; a resume with the same layout
    loads each rank's own shard (MindSpore's sliced-parameter form), without touching the merged files; another
    layout or a changed strategy file falls back to the merged files."""
    recipe, model, cell = tiny_run(tmp_path / "out")
    output_dir = recipe["output"]["output_dir"]
    write_rank_strategies(output_dir, model, cell, stages=2)
    ckpt = save_on_every_rank(recipe, model, cell, SaveSpy(ms.save_checkpoint), stages=2)[0]
    kept = os.path.join(ckpt, "shards")
    assert sorted(os.listdir(kept)) == ["layout.json"] + [f"rank_{r}" for r in range(WORLD)]
    assert sorted(os.listdir(os.path.join(kept, "rank_3"))) == [SHARD_FILE, "strategy.ckpt"]
    verify_checkpoint(ckpt)  # the manifest covers the shards: a damaged one is caught before any rank loads it
    with open(os.path.join(kept, "rank_1", SHARD_FILE), "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointDamaged, match="shards/rank_1/shard.safetensors: is 100 bytes"):
        verify_checkpoint(ckpt)
    os.remove(os.path.join(kept, "rank_1", SHARD_FILE))
    os.rename(os.path.join(kept, "rank_3", SHARD_FILE), os.path.join(kept, "rank_1", SHARD_FILE))  # whole on CPU

    os.remove(os.path.join(ckpt, WEIGHTS_FILE))  # the shard path must not need the merged files
    fresh = tiny_run(tmp_path / "other")
    shape = dataclasses.replace(shape_of(model.config, 1, True, stages=2), resume_from=ckpt)
    assert restore(shape, fresh[1], fresh[2]) == 2
    for name, array in whole(model).items():
        np.testing.assert_array_equal(whole(fresh[1])[name], array)
        assert fresh[1].parameters_dict()[name].sliced  # MindSpore's compile keeps a sliced parameter as it is
    np.testing.assert_array_equal(train_cell_state(fresh[2], fresh[1])["adam_v.lm_head.weight"].asnumpy(),
                                  train_cell_state(cell, model)["adam_v.lm_head.weight"].asnumpy())

    # another layout (dp 4, no pipeline): the shards do not apply
    other = Sharding.of_run(1, WORLD, 1, {"data_parallel": 4, "model_parallel": 1, "pipeline_stage": 1,
                                          "micro_batch_num": 1})
    assert resume_from_shards(ckpt, fresh[1], fresh[2], other, output_dir) is None
    # this rank's strategy file changed since the save: neither
    write_strategy(rank_strategy_file(output_dir, 1), 0, {"lm_head.weight": (1000, 64)}, 2)
    assert resume_from_shards(ckpt, fresh[1], fresh[2], shape.sharding, output_dir) is None
