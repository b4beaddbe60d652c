"""Chat formats: how each model family lays a conversation out in tokens, defined once as data.

    baichuan2  {system}<reserved_106>{user}<reserved_107>{assistant}<reserved_106>{user}<reserved_107>...
               role tokens; eos is never an input after an answer, it is the label of the next user token
    xverse     {system}\\n\\nHuman: {user}\\n\\nAssistant: {assistant}<|endoftext|>Human: {user}\\n\\nAssistant: ...
               role text, encoded together with the content; eos is a real token after each answer
    None       base models: no chat layout, greedy generation defaults

System text (neither family has a system role token): Baichuan2 puts it before the first user token as plain text
(as Baichuan2-Chat's own build_chat_input does); XVERSE puts it before "Human: " followed by a blank line (as the
XVERSE chat code is reported to do). It is never a training target.

A format lists, for each role, the parts of a turn in order: a special Token (placed by id, never by encoding its
text), literal text, or CONTENT (the message). Everything else is derived from that data, so the layout has one
home: training rows and their labels (`label_turns`, used by baichuan2.data), chat prompts from a message history
(`prompt_ids`: chat.py, server.py), stop ids, the family's generation defaults (what model_dir.py writes as
generation_config.json and generation_settings.py falls back on), the text form of a prompt (`render_text`) and the
Jinja `chat_template` of tokenizer_config.json (`chat_template`). It imports nothing of the project: it is copied
into model directories with generation_settings.py.

Tokenisation rule: text is encoded in runs that end only at a special Token, exactly as a tokenizer that splits on
special tokens reads the rendered text. So `prompt_ids(messages)` == encode(render_text(messages)) ==
apply_chat_template(messages, add_generation_prompt=True) for every family. Training rows follow the same rule with
one more boundary: a learned run (an answer) is encoded alone. For byte-level BPE (XVERSE) this matters at one place:
"Assistant: " + answer rendered whole merges the space into the answer's first token (" Hello"), while the prompt
that asks for that answer ends with the space token, after which the model generates "Hello". Rows therefore teach
the answer as it is generated; an earlier answer inside a multi-turn row keeps that form, where the prompt of a later
turn re-reads it merged (as XVERSE's chat code and apply_chat_template both do). Baichuan2's runs always end at a
role token, so its rows are exactly its prompts.

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
    one string (byte-level BPE tokenises "Human: " alone differently from "Human: q"). learned: the content and
    every part after it are training targets; earlier parts never are."""
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
    system: Optional[Turn] = None      # a system message: first only, never learned
    reply_start: Turn = NO_TURN        # opens the assistant's reply in a prompt
    closing: Turn = NO_TURN            # ends a training row; its tokens are their own labels
    user_label: Optional[Token] = None  # label of each user turn's first token: the target after the previous answer
    stop_tokens: Tuple[Token, ...] = ()  # besides eos, tokens that end a reply (the start of a new user turn)

    @property
    def has_turns(self):
        return self.user is not None

    def turn(self, role):
        turn = getattr(self, role) if role in ("user", "assistant", "system", "reply_start", "closing") else None
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
    def _runs(self, turns, learn):
        """[key, text, learned, label] runs of turns [(role, content)]: a Token is a run of its own (key set), text
        is joined until the next Token and (learn) until learned and unlearned parts meet. label: the key of the
        id that labels the run's first token (user_label), or None."""
        runs, previous = [], None
        for role, content in turns:
            turn = self.turn(role)
            for number, (key, texts, after) in enumerate(turn.plan):
                learned = learn and turn.learned and after
                label = None
                if number == 0 and role == "user" and self.user_label is not None and previous != "system":
                    label = self.user_label.key  # not after system text: the model must not learn to stop there
                if key is not None:
                    runs.append([key, None, learned, label])
                    continue
                text = "".join(content if t is CONTENT else t for t in texts)
                last = runs[-1] if runs else None
                if last and last[0] is None and last[2] == learned:
                    last[1] += text
                else:
                    runs.append([None, text, learned, label])
            previous = role
        return runs

    @staticmethod
    def _encode_runs(runs, encode, ids):
        return [([ids[key]] if key is not None else list(encode(text)), learned, label)
                for key, text, learned, label in runs if key is not None or text]

    def label_turns(self, turns, encode, ids):
        """(input_ids, labels) of a whole conversation, uncut and unpadded: turns [("system"|"user"|"assistant",
        text)] (system only first), encode: text -> ids, ids: {key: id}. Labels are IGNORE where nothing is
        learned."""
        inputs, labels = [], []
        for tokens, learned, label in self._encode_runs(self._runs(turns, learn=True), encode, ids):
            start = len(labels)
            inputs += tokens
            labels += tokens if learned else [IGNORE] * len(tokens)
            if label is not None:
                labels[start] = ids[label]
        closing = self._ids([("closing", "")], encode, ids)
        return inputs + closing, labels + closing

    def prompt_ids(self, messages, encode, ids, add_reply_start=True):
        """Prompt ids of `messages` ({"role", "content"}), ending with the reply start unless the last message is
        the assistant's: what a tokenizer that splits on special tokens makes of `render_text(messages)`."""
        turns = [(m["role"], m["content"]) for m in messages]
        if add_reply_start and messages and messages[-1]["role"] != "assistant":
            turns.append(("reply_start", ""))
        return self._ids(turns, encode, ids)

    def _ids(self, turns, encode, ids):
        return [t for tokens, _, _ in self._encode_runs(self._runs(turns, learn=False), encode, ids) for t in tokens]

    def stop_ids(self, ids):
        """Ids that end a reply besides eos (those the caller knows)."""
        return [ids[t.key] for t in self.stop_tokens if ids.get(t.key) is not None]

    # ------------------------------------------------------------------------------------------ text
    def render_text(self, messages, add_reply_start=True):
        """The prompt as text (special tokens as their pieces), what `chat_template` renders; a tokenizer that
        keeps the pieces whole encodes it to `prompt_ids`."""
        text = "".join(self.turn(m["role"]).text(m["content"]) for m in messages)
        if add_reply_start and messages and messages[-1]["role"] != "assistant":
            text += self.reply_start.text("")
        return text

    def chat_template(self):
        """`render_text` as a Jinja chat_template (Hugging Face convention: `messages` of role/content,
        `add_generation_prompt`), for tokenizer_config.json; None for a base model. Content may also be a list
        of {"type": "text", "text"} parts, joined with newlines as the server joins them."""
        if not self.has_turns:
            return None

        def expression(turn):
            parts = ["content" if p is CONTENT else _jinja_string(p.piece if isinstance(p, Token) else p)
                     for p in turn.parts]
            return "{{ " + " + ".join(parts) + " }}" if parts else ""

        roles = ["{%- if message['role'] == 'system' -%}{%- if not loop.first -%}"
                 "{{ raise_exception('a system message may only come first') }}{%- endif -%}"
                 + expression(self.system)]
        roles += [f"{{%- elif message['role'] == '{role}' -%}}" + expression(self.turn(role))
                  for role in ("user", "assistant")]
        roles.append("{%- else -%}{{ raise_exception('unknown role ' + message['role'] + "
                     "' (expected system, user or assistant)') }}{%- endif -%}")
        template = ("{%- for message in messages -%}"
                    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
                    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text') "
                    "| map(attribute='text') | join('\\n') -%}{%- endif -%}"
                    + "".join(roles) + "{%- endfor -%}")
        reply_start = expression(self.reply_start)
        if reply_start:
            template += ("{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' -%}"
                         + reply_start + "{%- endif -%}")
        return template


def _jinja_string(text):
    """A Jinja string literal of `text` (Jinja reads backslash escapes in string literals)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


# ---------------------------------------------------------------------------------------------- the formats
# The family layer of generation_settings.resolve. Chat: Baichuan2-Chat's generation_config.json (XVERSE chat models
# use the same defaults here). Base: greedy; its max_new_tokens is also the Generator's own default.
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
    system=Turn((CONTENT, "\n\n")))

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
