"""What CPU can run of the Ascend recipes' numerics: half-precision parameters with float32 AdamW state, and
gradient accumulation, through training/run.py's own builders (GRAPH mode, tiny Baichuan2 model)."""
import copy

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.training import load_recipe
from baichuan2.training.optim import FP32StateAdamW
from baichuan2.training.recipe import DEFAULT_CONFIG
from baichuan2.training.run import RunShape, build_model, build_train_cell
from baichuan2.training.schedule import lr_schedule

SEQ = 16
ROWS = 8
STEPS = 20
# Measured (2026-12, mindspore 2.7.2): the float16-parameter run's loss stays within 0.5% (relative) of the float32
# run's over 20 steps while it falls from 7.45 to 0.07; the bound leaves 4x margin.
LOSS_RTOL = 2e-2


def batches(steps, rows):
    """The same `rows` random token sequences every step (no masked labels: every row has SEQ targets): a smooth
    curve to compare, where a noisy stream would let tiny differences pick different paths."""
    pool = np.random.default_rng(0).integers(10, 1000, size=(rows, SEQ)).astype(np.int32)
    return [Tensor(pool)] * steps


def setup(param_dtype, accum=1, batch=2, moment_dtype="float32", master_weights=True, lr=5e-3, eps=1e-8,
          init=None):
    """(model, train cell) built by run.py's build_model/build_train_cell from the tiny recipe."""
    recipe = copy.deepcopy(load_recipe(DEFAULT_CONFIG))
    recipe["train"].update(lr=lr, min_lr=lr, eps=eps, warmup_ratio=0.0, weight_decay=0.1, grad_clip=1.0,
                           moment_dtype=moment_dtype, master_weights=master_weights)
    config = BaichuanConfig.from_preset("tiny", param_dtype=param_dtype, compute_dtype="float32")
    shape = RunShape(rank=0, world_size=1, device="CPU", config=config, seq_length=SEQ, num_samples=1000,
                     batch=batch, accum=accum, total_steps=STEPS)
    model = build_model(recipe, shape)
    if init is not None:  # the same starting weights for every run, rounded to this run's dtype
        for p in model.get_parameters():
            p.set_data(Tensor(init[p.name]).astype(p.dtype))
    lrs = lr_schedule(STEPS, lr, lr, 0.0)
    return model, build_train_cell(model, recipe["train"], lrs, shape)


def loss_curve(param_dtype, init, **kw):
    model, cell = setup(param_dtype, batch=ROWS, init=init, **kw)
    curve = []
    for ids in batches(STEPS, ROWS):
        loss = cell(ids, ids)[0]
        curve.append(float(loss.asnumpy()))
    return curve, model, cell


@pytest.fixture(scope="module")
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def float32_run(graph_mode):
    model, _ = setup("float32")
    init = {p.name: p.asnumpy() for p in model.get_parameters()}
    curve, _, cell = loss_curve("float32", init)
    return init, curve, cell


def test_float16_parameters_with_float32_state_track_the_float32_run(float32_run):
    init, reference, ref_cell = float32_run
    assert isinstance(ref_cell.optimizer, nn.AdamWeightDecay)  # float32 parameters keep MindSpore's AdamW
    curve, model, cell = loss_curve("float16", init)
    assert isinstance(cell.optimizer, FP32StateAdamW)
    assert all(p.dtype == ms.float16 for p in model.trainable_params())
    state = {p.name: p for p in cell.optimizer.get_parameters()}
    assert all(state[f"{prefix}.{p.name}"].dtype == ms.float32 for p in model.trainable_params()
               for prefix in ("adam_m", "adam_v", "master"))
    assert reference[-1] < reference[0] - 0.5, reference  # the float32 run learns: the comparison is not vacuous
    rel = np.abs(np.array(curve) - np.array(reference)) / np.array(reference)
    assert np.all(np.isfinite(curve)) and rel.max() <= LOSS_RTOL, (rel.max(), curve, reference)


def test_float32_moments_without_master_copy_also_track(float32_run):
    init, reference, _ = float32_run
    curve, _, cell = loss_curve("float16", init, master_weights=False)
    assert "master.lm_head.weight" not in {p.name for p in cell.optimizer.get_parameters()}
    rel = np.abs(np.array(curve) - np.array(reference)) / np.array(reference)
    assert np.all(np.isfinite(curve)) and rel.max() <= LOSS_RTOL, (rel.max(), curve, reference)


def test_fp32_state_adamw_is_adamweightdecay_on_float32_parameters(graph_mode):
    """Same update rule as nn.AdamWeightDecay, groups with their own weight decay included."""
    def run(cls):
        w = ms.Parameter(Tensor(np.linspace(-1, 1, 12).reshape(3, 4).astype(np.float32)), name="w")
        b = ms.Parameter(Tensor(np.ones(4, np.float32)), name="b")
        opt = cls([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                  learning_rate=Tensor(np.array([1e-2, 2e-2, 3e-2], np.float32)), beta1=0.9, beta2=0.95, eps=1e-8)
        for i in range(3):
            opt((Tensor(np.full((3, 4), 0.1 * (i + 1), np.float32)), Tensor(np.full(4, -0.2, np.float32))))
        return w.asnumpy(), b.asnumpy()
    ours, stock = run(FP32StateAdamW), run(nn.AdamWeightDecay)
    np.testing.assert_allclose(ours[0], stock[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[1], stock[1], rtol=1e-6, atol=1e-7)
    assert np.abs(ours[0] - np.linspace(-1, 1, 12).reshape(3, 4)).max() > 1e-3  # it moved


def test_accumulating_two_rows_one_at_a_time_equals_a_batch_of_two(float32_run):
    init = float32_run[0]
    ids = batches(1, 2)[0]
    results = []
    for accum, batch in ((1, 2), (2, 1)):
        model, cell = setup("float32", accum=accum, batch=batch, eps=1e-3, init=init)
        loss, norm, overflow, _ = cell(ids, ids)
        results.append((float(loss.asnumpy()), float(norm.asnumpy()), bool(overflow.asnumpy()),
                        {p.name: p.asnumpy() for p in model.trainable_params()}))
    (loss2, norm2, of2, w2), (loss11, norm11, of11, w11) = results
    assert not of2 and not of11
    assert abs(loss11 - loss2) <= 1e-6 * loss2 and abs(norm11 - norm2) <= 1e-5 * norm2, (loss11, loss2, norm11, norm2)
    # With eps 1e-8 AdamW's first step is lr x sign(g): a gradient within rounding of zero could flip a weight's
    # step. eps 1e-3 makes the step smooth in g, so the weights compare the gradients' directions and sizes.
    for name, w in w2.items():
        np.testing.assert_allclose(w11[name], w, rtol=1e-5, atol=1e-7, err_msg=name)
        assert np.abs(w - init[name]).max() > 0, name  # the step changed every weight


def test_float16_moments_are_why(float32_run):
    """The contrast: MindSpore's AdamWeightDecay on float16 parameters keeps float16 moments (eps 1e-8 is 0 there)
    and the same run turns NaN after its first step."""
    init = float32_run[0]
    curve, _, cell = loss_curve("float16", init, moment_dtype="float16")
    assert isinstance(cell.optimizer, nn.AdamWeightDecay)
    assert np.isfinite(curve[0]) and not np.all(np.isfinite(curve)), curve
