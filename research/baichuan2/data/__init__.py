"""Training data: chat records -> labelled MindRecord rows (example/dataset/belle_preprocess.py is the command line).

    errors.py      DataError (a bad record, file or option, with a reason key)
    readers.py     streaming JSON array / JSON Lines readers with file:line locations
    records.py     record formats (belle/sharegpt, alpaca, messages): one record -> conversation turns
    labelling.py   turns -> (input_ids, labels) rows in a chat format of baichuan2/chat_format.py
    tokens.py      tokenizer files: text -> ids, role/eos/pad ids
    workers.py     labelling in a fork pool, order kept
    mindrecord.py  atomic MindRecord shard writer
    preprocess.py  the driver: read -> validate -> label -> write, skip counters, --strict
    cli.py         flags and summary of belle_preprocess.py

Importing it loads neither MindSpore nor a tokenizer (workers fork before MindSpore is imported).
"""
from .cli import main, parse_args
from .errors import DataError
from .labelling import IGNORE, TEMPLATES, build_row, build_xverse_row, cut_and_pad, label_conversation
from .preprocess import preprocess
from .readers import read_file, read_json_array, read_json_lines, read_records
from .records import FORMAT_NAMES, RECORD_FORMATS, detect_format, record_turns, validate_record
from .tokens import load_encoder, resolve_token, xverse_ids

__all__ = ["main", "parse_args", "DataError", "IGNORE", "TEMPLATES", "build_row", "build_xverse_row", "cut_and_pad",
           "label_conversation", "preprocess", "read_file", "read_json_array", "read_json_lines", "read_records",
           "FORMAT_NAMES", "RECORD_FORMATS", "detect_format", "record_turns", "validate_record", "load_encoder",
           "resolve_token", "xverse_ids"]
