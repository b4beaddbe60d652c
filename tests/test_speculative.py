"""Prompt-lookup speculative decoding in the engine (engine.lookup_draft, Engine._verify, RowSampler.verify).

Greedy output with speculation is the output without it, token for token, and so are the logprobs of every step
(the pool after a rejection holds only accepted rows: a later step reading a rejected row would change them); the
parity models cover every family (RoPE and ALiBi, the kernel step and the stock-op step), random tiny models the
quantized formats; a tiny random model that repeats itself makes drafts that are accepted. Sampled output follows
the acceptance rule: token frequencies with and without speculation agree.
"""
import numpy as np
import pytest

from baichuan2 import BaichuanForCausalLM
from baichuan2.engine import Engine, lookup_draft
from baichuan2.random_model import build_random_model
from baichuan2.sampling import GenerationOptions, RowSampler

FAMILIES = ["baichuan2_7b", "baichuan2_13b", "baichuan_7b", "xverse_7b"]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=97,
            max_position_embeddings=256, model_max_length=256)


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_draft([1, 2, 3, 9, 1, 2, 3], 2) == [9, 1]  # 3-gram (1, 2, 3) seen at 0
    assert lookup_draft([5, 1, 2, 7, 8, 1, 2], 3) == [7, 8, 1]  # 2-gram; its latest earlier occurrence
    assert lookup_draft([4, 6, 4, 6, 4, 6], 8) == [4, 6]  # n = 3: (6, 4, 6) at 1, followed by 4, 6
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([1, 2, 1], 0) == []


def run(model, prompts, k, mixed=False, **extra):
    """(outputs, per-sequence top logprobs of every step, tokens drafted, accepted)."""
    engine = Engine(model, num_blocks=96, block_size=4, max_seqs=4)
    seqs = [engine.add(p, GenerationOptions(max_new_tokens=14, eos_token_id=(), logprobs=3,
                                            prompt_lookup_num_tokens=0 if mixed and i % 2 else k, **extra))
            for i, p in enumerate(prompts)]
    tops = {s.id: [] for s in seqs}
    while engine.has_work():
        for event in engine.step():
            if event.top_logprobs:
                tops[event.seq.id].append(event.top_logprobs)
    assert all(engine.pool.refs[b] == 0 for b in range(1, engine.pool.num_blocks))
    return [s.output for s in seqs], [tops[s.id] for s in seqs], engine.draft_tokens, engine.accepted_tokens


def assert_same_steps(a, b):
    assert a[0] == b[0]
    for tops_a, tops_b in zip(a[1], b[1]):
        for x, y in zip(tops_a, tops_b):
            assert [t for t, _ in x] == [t for t, _ in y]
            # several rows a step against one: MindSpore's matmuls sum in another order (measured up to 1.2e-4)
            np.testing.assert_allclose([v for _, v in x], [v for _, v in y], atol=3e-4)


def repeating_prompts(vocab, seed=0):
    rng = np.random.default_rng(seed)
    base = list(rng.integers(3, vocab, 9))
    return [base + base[:6], base[3:] * 2, list(rng.integers(3, vocab, 7))]


@pytest.fixture(scope="module")
def looping():
    """A tiny random model (kernel step) whose greedy output falls into short cycles: drafts get accepted."""
    return build_random_model(TINY, "float32", seed=0)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("backend", ["cpu-stack", "composed"])
def test_greedy_with_speculation_is_greedy_without(family, backend, parity_model_dir):
    model = BaichuanForCausalLM.from_pretrained(parity_model_dir(family), backend=backend)
    prompts = repeating_prompts(model.config.vocab_size)
    plain = run(model, prompts, 0)
    for k, mixed in ((1, False), (4, True), (8, False)):
        assert_same_steps(run(model, prompts, k, mixed), plain)


@pytest.mark.parametrize("weights", ["float32", "int8", "int4"])
def test_accepted_drafts_change_nothing_in_every_format(weights, looping):
    model = looping if weights == "float32" else build_random_model(TINY, weights, seed=0)
    prompts = repeating_prompts(TINY["vocab_size"])
    plain = run(model, prompts, 0)
    drafted = accepted = 0
    for k in range(1, 9):
        got = run(model, prompts, k, mixed=k % 3 == 0)
        assert_same_steps(got, plain)
        drafted, accepted = drafted + got[2], accepted + got[3]
    assert accepted > 10  # drafts were accepted
    if weights == "float32":
        assert drafted > accepted  # and rejected: both paths ran


@pytest.mark.parametrize("draft", ["likely", "unlikely", "filtered out"])
def test_sampled_tokens_follow_the_acceptance_rule(draft):
    """One row's token frequencies without speculation (RowSampler.choose) and with a point-mass draft verified
    (RowSampler.verify), 20,000 draws each: the same distribution within a total variation of 0.03 (the sampling
    noise is about 0.006), for a draft the distribution favours, one it rarely picks, one top_k removes."""
    vocab = 24
    logits = np.random.default_rng(7).normal(0, 2, vocab).astype(np.float32)
    order = np.argsort(-logits)
    token = {"likely": order[0], "unlikely": order[6], "filtered out": order[-1]}[draft]
    options = GenerationOptions(do_sample=True, temperature=0.8, top_k=10, top_p=0.95, seed=1)
    plain, speculative = RowSampler(options, [1], vocab), RowSampler(options, [1], vocab)
    draws = 20000
    without = np.bincount([plain.choose(logits, 0)[0] for _ in range(draws)], minlength=vocab)
    verified = [speculative.verify(logits, 0, int(token)) for _ in range(draws)]
    with_draft = np.bincount([t for t, _ in verified], minlength=vocab)
    accepted = sum(ok for _, ok in verified) / draws
    assert 0.5 * np.abs(without - with_draft).sum() / draws <= 0.03
    assert abs(accepted - without[token] / draws) <= 0.02  # a draft is accepted with its own probability


def test_model_generate_takes_prompt_lookup_and_refuses_unknown_arguments(looping):
    """The pipeline's entry (model.generate): transformers' prompt_lookup_num_tokens gives the same greedy ids; a
    misspelt argument is an error naming it, never ignored."""
    prompt = [repeating_prompts(TINY["vocab_size"])[0]]
    plain = looping.generate(prompt, max_new_tokens=12, do_sample=False)
    assert looping.generate(prompt, max_new_tokens=12, do_sample=False, prompt_lookup_num_tokens=4) == plain
    with pytest.raises(TypeError, match="prompt_lookup_num_token"):
        looping.generate(prompt, max_new_tokens=12, prompt_lookup_num_token=4)


def test_command_lines_take_speculative_ngram(parity_model_dir):
    """inference.py --speculative ngram --num_speculative_tokens K prints what it prints without."""
    from helpers import REPO, call_script  # pylint: disable=import-outside-toplevel
    script = f"{REPO}/example/inference.py"
    args = ["--model_dir", parity_model_dir("baichuan2_7b"), "--prompt", "one two one two one", "--greedy",
            "--max_new_tokens", "8", "--mode", "pynative"]
    code, plain, err = call_script(script, args)
    assert code == 0, err
    code, speculative, err = call_script(script, args + ["--speculative", "ngram", "--num_speculative_tokens", "3"])
    assert code == 0, err
    assert speculative == plain and plain.strip()
