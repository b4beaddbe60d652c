"""Multi-turn chat: prompt building from a message history, generation options, streamed text.

    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好!"},
                {"role": "user", "content": "你是谁?"}]
    ids = build_chat_input(config, tokenizer.encode, messages, max_new_tokens=2048)
    answer = chat(model, tokenizer, messages)                       # text
    for piece in chat(model, tokenizer, messages, stream=True): ...  # text pieces as they are generated
    answer = chat(model, tokenizer, messages, do_sample=False, max_new_tokens=64)   # settings the caller sets

History rule (as Baichuan2-Chat): whole rounds are added newest-first while they fit in
model_max_length - max_new_tokens (the newest round is always kept), then the prompt ends with the assistant turn
marker and is cut from the left to that budget.

The layout (role tokens or role text, system text, reply start, stop ids) comes from `config.chat_format`, defined
in chat_format.py, which also writes it as the chat_template of tokenizer_config.json: the prompt is the tokenised
text that template renders for the kept messages. Generation settings are generation_settings.resolve'd: the
caller's keywords over the model directory's generation_config.json over the family's defaults.
"""
import warnings

from . import chat_format as formats
from .generation import generator_for
from .generation_settings import resolve


def _rounds(messages):
    """Splits messages into (system text, rounds), a round starting at each user message."""
    system, rounds = "", []
    for number, message in enumerate(messages):
        if message["role"] == "system":
            if number:
                raise ValueError("a system message may only come first")
            system = message["content"]
            continue
        if message["role"] not in ("user", "assistant"):
            raise ValueError(f"unknown role {message['role']!r} (expected system, user or assistant)")
        if message["role"] == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(message)
    return system, rounds


def fit_max_new_tokens(config, max_new_tokens):
    """A reply budget that leaves room for history: at most half of model_max_length (only small demo models
    hit this; Baichuan2's 2048 of 4096 passes unchanged)."""
    limit = max(1, config.model_max_length // 2)
    if max_new_tokens > limit:
        warnings.warn(f"max_new_tokens={max_new_tokens} is more than half of the {config.model_max_length}-token "
                      f"context; using {limit}", stacklevel=3)
        return limit
    return max_new_tokens


def build_chat_input(config, encode, messages, max_new_tokens=None):
    """Prompt token ids for `messages` ({"role": "system"|"user"|"assistant", "content": str}, oldest first): the
    ids of the kept messages rendered by the format's chat_template (`ChatFormat.prompt_ids`), so a client using
    tokenizer.apply_chat_template(messages, add_generation_prompt=True) sends the same ids. max_new_tokens: the
    reply's budget, kept free of history (None: what chat_options resolves for this config)."""
    if not messages:
        raise ValueError("messages is empty")
    fmt, ids = formats.for_config(config)
    if max_new_tokens is None:
        max_new_tokens = chat_options(config)["max_new_tokens"]
    max_input = config.model_max_length - max_new_tokens
    if max_input < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for input in model_max_length "
                         f"{config.model_max_length}")
    system, rounds = _rounds(messages)
    head = [{"role": "system", "content": system}] if system else []
    history_budget = max_input - len(fmt.prompt_ids(head, encode, ids, add_reply_start=False))
    kept, used = [], 0
    for round_messages in reversed(rounds):  # newest first, each round measured alone
        size = len(fmt.prompt_ids(round_messages, encode, ids, add_reply_start=False))
        if kept and used + size > history_budget:
            break
        kept, used = round_messages + kept, used + size
        if used >= history_budget:
            break
    tokens = fmt.prompt_ids(head + kept, encode, ids)  # encoded whole, as the chat_template renders it
    return tokens[-max_input:]  # cut from the left


# ---------------------------------------------------------------------------------------------- generation
def chat_options(config, generation_config=None, **explicit):
    """Generation settings of a chat reply (generation_settings.resolve: `explicit` over generation_config, by
    default the file in config.name_or_path, over the family's defaults), stopping at eos and at a new user turn;
    max_new_tokens fitted to leave room for history."""
    options = resolve(config, explicit, generation_config=generation_config, chat=True)
    options["max_new_tokens"] = fit_max_new_tokens(config, options["max_new_tokens"])
    return options


def stream_text(tokenizer, token_steps):
    """Text pieces from a stream of token ids: decodes everything so far and yields what is new, holding back
    an incomplete multi-byte character (shown as U+FFFD) until its remaining bytes arrive."""
    ids, shown = [], ""
    for token in token_steps:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        if len(text) > len(shown):
            yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > len(shown):
        yield text[len(shown):]


def chat(model, tokenizer, messages, stream=False, generation_config=None, **explicit):
    """The assistant's reply to `messages` as text, or (stream=True) an iterator of text pieces. Settings as
    chat_options resolves them (generation_config: the directory's file, read from config.name_or_path if None);
    prompt_lookup_num_tokens=K decodes with prompt-lookup speculation (same reply)."""
    config = model.config
    lookup = explicit.pop("prompt_lookup_num_tokens", 0)  # speculative decoding: the engine's, not a setting
    options = chat_options(config, generation_config, **explicit)
    prompt = build_chat_input(config, tokenizer.encode, messages, options["max_new_tokens"])
    steps = (step[0] for step in generator_for(model).stream([prompt], **options, prompt_lookup_num_tokens=lookup))
    pieces = stream_text(tokenizer, steps)
    return pieces if stream else "".join(pieces)
