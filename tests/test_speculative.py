"""Prompt-lookup speculative decoding in the engine (engine.lookup_draft, Engine._verify, RowSampler.verify).

Greedy output with speculation is the output without it, token for token, and so are the logprobs of every step
(the pool after a rejection holds only accepted rows: a later step reading a rejected row would change them); the
parity models cover every family (RoPE and ALiBi, the kernel step and the stock-op step), random tiny models the
quantized formats; a tiny random model that repeats itself makes drafts that are accepted. Sampled output follows
the acceptance rule: token frequencies with and without speculation agree. Those runs fix the step costs flat (every
draft pays); DraftPolicy's own tests give it cost tables and acceptances and check the K it chooses.
"""
import numpy as np
import pytest

from baichuan2 import BaichuanForCausalLM
from baichuan2.engine import (DraftPolicy, Engine, Sequence, StepCosts, expected_accepted, lookup_draft,
                              lookup_match)
from baichuan2.random_model import build_random_model
from baichuan2.sampling import GenerationOptions, RowSampler

FAMILIES = ["baichuan2_7b", "baichuan2_13b", "baichuan_7b", "xverse_7b"]
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=97,
            max_position_embeddings=256, model_max_length=256)


def test_lookup_draft_takes_what_followed_the_latest_match():
    assert lookup_match([1, 2, 3, 9, 1, 2, 3], 2) == ([9, 1], 3)  # 3-gram (1, 2, 3) seen at 0
    assert lookup_match([5, 1, 2, 7, 8, 1, 2], 3) == ([7, 8, 1], 2) and lookup_match([1, 2, 3], 4) == ([], 0)
    assert lookup_draft([5, 1, 2, 7, 8, 1, 2], 3) == [7, 8, 1]  # 2-gram; its latest earlier occurrence
    assert lookup_draft([4, 6, 4, 6, 4, 6], 8) == [4, 6]  # n = 3: (6, 4, 6) at 1, followed by 4, 6
    assert lookup_draft([1, 2, 3], 4) == [] and lookup_draft([1, 2, 1], 0) == []


FLAT = StepCosts({1: 1.0}, learn=False)  # a step of any size costs a decode step's: every draft pays


def run(model, prompts, k, mixed=False, costs=FLAT, **extra):
    """(outputs, per-sequence top logprobs of every step, tokens drafted, accepted)."""
    engine = Engine(model, num_blocks=96, block_size=4, max_seqs=4, step_costs=costs)
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


# ---------------------------------------------------------------- the draft policy (how many drafted tokens pay)
def costs(per_row, rows=8):
    """A fixed cost table: a step of n tokens costs 1 + per_row * (n - 1) decode steps."""
    return StepCosts({n: 1.0 + per_row * (n - 1) for n in range(1, rows + 1)}, learn=False)


def sequence(acceptance=None, k=4, ngram=3):
    """A sequence whose drafts come from `ngram`-token matches, accepted with `acceptance` at every position."""
    seq = Sequence(0, [3, 4, 5], GenerationOptions(prompt_lookup_num_tokens=k).validate(), (), 97, 4, 64)
    seq.draft_ngram = ngram
    if acceptance is not None:
        seq.acceptance[ngram] = [acceptance] * k
    return seq


def test_step_costs_average_each_size_and_fill_in_the_others():
    c = StepCosts()
    c.record(1, 5.0)  # a size's first step (its compilation) is not counted
    assert c.cost(1) is None
    c.record(1, 0.010)
    c.record(1, 0.020)
    assert c.cost(1) == pytest.approx(0.011)  # slower: a tenth of the way
    c.record(1, 9.0)  # a stall counts as twice the estimate at most
    assert c.cost(1) == pytest.approx(0.0121)
    c.record(1, 0.0081)
    assert c.cost(1) == pytest.approx(0.0101)  # faster: half way
    for seconds in (1.0, 0.030, 0.030):
        c.record(5, seconds)
    assert c.cost(5) == pytest.approx(0.030)
    assert c.cost(3) == pytest.approx(0.0101 + (0.030 - 0.0101) / 2)  # between two measured sizes: linear
    assert c.cost(9) == pytest.approx(0.030)  # above the largest measured: its cost (so a larger draft is tried)
    assert StepCosts({5: 1.0}).cost(2) is None  # nothing measured at or below
    assert expected_accepted([0.5, 0.5, 0.5], 2) == pytest.approx(0.75) and expected_accepted([0.9], 0) == 0


def test_policy_takes_larger_drafts_when_verifying_is_cheap():
    draft = [7, 8, 9, 10]
    chosen = {per_row: DraftPolicy(costs(per_row)).choose([sequence(0.7)], [draft])[0]
              for per_row in (0.02, 0.2, 0.5, 1.0)}
    # 0.7 a position: 4 tokens pay best at 2 % a row, 3 at 20 %, 1 at 50 %, none when a row costs a whole step
    assert chosen == {0.02: 4, 0.2: 3, 0.5: 1, 1.0: 0}
    assert DraftPolicy(costs(0.02)).choose([sequence(0.7)], [draft[:2]]) == [2]  # at most what the lookup found
    assert DraftPolicy(StepCosts()).choose([sequence(0.9)], [draft]) == [0]  # a plain step's cost not yet known


def test_policy_prices_drafts_by_their_match_length():
    """A sequence whose 1-token matches were rejected and 3-token ones accepted, three times each (acceptance 0.17
    and 0.83 from the prior's 0.5), rows at 30 % of a step: 3 tokens of a 3-token match's draft pay, none of a
    1-token match's."""
    policy, seq = DraftPolicy(costs(0.3)), sequence(0.5)
    for n in (1, 3, 1, 3, 1, 3):
        seq.draft_ngram = n
        policy.learn(seq, 4, 4 if n == 3 else 0)
    seq.draft_ngram = 3
    assert policy.choose([seq], [[7, 8, 9, 10]]) == [3]
    seq.draft_ngram = 1
    assert policy.choose([seq], [[7, 8, 9, 10]]) == [0]
    # what drafts were worth is shared with later sequences (a slower average): they start from it
    assert policy.shared[3][0] > DraftPolicy.PRIOR > policy.shared[1][0] and policy.shared[2][0] == DraftPolicy.PRIOR
    later = sequence()
    policy.start(later)
    assert later.acceptance[3] == policy.shared[3][:4] and later.acceptance[3] is not policy.shared[3]


def test_policy_prices_a_batch_by_its_step_time_curve():
    """Two sequences decoding together: steps of up to 4 rows cost the same, each row more costs a step. The first
    sequence's draft fills the free rows; the second's would cost a whole step: not verified."""
    curve = StepCosts({1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 2.0, 6: 3.0}, learn=False)
    assert DraftPolicy(curve).choose([sequence(0.9), sequence(0.9)], [[5, 6, 7, 8], [5, 6, 7, 8]]) == [2, 0]


def test_policy_stops_drafting_when_drafts_fail_and_starts_again_when_they_are_accepted():
    """A verify row costs half a decode step (a 1-token draft at the prior's 0.5 does not pay). 200 steps whose
    drafts would all be rejected: only 1-token probes, after waits of 8, 16, 32, 64 and 64 steps; then 200 steps
    whose drafts are all accepted: a probe notices, and the draft grows position by position to the full K."""
    policy, seq, draft, history = DraftPolicy(costs(0.5)), sequence(), [7, 8, 9, 10], []
    for agree in [False] * 200 + [True] * 200:
        k = policy.choose([seq], [draft])[0]
        if k:
            policy.learn(seq, k, k if agree else 0)
        history.append(k)
    failing, copying = history[:200], history[200:]
    assert [i for i, k in enumerate(failing) if k] == [7, 23, 55, 119, 183] and max(failing) == 1
    first_probe = copying.index(1)
    assert first_probe < 64  # the wait left from the failing steps
    # an accepted probe brings the wait back to 8; after two, 1 token pays; then a few of each length to K
    assert copying[first_probe:].index(4) <= 30
    assert copying[-100:] == [4] * 100


class FakeClock:
    """Time advances only in the model's step, by a cost table per step size: deterministic step costs."""

    def __init__(self, engine, cost):
        self.now, self.cost, self.forward = 0.0, cost, engine.forward
        engine.forward = self.timed_forward
        engine.clock = self

    def __call__(self):
        return self.now

    def timed_forward(self, plan):
        self.now += self.cost(sum(count for _, count in plan))
        return self.forward(plan)


def test_engine_learns_step_costs_and_drafts_only_what_pays(looping):
    """The engine learns the step costs from its clock: where each verify row costs a decode step (no draft can pay)
    it drafts only a few probes, where rows cost nothing it drafts and fewer steps make the same tokens."""
    prompt = repeating_prompts(TINY["vocab_size"])[0]
    got = {}
    for cost in ("plain", "dear", "free"):
        engine = Engine(looping, num_blocks=64, block_size=4, max_seqs=2)
        FakeClock(engine, (lambda n: float(n)) if cost == "dear" else (lambda n: 1.0))
        seq = engine.add(prompt, GenerationOptions(max_new_tokens=60, eos_token_id=(),
                                                   prompt_lookup_num_tokens=0 if cost == "plain" else 4))
        while engine.has_work():
            engine.step()
        got[cost] = dict(output=seq.output, drafted=engine.draft_tokens, accepted=engine.accepted_tokens,
                         steps=engine.steps)
    assert got["free"]["output"] == got["dear"]["output"] == got["plain"]["output"]
    assert got["free"]["accepted"] > 20 and got["free"]["steps"] < got["plain"]["steps"]
    # dear: 2 steps of K = 4 while 5 tokens' cost is unknown (a size's first step is not counted), then only
    # 1-token probes, 8 or more steps apart
    assert got["dear"]["drafted"] <= 8 + 60 // 8 < got["free"]["drafted"]
