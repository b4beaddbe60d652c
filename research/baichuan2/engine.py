"""The generation engine: iteration-level scheduling (continuous batching) over a paged key/value cache.

    engine = Engine(model, num_blocks=64)
    seq = engine.add([5, 6, 7], GenerationOptions(max_new_tokens=16))
    while engine.has_work():
        for event in engine.step(): ...        # StepEvent: a sequence's new token, or its end
    seq.output                                 # the new ids (eos / stop ids excluded)

Every step runs the model once over the tokens of all running sequences: one new token for each sequence that is
decoding, and a chunk of the prompt (at most `max_step_tokens` tokens in all) for sequences still being read, so a
long prompt never stalls the others for more than a chunk. A new sequence is admitted at the next step when the
pool can hold it to its end (its prompt plus max_new_tokens, less the blocks it shares through prefix reuse): a
full pool makes it wait, never an out-of-memory. A finished or aborted sequence leaves at once and its blocks go
back to the pool. Each sequence keeps its own options and random generator (sampling.RowSampler), so rows with
different settings share a step, and its tokens are computed from its own rows only: a greedy output does not
depend on what else runs.

Speculative decoding (options.prompt_lookup_num_tokens = K): a decoding sequence also carries up to K tokens
drafted from its own text (lookup_draft), verified in the same step; the tokens the model agrees with are kept,
the first disagreement gives the corrected token (see _verify), and greedy output is the output without it.
How many of its drafted tokens a step verifies (0..K) is DraftPolicy's choice: the number that maximises the step's
expected tokens per second, from what steps of each size cost here (StepCosts, learnt from the engine's own steps)
and how often each sequence's drafts were accepted; a draft that does not pay is not verified (an occasional one-token
probe notices a sequence that starts repeating itself). The policy only chooses how many: the output is the same.

Positions are per sequence (no padding between them, no shared slot); the cache is kv_pool.BlockPool's blocks.
The model's step cell runs the step (modeling_baichuan.py: PagedStep in stock ops, compiled once for all sizes, or
PagedStackStep on the whole-stack kernel, inputs padded to a few sizes). Host-side bookkeeping only here: no
MindSpore op.
"""
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from mindspore import Tensor

from .kv_pool import NULL_BLOCK, BlockPool, blocks_for, prefix_hashes
from .sampling import MAX_LOOKUP_TOKENS, GenerationOptions, RowSampler, log_softmax, stop_ids

DEFAULT_BLOCK_SIZE = 16
DEFAULT_STEP_TOKENS = 256  # tokens a step computes at most (vLLM's max_num_batched_tokens)
DEFAULT_MAX_SEQS = 16
LOOKUP_NGRAM = 3  # prompt lookup matches the text's last 3, else 2, else 1 tokens


KV_ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}  # (int8's scales: 4 bytes per row)


def block_bytes(config, block_size, element_bytes=4):
    """Bytes one cache block takes over all layers: keys and values of block_size tokens (float32: 4 bytes)."""
    return 2 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * block_size * element_bytes


def available_memory_bytes():
    """MemAvailable of /proc/meminfo (Linux), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pool_blocks(config, block_size, cache_bytes=None, element_bytes=4, margin=0.8, max_seqs=DEFAULT_MAX_SEQS):
    """Blocks of the pool: `cache_bytes` of memory (default: `margin` of the memory available now, after the weights
    were loaded), but no more than max_seqs full contexts need; at least one context plus the padding block."""
    per_block = block_bytes(config, block_size, element_bytes)
    one_context = blocks_for(config.max_context, block_size)
    if cache_bytes is None:
        available = available_memory_bytes()
        cache_bytes = margin * available if available else per_block * (one_context + 1)
    return int(max(one_context + 1, min(cache_bytes // per_block, max_seqs * one_context + 1)))


class RequestTooLarge(ValueError):
    """A request that could never fit the pool or the context (the server answers 400)."""


@dataclass
class StepEvent:
    seq: "Sequence"
    token: Optional[int]  # the new token, or None when the sequence ended without one (eos, stop id, abort)
    finished: bool
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token, logprob)] most likely first, when the options ask


class Sequence:
    """One request's state: its tokens (prompt, then output), its block table and how much of it is computed."""

    def __init__(self, seq_id, prompt, options, stop_ids, vocab_size, block_size, total_tokens,
                 prompt_logprobs=False):
        self.id = seq_id
        self.tokens = list(prompt)
        self.prompt_len = len(prompt)
        self.options = options
        self.stop_ids = stop_ids
        self.sampler = RowSampler(options, prompt, vocab_size, banned_early=stop_ids)
        self.blocks: List[int] = []
        self.block_hashes: List[int] = []  # chained hashes of its full blocks (registered in the pool)
        self.computed = 0  # tokens whose keys / values are in the pool
        self.reserved = blocks_for(total_tokens, block_size)  # blocks it may come to hold
        self.output: List[int] = []
        self.finish_reason: Optional[str] = None  # "stop", "length" or "abort"
        self.prompt_logprobs = [] if prompt_logprobs else None  # [(token, logprob)] for prompt tokens 1 ..
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache
        self.draft: List[int] = []  # speculative tokens this step verifies (prompt lookup)
        self.draft_ngram = 0  # the length of the n-gram match that gave the draft (lookup_match)
        # DraftPolicy's record of this sequence: per match length and draft position, how often a draft token there
        # was accepted when reached (a moving average), and the probing state (steps a lookup found a draft that was
        # not verified)
        self.acceptance = {n: [DraftPolicy.PRIOR] * options.prompt_lookup_num_tokens
                           for n in range(1, LOOKUP_NGRAM + 1)}
        self.unverified_steps = 0
        self.probe_wait = DraftPolicy.PROBE_FIRST

    @property
    def finished(self):
        return self.finish_reason is not None

    @property
    def prefilling(self):
        """Whether prompt tokens are still to be computed (else it decodes: one token a step)."""
        return self.computed < self.prompt_len


def lookup_match(tokens, max_tokens, max_ngram=LOOKUP_NGRAM):
    """Prompt-lookup drafting: (the tokens that followed the latest earlier occurrence of the text's last n tokens,
    n = max_ngram down to 1, at most max_tokens of them; n); ([], 0) when nothing repeats."""
    if max_tokens <= 0:
        return [], 0
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), 0, -1):
        tail = tokens[length - n:]
        for start in range(length - n - 1, -1, -1):  # the latest match first
            if tokens[start:start + n] == tail:
                return list(tokens[start + n:start + n + max_tokens]), n
    return [], 0


def lookup_draft(tokens, max_tokens, max_ngram=LOOKUP_NGRAM):
    """lookup_match's draft alone."""
    return lookup_match(tokens, max_tokens, max_ngram)[0]


class StepCosts:
    """What a decoding step of n tokens costs here, in seconds: per _bucket(n) (the size the step is padded to), a
    moving average of the engine's step wall times that follows a faster step at once (half way) and a slower one
    slowly (a tenth of the way, counting at most twice the estimate), so it tracks a low quantile: other work on the
    machine only ever adds time, and a size measured while it was busy (then no longer drafted, so not measured again)
    would otherwise keep that time. The first step of a size is not counted (it compiles the size's graph). A size not
    measured costs what the sizes around it say (linear between two measured ones); above the largest measured, that
    one's cost (optimistic: a larger draft is tried, and so measured). `table` {n: seconds} with learn=False fixes
    the costs (tests)."""

    FASTER, SLOWER = 0.5, 0.1  # how far a faster / slower step moves its size's estimate

    def __init__(self, table=None, learn=True):
        self.seconds: Dict[int, float] = {_bucket(n): float(t) for n, t in (table or {}).items()}
        self.learn = learn
        self.seen = set(self.seconds)

    def record(self, tokens, seconds):
        key = _bucket(tokens)
        if not self.learn:
            return
        if key not in self.seen:
            self.seen.add(key)
            return
        old = self.seconds.get(key)
        if old is None:
            self.seconds[key] = seconds
        elif seconds < old:
            self.seconds[key] = old + self.FASTER * (seconds - old)
        else:
            self.seconds[key] = old + self.SLOWER * (min(seconds, 2 * old) - old)

    def cost(self, tokens):
        """The estimated seconds of a step of `tokens` tokens; None when no size at or below it is measured."""
        key = _bucket(tokens)
        if key in self.seconds:
            return self.seconds[key]
        below = [n for n in self.seconds if n < key]
        if not below:
            return None
        low = max(below)
        above = [n for n in self.seconds if n > key]
        if not above:
            return self.seconds[low]
        high = min(above)
        return self.seconds[low] + (self.seconds[high] - self.seconds[low]) * (key - low) / (high - low)


def expected_accepted(acceptance, k):
    """The expected number of a k-token draft's tokens accepted, acceptance[i] being the chance that position i is
    accepted when every position before it was."""
    total, reach = 0.0, 1.0
    for rate in acceptance[:k]:
        reach *= rate
        total += reach
    return total


class DraftPolicy:
    """Speculative decoding's K, per sequence and step. The step's decoding sequences give one token each; verifying
    k drafted tokens of a sequence adds k rows, which make the step cost StepCosts.cost(rows), and
    expected_accepted(k) tokens, from the sequence's acceptance for drafts of this match length (lookup_match's n: a
    3-token match is worth more than a 1-token one, and a text that copies again finds 3-token matches again at once).
    Sequence by sequence, the k (0 .. what the lookup found) that maximises the step's expected tokens per second is
    taken; k = 0 when no draft pays. A sequence whose lookups found drafts that were not verified for probe_wait steps
    verifies a 1-token draft (a probe: its acceptance is measured again); a rejected probe doubles the wait (up to
    PROBE_MOST), an accepted one resets it. Until a step of at most this many tokens is measured, nothing is drafted
    (the plain step is measured first). A new sequence starts from the acceptance of all sequences' drafts so far
    (`shared`: the same averages, a slower weight), PRIOR before any. Deterministic given the costs."""

    PRIOR = 0.5  # the first sequence's acceptance at every position
    WEIGHT, SHARED_WEIGHT = 0.3, 0.1  # of a new outcome in a position's moving average (a sequence's; all's)
    PROBE_FIRST, PROBE_MOST = 8, 64  # steps between probes

    def __init__(self, costs):
        self.costs = costs
        self.shared = {n: [self.PRIOR] * MAX_LOOKUP_TOKENS for n in range(1, LOOKUP_NGRAM + 1)}

    def start(self, seq):
        """A new sequence's acceptance: what drafts have been worth so far."""
        seq.acceptance = {n: rates[:len(seq.acceptance[n])] for n, rates in self.shared.items()}

    def choose(self, seqs, drafts):
        """How many tokens of each sequence's draft (lookup_match's, for its seq.draft_ngram) the step verifies."""
        rows = len(seqs)
        base = self.costs.cost(rows)
        if base is None:
            return [0] * rows
        tokens, chosen = float(rows), []
        for seq, draft in zip(seqs, drafts):
            best, best_rate, best_gain = 0, tokens / base, 0.0
            for k in range(1, len(draft) + 1):
                gain = expected_accepted(seq.acceptance[seq.draft_ngram], k)
                rate = (tokens + gain) / self.costs.cost(rows + k)
                if rate > best_rate:
                    best, best_rate, best_gain = k, rate, gain
            if draft and not best:
                seq.unverified_steps += 1
                if seq.unverified_steps >= seq.probe_wait:
                    best, best_gain = 1, expected_accepted(seq.acceptance[seq.draft_ngram], 1)
            if best:
                seq.unverified_steps = 0
            chosen.append(best)
            rows += best
            tokens += best_gain
        return chosen

    def learn(self, seq, drafted, accepted):
        """Updates a sequence's acceptance after a verify step: positions before `accepted` were accepted, the one at
        it (if drafted) rejected, later ones not reached. A fully accepted draft also raises the next position's
        estimate by half a step (else a position the policy never drafts would keep its estimate forever)."""
        for rates, weight in ((seq.acceptance[seq.draft_ngram], self.WEIGHT),
                              (self.shared[seq.draft_ngram], self.SHARED_WEIGHT)):
            for i in range(min(drafted, accepted + 1)):
                outcome = 1.0 if i < accepted else 0.0
                rates[i] += weight * (outcome - rates[i])
            if accepted == drafted < len(seq.acceptance[seq.draft_ngram]):
                rates[drafted] += weight / 2 * (1.0 - rates[drafted])
        if drafted == 1:  # a probe, or a 1-token draft: the probing wait follows its outcome
            seq.probe_wait = self.PROBE_FIRST if accepted else min(self.PROBE_MOST, 2 * seq.probe_wait)


def _pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _gathered_inputs(ids, positions, owners, out_rows, tables, block_size):
    """PagedStep's inputs (stock ops): (input_ids [1, T], positions, slot_rows [T], key_rows [T, K], key_valid
    [T, K], out_rows), the pool rows of every position each token sees, in position order."""
    bs = block_size
    keys = tables.shape[1] * bs
    key_index = np.arange(keys)
    key_rows = tables[owners][:, key_index // bs].astype(np.int64) * bs + key_index % bs  # [T, K]
    key_valid = key_index[None, :] <= positions[:, None]
    slot_rows = key_rows[np.arange(len(ids)), positions]
    key_rows = np.where(key_valid, key_rows, NULL_BLOCK * bs)
    return (ids[None, :], positions, slot_rows.astype(np.int32), key_rows.astype(np.int32), key_valid, out_rows)


def _bucket(n):
    """n up to 16, then the next of four sizes an octave (20, 24, 28, 32, 40, ...): few shapes to compile, and
    little padding where it costs most (every padding token goes through every projection: a verify step of 5
    tokens padded to 8 would do 8 tokens' work)."""
    if n <= 16:
        return max(1, int(n))
    step = 1 << (int(n).bit_length() - 3)
    return -(-int(n) // step) * step


def _stack_inputs(ids, positions, owners, out_rows, tables, block_size):
    """PagedStackStep's inputs: (input_ids [T], tokens [T, 2], out_rows [R], block_tables [B, MB]), tokens and rows
    padded to _bucket sizes, sequences and blocks to powers of two (its graph is compiled per shape). Each padding
    token is a sequence of its own at position 0 in the padding block (kv_pool.NULL_BLOCK): its table row is all
    that block."""
    del block_size  # the tables hold every position's block already
    tokens, sequences = len(ids), tables.shape[0]
    t_pad = _bucket(tokens)
    extra = t_pad - tokens
    b_pad = _pow2(sequences + extra)
    mb_pad = _pow2(tables.shape[1])
    padded_ids = np.zeros(t_pad, np.int32)
    padded_ids[:tokens] = ids
    pairs = np.zeros((t_pad, 2), np.int32)
    pairs[:tokens, 0], pairs[:tokens, 1] = owners, positions
    pairs[tokens:, 0] = sequences + np.arange(extra)
    padded_tables = np.full((b_pad, mb_pad), NULL_BLOCK, np.int32)
    padded_tables[:sequences, :tables.shape[1]] = tables
    padded_rows = np.zeros(_bucket(len(out_rows)), np.int32)
    padded_rows[:len(out_rows)] = out_rows
    return padded_ids, pairs, padded_rows, padded_tables


def _padded(inputs, block_size):
    """The step's inputs padded to powers of two (tokens, keys >= 4 blocks, logits rows), for a PagedStep whose
    graph is compiled per shape: a few shapes, each compiled once. Padding tokens are token 0 at position 0 in the
    padding block (kv_pool.NULL_BLOCK), seeing only that row; padding keys are hidden; padding rows are row 0."""
    ids, pos, slot_rows, key_rows, key_valid, rows = inputs
    tokens, keys = key_rows.shape
    t_pad, k_pad, r_pad = _pow2(tokens), max(4 * block_size, _pow2(keys)), _pow2(len(rows))
    null = NULL_BLOCK * block_size
    padded_ids = np.zeros((1, t_pad), np.int32)
    padded_ids[0, :tokens] = ids[0]
    padded_pos = np.zeros(t_pad, np.int32)
    padded_pos[:tokens] = pos
    padded_slots = np.full(t_pad, null, np.int32)
    padded_slots[:tokens] = slot_rows
    padded_keys = np.full((t_pad, k_pad), null, np.int32)
    padded_keys[:tokens, :keys] = key_rows
    padded_valid = np.zeros((t_pad, k_pad), bool)
    padded_valid[:tokens, :keys] = key_valid
    padded_valid[tokens:, 0] = True
    padded_rows = np.zeros(r_pad, np.int32)
    padded_rows[:len(rows)] = rows
    return padded_ids, padded_pos, padded_slots, padded_keys, padded_valid, padded_rows


class Engine:
    """Continuous batching for one model (see the module docstring). Not thread-safe: one thread drives it."""

    def __init__(self, model, num_blocks, block_size=DEFAULT_BLOCK_SIZE, max_step_tokens=DEFAULT_STEP_TOKENS,
                 max_seqs=DEFAULT_MAX_SEQS, prefix_cache=True, kv_cache_dtype="auto", step_costs=None,
                 clock=time.perf_counter):
        if max_step_tokens < max_seqs:
            raise ValueError(f"max_step_tokens ({max_step_tokens}) must be >= max_seqs ({max_seqs}): every running "
                             f"sequence decodes a token each step")
        model.set_train(False)
        self.model = model
        self.config = model.config
        self.pool = BlockPool(num_blocks, block_size, prefix_cache)
        self.block_size = block_size
        self.max_step_tokens = int(max_step_tokens)
        self.max_seqs = int(max_seqs)
        self.step_cell = model.paged_step_cell()
        self.kv_cache_dtype = model.kv_cache_dtypes()[0] if kv_cache_dtype == "auto" else kv_cache_dtype
        self.pools = model.empty_pools(num_blocks, block_size, self.kv_cache_dtype)
        self.waiting: List[Sequence] = []
        self.running: List[Sequence] = []
        self.next_id = 0
        self.steps = 0
        self.last_step_sequences = 0  # sequences the last step ran
        self.prompt_tokens = 0  # computed prompt tokens (prefix-cache hits excluded)
        self.generated_tokens = 0
        self.draft_tokens = 0  # speculative tokens proposed (prompt lookup)
        self.accepted_tokens = 0  # of which the model agreed with
        self.prefix_query_tokens = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hit_tokens = 0  # of which found
        self.step_costs = step_costs or StepCosts()  # learnt from the decoding steps' wall times (clock())
        self.draft_policy = DraftPolicy(self.step_costs)
        self.clock = clock

    # ------------------------------------------------------------------ requests
    def check_fits(self, prompt_len, max_new_tokens):
        """RequestTooLarge unless a sequence of this size fits the context and the pool (alone)."""
        context = self.config.max_context
        if prompt_len + max_new_tokens > context:
            raise RequestTooLarge(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) exceed "
                                  f"the model's context of {context} tokens")
        need = blocks_for(prompt_len + max_new_tokens, self.block_size)
        if need > self.pool.capacity:
            raise RequestTooLarge(f"the prompt ({prompt_len} tokens) plus max_new_tokens ({max_new_tokens}) need "
                                  f"{need} cache blocks of {self.block_size} tokens; the pool has "
                                  f"{self.pool.capacity}: lower max_new_tokens or give the cache more memory")

    def add(self, prompt, options=None, prompt_logprobs=False):
        """Queues a request (token ids) and returns its Sequence; admitted at a next step()."""
        options = (options or GenerationOptions()).validate()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.config.vocab_size:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        self.check_fits(len(prompt), options.max_new_tokens)
        seq = Sequence(self.next_id, prompt, options, stop_ids(options, self.config.eos_token_id),
                       self.config.vocab_size, self.block_size, len(prompt) + options.max_new_tokens, prompt_logprobs)
        self.next_id += 1
        self.draft_policy.start(seq)
        self.waiting.append(seq)
        return seq

    def abort(self, seq):
        """Ends a sequence now (a client went away); its blocks go back to the pool."""
        if seq.finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "abort")

    def has_work(self):
        return bool(self.waiting or self.running)

    def _finish(self, seq, reason):
        seq.finish_reason = reason
        if seq in self.running:
            self.running.remove(seq)
        self.pool.release(seq.blocks)
        seq.blocks = []

    # ------------------------------------------------------------------ scheduling
    def _outstanding(self):
        """Blocks the running sequences may still take (their reservations)."""
        return sum(max(0, seq.reserved - len(seq.blocks)) for seq in self.running)

    def _admit(self, seq):
        """Takes the waiting sequence's shared prefix blocks and reserves the rest, if the pool can hold it."""
        # the prompt's last token is always computed (its logits choose the first new token), so at most the full
        # blocks before it are shared; prompt logprobs need every prompt token computed
        shareable = [] if seq.prompt_logprobs is not None else \
            prefix_hashes(seq.tokens[:seq.prompt_len - 1], self.block_size)
        need = seq.reserved - self.pool.active_hits(shareable)
        if need > self.pool.available() - self._outstanding():
            return False
        seq.blocks = self.pool.lookup(shareable)
        seq.block_hashes = shareable[:len(seq.blocks)]
        seq.computed = seq.cached_tokens = len(seq.blocks) * self.block_size
        self.prefix_query_tokens += seq.prompt_len
        self.prefix_hit_tokens += seq.cached_tokens
        self.waiting.remove(seq)
        self.running.append(seq)
        return True

    def schedule(self):
        """[(sequence, number of its tokens to compute this step)]: every decoding sequence's next token first, then
        the first prompt chunk of newly admitted sequences, then the next chunks of prompts being read, while the
        step's token budget lasts. New requests before prompts being read: a short request that arrives while a long
        prompt is read starts at once (its first token does not wait for the whole long prompt)."""
        plan, budget = [], self.max_step_tokens
        reading = [seq for seq in self.running if seq.prefilling]
        decoding = [seq for seq in self.running if not seq.prefilling]
        # a token each, and drafts (prompt lookup) from an equal share of what is left, as many as pay (DraftPolicy)
        drafts = [self._draft(seq, (self.max_step_tokens - len(decoding)) // len(decoding)) for seq in decoding]
        if any(drafts):
            drafts = [d[:k] for d, k in zip(drafts, self.draft_policy.choose(decoding, drafts))]
        for seq, draft in zip(decoding, drafts):
            seq.draft = draft
            plan.append((seq, 1 + len(seq.draft)))
            budget -= 1 + len(seq.draft)
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            seq = self.waiting[0]
            if not self._admit(seq):
                break  # first come, first served: later requests wait behind it
            count = min(len(seq.tokens) - seq.computed, budget)
            plan.append((seq, count))
            budget -= count
        for seq in reading:
            if budget > 0:
                count = min(len(seq.tokens) - seq.computed, budget)
                plan.append((seq, count))
                budget -= count
        return plan

    def _draft(self, seq, room):
        """Up to K prompt-lookup tokens, within what the sequence may still generate, the context, its block
        reservation and the step's budget `room` (DraftPolicy then chooses how many of them the step verifies)."""
        if not seq.options.prompt_lookup_num_tokens or room <= 0:
            return []
        left = min(seq.options.max_new_tokens - len(seq.output) - 1, self.config.max_context - len(seq.tokens) - 1,
                   seq.reserved * self.block_size - len(seq.tokens) - 1, room, seq.options.prompt_lookup_num_tokens)
        draft, seq.draft_ngram = lookup_match(seq.tokens, left)
        return draft

    # ------------------------------------------------------------------ the step
    def _inputs(self, plan):
        """The step cell's inputs for a plan, and which logits row is whose: (first row, rows, whether the sequence
        samples) per planned sequence. Blocks are taken here as the planned tokens need them."""
        bs = self.block_size
        ids, positions, owners, out_rows, row_of = [], [], [], [], []
        for index, (seq, count) in enumerate(plan):
            while len(seq.blocks) * bs < seq.computed + count:
                seq.blocks.append(self.pool.allocate())
            first = len(ids)
            ids.extend((seq.tokens + seq.draft)[seq.computed:seq.computed + count])
            positions.extend(range(seq.computed, seq.computed + count))
            owners.extend([index] * count)
            samples = seq.computed + count == len(seq.tokens) + len(seq.draft)
            if seq.draft or (seq.prompt_logprobs is not None and seq.computed < seq.prompt_len):
                rows = range(first, first + count)  # verification: every row's logits
            else:
                rows = [first + count - 1] if samples else []
            row_of.append((len(out_rows), len(rows), samples))
            out_rows.extend(rows)
        tables = np.zeros((len(plan), blocks_for(max(positions) + 1, bs)), np.int32)
        for index, (seq, _) in enumerate(plan):
            tables[index, :len(seq.blocks)] = seq.blocks[:tables.shape[1]]
        step = (np.asarray(ids, np.int32), np.asarray(positions, np.int32), np.asarray(owners, np.int32),
                np.asarray(out_rows or [0], np.int32), tables)  # a step that samples nothing still returns a row
        if self.step_cell.whole_stack:
            inputs = _stack_inputs(*step, bs)
        else:
            inputs = _gathered_inputs(*step, bs)
            if not self.step_cell.dynamic:
                inputs = _padded(inputs, bs)
        return tuple(Tensor.from_numpy(np.ascontiguousarray(a)) for a in inputs), row_of

    def step(self):
        """Runs one step; returns the StepEvents of this step (new tokens, ends)."""
        start = self.clock()
        plan = self.schedule()
        self.last_step_sequences = len(plan)
        if not plan:
            return []
        decoding = all(not seq.prefilling for seq, _ in plan)  # the steps StepCosts learns from
        logits, row_of = self.forward(plan)
        self.steps += 1
        events = []
        for (seq, count), (first, nrows, samples) in zip(plan, row_of):
            if seq.computed < seq.prompt_len:
                self.prompt_tokens += min(count, seq.prompt_len - seq.computed)
            if seq.prompt_logprobs is not None and seq.computed < seq.prompt_len:
                self._record_prompt_logprobs(seq, logits[first:first + nrows], count)
            if seq.draft:
                events += self._verify(seq, logits[first:first + nrows])
                continue
            seq.computed += count
            self._register_full_blocks(seq)
            if samples:
                events.append(self._sample(seq, logits[first + nrows - 1]))
        if decoding:
            self.step_costs.record(sum(count for _, count in plan), self.clock() - start)
        return events

    def forward(self, plan):
        """The step cell on a plan ([(sequence, tokens to compute)]; a sequence's draft tokens follow its own):
        (logits rows as numpy, which rows are whose). Writes the plan's keys / values into the pool, moves nothing."""
        inputs, row_of = self._inputs(plan)
        logits, self.pools = self.step_cell.step(inputs, self.pools)
        return logits.asnumpy(), row_of

    def _verify(self, seq, rows):
        """Speculative decoding's verification: row i chooses the token after the last known one plus i draft
        tokens; draft tokens are accepted while the choices agree (sampling: the acceptance rule), the first
        disagreement gives the corrected token, and when all agree the last row gives one more. The pool keeps
        only the accepted rows (computed moves past them; the rejected ones are overwritten later)."""
        draft, seq.draft = seq.draft, []
        events, accepted = [], 0
        seq.computed += 1  # the last generated token's row
        for i, row in enumerate(rows):
            proposal = draft[i] if i < len(draft) else None
            event = self._sample(seq, row, proposal)
            events.append(event)
            agreed = proposal is not None and event.token == proposal
            if event.finished or not agreed:
                break
            accepted += 1
            seq.computed += 1  # the draft token's row is the accepted token's
        self.draft_tokens += len(draft)
        self.accepted_tokens += accepted
        if not seq.finished:
            self.draft_policy.learn(seq, len(draft), accepted)
            self._register_full_blocks(seq)
        return events

    def _record_prompt_logprobs(self, seq, rows, count):
        """Log-probabilities of the prompt tokens that follow the rows just computed (echo / prompt logprobs)."""
        start = seq.computed
        for i in range(min(count, len(rows))):
            target = start + i + 1
            if target < seq.prompt_len:
                token = seq.tokens[target]
                seq.prompt_logprobs.append((token, float(log_softmax(rows[i])[token])))

    def _register_full_blocks(self, seq):
        bs = self.block_size
        while len(seq.block_hashes) < seq.computed // bs:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(hash((parent, tuple(seq.tokens[i * bs:(i + 1) * bs]))))
            self.pool.register(seq.blocks[i], seq.block_hashes[-1])

    def _sample(self, seq, logits, proposal=None):
        if proposal is None:
            token, _ = seq.sampler.choose(logits, len(seq.output))
        else:
            token, _ = seq.sampler.verify(logits, len(seq.output), proposal)
        event = StepEvent(seq, None, False)
        if seq.options.logprobs is not None:
            logp = log_softmax(logits)  # of the model's distribution, as OpenAI / vLLM report it
            event.logprob = float(logp[token])
            top = np.argsort(-logp, kind="stable")[:seq.options.logprobs]
            event.top_logprobs = [(int(t), float(logp[t])) for t in top]
        if token in seq.stop_ids:
            self._finish(seq, "stop")
            event.finished = True
            return event
        seq.tokens.append(token)
        seq.output.append(token)
        seq.sampler.accept(token)
        self.generated_tokens += 1
        event.token = token
        if len(seq.output) >= seq.options.max_new_tokens or len(seq.tokens) >= self.config.max_context:
            self._finish(seq, "length")
            event.finished = True
        return event

    # ------------------------------------------------------------------ convenience
    def run(self, prompts, options, prompt_logprobs=False):
        """Generates for every prompt (all admitted as the pool allows) and returns their Sequences when all ended."""
        seqs = [self.add(p, options, prompt_logprobs) for p in prompts]
        while any(not s.finished for s in seqs):
            self.step()
        return seqs
