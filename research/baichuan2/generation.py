"""Text generation for BaichuanForCausalLM: greedy and sampling, batched left-padded prompts, streaming.

    gen = Generator(model)
    new_ids = gen.generate([[5, 6, 7], [8, 9]], max_new_tokens=32)            # greedy, list of new ids per prompt
    new_ids = gen.generate(prompts, do_sample=True, temperature=0.3, top_k=5, top_p=0.85, seed=0)
    for step in gen.stream(prompts, max_new_tokens=32): ...                 # one id (or None) per prompt per step

With the cache (default) the prompt goes through one prefill graph and every further token through one decode
graph, both on fixed shapes: prompts are left-padded to a multiple of `bucket` tokens and the key/value caches are
preallocated for the whole generation, so GRAPH mode compiles each graph once per (batch, bucket) and never per
token. `use_cache=False` recomputes the full sequence every step (fixed-length buffer, one graph as well); greedy
output is the same either way.

Token choice runs on the host in numpy (CPU has no `mint.argmax` kernel, and the sampling knobs are simpler there).
Finished sequences stop at an eos or stop id, which is not returned.

The Generator's own defaults (greedy, every knob off, a base model's max_new_tokens) are generation_settings.NEUTRAL;
what a chat, a command line, the server or a pipeline call generates with is `generation_settings.resolve`d (the
model directory's generation_config.json, the family's defaults, the caller's arguments).

This file imports from the project only generation_settings.py (and through it chat_format.py), both standard
library only; the model hands over its step cells. It is copied into model directories with them, and an import
back into modeling_baichuan would make a cycle that mindformers' remote-code loader never finishes resolving (it
loops forever on circular relative imports).
"""
import warnings
import weakref
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import numpy as np
from mindspore import Tensor

from .generation_settings import NEUTRAL, check, fit_new_tokens, resolve

DEFAULT_BUCKET = 64


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

    def validate(self):
        check({f.name: getattr(self, f.name) for f in fields(self)})
        return self


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


# ---------------------------------------------------------------------------------------------- token choice
def apply_repetition_penalty(scores, seen, penalty):
    """CTRL-style penalty (as Hugging Face): seen tokens' positive scores are divided, negative ones multiplied."""
    if penalty == 1.0:
        return scores
    picked = scores[seen]
    scores[seen] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def sample_filter(scores, temperature, top_k, top_p):
    """Temperature, then top-k, then top-p (nucleus) filtering; filtered-out scores become -inf."""
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
    return scores


def choose_tokens(logits, seen, options, rng):
    """Next token per row from float32 logits [B, V]."""
    scores = apply_repetition_penalty(np.array(logits, dtype=np.float32), seen, options.repetition_penalty)
    if not options.do_sample:
        return scores.argmax(-1).astype(np.int64)
    scores = sample_filter(scores, options.temperature, options.top_k, options.top_p).astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)


# ---------------------------------------------------------------------------------------------- generator
class Generator:
    """Generation driver for one model. Keep one per model (see `generator_for`): it owns the compiled graphs."""

    def __init__(self, model, bucket=DEFAULT_BUCKET):
        self.model = model
        model.set_train(False)  # dropout off (LoRA); the model's backend was fixed when it was built
        self.config = model.config
        self.bucket = int(bucket)
        self.prefill, self.decode = model.cached_step_cells()

    def options(self, **kwargs):
        unknown = set(kwargs) - {f.name for f in fields(GenerationOptions)}
        if unknown:
            raise TypeError(f"unknown generation option(s) {sorted(unknown)}; "
                            f"valid: {[f.name for f in fields(GenerationOptions)]}")
        return GenerationOptions(**kwargs).validate()

    def _stop_ids(self, options):
        eos = options.eos_token_id
        if eos is None:
            eos = self.config.eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, (int, np.integer)) else list(eos))
        return set(int(t) for t in eos) | set(int(t) for t in options.stop_token_ids)

    def fit_prompts(self, prompts, max_new_tokens):
        """Cuts prompts from the left (with a warning) so prompt + new tokens fit in the model's context."""
        context = self.config.max_context
        if max_new_tokens >= context:
            raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt in the model's "
                             f"context of {context} tokens")
        limit = context - max_new_tokens
        fitted = []
        for number, prompt in enumerate(prompts):
            prompt = [int(t) for t in prompt]
            if not prompt:
                raise ValueError(f"prompt {number} is empty")
            if len(prompt) > limit:
                warnings.warn(f"prompt {number} has {len(prompt)} tokens; with max_new_tokens={max_new_tokens} "
                              f"only the last {limit} fit the {context}-token context: cut from the left",
                              stacklevel=3)
                prompt = prompt[-limit:]
            fitted.append(prompt)
        return fitted

    def stream(self, prompts, **kwargs):
        """Yields, per step, a list with the new token of each prompt (None once that prompt has finished)."""
        options = self.options(**kwargs)
        if prompts and isinstance(prompts[0], (int, np.integer)):
            raise TypeError("prompts must be a list of token-id lists (wrap a single prompt in a list)")
        prompts = self.fit_prompts(prompts, options.max_new_tokens)
        stop_ids = self._stop_ids(options)
        rng = np.random.default_rng(options.seed)
        batch = len(prompts)
        prompt_len = _round_up(max(len(p) for p in prompts), self.bucket)
        slots = _round_up(prompt_len + options.max_new_tokens, self.bucket)
        pad = self.config.pad_token_id or 0
        # left padding: every row's last prompt token sits in column prompt_len - 1
        tokens = np.full((batch, slots), pad, dtype=np.int32)
        mask = np.zeros((batch, slots), dtype=np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, prompt_len - len(prompt):prompt_len] = prompt
            mask[row, prompt_len - len(prompt):prompt_len] = 1
        seen = np.zeros((batch, self.config.vocab_size), dtype=bool)
        for row, prompt in enumerate(prompts):
            seen[row, prompt] = True
        finished = np.zeros(batch, dtype=bool)
        steps = self._cached_logits if options.use_cache else self._full_logits
        logit_steps = steps(tokens, mask, prompt_len)
        for step in range(options.max_new_tokens):
            logits = next(logit_steps)
            chosen = choose_tokens(logits, seen, options, rng)
            out = []
            for row in range(batch):
                token = int(chosen[row])
                if finished[row]:
                    out.append(None)
                elif token in stop_ids:
                    finished[row] = True
                    out.append(None)
                else:
                    seen[row, token] = True
                    out.append(token)
            if finished.all():
                return
            yield out
            if step + 1 < options.max_new_tokens:
                column = prompt_len + step
                tokens[:, column] = np.where(finished, pad, chosen)
                mask[:, column] = 1

    def _cached_logits(self, tokens, mask, prompt_len):
        """Logits [B, V] for each next token: one prefill, then one decode per token the caller wrote."""
        batch, slots = tokens.shape
        k_caches, v_caches = self.model.empty_caches(batch, slots)
        # Every slot past the prompt will hold a token (the caller opens each one, finished rows included) and no
        # query sees a slot after its own, so one mask with them all open serves every step: a new Tensor per step
        # costs more than its data (see the Tensor.from_numpy note below).
        opened = mask.copy()
        opened[:, prompt_len:] = 1
        opened = Tensor(opened)
        logits, k_caches, v_caches = self.prefill.step(Tensor(tokens[:, :prompt_len]), opened, k_caches, v_caches)
        yield logits.asnumpy()
        for slot in range(prompt_len, slots):
            # The caller has written the chosen token into tokens[:, slot]. Tensor.from_numpy wraps fresh arrays
            # (never written again) without Tensor()'s checks: 2-core EPYC, shape S, 34 against 150 us a step.
            ids = Tensor.from_numpy(tokens[:, slot:slot + 1].copy())
            logits, k_caches, v_caches = self.decode.step(ids, opened, Tensor.from_numpy(np.array(slot, np.int32)),
                                                          k_caches, v_caches)
            yield logits.asnumpy()

    def _full_logits(self, tokens, mask, prompt_len):
        """No cache: the whole fixed-length buffer every step (future columns are masked), same shapes each time."""
        for column in range(prompt_len - 1, tokens.shape[1]):
            logits = self.model(Tensor(tokens), attention_mask=Tensor(mask))
            yield logits[:, column].asnumpy()

    def generate(self, prompts, **kwargs):
        """List of new token ids per prompt (eos / stop ids excluded)."""
        outputs = [[] for _ in prompts]
        for step in self.stream(prompts, **kwargs):
            for row, token in enumerate(step):
                if token is not None:
                    outputs[row].append(token)
        return outputs


_GENERATORS = weakref.WeakKeyDictionary()


def generator_for(model):
    """The model's Generator, made once (so compiled graphs are reused across calls)."""
    if model not in _GENERATORS:
        _GENERATORS[model] = Generator(model)
    return _GENERATORS[model]


def generate(model, prompts, **kwargs):
    return generator_for(model).generate(prompts, **kwargs)


# ---------------------------------------------------------------------------------------------- pipelines
PIPELINE_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
                     "eos_token_id", "seed")


def generate_for_pipeline(model, input_ids, **kwargs):
    """`model.generate(...)` as mindformers' TextGenerationPipeline (and openmind's) call it.

    Settings are `generation_settings.resolve`d as everywhere else: the call's keywords over the model directory's
    generation_config.json over the family's defaults (so `do_sample=False` is plain greedy decoding: the sampling
    knobs of a chat generation_config apply only when sampling or when passed in the call). max_length (prompt +
    new tokens) counts when max_new_tokens is not given; max_new_tokens is cut to what the context leaves after
    the prompt. Other keywords of the pipeline are ignored. Returns {"sequences": prompt + new ids per row} when
    return_dict_in_generate, else the list of rows."""
    if isinstance(input_ids, Tensor):
        input_ids = input_ids.asnumpy()
    rows = np.array(input_ids, dtype=object).tolist() if not isinstance(input_ids, list) else input_ids
    if rows and isinstance(rows[0], (int, np.integer)):
        rows = [rows]
    config = model.config
    pad = kwargs.get("pad_token_id", config.pad_token_id)
    if len(rows) > 1 and pad is not None:  # the tokenizer padded the batch: strip it, we left-pad ourselves
        rows = [_strip(list(r), pad) for r in rows]
    longest = max(len(r) for r in rows)
    explicit = {key: kwargs.get(key) for key in PIPELINE_SETTINGS}
    if explicit["max_new_tokens"] is None and kwargs.get("max_length") is not None:
        explicit["max_new_tokens"] = max(1, int(kwargs["max_length"]) - longest)
    settings = resolve(config, explicit)
    settings["max_new_tokens"] = fit_new_tokens(settings["max_new_tokens"], longest, config.max_context)
    new = generator_for(model).generate(rows, **settings)
    sequences = [list(r) + n for r, n in zip(rows, new)]
    if kwargs.get("return_dict_in_generate"):
        return {"sequences": sequences}
    return sequences


def _strip(row, pad):
    start, end = 0, len(row)
    while start < end - 1 and row[start] == pad:
        start += 1
    while end > start + 1 and row[end - 1] == pad:
        end -= 1
    return row[start:end]


__all__ = ["GenerationOptions", "Generator", "generator_for", "generate", "generate_for_pipeline",
           "choose_tokens", "sample_filter", "apply_repetition_penalty"]
