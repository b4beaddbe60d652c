"""Token choice for one sequence: what to generate (GenerationOptions) and the next token from its logits.

Each sequence of the generation engine (engine.py) carries its own options and random generator, so rows with
different settings share a step and a row's output never depends on the others. Host-side numpy: CPU has no
`mint.argmax` kernel, and the knobs are simpler here. Filters apply in the order of transformers / vLLM:
repetition penalty (prompt and output tokens), presence and frequency penalties (output tokens, as OpenAI and
vLLM), then temperature, top-k, top-p, min-p.

Imports from the project only generation_settings.py (standard library); copied into model directories with it.
"""
import math
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import numpy as np

from .generation_settings import NEUTRAL, check

MAX_LOOKUP_TOKENS = 64  # the most prompt_lookup_num_tokens a request may ask for


@dataclass
class GenerationOptions:
    """What to generate. eos_token_id None means the model config's eos; pass () for no eos stop."""
    max_new_tokens: int = NEUTRAL["max_new_tokens"]
    do_sample: bool = NEUTRAL["do_sample"]
    temperature: float = NEUTRAL["temperature"]
    top_k: int = NEUTRAL["top_k"]  # 0 = off
    top_p: float = NEUTRAL["top_p"]  # 1.0 = off
    repetition_penalty: float = NEUTRAL["repetition_penalty"]  # 1.0 = off; > 1 discourages tokens already seen
    eos_token_id: Optional[object] = None
    stop_token_ids: Sequence[int] = ()
    seed: Optional[int] = None
    use_cache: bool = True
    min_p: float = 0.0  # 0 = off; else tokens below min_p x the top token's probability are dropped
    presence_penalty: float = 0.0  # subtracted once from every token already generated (OpenAI's range -2 .. 2)
    frequency_penalty: float = 0.0  # subtracted per occurrence in the generated tokens
    min_new_tokens: int = 0  # eos and stop ids are not chosen before this many new tokens
    ignore_eos: bool = False  # generate until max_new_tokens (stop ids still stop)
    logprobs: Optional[int] = None  # None: none; N >= 0: the chosen token's log-probability and the N most likely
    prompt_lookup_num_tokens: int = 0  # speculative decoding: up to K tokens drafted from the text itself (engine.py)

    def validate(self):
        check({f.name: getattr(self, f.name) for f in fields(self)
               if f.name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                             "seed")})
        for name in ("min_p", "presence_penalty", "frequency_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not 0 <= self.prompt_lookup_num_tokens <= MAX_LOOKUP_TOKENS:
            raise ValueError(f"prompt_lookup_num_tokens must be in [0, {MAX_LOOKUP_TOKENS}], got "
                             f"{self.prompt_lookup_num_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        return self


def option_names():
    return [f.name for f in fields(GenerationOptions)]


def stop_ids(options, model_eos):
    """The ids that end a sequence: its eos (options.eos_token_id; None = the model's `model_eos`; none with
    ignore_eos) and its stop_token_ids."""
    eos = model_eos if options.eos_token_id is None else options.eos_token_id
    eos = [] if eos is None or options.ignore_eos else ([eos] if isinstance(eos, (int, np.integer)) else eos)
    return frozenset(int(t) for t in eos) | frozenset(int(t) for t in options.stop_token_ids)


# ---------------------------------------------------------------------------------------------- filters
def apply_repetition_penalty(scores, seen, penalty):
    """CTRL-style penalty (as Hugging Face): seen tokens' positive scores are divided, negative ones multiplied."""
    if penalty == 1.0:
        return scores
    picked = scores[seen]
    scores[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def sample_filter(scores, temperature, top_k, top_p, min_p=0.0):
    """Temperature, then top-k, top-p (nucleus) and min-p filtering of scores [B, V]; filtered-out scores become
    -inf."""
    scores = scores / temperature
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = np.partition(scores, vocab - top_k, axis=-1)[:, vocab - top_k][:, None]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(-scores, axis=-1, kind="stable")
        sorted_scores = np.take_along_axis(scores, order, -1)
        probs = np.exp(sorted_scores - sorted_scores[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it included)
        drop_sorted = np.cumsum(probs, -1) - probs >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, -1)
        scores = np.where(drop, -np.inf, scores)
    if min_p > 0.0:  # p < min_p * p_max  <=>  score < max score + log(min_p)
        scores = np.where(scores < scores.max(-1, keepdims=True) + math.log(min_p), -np.inf, scores)
    return scores


def log_softmax(logits):
    """float64 log-probabilities of float32 logits [..., V]."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def choose_tokens(logits, seen, options, rng):
    """Next token per row from float32 logits [B, V] (rows share the options; the engine calls it per row)."""
    scores = apply_repetition_penalty(np.array(logits, dtype=np.float32), seen, options.repetition_penalty)
    if not options.do_sample:
        return scores.argmax(-1).astype(np.int64)
    scores = sample_filter(scores, options.temperature, options.top_k, options.top_p,
                           options.min_p).astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


class RowSampler:
    """One sequence's token choice: its options, its random generator (seeded per sequence) and the counts of what
    it has seen (the prompt for the repetition penalty, its output for presence / frequency penalties)."""

    def __init__(self, options, prompt, vocab_size, banned_early=()):
        self.options = options
        self.filter_options = replace(options, repetition_penalty=1.0)  # applied by scores(), once
        self.rng = np.random.default_rng(options.seed)
        self.vocab_size = vocab_size
        self.seen = None
        if options.repetition_penalty != 1.0:
            self.seen = np.zeros((1, vocab_size), bool)
            self.seen[0, np.asarray(prompt, np.int64)] = True
        self.output_counts = {}
        self.banned_early = np.asarray(sorted(banned_early), np.int64)  # eos / stop ids before min_new_tokens

    def scores(self, logits, generated):
        """The logits after this row's penalties and bans: float32 [1, V]."""
        o = self.options
        scores = np.array(logits, np.float32).reshape(1, -1)
        if self.seen is not None:
            scores = apply_repetition_penalty(scores, self.seen, o.repetition_penalty)
        if self.output_counts and (o.presence_penalty or o.frequency_penalty):
            ids = np.fromiter(self.output_counts, np.int64)
            counts = np.fromiter(self.output_counts.values(), np.float32)
            scores[0, ids] -= o.presence_penalty + o.frequency_penalty * counts
        if generated < o.min_new_tokens and self.banned_early.size:
            scores[0, self.banned_early] = -np.inf
        return scores

    def choose(self, logits, generated):
        """(token, its scores [1, V]) for a row's logits [V] after `generated` new tokens."""
        scores = self.scores(logits, generated)
        token = int(choose_tokens(scores, None, self.filter_options, self.rng)[0])
        return token, scores

    def verify(self, logits, generated, draft):
        """Speculative decoding's acceptance rule for a point-mass draft: (token, whether it is the draft). Greedy:
        the choice itself, accepted when it equals the draft. Sampling: the draft is accepted with its probability
        p(draft) under this row's filtered distribution, else a token is drawn from p with the draft taken out
        (renormalised), so the output distribution is exactly p (Leviathan et al.'s rule with q = the draft)."""
        scores = self.scores(logits, generated)
        if not self.options.do_sample:
            token = int(scores[0].argmax())
            return token, token == draft
        o = self.options
        filtered = sample_filter(scores, o.temperature, o.top_k, o.top_p, o.min_p).astype(np.float64)[0]
        probs = np.exp(filtered - filtered.max())
        probs /= probs.sum()
        if self.rng.random() < probs[draft]:
            return int(draft), True
        probs[draft] = 0.0
        total = probs.sum()
        if total <= 0.0:  # the draft held all the mass: it was accepted above with probability 1
            return int(draft), True
        return int(self.rng.choice(probs.shape[0], p=probs / total)), False

    def accept(self, token):
        """Records a generated token (penalties)."""
        if self.seen is not None:
            self.seen[0, token] = True
        self.output_counts[token] = self.output_counts.get(token, 0) + 1
