"""The parallel/recompute recipe sections: one clear error per invalid setting, CPU refusals, and recomputation
that changes memory, not numbers (GRAPH mode, tiny Baichuan2 model)."""
import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn, ops

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.training.parallel import (PARALLEL_DEFAULTS, ParallelRecipeError, apply_recompute, parallel_settings,
                                         recompute_settings, validate)

B7 = BaichuanConfig.from_preset("baichuan2_7b")
B13 = BaichuanConfig.from_preset("baichuan2_13b")
PUBLISHED_7B = {"data_parallel": 8, "enable_parallel_optimizer": True}


def test_defaults_are_plain_data_parallel_and_pass_on_cpu():
    p, r = validate(None, None, B7, 1, "CPU")
    assert p == PARALLEL_DEFAULTS and r == {"recompute": False, "select_recompute": False}
    p, _ = validate({"data_parallel": 2}, None, B7, 2, "CPU")
    assert p["data_parallel"] == 2


def test_published_layouts_pass_on_ascend():
    validate(PUBLISHED_7B, {"recompute": False}, B7, 8, "Ascend")
    validate(PUBLISHED_7B, {"recompute": True}, B13, 8, "Ascend")
    two_nodes = dict(PUBLISHED_7B, pipeline_stage=2, micro_batch_num=8)
    p, _ = validate(two_nodes, None, B7, 16, "Ascend")
    assert p["pipeline_stage"] == 2 and p["micro_batch_num"] == 8
    validate({"data_parallel": 2, "model_parallel": 4}, None, B7, 8, "Ascend")


@pytest.mark.parametrize("parallel, recompute, config, devices, target, message", [
    ({"data_parallel": 4}, None, B7, 8, "Ascend",
     "data_parallel 4 x model_parallel 1 x pipeline_stage 1 = 4, but the job has 8 device(s)"),
    ({"data_parallel": 4, "pipeline_stage": 2, "micro_batch_num": 1}, None, B7, 8, "Ascend",
     "micro_batch_num 1 < pipeline_stage 2"),
    ({"data_parallel": 4, "micro_batch_num": 4}, None, B7, 4, "Ascend",
     "micro_batch_num 4 only applies with pipeline_stage > 1"),
    ({"data_parallel": 1, "model_parallel": 3}, None, B7, 3, "Ascend",
     "model_parallel 3 does not divide the model's num_attention_heads 32"),
    ({"data_parallel": 1, "model_parallel": 16}, None, B13, 16, "Ascend",
     "model_parallel 16 does not divide the model's num_attention_heads 40"),
    ({"data_parallel": 1, "model_parallel": 5}, None, B13, 5, "Ascend",
     "model_parallel 5 does not divide the model's intermediate_size 13696"),
    ({"data_parallel": 1, "pipeline_stage": 3, "micro_batch_num": 3}, None, B7, 3, "Ascend",
     "pipeline_stage 3 does not divide the model's 32 layers"),
    ({"data_parallel": 0}, None, B7, 8, "Ascend", "parallel.data_parallel must be >= 1, got 0"),
    ({"data_parallel": "8"}, None, B7, 8, "Ascend", "parallel.data_parallel must be an integer, got '8'"),
    ({"dp": 8}, None, B7, 8, "Ascend", "unknown key parallel.dp"),
    (dict(PUBLISHED_7B, optimizer_level="level4"), None, B7, 8, "Ascend",
     "parallel.optimizer_level must be one of ['level1', 'level2', 'level3'], got 'level4'"),
    (dict(PUBLISHED_7B, gradient_accumulation_shard=True), None, B7, 8, "Ascend",
     "gradient_accumulation_shard: true is MindSpore's old name for optimizer_level level2"),
    (dict(PUBLISHED_7B, parallel_optimizer_threshold=-1), None, B7, 8, "Ascend",
     "parallel_optimizer_threshold is a size in KB, >= 0"),
    ({"enable_parallel_optimizer": True}, None, B7, 1, "Ascend", "data_parallel is 1"),
    (PUBLISHED_7B, {"recompute": "yes"}, B7, 8, "Ascend", "recompute.recompute must be true or false, got 'yes'"),
    (PUBLISHED_7B, {"recompute": True, "select_recompute": True}, B7, 8, "Ascend", "are both true"),
    (PUBLISHED_7B, {"recompute_slice_activation": True}, B7, 8, "Ascend",
     "unknown key recompute.recompute_slice_activation"),
    # CPU: only plain data parallelism compiles
    ({"data_parallel": 1, "model_parallel": 2}, None, B7, 2, "CPU",
     "CPU runs plain data parallelism only; this recipe asks for parallel.model_parallel 2"),
    ({"data_parallel": 1, "pipeline_stage": 2, "micro_batch_num": 2}, None, B7, 2, "CPU",
     "CPU runs plain data parallelism only; this recipe asks for parallel.pipeline_stage 2"),
    ({"data_parallel": 2, "enable_parallel_optimizer": True}, None, B7, 2, "CPU",
     "parallel.enable_parallel_optimizer (MindSpore's optimizer sharding runs on Ascend only)"),
])
def test_each_invalid_setting_has_its_one_line_error(parallel, recompute, config, devices, target, message):
    with pytest.raises(ParallelRecipeError) as err:
        validate(parallel, recompute, config, devices, target)
    text = str(err.value)
    assert message in text and "\n" not in text, text


def test_cpu_refusal_names_everything_cpu_cannot_do():
    with pytest.raises(ParallelRecipeError) as err:
        validate({"data_parallel": 2, "model_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 2,
                  "enable_parallel_optimizer": True}, None, B7, 8, "CPU")
    text = str(err.value)
    assert "model_parallel 2" in text and "pipeline_stage 2" in text and "enable_parallel_optimizer" in text


def test_sections_alone_need_no_model():
    assert parallel_settings({"optimizer_level": "level2", "gradient_accumulation_shard": True})["optimizer_level"] \
        == "level2"
    assert recompute_settings({"select_recompute": True})["select_recompute"] is True


class LossAndGrads(nn.Cell):
    """(loss, gradients of every trainable parameter) in one graph."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model
        self.weights = ms.ParameterTuple(model.trainable_params())
        self.grad = ops.GradOperation(get_by_list=True)

    def construct(self, ids, labels):
        return self.model(ids, labels), self.grad(self.model, self.weights)(ids, labels)


def loss_and_grads(recompute):
    """Loss and gradients of a 2-layer tiny Baichuan2 model (same seed, same weights) with `recompute` applied,
    in GRAPH mode (where MindSpore honours recomputation)."""
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.set_seed(7)
    model = BaichuanForCausalLM(BaichuanConfig.from_preset("tiny"))
    apply_recompute(model, recompute)
    model.set_train(True)
    ids = Tensor(np.random.default_rng(3).integers(5, 1000, size=(2, 17)).astype(np.int32))
    step = LossAndGrads(model)
    loss, grads = step(ids, ids)
    return float(loss.asnumpy()), {p.name: g.asnumpy() for p, g in zip(step.weights, grads)}


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [{"recompute": True}, {"select_recompute": True}])
def test_recompute_keeps_loss_and_gradients(recompute):
    try:
        loss_off, grads_off = loss_and_grads(None)
        loss_on, grads_on = loss_and_grads(recompute)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert abs(loss_on - loss_off) <= 1e-6 * abs(loss_off), (loss_on, loss_off)
    assert grads_on.keys() == grads_off.keys() and len(grads_off) == 2 * 9 + 3
    for name, g in grads_off.items():
        rel = np.abs(grads_on[name] - g).max() / max(np.abs(g).max(), 1e-30)
        assert rel <= 1e-6, (name, rel)
        assert np.abs(g).max() > 0, name  # a gradient that is zero everywhere would make the comparison empty


def test_recompute_marks_the_decoder_layers_or_their_mlp():
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    tiny = BaichuanConfig.from_preset("tiny")
    full = apply_recompute(BaichuanForCausalLM(tiny), {"recompute": True})
    assert all(layer._recompute_cell is not None and layer.mlp._recompute_cell is None for layer in full.model.layers)
    select = apply_recompute(BaichuanForCausalLM(tiny), {"select_recompute": True})
    assert all(layer._recompute_cell is None and layer.mlp._recompute_cell is not None
               for layer in select.model.layers)
    off = apply_recompute(BaichuanForCausalLM(tiny), None)
    assert all(layer._recompute_cell is None for layer in off.model.layers)


def test_ascend_application_sets_the_context_and_stages():
    """Only what apply_ascend_parallel records (context, stage per cell, recompute marks) is checked here: nothing is
    compiled, since CPU refuses semi-auto parallel. The model_parallel strategies need an initialised communication
    group and are not exercised."""
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.training.parallel import apply_ascend_parallel
    config = BaichuanConfig.from_preset("tiny", num_hidden_layers=4)
    model = BaichuanForCausalLM(config)
    try:
        apply_ascend_parallel(model, {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 4,
                                      "enable_parallel_optimizer": True, "optimizer_level": "level2"},
                              {"recompute": True})
        context = {key: ms.get_auto_parallel_context(key) for key in
                   ("parallel_mode", "pipeline_stages", "full_batch", "enable_parallel_optimizer")}
        from mindspore.parallel._auto_parallel_context import auto_parallel_context
        sharded_grads = auto_parallel_context().get_grad_accumulation_shard()  # what level2 turns on
        threshold = auto_parallel_context().get_parallel_optimizer_threshold()
    finally:
        ms.reset_auto_parallel_context()
    assert context == {"parallel_mode": "semi_auto_parallel", "pipeline_stages": 2, "full_batch": True,
                       "enable_parallel_optimizer": True}
    assert sharded_grads is True and threshold == 64
    assert [layer.pipeline_stage for layer in model.model.layers] == [0, 0, 1, 1]
    assert (model.model.embed_tokens.pipeline_stage, model.model.norm.pipeline_stage,
            model.lm_head.pipeline_stage) == (0, 1, 1)
    assert all(layer._recompute_cell is not None for layer in model.model.layers)


def test_ascend_train_network_builds_mindspores_pipeline_pieces(graph):
    """Construction only (CPU cannot compile a pipeline): the MindSpore 2.7 classes the Ascend path names exist and
    take what run.build_train_cell passes them (the optimizer's ParameterTuple)."""
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.training.parallel import ascend_train_network
    model = BaichuanForCausalLM(BaichuanConfig.from_preset("tiny", num_hidden_layers=4))
    weights = nn.AdamWeightDecay(model.trainable_params()).parameters
    assert ascend_train_network(model, {"data_parallel": 8}, weights) == (model, None, 1)
    network, reducer, summed = ascend_train_network(
        model, {"data_parallel": 2, "pipeline_stage": 2, "micro_batch_num": 4}, weights)
    assert (type(network).__name__, network.micro_size, type(reducer).__name__, summed) == (
        "Pipeline", 4, "PipelineGradReducer", 4)
