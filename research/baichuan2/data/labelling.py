"""Labelling: validated turns -> one training row (input_ids, labels) in a chat format of chat_format.py.

A row is the conversation laid out by the format (`ChatFormat.label_turns`), then cut on the right or padded
(inputs with the pad id, labels with IGNORE) to seq_length + 1 tokens. The model shifts: inputs[:-1] are fed,
labels[1:] are the targets. A packing step (several conversations per row) goes between the two: it takes the
uncut (inputs, labels) of `label_conversation` and fills rows itself.

baichuan2 (`build_row`; ids["user"], ids["assistant"] are the role tokens):
    user turn       inputs += [user_token] + tokens      labels += [eos] + [-100] * len(tokens)
    assistant turn  inputs += [assistant_token] + tokens labels += [-100] + tokens
    end             inputs += [eos]                      labels += [eos]
So the eos label at each user token teaches "stop after the answer", the answer tokens are learned, and user text
is never a target.

Worked example (user token U=3, assistant token A=4, eos=2, pad=0; "Hi" -> [7, 8], "Yo" -> [9], seq_length=8):
    inputs  = [U,    7,    8,    A,    9, 2, 0,    0,    0   ]
    labels  = [2,    -100, -100, -100, 9, 2, -100, -100, -100]
    fed     = inputs[:-1] = [3, 7, 8, 4, 9, 2, 0, 0]
    targets = labels[1:]  = [-100, -100, -100, 9, 2, -100, -100, -100]   (predict 9 after A, eos after 9)

xverse (`build_xverse_row`): the chat format is text, "Human: {q}\\n\\nAssistant: {a}<|endoftext|>Human: ...":
    user turn       inputs += encode("Human: " + q + "\\n\\nAssistant: ")   labels += [-100] * len
    assistant turn  inputs += encode(a) + [eos]                            labels += encode(a) + [eos]
The prompt is encoded as one string, as the chat input builder encodes it at inference. The eos after each answer
is a real input token here, so its label trains exactly what the eos label on Baichuan2's user token trains: stop
after the answer. Targets are the same as above: every answer token and one eos per answer. Nothing is appended
after the last turn (an assistant turn already ends with eos).
"""
from .. import chat_format
from ..chat_format import IGNORE

TEMPLATES = chat_format.CHAT_FORMAT_NAMES  # chat formats rows can be labelled in


def label_conversation(turns, encode, ids, template="baichuan2"):
    """(inputs, labels) of one conversation in `template`, uncut and unpadded."""
    return chat_format.get(template).label_turns(turns, encode, ids)


def cut_and_pad(inputs, labels, ids, seq_length):
    """Returns (input_ids, labels, length, truncated): both lists seq_length + 1 long, the number of real
    (non-padding) tokens, and whether the conversation was cut."""
    total = seq_length + 1
    truncated = len(inputs) > total
    inputs, labels = inputs[:total], labels[:total]
    length = len(inputs)
    pad = total - length
    return inputs + [ids["pad"]] * pad, labels + [IGNORE] * pad, length, truncated


def build_row(turns, encode, ids, seq_length, template="baichuan2"):
    """One training row from validated turns [("user"|"assistant", text), ...].

    encode: text -> list of token ids. ids: {"user", "assistant", "eos", "pad"} token ids (xverse needs only eos
    and pad: its roles are text). Returns cut_and_pad's (input_ids, labels, length, truncated).
    """
    return cut_and_pad(*label_conversation(turns, encode, ids, template), ids, seq_length)


def build_xverse_row(turns, encode, ids, seq_length):
    """build_row in the XVERSE chat format."""
    return build_row(turns, encode, ids, seq_length, "xverse")
