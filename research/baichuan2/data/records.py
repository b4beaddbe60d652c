"""Record formats: one decoded record -> conversation turns [("system"|"user"|"assistant", text), ...] or DataError.

Every format ends in the same turns, so every format is labelled by the same rules: an optional system turn first
(laid out as the chat format's system text, see chat_format.py; never a target), then user and assistant turns
alternating from the user, at least one assistant turn. An empty system text is no system text.

    belle, sharegpt  {"conversations": [{"from": "human"|"user", "value": ...}, {"from": "gpt"|"assistant", ...}]}
                     an optional first {"from": "system"} turn, or a top-level "system" string
    alpaca           {"instruction", "input" (optional), "output", "system" (optional), "history" (optional)}
                     as LLaMA-Factory's alpaca files: history [[question, answer], ...] comes first, then the user
                     turn instruction + "\\n" + input (instruction alone when input is empty), then output
    messages         {"messages": [{"role": "system"|"user"|"assistant", "content": ...}]}, OpenAI's chat format:
                     content is a string or a list of {"type": "text", "text"} parts, joined with newlines (as the
                     server joins them)

Each format has one function, registered in RECORD_FORMATS; `detect_format` picks one from a file's first record
(--format auto). readers.py does not care which.
"""
from .errors import DataError

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
FORMAT_NAMES = ("belle", "sharegpt", "alpaca", "messages")
FORMATS_HELP = ("belle/sharegpt ('conversations' of from/value turns), alpaca ('instruction', 'input', 'output'), "
                "messages ('messages' of role/content)")


def _object(record, where):
    if not isinstance(record, dict):
        raise DataError("not_an_object", f"{where}: record is a {type(record).__name__}, expected a JSON object")


def _text(value, where, name, field):
    """`value` checked as a non-empty string; `name` says where it is ("turn 2 ('gpt')"), `field` its key."""
    if not isinstance(value, str):
        raise DataError("non_string_value", f"{where}: {name} '{field}' is a {type(value).__name__}, "
                                            f"expected a string")
    if not value.strip():
        raise DataError("empty_value", f"{where}: {name} has an empty '{field}'")
    return value


def _system(record, where):
    """The optional top-level "system" string (alpaca, sharegpt); None when absent or empty."""
    system = record.get("system")
    if system is None or system == "":
        return None
    if not isinstance(system, str):
        raise DataError("non_string_value", f"{where}: 'system' is a {type(system).__name__}, expected a string")
    return system if system.strip() else None


def _ordered(where, items, system=None):
    """Turns from items [(role, text, name, shown role)] in order: the system text first (if any), then user and
    assistant alternating from the user, at least one assistant turn."""
    turns = [("system", system)] if system else []
    for role, text, name, shown in items:
        if role == "system":
            if turns:
                raise DataError("bad_order", f"{where}: {name} is a system turn after the conversation started (or "
                                             f"a second system text); system text may only come first, once")
            if text.strip():
                turns.append(("system", text))
            continue
        spoken = len(turns) - (1 if turns and turns[0][0] == "system" else 0)
        expected = "user" if spoken % 2 == 0 else "assistant"
        if role != expected:
            raise DataError("bad_order", f"{where}: {name} is '{shown}' but a {expected} turn was expected "
                                         f"(conversations start with the user and alternate)")
        turns.append((role, text))
    if not any(role == "assistant" for role, _ in turns):
        raise DataError("no_assistant_turn", f"{where}: conversation has no assistant turn, nothing to learn")
    return turns


def belle_turns(record, where):
    """BELLE / ShareGPT: "conversations" of {"from", "value"} turns."""
    _object(record, where)
    if "conversations" not in record:
        raise DataError("missing_conversations", f"{where}: record has no 'conversations' field (--format belle/"
                                                 f"sharegpt; other layouts: --format auto, alpaca or messages)")
    convs = record["conversations"]
    if not isinstance(convs, list):
        raise DataError("conversations_not_list",
                        f"{where}: 'conversations' is a {type(convs).__name__}, expected a list of turns")
    items = []
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError("bad_turn", f"{where}: turn {i} must be an object with 'from' and 'value'")
        shown = turn["from"]
        if shown == "system" and i == 0:
            if not isinstance(turn["value"], str):
                raise DataError("non_string_value", f"{where}: turn 0 ('system') 'value' is a "
                                                    f"{type(turn['value']).__name__}, expected a string")
            items.append(("system", turn["value"], f"turn {i}", shown))
            continue
        text = _text(turn["value"], where, f"turn {i} ('{shown}')", "value")
        if shown in USER_ROLES:
            role = "user"
        elif shown in ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise DataError("unknown_role", f"{where}: turn {i} has unknown role {shown!r}; expected one of "
                                            f"{USER_ROLES + ASSISTANT_ROLES} (or 'system' as the first turn)")
        items.append((role, text, f"turn {i}", shown))
    return _ordered(where, items, _system(record, where))


def alpaca_turns(record, where):
    """Alpaca: instruction / input / output, optional system and history."""
    _object(record, where)
    for field in ("instruction", "output"):
        if field not in record:
            raise DataError("missing_field", f"{where}: alpaca record has no '{field}' field (alpaca records hold "
                                             f"'instruction', optional 'input', and 'output')")
    instruction, extra = record["instruction"], record.get("input") or ""
    for field, value in (("instruction", instruction), ("input", extra)):
        if not isinstance(value, str):
            raise DataError("non_string_value", f"{where}: '{field}' is a {type(value).__name__}, expected a string")
    question = "\n".join(part for part in (instruction, extra) if part.strip())
    if not question:
        raise DataError("empty_value", f"{where}: 'instruction' and 'input' are both empty")
    history = record.get("history") or []
    if not isinstance(history, list):
        raise DataError("bad_history", f"{where}: 'history' is a {type(history).__name__}, expected a list of "
                                       f"[question, answer] pairs")
    items = []
    for i, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise DataError("bad_history", f"{where}: history[{i}] must be a [question, answer] pair")
        items.append(("user", _text(pair[0], where, f"history[{i}]", "0"), f"history[{i}][0]", "user"))
        items.append(("assistant", _text(pair[1], where, f"history[{i}]", "1"), f"history[{i}][1]", "assistant"))
    items.append(("user", question, "instruction", "user"))
    items.append(("assistant", _text(record["output"], where, "the record", "output"), "output", "assistant"))
    return _ordered(where, items, _system(record, where))


def _content(message, where, i):
    """A message's content as one string: a string, or text parts joined with newlines."""
    content = message["content"]
    if isinstance(content, list):
        kinds = [part.get("type") if isinstance(part, dict) else type(part).__name__ for part in content]
        others = sorted({str(kind) for kind in kinds if kind != "text"})
        if others:
            raise DataError("bad_content", f"{where}: messages[{i}].content has {', '.join(others)} parts; only "
                                           f"text parts ({{'type': 'text', 'text': ...}}) can be trained on")
        texts = [part.get("text") for part in content]
        if not all(isinstance(text, str) for text in texts):
            raise DataError("bad_content", f"{where}: messages[{i}].content has a text part without a string "
                                           f"'text'")
        content = "\n".join(texts)
    return content


def messages_turns(record, where):
    """OpenAI messages: "messages" of {"role", "content"}."""
    _object(record, where)
    if "messages" not in record:
        raise DataError("missing_messages", f"{where}: record has no 'messages' field (--format messages; other "
                                            f"layouts: --format auto, belle, sharegpt or alpaca)")
    messages = record["messages"]
    if not isinstance(messages, list):
        raise DataError("messages_not_list", f"{where}: 'messages' is a {type(messages).__name__}, expected a list")
    items = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError("bad_turn", f"{where}: messages[{i}] must be an object with 'role' and 'content'")
        role = message["role"]
        if role not in ("system", "user", "assistant"):
            raise DataError("unknown_role", f"{where}: messages[{i}] has unknown role {role!r}; expected system, "
                                            f"user or assistant")
        content = _content(message, where, i)
        if role == "system":
            if not isinstance(content, str):
                raise DataError("non_string_value", f"{where}: messages[{i}] ('system') 'content' is a "
                                                    f"{type(content).__name__}, expected a string or text parts")
            items.append(("system", content, f"messages[{i}]", role))
            continue
        items.append((role, _text(content, where, f"messages[{i}] ('{role}')", "content"), f"messages[{i}]", role))
    return _ordered(where, items)


validate_record = belle_turns  # the original BELLE validator's name

RECORD_FORMATS = {"belle": belle_turns, "sharegpt": belle_turns, "alpaca": alpaca_turns, "messages": messages_turns}


def detect_format(record, where):
    """The format of a file whose first record is `record`; DataError naming the accepted formats otherwise."""
    if isinstance(record, dict):
        for key, name in (("conversations", "belle"), ("messages", "messages"), ("instruction", "alpaca")):
            if key in record:
                return name
        shown = f"an object with keys {sorted(record)[:6]}"
    else:
        shown = f"a {type(record).__name__}"
    raise DataError("unknown_format", f"{where}: cannot tell the record format: the first record is {shown}; "
                                      f"--format auto reads {FORMATS_HELP}; convert the file or pass --format")


def record_turns(record, where, record_format="belle"):
    """Turns of one decoded record in `record_format` (a key of RECORD_FORMATS); DataError when it is bad."""
    return RECORD_FORMATS[record_format](record, where)
