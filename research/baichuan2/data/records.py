"""Record validation: one decoded record -> conversation turns [("user"|"assistant", text), ...] or DataError.

Turns alternate and start with the user; at least one assistant turn. Each record format has one function here,
registered in RECORD_FORMATS (the future --format flag picks one); readers.py does not care which.

BELLE: {"id": ..., "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}
with roles human|user and gpt|assistant. An optional first turn {"from": "system"} is glued in front of the first
user turn's text ("system\\nuser"): the system text is then masked like any user text, and the row layout stays the
reference one.
"""
from .errors import DataError

USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


def validate_record(record, where):
    """Checks one decoded record; returns turns [("user"|"assistant", text)] or raises DataError."""
    if not isinstance(record, dict):
        raise DataError("not_an_object", f"{where}: record is a {type(record).__name__}, expected a JSON object")
    if "conversations" not in record:
        raise DataError("missing_conversations", f"{where}: record has no 'conversations' field")
    convs = record["conversations"]
    if not isinstance(convs, list):
        raise DataError("conversations_not_list",
                        f"{where}: 'conversations' is a {type(convs).__name__}, expected a list of turns")
    turns, system = [], None
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError("bad_turn", f"{where}: turn {i} must be an object with 'from' and 'value'")
        role, value = turn["from"], turn["value"]
        if not isinstance(value, str):
            raise DataError("non_string_value", f"{where}: turn {i} 'value' is a {type(value).__name__}, "
                                                f"expected a string")
        if not value.strip():
            raise DataError("empty_value", f"{where}: turn {i} ('{role}') has an empty 'value'")
        if role == "system" and i == 0:
            system = value
            continue
        if role in USER_ROLES:
            role = "user"
        elif role in ASSISTANT_ROLES:
            role = "assistant"
        else:
            raise DataError("unknown_role", f"{where}: turn {i} has unknown role {role!r}; expected one of "
                                            f"{USER_ROLES + ASSISTANT_ROLES} (or 'system' as the first turn)")
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise DataError("bad_order", f"{where}: turn {i} is '{turn['from']}' but a {expected} turn was "
                                         f"expected (conversations start with the user and alternate)")
        turns.append((role, value))
    if len(turns) < 2:
        raise DataError("no_assistant_turn", f"{where}: conversation has no assistant turn, nothing to learn")
    if system is not None:
        turns[0] = ("user", system + "\n" + turns[0][1])
    return turns


RECORD_FORMATS = {"belle": validate_record}


def record_turns(record, where, record_format="belle"):
    """Turns of one decoded record in `record_format` (a key of RECORD_FORMATS); DataError when it is bad."""
    return RECORD_FORMATS[record_format](record, where)
