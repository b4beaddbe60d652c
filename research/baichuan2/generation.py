"""Text generation for BaichuanForCausalLM: greedy and sampling, batches of prompts, streaming.

    gen = Generator(model)
    new_ids = gen.generate([[5, 6, 7], [8, 9]], max_new_tokens=32)            # greedy, list of new ids per prompt
    new_ids = gen.generate(prompts, do_sample=True, temperature=0.3, top_k=5, top_p=0.85, seed=0)
    for step in gen.stream(prompts, max_new_tokens=32): ...                 # one id (or None) per prompt per step

With the cache (default) the prompts run on the generation engine (engine.py: continuous batching over a paged
key/value cache in float32 rows, each prompt at its own positions, its own random generator seeded with `seed`);
the Generator keeps one engine per model and makes its pool larger when a call needs more. `use_cache=False`
recomputes the full, left-padded sequence every step (fixed-length buffer, one graph): the reference the cached
path is checked against; greedy output is the same either way.

Token choice runs on the host in numpy (sampling.py; CPU has no `mint.argmax` kernel, and the knobs are simpler
there). Finished sequences stop at an eos or stop id, which is not returned.

The Generator's own defaults (greedy, every knob off, a base model's max_new_tokens) are generation_settings.NEUTRAL;
what a chat, a command line, the server or a pipeline call generates with is `generation_settings.resolve`d (the
model directory's generation_config.json, the family's defaults, the caller's arguments).

This file imports from the project only engine.py, kv_pool.py, sampling.py and generation_settings.py (and through
it chat_format.py); the model hands over its step cells. It is copied into model directories with them, and an
import back into modeling_baichuan would make a cycle that mindformers' remote-code loader never finishes resolving
(it loops forever on circular relative imports).
"""
import warnings
import weakref

import numpy as np
from mindspore import Tensor

from .engine import Engine
from .generation_settings import fit_new_tokens, resolve
from .kv_pool import blocks_for
from .sampling import GenerationOptions, apply_repetition_penalty, choose_tokens, option_names, sample_filter
from .sampling import stop_ids as stop_ids_of

DEFAULT_BUCKET = 64


def _round_up(n, multiple):
    return -(-n // multiple) * multiple



# ---------------------------------------------------------------------------------------------- generator
class Generator:
    """Generation driver for one model. Keep one per model (see `generator_for`): it owns the compiled graphs."""

    def __init__(self, model, bucket=DEFAULT_BUCKET):
        self.model = model
        model.set_train(False)  # dropout off (LoRA); the model's backend was fixed when it was built
        self.config = model.config
        self.bucket = int(bucket)
        self.engine = None  # made on first use, remade larger when a call needs a bigger pool

    def options(self, **kwargs):
        unknown = set(kwargs) - set(option_names())
        if unknown:
            raise TypeError(f"unknown generation option(s) {sorted(unknown)}; valid: {option_names()}")
        return GenerationOptions(**kwargs).validate()

    def engine_for(self, prompts, max_new_tokens):
        """The engine, with a pool that holds every prompt to its end at once (a power of two blocks, so repeated
        calls of similar sizes keep the compiled graphs)."""
        block = self.engine.block_size if self.engine else 16
        need = sum(blocks_for(len(p) + max_new_tokens, block) for p in prompts) + 1
        if self.engine is None or self.engine.pool.num_blocks < need or self.engine.max_seqs < len(prompts):
            blocks = max(64, 1 << (need - 1).bit_length())  # a pool of a new size is a new graph shape
            seqs = max(16, 1 << (len(prompts) - 1).bit_length())
            # float32 rows where the model offers them: generate() keeps the model's own precision (a server
            # chooses a narrower cache for memory, create_app's kv_cache_dtype)
            dtype = "float32" if "float32" in self.model.kv_cache_dtypes() else "auto"
            self.engine = Engine(self.model, blocks, block, max_step_tokens=max(256, seqs), max_seqs=seqs,
                                 kv_cache_dtype=dtype)
        return self.engine

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
        if options.use_cache:
            yield from self._engine_stream(prompts, options)
            return
        stop_ids = stop_ids_of(options, self.config.eos_token_id)
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
        logit_steps = self._full_logits(tokens, mask, prompt_len)
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

    def _engine_stream(self, prompts, options):
        """stream() on the engine: the i-th new token of every prompt together (the engine may reach them at
        different steps: prompts are read in chunks)."""
        engine = self.engine_for(prompts, options.max_new_tokens)
        seqs = [engine.add(p, options) for p in prompts]
        emitted = 0
        try:
            while True:
                while all(s.finished or len(s.output) > emitted for s in seqs):
                    if all(len(s.output) <= emitted for s in seqs):
                        return
                    yield [s.output[emitted] if len(s.output) > emitted else None for s in seqs]
                    emitted += 1
                engine.step()
        finally:  # a caller that stops early gives the blocks back
            for s in seqs:
                engine.abort(s)

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
PIPELINE_KEYWORDS = PIPELINE_SETTINGS + ("max_length", "pad_token_id", "return_dict_in_generate",
                                         "prompt_lookup_num_tokens")


def generate_for_pipeline(model, input_ids, **kwargs):
    """`model.generate(...)` as mindformers' TextGenerationPipeline (and openmind's) call it.

    Settings are `generation_settings.resolve`d as everywhere else: the call's keywords over the model directory's
    generation_config.json over the family's defaults (so `do_sample=False` is plain greedy decoding: the sampling
    knobs of a chat generation_config apply only when sampling or when passed in the call). max_length (prompt +
    new tokens) counts when max_new_tokens is not given; max_new_tokens is cut to what the context leaves after
    the prompt; prompt_lookup_num_tokens=K turns on prompt-lookup speculative decoding (transformers' name). Any
    other keyword is a TypeError naming it. Returns {"sequences": prompt + new ids per row} when
    return_dict_in_generate, else the list of rows."""
    unknown = sorted(set(kwargs) - set(PIPELINE_KEYWORDS))
    if unknown:  # as transformers' generate: a misspelt option is an error, never silently ignored
        raise TypeError(f"model.generate got unknown argument(s) {unknown}; it takes {list(PIPELINE_KEYWORDS)}")
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
    new = generator_for(model).generate(rows, **settings,
                                        prompt_lookup_num_tokens=int(kwargs.get("prompt_lookup_num_tokens") or 0))
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
