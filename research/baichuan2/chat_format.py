"""Chat formats: how each model family lays a conversation out in tokens, defined once as data.

    baichuan2  <reserved_106>{user}<reserved_107>{assistant}<reserved_106>{user}<reserved_107>...
               role tokens; eos is never an input after an answer, it is the label of the next user token
    xverse     Human: {user}\\n\\nAssistant: {assistant}<|endoftext|>Human: {user}\\n\\nAssistant: ...
               role text, encoded together with the content; eos is a real token after each answer
    None       base models: no chat layout, greedy generation defaults

A format lists, for each role, the parts of a turn in order: a special Token (placed by id, never by encoding its
text), literal text, or CONTENT (the message). Everything else is derived from that data, so the layout has one
home: training rows and their labels (`label_turns`, used by baichuan2.data), chat prompts from a message history
(`message_ids`, `reply_start_ids`: chat.py, server.py), stop ids, generation_config.json defaults (model_dir.py), and
the text form of a prompt (`render_text`: the same walk a Jinja `chat_template` would be rendered from).

A Jinja `chat_template` is `render_text` written in Jinja: for each message its turn's parts in order (a Token's
piece, text as is, `{{ message['content'] }}` for CONTENT), then reply_start when add_generation_prompt. Caveat for
byte-level BPE (XVERSE): text rendered whole and tokenised at once can merge across a turn boundary ("Assistant: "
then the answer) where message_ids encodes each turn alone; the two agree for a single user message.

Token ids come as a dict keyed by Token.key ("user", "assistant", "eos"): from a model config (`config_ids`) or
from the tokenizer and preprocessing flags.
"""
import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional, Tuple

IGNORE = -100  # label of a position that is not a training target


@dataclass(frozen=True)
class Token:
    """A special token: `key` names its id in an ids dict, `piece` is its text in the vocabulary."""
    key: str
    piece: str


class _Content:
    def __repr__(self):
        return "CONTENT"


CONTENT = _Content()  # where the message's text goes in a turn


@dataclass(frozen=True)
class Turn:
    """The parts of one message in order (Token, literal text or CONTENT). Adjacent text and content are encoded as
    one string, as the prompt is at inference (byte-level BPE tokenises "Human: " alone differently from
    "Human: q"). learned: the content and every part after it are training targets; earlier parts never are."""
    parts: tuple
    learned: bool = False

    @functools.cached_property
    def plan(self):
        """The runs to produce, worked out once: (token key, None, after) for a Token, (None, texts, after) for a
        stretch of text and content; `after`: the run holds or follows the content."""
        plan, pending, after = [], [], False
        for part in self.parts + (None,):
            if part is CONTENT or isinstance(part, str):
                pending.append(part)
                after = after or part is CONTENT
                continue
            if pending:
                plan.append((None, tuple(pending), after))
                pending = []
            if part is not None:
                plan.append((part.key, None, after))
        return tuple(plan)

    def runs(self, content, encode, ids):
        """[(token ids, learned)] of this turn with `content` in it."""
        runs = []
        for key, texts, after in self.plan:
            tokens = [ids[key]] if key is not None else list(encode("".join(
                content if t is CONTENT else t for t in texts)))
            runs.append((tokens, self.learned and after))
        return runs

    def ids(self, content, encode, ids):
        return [t for tokens, _ in self.runs(content, encode, ids) for t in tokens]

    def text(self, content):
        """The turn as text, special tokens as their pieces."""
        return "".join(content if p is CONTENT else p.piece if isinstance(p, Token) else p for p in self.parts)


NO_TURN = Turn(())


@dataclass(frozen=True)
class ChatFormat:
    """One family's chat layout (see the module docstring); name None is the base model (no turns)."""
    name: Optional[str]
    generation: MappingProxyType       # generation_config.json defaults: sampling and max_new_tokens
    user: Optional[Turn] = None
    assistant: Optional[Turn] = None
    system: Optional[Turn] = None      # a system message at inference (training glues it into the first user turn)
    reply_start: Turn = NO_TURN        # opens the assistant's reply in a prompt
    closing: Turn = NO_TURN            # ends a training row; its tokens are their own labels
    user_label: Optional[Token] = None  # label of each user turn's first token: the target after the previous answer
    stop_tokens: Tuple[Token, ...] = ()  # besides eos, tokens that end a reply (the start of a new user turn)

    @property
    def has_turns(self):
        return self.user is not None

    def turn(self, role):
        turn = getattr(self, role) if role in ("user", "assistant", "system") else None
        if turn is None:
            raise ValueError(f"chat format {self.name!r} has no {role!r} turn")
        return turn

    def token_keys(self):
        """Keys of every special token the layout places (the ids a caller must supply), user/assistant/eos first."""
        turns = [t for t in (self.user, self.assistant, self.system, self.reply_start, self.closing) if t]
        parts = [p for t in turns for p in t.parts] + list(self.stop_tokens) + [self.user_label]
        keys = {p.key for p in parts if isinstance(p, Token)}
        first = [key for key in ("user", "assistant", "eos") if key in keys]
        return first + sorted(keys - set(first))

    # ------------------------------------------------------------------------------------------ token ids
    def label_turns(self, turns, encode, ids):
        """(input_ids, labels) of a whole conversation, uncut and unpadded: turns [("user"|"assistant", text)],
        encode: text -> ids, ids: {key: id}. Labels are IGNORE where nothing is learned."""
        inputs, labels = [], []
        for role, text in turns:
            start = len(labels)
            for tokens, learned in self.turn(role).runs(text, encode, ids):
                inputs += tokens
                labels += tokens if learned else [IGNORE] * len(tokens)
            if role == "user" and self.user_label is not None and len(labels) > start:
                labels[start] = ids[self.user_label.key]
        closing = self.closing.ids("", encode, ids)
        return inputs + closing, labels + closing

    def message_ids(self, role, content, encode, ids):
        """Prompt ids of one message (no labels)."""
        return self.turn(role).ids(content, encode, ids)

    def reply_start_ids(self, encode, ids):
        return self.reply_start.ids("", encode, ids)

    def stop_ids(self, ids):
        """Ids that end a reply besides eos (those the caller knows)."""
        return [ids[t.key] for t in self.stop_tokens if ids.get(t.key) is not None]

    # ------------------------------------------------------------------------------------------ text
    def render_text(self, messages, add_reply_start=True):
        """The prompt as text (special tokens as their pieces), what a Jinja chat_template renders; a tokenizer
        that keeps the pieces whole encodes it to `message_ids` (+ `reply_start_ids`)."""
        text = "".join(self.turn(m["role"]).text(m["content"]) for m in messages)
        if add_reply_start and messages and messages[-1]["role"] != "assistant":
            text += self.reply_start.text("")
        return text


# ---------------------------------------------------------------------------------------------- the formats
# Baichuan2-Chat's generation_config.json; XVERSE chat models use the same defaults here.
CHAT_DEFAULTS = MappingProxyType({"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
                                  "repetition_penalty": 1.05, "max_new_tokens": 2048})
BASE_DEFAULTS = MappingProxyType({"do_sample": False, "max_new_tokens": 512})  # base models decode greedily

USER_TOKEN = Token("user", "<reserved_106>")
ASSISTANT_TOKEN = Token("assistant", "<reserved_107>")
BAICHUAN2_EOS = Token("eos", "</s>")
XVERSE_EOS = Token("eos", "<|endoftext|>")

BAICHUAN2 = ChatFormat(
    name="baichuan2", generation=CHAT_DEFAULTS,
    user=Turn((USER_TOKEN, CONTENT)),
    assistant=Turn((ASSISTANT_TOKEN, CONTENT), learned=True),
    system=Turn((CONTENT,)),
    reply_start=Turn((ASSISTANT_TOKEN,)),
    closing=Turn((BAICHUAN2_EOS,)),
    user_label=BAICHUAN2_EOS,
    stop_tokens=(USER_TOKEN,))

XVERSE = ChatFormat(
    name="xverse", generation=CHAT_DEFAULTS,
    user=Turn(("Human: ", CONTENT, "\n\nAssistant: ")),  # already ends with the reply start
    assistant=Turn((CONTENT, XVERSE_EOS), learned=True),
    system=Turn((CONTENT,)))

BASE = ChatFormat(name=None, generation=BASE_DEFAULTS)

FORMATS = {f.name: f for f in (BAICHUAN2, XVERSE, BASE)}
CHAT_FORMAT_NAMES = sorted(name for name, f in FORMATS.items() if f.has_turns)


def get(name):
    """The format called `name` (None: base model)."""
    if name not in FORMATS:
        raise ValueError(f"unknown chat format {name!r}; expected one of {CHAT_FORMAT_NAMES} or None (base model)")
    return FORMATS[name]


def config_ids(config):
    """Special token ids of a model config, keyed as the formats' Tokens."""
    return {"user": getattr(config, "user_token_id", None), "assistant": getattr(config, "assistant_token_id", None),
            "eos": getattr(config, "eos_token_id", None)}


def for_config(config):
    """(format, ids) of a config that must chat; ValueError for a base model or missing role ids."""
    fmt = FORMATS.get(config.chat_format)
    if fmt is None or not fmt.has_turns:
        raise ValueError(f"model family {config.family!r} has no chat format (chat_format={config.chat_format!r}); "
                         f"chat needs one of {CHAT_FORMAT_NAMES}: use plain generation for base models")
    ids = config_ids(config)
    missing = [key for key in fmt.token_keys() if ids.get(key) is None]
    if missing:
        raise ValueError(f"chat_format {fmt.name!r} needs {' and '.join(k + '_token_id' for k in missing)} "
                         f"in the config")
    return fmt, ids
