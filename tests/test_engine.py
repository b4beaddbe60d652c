"""The generation engine (engine.py) and its block pool (kv_pool.py): continuous batching on a paged cache.

Against independent references where one exists: the parity goldens (transformers' greedy tokens, every family,
RoPE and ALiBi) and a plain uncached forward of the model (log-softmax of its logits). The rest are properties:
joining a running batch changes no greedy output, prefix reuse changes no logit, 300 random requests with
disconnects leave the pool empty, a short request overtakes a long one, a full pool queues.
"""
import numpy as np
import pytest
from mindspore import Tensor

from baichuan2 import BaichuanForCausalLM
from baichuan2.engine import Engine, RequestTooLarge
from baichuan2.kv_pool import BlockPool, PoolExhausted, prefix_hashes
from baichuan2.sampling import GenerationOptions
from helpers import PARITY
from safetensors.numpy import load_file

FAMILIES = ["baichuan2_7b", "baichuan2_13b", "baichuan_7b", "xverse_7b"]


def greedy(max_new_tokens, **extra):
    return GenerationOptions(max_new_tokens=max_new_tokens, eos_token_id=(), **extra)


# ---------------------------------------------------------------------------------------------- the pool
def test_pool_hands_out_reference_counts_and_takes_back():
    pool = BlockPool(5, 4)
    taken = [pool.allocate() for _ in range(4)]
    assert sorted(taken) == [1, 2, 3, 4] and pool.available() == 0  # block 0 is the padding block
    with pytest.raises(PoolExhausted):
        pool.allocate()
    pool.release(taken[:2])
    assert pool.available() == 2
    with pytest.raises(RuntimeError):
        pool.release([taken[0]])  # released twice
    pool.release(taken[2:])
    pool.check_empty()


def test_prefix_blocks_are_shared_and_evicted_oldest_first():
    pool = BlockPool(4, 2)
    hashes = prefix_hashes([1, 2, 3, 4, 5], 2)
    assert len(hashes) == 2 and hashes != prefix_hashes([9, 2, 3, 4], 2)  # chained: the first block counts
    assert prefix_hashes([1, 2, 3, 4], 2)[1] == hashes[1]
    a, b = pool.allocate(), pool.allocate()
    pool.register(a, hashes[0])
    pool.register(b, hashes[1])
    assert pool.active_hits(hashes) == 2
    assert pool.lookup(hashes) == [a, b]  # a second sequence shares both
    pool.release([a, b])
    pool.release([a, b])  # both ended: the blocks keep their prefix, evictable
    assert pool.available() == 3 and pool.active_hits(hashes) == 0
    assert pool.lookup(hashes[:1]) == [a]  # taken back from the eviction queue
    pool.release([a])
    fresh = [pool.allocate() for _ in range(3)]  # the empty block first, then the oldest freed (b's before a's)
    assert fresh[0] not in (a, b) and pool.lookup(hashes) == []
    pool.release(fresh)
    pool.check_empty()


# ---------------------------------------------------------------------------------------------- the engine
@pytest.fixture(scope="module")
def models(parity_model_dir):
    """family -> its parity model on the composed backend (stock ops: the engine's reference step)."""
    return {family: BaichuanForCausalLM.from_pretrained(parity_model_dir(family), backend="composed")
            for family in FAMILIES}


def run_alone(model, prompt, options, **engine_args):
    engine = Engine(model, num_blocks=64, block_size=4, **engine_args)
    return engine.run([prompt], options)[0].output


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_the_reference_alone_and_in_a_running_batch(family, models):
    """transformers' greedy tokens (tools/parity), with the sequences admitted at different steps and small blocks
    and step budgets, so prompts are read in chunks across block boundaries while others decode."""
    model = models[family]
    ref = load_file(f"{PARITY}/{family}/reference.safetensors")
    prompts = [ref["greedy_prompt_0"].tolist(), ref["greedy_prompt_1"].tolist()]
    wanted = [ref["greedy_out_0"].tolist(), ref["greedy_out_1"].tolist()]
    engine = Engine(model, num_blocks=64, block_size=4, max_step_tokens=5, max_seqs=4)
    first = engine.add(prompts[0], greedy(len(wanted[0])))
    for _ in range(3):
        engine.step()
    second = engine.add(prompts[1], greedy(len(wanted[1])))
    third = engine.add(prompts[0], greedy(len(wanted[0])))  # the same prompt again: its full blocks are shared
    while engine.has_work():
        engine.step()
    assert [first.output, second.output, third.output] == [wanted[0], wanted[1], wanted[0]]
    assert third.cached_tokens > 0
    assert run_alone(model, prompts[1], greedy(len(wanted[1]))) == wanted[1]


@pytest.fixture(scope="module")
def stack_models(parity_model_dir):
    """family -> its parity model on the whole-stack kernel backend (the engine's PagedStackLogits op)."""
    return {family: BaichuanForCausalLM.from_pretrained(parity_model_dir(family), backend="cpu-stack")
            for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_pools_match_the_reference_and_half_width_pools_stay_close(family, stack_models):
    """The whole-stack op over a float32 pool gives transformers' greedy tokens in a running batch; bfloat16 and
    int8 pools (a scale per token and head) keep every logprob of the float32 pool's top 5 within a bound set from
    what these models measured."""
    model = stack_models[family]
    ref = load_file(f"{PARITY}/{family}/reference.safetensors")
    prompts = [ref["greedy_prompt_0"].tolist(), ref["greedy_prompt_1"].tolist()]
    wanted = [ref["greedy_out_0"].tolist(), ref["greedy_out_1"].tolist()]
    tops = {}
    for dtype in ("float32", "bfloat16", "int8"):
        engine = Engine(model, num_blocks=64, block_size=4, max_step_tokens=5, max_seqs=4, kv_cache_dtype=dtype)
        first = engine.add(prompts[0], greedy(len(wanted[0]), logprobs=5))
        engine.step()
        second = engine.add(prompts[1], greedy(len(wanted[1]), logprobs=5))
        events = []
        while engine.has_work():
            events += [e for e in engine.step() if e.seq is first and e.top_logprobs]
        if dtype == "float32":
            assert [first.output, second.output] == wanted
        tops[dtype] = events
        engine.pool.check_empty() if not engine.pool.prefix_cache else None
    # measured on the four parity models (2-core EPYC): at most 0.034 (bfloat16) and 0.070 (int8) apart
    for dtype, bound in (("bfloat16", 0.06), ("int8", 0.12)):
        for exact, near in zip(tops["float32"], tops[dtype]):
            exact_values = dict(exact.top_logprobs)
            near_values = dict(near.top_logprobs)
            for token, value in exact_values.items():
                if token in near_values:
                    assert abs(near_values[token] - value) <= bound, (dtype, token)


def test_logprobs_equal_log_softmax_of_the_models_logits(models):
    """Chosen-token and top logprobs of each generated token, and the prompt's (echo), against an uncached forward
    over the whole sequence."""
    model = models["baichuan2_13b"]  # ALiBi
    prompt = [5, 9, 33, 2, 17, 8, 61]
    engine = Engine(model, num_blocks=32, block_size=4, max_step_tokens=3, max_seqs=2)
    seq = engine.add(prompt, greedy(5, logprobs=3), prompt_logprobs=True)
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if e.token is not None]
    full = seq.tokens
    logits = model(Tensor(np.array([full], np.int32))).asnumpy()[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    for i, event in enumerate(events):
        at = len(prompt) - 1 + i
        assert event.logprob == pytest.approx(logp[at, event.token], abs=1e-4)
        assert [t for t, _ in event.top_logprobs][0] == event.token  # greedy: the chosen one is the most likely
        for token, value in event.top_logprobs:
            assert value == pytest.approx(logp[at, token], abs=1e-4)
    assert [t for t, _ in seq.prompt_logprobs] == prompt[1:]
    for i, (token, value) in enumerate(seq.prompt_logprobs):
        assert value == pytest.approx(logp[i, token], abs=1e-4)


def test_prefix_reuse_gives_the_logits_of_no_reuse(models):
    model = models["baichuan2_7b"]
    system = list(range(3, 3 + 13))  # 3 full blocks of 4, and one token more
    prompts = [system + [40, 41, 42], system + [50, 51]]
    options = greedy(6, logprobs=5)
    results = {}
    for prefix_cache in (True, False):
        engine = Engine(model, num_blocks=32, block_size=4, prefix_cache=prefix_cache)
        engine.run([prompts[0]], options)
        seq = engine.add(prompts[1], options)
        tops = []
        while engine.has_work():
            tops += [e.top_logprobs for e in engine.step() if e.top_logprobs]
        results[prefix_cache] = (seq.output, tops, seq.cached_tokens)
    assert results[True][2] == 12 and results[False][2] == 0
    assert results[True][0] == results[False][0]
    for with_reuse, without in zip(results[True][1], results[False][1]):
        assert [t for t, _ in with_reuse] == [t for t, _ in without]
        np.testing.assert_allclose([v for _, v in with_reuse], [v for _, v in without], atol=1e-5)


def test_a_short_request_arriving_during_a_long_one_finishes_first(models):
    model = models["baichuan_7b"]
    engine = Engine(model, num_blocks=64, block_size=4, max_step_tokens=8, max_seqs=4)
    long = engine.add(list(range(3, 33)), greedy(20))
    engine.step()
    short = engine.add([7, 8, 9], greedy(3))
    finished = []
    tokens_each_step = []
    while engine.has_work():
        events = engine.step()
        tokens_each_step.append(sum(1 for e in events if e.seq is short and e.token is not None))
        finished += [e.seq for e in events if e.finished]
    assert finished == [short, long]
    # the short one decodes every step once admitted, while the long prompt is still read in chunks
    assert tokens_each_step[:3] == [1, 1, 1]
    engine.pool.check_empty() if not engine.pool.prefix_cache else None


def test_requests_that_can_never_fit_are_refused_and_a_full_pool_queues(models):
    model = models["xverse_7b"]
    engine = Engine(model, num_blocks=9, block_size=4)  # 8 usable blocks: 32 tokens
    with pytest.raises(RequestTooLarge, match="cache blocks"):
        engine.add([5] * 20, greedy(13))
    with pytest.raises(RequestTooLarge, match="context"):
        engine.add([5] * 10, greedy(model.config.max_context))
    first = engine.add(list(range(3, 23)), greedy(4))   # 24 tokens: 6 blocks
    second = engine.add(list(range(30, 40)), greedy(4))  # 14 tokens: 4 blocks, waits for the first
    engine.step()
    assert engine.running == [first] and engine.waiting == [second]
    while engine.has_work():
        engine.step()
    assert len(first.output) == len(second.output) == 4
    assert second.output == run_alone(model, list(range(30, 40)), greedy(4))


def test_three_hundred_random_requests_with_disconnects_leave_the_pool_empty(stack_models):
    model = stack_models["baichuan2_7b"]  # the kernel step: ~900 steps take seconds, not minutes
    vocab = model.config.vocab_size
    rng = np.random.default_rng(0)
    engine = Engine(model, num_blocks=48, block_size=4, max_step_tokens=16, max_seqs=6)
    shared = list(rng.integers(3, vocab, 9))  # some requests share a prefix (prefix cache hits and evictions)
    live, done, aborted = [], 0, 0
    for number in range(300):
        prompt = list(rng.integers(3, vocab, int(rng.integers(1, 24))))
        if number % 3 == 0:
            prompt = shared + prompt
        options = GenerationOptions(max_new_tokens=int(rng.integers(1, 12)), do_sample=bool(rng.integers(2)),
                                    temperature=float(rng.uniform(0.5, 1.5)), top_k=int(rng.integers(0, 20)),
                                    top_p=float(rng.uniform(0.5, 1.0)), seed=int(rng.integers(1000)),
                                    eos_token_id=int(rng.integers(3, vocab)), presence_penalty=0.5,
                                    repetition_penalty=float(rng.choice([1.0, 1.2])))
        live.append(engine.add(prompt, options))
        for _ in range(int(rng.integers(0, 3))):
            engine.step()
        if rng.random() < 0.1:  # a client goes away: waiting, prefilling or decoding
            victim = live[int(rng.integers(len(live)))]
            aborted += not victim.finished
            engine.abort(victim)
        done += sum(1 for s in live if s.finished)
        live = [s for s in live if not s.finished]
        assert engine.pool.in_use() <= engine.pool.capacity
    while engine.has_work():
        engine.step()
    assert aborted > 10
    for block in range(1, engine.pool.num_blocks):
        assert engine.pool.refs[block] == 0
    engine.pool.check_empty()


def test_rows_with_different_options_share_a_step(models):
    """A sampled row beside a greedy one: the greedy row's tokens are those it gets alone, and the sampled row's
    are those it gets alone with its seed."""
    model = models["baichuan2_7b"]
    sampled = GenerationOptions(max_new_tokens=6, do_sample=True, temperature=0.9, top_k=10, seed=3,
                                eos_token_id=())
    engine = Engine(model, num_blocks=32, block_size=4)
    a = engine.add([5, 6, 7, 8], greedy(6))
    b = engine.add([9, 10, 11], sampled)
    while engine.has_work():
        engine.step()
    assert a.output == run_alone(model, [5, 6, 7, 8], greedy(6))
    assert b.output == run_alone(model, [9, 10, 11], sampled)


def test_paged_step_on_asymmetric_int4_weights():
    """The engine's whole-stack op binds int4 weights with minimums (qweight, scales, mins per projection and the
    lm_head): every generated token's logprobs equal an uncached forward of the same weights on stock ops (the
    composed backend dequantises w = s (q + 8) + mn itself) within what x's int8 rounding moves them (test_backends:
    1e-2 of the largest logit; a missing or misread minimum moves them by O(1))."""
    from baichuan2.random_model import build_random_model  # pylint: disable=import-outside-toplevel
    shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=352, vocab_size=300,
                 max_position_embeddings=128, model_max_length=128)
    fused = build_random_model(shape, "int4_asym", backend="cpu-stack")
    stock = build_random_model(shape, "int4_asym", backend="composed")
    assert fused.paged_stack_op is not None and len(fused.head_weights) == 3
    prompt = [5, 9, 33, 2, 17, 8, 61, 4, 250]
    engine = Engine(fused, num_blocks=16, block_size=4, max_step_tokens=4, max_seqs=2)
    engine.add(prompt, greedy(4, logprobs=5))
    events = []
    while engine.has_work():
        events += [e for e in engine.step() if e.token is not None]
    full = prompt + [e.token for e in events]
    logits = stock(Tensor(np.array([full], np.int32))).asnumpy()[0].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    bound = 1e-2 * np.abs(logits).max()
    for i, event in enumerate(events):
        for token, value in event.top_logprobs:
            assert abs(value - logp[len(prompt) - 1 + i, token]) <= bound, (i, token)
