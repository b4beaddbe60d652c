"""Generation settings: one resolver for every way this model generates text (chat.py, example/inference.py, the
server, the openmind / mindformers pipeline through `model.generate`).

    settings = resolve(config, {"max_new_tokens": args.max_new_tokens}, generation_config=saved, chat=True)
    Generator(model).generate(prompts, **settings)

Each setting comes from the highest of four layers that sets it (None is "not set" in every layer, so command-line
options default to None and only what the user typed overrides the file):

    4. the caller's explicit arguments
    3. the model directory's generation_config.json (convert_weight.py writes it; users edit it)
    2. the family's defaults, `ChatFormat.generation` in chat_format.py: Baichuan2-Chat's sampling for chat
       families, greedy decoding for base models (also what generation_config.json starts as)
    1. NEUTRAL: greedy with every sampling knob off, the base family's max_new_tokens (the Generator's own defaults)

Greedy stays plain greedy: when the result does not sample, the sampling knobs (temperature, top_k, top_p,
repetition_penalty) of a layer that samples are left out. A layer samples when its do_sample, or the do_sample of
the layers under it when it has none, is true. So asking Baichuan2-Chat for greedy decoding gives the model's plain
greedy choice (its file's repetition_penalty 1.05 belongs to its sampling), while a generation_config.json that
itself says do_sample false keeps its repetition_penalty, as transformers reads it. The caller's own knobs always
apply.

chat=True adds the chat format's stop ids (a new user turn ends a Baichuan2 reply) to the stop_token_ids.

This module is copied into model directories with generation.py (the pipeline resolves here as well), so it imports
the standard library and chat_format.py only, and chat_format.py imports nothing of the project. mindformers' remote
code loader copies only the relative imports of the auto_map module itself, so modeling_baichuan.py imports both.
"""
import json
import math
import numbers
import os
from types import MappingProxyType

from .chat_format import BASE_DEFAULTS, config_ids, get as chat_format_named

SAMPLING_KNOBS = ("temperature", "top_k", "top_p", "repetition_penalty")
NEUTRAL = MappingProxyType(dict({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0},
                                **BASE_DEFAULTS))
# every setting the resolver knows, with its kind; eos_token_id None means the model config's eos, () no eos stop
KINDS = MappingProxyType({"max_new_tokens": int, "do_sample": bool, "temperature": float, "top_k": int,
                          "top_p": float, "repetition_penalty": float, "eos_token_id": "ids",
                          "stop_token_ids": "ids", "seed": int, "use_cache": bool})
# the settings a command line offers (add_arguments); use_cache and eos / stop ids are set by the program
CLI_SETTINGS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


# ---------------------------------------------------------------------------------------------- checks
def _kind_error(key, value):
    kind = KINDS[key]
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        return None if isinstance(value, numbers.Integral) and not isinstance(value, bool) else "an integer"
    if kind is float:
        return None if isinstance(value, numbers.Real) and not isinstance(value, bool) else "a number"
    items = value if isinstance(value, (list, tuple)) else [value]
    if all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in items):
        return None
    return "a token id or a list of token ids"


def _converted(key, value):
    kind = KINDS[key]
    if kind == "ids":
        if isinstance(value, (list, tuple)):
            return [int(t) for t in value]
        return [int(value)] if key == "stop_token_ids" else int(value)
    return kind(value)


def check(settings, where=None):
    """ValueError (one line) for a value out of range; `settings` may hold any subset of KINDS. where: a string
    naming where every value came from, or a dict key -> where (one per key)."""
    get = settings.get
    problems = [(key, f"{key} must be a finite number, got {get(key)}") for key in SAMPLING_KNOBS
                if isinstance(get(key), float) and not math.isfinite(get(key))]
    if get("max_new_tokens") is not None and get("max_new_tokens") < 1:
        problems.append(("max_new_tokens", f"max_new_tokens must be >= 1, got {get('max_new_tokens')}"))
    if get("temperature") is not None and (get("temperature") < 0 or (get("do_sample") and get("temperature") == 0)):
        problems.append(("temperature", f"temperature must be > 0 when sampling, got {get('temperature')}"))
    if get("top_p") is not None and not 0 < get("top_p") <= 1:
        problems.append(("top_p", f"top_p must be in (0, 1], got {get('top_p')}"))
    if get("top_k") is not None and get("top_k") < 0:
        problems.append(("top_k", f"top_k must be >= 0, got {get('top_k')}"))
    if get("repetition_penalty") is not None and get("repetition_penalty") <= 0:
        problems.append(("repetition_penalty", f"repetition_penalty must be > 0, got {get('repetition_penalty')}"))
    if get("seed") is not None and get("seed") < 0:  # numpy's generators take seeds >= 0
        problems.append(("seed", f"seed must be >= 0, got {get('seed')}"))
    if problems:
        key, message = problems[0]
        origin = where.get(key) if isinstance(where, dict) else where
        raise ValueError(f"{origin}: {message}{_hint(origin)}" if origin else message)


def _hint(origin):
    """How to fix a bad value, by where it came from."""
    return " (fix the file, or override the setting)" if str(origin).endswith("generation_config.json") else ""


def _layer(values, where, strict):
    """The set values of one layer, type-checked and converted. strict: unknown keys are an error (a caller's
    typo); a generation_config.json holds other keys too (bos_token_id, user_token_id, ...), which are skipped."""
    unknown = sorted(set(values) - set(KINDS))
    if strict and unknown:
        raise TypeError(f"unknown generation setting(s) {unknown}; valid: {sorted(KINDS)}")
    layer = {}
    for key in KINDS:
        value = values.get(key)
        if value is None:
            continue
        wanted = _kind_error(key, value)
        if wanted:
            raise ValueError(f"{where}: {key} must be {wanted}, got {value!r}{_hint(where)}")
        layer[key] = _converted(key, value)
    check({k: v for k, v in layer.items() if k != "do_sample"}, where)  # temperature against do_sample: at the end
    return layer


# ---------------------------------------------------------------------------------------------- the layers
def read_generation_config(model_dir):
    """generation_config.json of a model directory as a dict ({} when there is none); ValueError naming the file
    when it is not a JSON object."""
    path = os.path.join(model_dir, "generation_config.json") if model_dir else ""
    if not path or not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}): fix the file or delete it to use the family's "
                         f"defaults") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object of settings: fix the file or "
                         f"delete it to use the family's defaults")
    return data


def family_defaults(config):
    """The family's generation defaults (its chat format's; a base model's when config is None)."""
    return chat_format_named(getattr(config, "chat_format", None)).generation


def resolve(config, explicit=None, generation_config=None, chat=False):
    """The generation settings of one call, as keywords for Generator.generate / Generator.stream.

    config: the model config (chat_format, role and eos ids, name_or_path); None for a bare base model.
    explicit: the caller's settings (keys of KINDS; None values are not set); an unknown key is a TypeError.
    generation_config: the model directory's generation_config.json as a dict; None reads the file in
        config.name_or_path (none there: {}).
    chat: a chat reply; the chat format's stop ids join stop_token_ids.
    Values of the wrong kind or out of range: ValueError naming the layer they came from."""
    model_dir = getattr(config, "name_or_path", None) or None
    if generation_config is None:
        generation_config = read_generation_config(model_dir)
    file_name = os.path.join(model_dir, "generation_config.json") if model_dir else "generation_config.json"
    layers = [(_layer(family_defaults(config), "the family's defaults", strict=True), "the family's defaults"),
              (_layer(generation_config, file_name, strict=False), file_name),
              (_layer(dict(explicit or {}), "the arguments", strict=True), "the arguments")]
    samples = NEUTRAL["do_sample"]
    modes = []
    for layer, _ in layers:
        samples = layer.get("do_sample", samples)
        modes.append(samples)
    settings, sources = dict(NEUTRAL), {}
    for (layer, where), layer_samples in zip(layers, modes):
        for key, value in layer.items():
            if key in SAMPLING_KNOBS and layer_samples and not samples and where != "the arguments":
                continue  # a sampling layer's knob: greedy stays plain greedy
            settings[key], sources[key] = value, where
    check(settings, sources)
    if chat:
        stops = list(settings.get("stop_token_ids") or [])
        fmt = chat_format_named(getattr(config, "chat_format", None))
        settings["stop_token_ids"] = stops + [t for t in fmt.stop_ids(config_ids(config)) if t not in stops]
    return settings


def fit_new_tokens(max_new_tokens, prompt_length, context):
    """max_new_tokens cut to what a `context`-token model leaves after the prompt (at least 1)."""
    return max(1, min(int(max_new_tokens), int(context) - int(prompt_length)))


# ---------------------------------------------------------------------------------------------- command lines
def add_arguments(parser):
    """The generation options of a command line, each defaulting to None so the model directory's
    generation_config.json decides what the user does not set; read them back with `arguments_of`."""
    group = parser.add_argument_group(
        "generation (default: the model directory's generation_config.json, then the family's defaults)")
    group.add_argument("--max_new_tokens", type=int, default=None, help="most new tokens per reply")
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--do_sample", dest="do_sample", action="store_const", const=True, default=None,
                      help="sample (with the temperature / top_k / top_p in effect)")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                      help="greedy decoding: the most likely token each step")
    group.add_argument("--temperature", type=float, default=None)
    group.add_argument("--top_k", type=int, default=None, help="0: off")
    group.add_argument("--top_p", type=float, default=None, help="1.0: off")
    group.add_argument("--repetition_penalty", type=float, default=None, help="1.0: off")
    group.add_argument("--seed", type=int, default=None, help="seed of the sampling (reproducible replies)")
    group.add_argument("--speculative", choices=["ngram"], default=None,
                       help="speculative decoding: ngram drafts tokens from the text itself (prompt lookup) and "
                            "verifies them in one step; the output is unchanged")
    group.add_argument("--num_speculative_tokens", type=int, default=4,
                       help="most tokens drafted a step with --speculative (default 4)")
    return parser


def speculation_of(args):
    """generate()'s speculative-decoding keyword from add_arguments' options ({} without --speculative)."""
    if getattr(args, "speculative", None) != "ngram":
        return {}
    return {"prompt_lookup_num_tokens": args.num_speculative_tokens}


def arguments_of(args):
    """The generation settings a parsed command line really set (add_arguments' options other than None)."""
    return {key: getattr(args, key) for key in CLI_SETTINGS if getattr(args, key, None) is not None}


__all__ = ["resolve", "read_generation_config", "family_defaults", "fit_new_tokens", "check", "add_arguments",
           "arguments_of", "speculation_of", "NEUTRAL", "KINDS"]
