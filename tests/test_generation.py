"""Generation: the static-cache path against the no-cache path and the transformers reference, batching with left
padding, sampling knobs, prompt cutting, stop ids. GRAPH mode (what users run); the compiled graphs are shared by
every test of a family through one Generator per module."""
import os
import warnings

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from baichuan2 import BaichuanForCausalLM
from baichuan2.generation import Generator, sample_filter
from helpers import PARITY

FAMILIES = {"rope": "baichuan2_7b", "alibi": "baichuan2_13b"}  # RoPE and ALiBi (6 heads: non-power-of-two slopes)


@pytest.fixture(scope="module", autouse=True)
def graph_mode():
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module")
def family_models(parity_model_dir):
    """position encoding -> (Generator over the converted parity checkpoint, reference tensors)."""
    out = {}
    for kind, family in FAMILIES.items():
        model_dir = parity_model_dir(family)
        model = BaichuanForCausalLM.from_pretrained(model_dir)
        out[kind] = (Generator(model), load_file(os.path.join(PARITY, family, "reference.safetensors")))
    return out


def reference_prompts(ref):
    return [ref["greedy_prompt_0"].tolist(), ref["greedy_prompt_1"].tolist()]


def reference_outputs(ref):
    return [ref["greedy_out_0"].tolist(), ref["greedy_out_1"].tolist()]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rope", "alibi"])
def test_cached_greedy_matches_reference_batched_and_alone(family_models, kind):
    gen, ref = family_models[kind]
    expected = reference_outputs(ref)
    # a batch of a 5- and an 11-token prompt: the short one is left-padded
    assert gen.generate(reference_prompts(ref), max_new_tokens=16, eos_token_id=()) == expected
    for prompt, out in zip(reference_prompts(ref), expected):
        assert gen.generate([prompt], max_new_tokens=16, eos_token_id=()) == [out]
    # those engine steps ran the compiled graph directly (mindspore_compat.CompiledCall), all but one per shape
    # and a few shape changes (the batch's two rows decode at the same steps, the padded sizes repeat)
    assert gen.engine.step_cell.graph_call.fast_calls >= 3 * 15 - 10


def test_compiled_call_equals_the_normal_call(family_models):
    """mindspore_compat.CompiledCall gives the cell's own result, runs the graph directly only for the signature
    the last normal call compiled, and goes back to the normal call for another one."""
    from baichuan2.mindspore_compat import CompiledCall  # pylint: disable=import-outside-toplevel
    gen, _ = family_models["rope"]
    model = gen.model
    cell = model.cached_step_cells()[1]
    call = CompiledCall(cell)

    def args(batch, slot):
        k, v = model.empty_caches(batch, 16)
        mask = np.ones((batch, 16), np.int32)
        return (ms.Tensor(np.full((batch, 1), 7, np.int32)), ms.Tensor(mask), ms.Tensor(slot, ms.int32),
                ms.mutable(k), ms.mutable(v))

    def logits(out):
        return (out if cell.in_place else out[0]).asnumpy()

    want = logits(cell(*args(1, 3)))
    assert np.array_equal(logits(call(*args(1, 3))), want) and call.fast_calls == 0  # the first: a normal call
    assert np.array_equal(logits(call(*args(1, 3))), want) and call.fast_calls == 1
    other = logits(call(*args(2, 3)))  # another batch size: a normal call (compiles), then fast again
    assert other.shape[0] == 2 and call.fast_calls == 1
    assert np.array_equal(logits(call(*args(2, 3))), other) and call.fast_calls == 2


@pytest.mark.parametrize("kind", ["rope", "alibi"])
def test_greedy_without_cache_is_identical(family_models, kind):
    gen, ref = family_models[kind]
    assert gen.generate(reference_prompts(ref), max_new_tokens=16, eos_token_id=(), use_cache=False) == \
        reference_outputs(ref)


@pytest.mark.slow
def test_stream_yields_the_generated_tokens_step_by_step(family_models):
    gen, ref = family_models["rope"]
    steps = list(gen.stream(reference_prompts(ref), max_new_tokens=16, eos_token_id=()))
    assert len(steps) == 16
    assert [[s[row] for s in steps] for row in range(2)] == reference_outputs(ref)


@pytest.mark.slow
def test_stop_ids_and_eos_end_a_row_without_being_returned(family_models):
    gen, ref = family_models["rope"]
    out0, out1 = reference_outputs(ref)
    stop = out0[5]
    first = out0.index(stop)
    got = gen.generate(reference_prompts(ref), max_new_tokens=16, eos_token_id=(), stop_token_ids=[stop])
    cut1 = out1.index(stop) if stop in out1 else 16
    assert got == [out0[:first], out1[:cut1]]
    # the same token as eos
    assert gen.generate([reference_prompts(ref)[0]], max_new_tokens=16, eos_token_id=stop) == [out0[:first]]
    # streaming reports the finished row as None while the other goes on
    if cut1 > first:
        steps = list(gen.stream(reference_prompts(ref), max_new_tokens=16, eos_token_id=stop))
        assert steps[first][0] is None and steps[first][1] == out1[first]


@pytest.mark.slow
def test_top_k_1_sampling_equals_greedy(family_models):
    gen, ref = family_models["rope"]
    sampled = gen.generate(reference_prompts(ref), max_new_tokens=8, eos_token_id=(), do_sample=True, top_k=1,
                           temperature=0.7, seed=123)
    assert sampled == [o[:8] for o in reference_outputs(ref)]


def test_sampling_is_reproducible_with_a_seed(family_models):
    gen, ref = family_models["rope"]
    options = dict(max_new_tokens=12, eos_token_id=(), do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    first = gen.generate(reference_prompts(ref), **options)
    assert gen.generate(reference_prompts(ref), **options) == first
    others = [gen.generate(reference_prompts(ref), **dict(options, seed=s)) for s in (8, 9)]
    assert any(o != first for o in others), "different seeds should give different samples at temperature 1.5"


def test_repetition_penalty_changes_greedy_choice(family_models):
    gen, ref = family_models["rope"]
    prompt = reference_prompts(ref)[1]
    plain = gen.generate([prompt], max_new_tokens=16, eos_token_id=())[0]
    assert len(set(plain)) < len(plain), "the fixture's greedy output repeats tokens"
    penalised = gen.generate([prompt], max_new_tokens=16, eos_token_id=(), repetition_penalty=5.0)[0]
    assert penalised != plain
    assert len(set(penalised)) > len(set(plain))


def test_long_prompt_is_cut_from_the_left_with_a_warning(family_models):
    gen, _ = family_models["rope"]  # max_position_embeddings 64
    prompt = [int(t) for t in np.random.default_rng(0).integers(5, 999, size=70)]
    with pytest.warns(UserWarning, match="cut from the left"):
        cut = gen.generate([prompt], max_new_tokens=8, eos_token_id=())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gen.generate([prompt[-56:]], max_new_tokens=8, eos_token_id=()) == cut
    with pytest.raises(ValueError, match="no room"):
        gen.generate([prompt], max_new_tokens=64)


def test_bad_options_are_reported(family_models):
    gen, ref = family_models["rope"]
    with pytest.raises(TypeError, match="unknown generation option"):
        gen.generate(reference_prompts(ref), max_tokens=3)
    with pytest.raises(ValueError, match="top_p"):
        gen.generate(reference_prompts(ref), do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="empty"):
        gen.generate([[]], max_new_tokens=4)


def test_sample_filter_top_k_and_top_p():
    scores = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float64))
    kept = lambda s: np.isfinite(s)[0].tolist()  # noqa: E731
    assert kept(sample_filter(scores, 1.0, 2, 1.0)) == [True, True, False, False]
    # nucleus keeps the smallest prefix reaching top_p, the crossing token included
    assert kept(sample_filter(scores, 1.0, 0, 0.5)) == [True, False, False, False]
    assert kept(sample_filter(scores, 1.0, 0, 0.7)) == [True, True, False, False]
    assert kept(sample_filter(scores, 1.0, 0, 0.9)) == [True, True, True, False]


def decode_after_a_warm_up(family_models):
    """The reference prompts of the alibi model generated once (compiling its graphs), then streamed again:
    (each prompt's 16 new tokens, seconds of the 15 decode steps after the prefill)."""
    import time  # pylint: disable=import-outside-toplevel
    gen, ref = family_models["alibi"]
    prompts = reference_prompts(ref)
    gen.generate(prompts, max_new_tokens=16, eos_token_id=())
    stream = gen.stream(prompts, max_new_tokens=16, eos_token_id=())
    steps = [next(stream)]  # the prefill
    start = time.perf_counter()
    steps += list(stream)
    seconds = time.perf_counter() - start
    return [list(row) for row in zip(*steps)], seconds


@pytest.mark.slow
def test_decode_after_a_warm_up_gives_the_reference_tokens(family_models):
    tokens, _ = decode_after_a_warm_up(family_models)
    assert tokens == reference_outputs(family_models["alibi"][1])


@pytest.mark.slow
@pytest.mark.perf
def test_decode_does_not_recompile_per_token(family_models):
    """After one warm-up run, 15 more tokens of the same shapes must cost milliseconds each (a compilation of the
    decode graph takes seconds, so recompiling per token would blow the 3 s budget many times over)."""
    _, seconds = decode_after_a_warm_up(family_models)
    assert seconds < 3.0
