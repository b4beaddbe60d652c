"""BELLE-format chat data -> MindRecord training rows for Baichuan2 (or XVERSE) finetuning.

    python example/dataset/belle_preprocess.py --input_glob 'data/*.json' --model_file dataset/tokenizer.model \
        --output_file out.mindrecord --seq_length 512 [--num_workers 2] [--strict] [--overwrite] \
        [--user_token '<reserved_106>'] [--assistant_token '<reserved_107>'] [--template baichuan2|xverse]

--model_file is a SentencePiece tokenizer.model (Baichuan families) or a Hugging Face tokenizer.json (XVERSE);
--template defaults from it: .json -> xverse, anything else -> baichuan2.

Input: every file matching --input_glob (sorted by name), each a JSON array or JSON Lines (one record per line),
read as a stream (never loaded whole). A record is

    {"id": ..., "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...]}

with roles human|user and gpt|assistant; turns must alternate and start with the user. An optional first turn
{"from": "system"} is glued in front of the first user turn's text ("system\\nuser"): the system text is then
masked like any user text, and the row layout stays the reference one.

Labelling (the Baichuan2 reference scheme, `build_row`):
    user turn       inputs += [user_token] + tokens     labels += [eos] + [-100] * len(tokens)
    assistant turn  inputs += [assistant_token] + tokens labels += [-100] + tokens
    end             inputs += [eos]                      labels += [eos]
then the row is cut on the right or padded (inputs with pad id, labels with -100) to seq_length + 1 tokens.
The model shifts: inputs[:-1] are fed, labels[1:] are the targets. So the eos label at each user token teaches
"stop after the answer", the answer tokens are learned, and user text is never a target.

Worked example (user token U=3, assistant token A=4, eos=2, pad=0; "Hi" -> [7, 8], "Yo" -> [9], seq_length=8):
    inputs  = [U,    7,    8,    A,    9, 2, 0,    0,    0   ]
    labels  = [2,    -100, -100, -100, 9, 2, -100, -100, -100]
    fed     = inputs[:-1] = [3, 7, 8, 4, 9, 2, 0, 0]
    targets = labels[1:]  = [-100, -100, -100, 9, 2, -100, -100, -100]   (predict 9 after A, eos after 9)

XVERSE template (`build_xverse_row`): the chat format is text, "Human: {q}\n\nAssistant: {a}<|endoftext|>Human: ...",
so role strings take the place of role ids:
    user turn       inputs += encode("Human: " + q + "\n\nAssistant: ")   labels += [-100] * len
    assistant turn  inputs += encode(a) + [eos]                            labels += encode(a) + [eos]
The prompt is encoded as one string, as the chat input builder encodes it at inference (byte-level BPE would
tokenise "Human: " alone differently from "Human: q"). The eos after each answer is a real input token here, as in
XVERSE's chat format, so its label trains exactly what the eos label on Baichuan2's user token trains: stop after
the answer. The targets are the same as above: every answer token and one eos per answer; user text and role
strings never are. Nothing is appended after the last turn (an assistant turn already ends with eos).

Output: one MindRecord shard (+ .db index) with int32 columns input_ids and labels of shape [seq_length + 1],
written into a temporary folder next to the output and renamed into place at the end (MindRecord files embed
their own file name, so the temporary file already has the final name). On failure nothing appears at the output
path; an existing output is replaced only with --overwrite. Rows do not depend on --num_workers (order is kept):
the .mindrecord bytes are identical for any N (the file embeds its own name, nothing time-dependent). Read it with
`mindspore.dataset.MindDataset(path, num_shards=k, shard_id=r)`: shards are disjoint and cover every row; when the
row count is not a multiple of k, MindDataset itself repeats a row so that every shard has ceil(rows / k).

Bad input is reported, never lost silently: by default a bad record is skipped and counted by reason (malformed
JSON syntax inside a JSON array, or bytes that are not UTF-8 there, stop reading that file since the array cannot
be resynchronised: the file and line are reported; in JSON Lines only the bad line is skipped). --strict stops at
the first problem with a non-zero exit. Rows whose every target is masked after truncation (the user turn alone
fills the row) are dropped and counted: they carry no loss and would make a batch's mean loss divide by zero.
"""
import argparse
import codecs
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from collections import Counter

import numpy as np

IGNORE = -100
CHUNK_BYTES = 1 << 20  # streaming read size
BLOCK = 2048           # records tokenised per batch (bounds memory whatever the input size)
USER_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")


class DataError(Exception):
    """A bad input record or file; `reason` is the counter key used in the report."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


# ----------------------------------------------------------------------------------------------------------------
# labelling: pure functions, one per chat template

def build_row(turns, encode, ids, seq_length):
    """One training row from validated turns [("user"|"assistant", text), ...] (Baichuan2 template).

    encode: text -> list of token ids. ids: {"user", "assistant", "eos", "pad"} token ids.
    Returns (input_ids, labels, length, truncated): two lists of seq_length + 1 ids, the number of real
    (non-padding) tokens, and whether the conversation was cut.
    """
    inputs, labels = [], []
    for role, text in turns:
        tokens = encode(text)
        if role == "user":
            inputs += [ids["user"]] + tokens
            labels += [ids["eos"]] + [IGNORE] * len(tokens)
        else:
            inputs += [ids["assistant"]] + tokens
            labels += [IGNORE] + tokens
    inputs.append(ids["eos"])
    labels.append(ids["eos"])
    return _cut_and_pad(inputs, labels, ids, seq_length)


XVERSE_USER_PREFIX, XVERSE_ASSISTANT_PREFIX = "Human: ", "\n\nAssistant: "


def build_xverse_row(turns, encode, ids, seq_length):
    """One training row in the XVERSE chat format (see the module docstring); same arguments and result as
    build_row ("user"/"assistant" ids are not used: the roles are text)."""
    inputs, labels = [], []
    for role, text in turns:
        if role == "user":
            tokens = encode(XVERSE_USER_PREFIX + text + XVERSE_ASSISTANT_PREFIX)
            inputs += tokens
            labels += [IGNORE] * len(tokens)
        else:
            tokens = encode(text) + [ids["eos"]]
            inputs += tokens
            labels += tokens
    return _cut_and_pad(inputs, labels, ids, seq_length)


TEMPLATES = {"baichuan2": build_row, "xverse": build_xverse_row}


def _cut_and_pad(inputs, labels, ids, seq_length):
    total = seq_length + 1
    truncated = len(inputs) > total
    inputs, labels = inputs[:total], labels[:total]
    length = len(inputs)
    pad = total - length
    return inputs + [ids["pad"]] * pad, labels + [IGNORE] * pad, length, truncated


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


# ----------------------------------------------------------------------------------------------------------------
# streaming readers: yield (where, record) or raise DataError (record-level errors are yielded as DataError items)

def _decoded_chunks(path):
    """Non-empty text chunks, then the end; DataError (with the byte offset) on bytes that are not UTF-8."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise DataError("non_utf8", f"{path}: bytes at offset {offset + e.start} are not valid UTF-8 "
                                            f"({e.reason}); re-encode the file as UTF-8") from None
            if text:  # a chunk may end inside a multi-byte character and decode to nothing yet
                yield text
            if not raw:
                return
            offset += len(raw)


def _is_json_array(path):
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def read_json_array(path):
    """Streams the elements of a top-level JSON array with JSONDecoder.raw_decode over growing chunks."""
    decoder = json.JSONDecoder()
    chunks = _decoded_chunks(path)
    buf, pos, eof = "", 0, False
    cursor = [0, 1]  # (index in buf, its line number), moved forward only so line counting stays linear

    def line_of(at):
        if at < cursor[0]:
            return cursor[1] - buf.count("\n", at, cursor[0])
        cursor[1] += buf.count("\n", cursor[0], at)
        cursor[0] = at
        return cursor[1]

    def more():
        nonlocal buf, pos, eof
        line_of(pos)
        cursor[0] = 0
        buf = buf[pos:]
        pos = 0
        text = next(chunks, None)
        eof = eof or text is None
        buf += text or ""

    def skip_ws():
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n\ufeff":
                pos += 1
            if pos < len(buf) or eof:
                return
            more()

    def where(at):
        return f"{path}:{line_of(at)}"

    skip_ws()
    pos += 1  # the '[' checked by _is_json_array
    skip_ws()
    if pos < len(buf) and buf[pos] == "]":
        return
    index = 0
    while True:
        skip_ws()
        while True:
            try:
                record, end = decoder.raw_decode(buf, pos)
                # a value ending exactly at the buffer end may continue in the next chunk (numbers, literals)
                if end < len(buf) or eof:
                    break
            except json.JSONDecodeError as e:
                if eof:
                    raise DataError("malformed_json", f"{where(e.pos)}: malformed JSON in array element {index} "
                                                      f"({e.msg}); the rest of this file was not read") from None
            more()
        yield where(pos), record
        index += 1
        pos = end
        skip_ws()
        if pos < len(buf) and buf[pos] == ",":
            pos += 1
        elif pos < len(buf) and buf[pos] == "]":
            return
        else:
            got = repr(buf[pos]) if pos < len(buf) else "end of file"
            raise DataError("malformed_json", f"{where(pos)}: expected ',' or ']' after array element {index - 1}, "
                                              f"got {got}; the rest of this file was not read")


def read_json_lines(path):
    """One record per non-blank line; a bad line is yielded as a DataError and reading goes on."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, DataError("non_utf8", f"{where}: byte {e.start} of the line is not valid UTF-8 "
                                                   f"({e.reason}); re-encode the file as UTF-8")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, DataError("malformed_json", f"{where}: malformed JSON at column {e.colno} ({e.msg})")


def read_records(paths):
    """All records of all files in order: (where, record | DataError)."""
    for path in paths:
        try:
            reader = read_json_array(path) if _is_json_array(path) else read_json_lines(path)
            yield from reader
        except DataError as e:  # file-level stop (JSON array syntax, non-UTF-8)
            yield path, e


# ----------------------------------------------------------------------------------------------------------------
# tokenisation (in worker processes when --num_workers > 1)

_WORKER = {}


def load_encoder(model_file):
    """text -> ids of a SentencePiece model or (for a .json file) a Hugging Face tokenizer.json, no bos/eos added."""
    if model_file.endswith(".json"):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(model_file)
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=model_file).encode


def _init_worker(model_file, ids, seq_length, template="baichuan2"):
    _WORKER.update(encode=load_encoder(model_file), ids=ids, seq_length=seq_length, build=TEMPLATES[template])


def _tokenise(turns):
    inputs, labels, length, truncated = _WORKER["build"](turns, _WORKER["encode"], _WORKER["ids"],
                                                         _WORKER["seq_length"])
    return np.asarray(inputs, np.int32), np.asarray(labels, np.int32), length, truncated


def resolve_token(sp, value, flag):
    """Id of a role token given as a piece ('<reserved_106>') or an id ('195'); must be one piece of the model."""
    if value.isdigit():
        token_id = int(value)
        if token_id >= sp.get_piece_size():
            raise DataError("config", f"{flag} {value}: id is outside the vocabulary (size {sp.get_piece_size()})")
        return token_id
    token_id = sp.piece_to_id(value)
    if token_id == sp.unk_id() or sp.encode(value) != [token_id]:
        raise DataError("config", f"{flag} {value!r} is not a single piece of the tokenizer (it encodes to "
                                  f"{sp.encode(value)}); pass a piece of the model or its id")
    return token_id


def xverse_ids(model_file):
    """eos/pad ids of an XVERSE tokenizer.json (`<|endoftext|>`, `<pad>`); both must exist."""
    if not model_file.endswith(".json"):
        raise DataError("config", f"--template xverse needs a Hugging Face tokenizer.json, got {model_file}")
    from tokenizers import Tokenizer
    try:
        tok = Tokenizer.from_file(model_file)
    except Exception as e:  # the tokenizers library raises bare Exceptions for unreadable files
        raise DataError("config", f"--model_file {model_file}: not a readable tokenizer.json ({e})") from None
    ids = {"eos": tok.token_to_id("<|endoftext|>"), "pad": tok.token_to_id("<pad>")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise DataError("config", f"--model_file {model_file}: no {' / '.join(missing)} token "
                                  f"(XVERSE uses <|endoftext|> as eos and <pad> as pad)")
    return ids


# ----------------------------------------------------------------------------------------------------------------
# driver

def parse_args(argv):
    p = argparse.ArgumentParser(description="BELLE-format chat data -> MindRecord rows for Baichuan2 finetuning")
    p.add_argument("--input_glob", required=True, help="glob of .json (array) / .jsonl files, read in sorted order")
    p.add_argument("--model_file", required=True,
                   help="SentencePiece tokenizer.model, or tokenizer.json (Hugging Face tokenizers, XVERSE)")
    p.add_argument("--template", choices=sorted(TEMPLATES),
                   help="chat layout and labelling (default: xverse for a .json tokenizer, else baichuan2)")
    p.add_argument("--output_file", required=True, help="output .mindrecord (its .db index is written beside it)")
    p.add_argument("--seq_length", type=int, default=512, help="rows are seq_length + 1 tokens")
    p.add_argument("--num_workers", type=int, default=1, help="tokenisation processes (output does not change)")
    p.add_argument("--strict", action="store_true", help="stop at the first bad record (exit code 2)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--user_token", default="<reserved_106>", help="piece or id starting user turns (baichuan2)")
    p.add_argument("--assistant_token", default="<reserved_107>",
                   help="piece or id starting assistant turns (baichuan2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def preprocess(args):
    """Runs the conversion; returns the stats dict. Raises DataError for anything that must stop the run."""
    import sentencepiece as spm
    from tqdm import tqdm

    start = time.time()
    paths = sorted(glob.glob(args.input_glob))
    if not paths:
        raise DataError("config", f"--input_glob {args.input_glob!r} matches no file; check the pattern "
                                  f"(quote it so the shell does not expand it)")
    if not os.path.isfile(args.model_file):
        raise DataError("config", f"--model_file {args.model_file!r}: tokenizer file not found")
    if args.seq_length < 1 or args.num_workers < 1:
        raise DataError("config", "--seq_length and --num_workers must be positive")
    out = os.path.abspath(args.output_file)
    if not args.overwrite and (os.path.exists(out) or os.path.exists(out + ".db")):
        raise DataError("config", f"{out} already exists; pass --overwrite to replace it or choose another "
                                  f"--output_file")
    if not os.path.isdir(os.path.dirname(out)):
        raise DataError("config", f"output folder {os.path.dirname(out)} does not exist")

    template = args.template or ("xverse" if args.model_file.endswith(".json") else "baichuan2")
    if template == "xverse":
        ids = xverse_ids(args.model_file)
    else:
        if args.model_file.endswith(".json"):
            raise DataError("config", f"--template baichuan2 needs a SentencePiece tokenizer.model, got "
                                      f"{args.model_file}")
        sp = spm.SentencePieceProcessor(model_file=args.model_file)
        ids = {"user": resolve_token(sp, args.user_token, "--user_token"),
               "assistant": resolve_token(sp, args.assistant_token, "--assistant_token"),
               "eos": sp.eos_id(), "pad": sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()}

    stats = Counter()
    skipped = Counter()
    # fork the workers before MindSpore is imported: they only need sentencepiece
    pool = None
    if args.num_workers > 1:
        import multiprocessing
        pool = multiprocessing.get_context("fork").Pool(args.num_workers, _init_worker,
                                                        (args.model_file, ids, args.seq_length, template))
    else:
        _init_worker(args.model_file, ids, args.seq_length, template)
    from mindspore.mindrecord import FileWriter

    tmp_dir = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
    try:
        tmp_out = os.path.join(tmp_dir, os.path.basename(out))  # MindRecord embeds its name: keep the final one
        writer = FileWriter(tmp_out, shard_num=1, overwrite=True)
        # the defaults (16 MB header, 32 MB pages) make even a tiny file 50 MB (sparse, but copies fill it in)
        writer.set_header_size(1 << 20)
        writer.set_page_size(max(1 << 22, 16 * (args.seq_length + 1) * 8))
        shape = [args.seq_length + 1]
        writer.add_schema({"input_ids": {"type": "int32", "shape": shape},
                           "labels": {"type": "int32", "shape": shape}}, f"{template} chat rows")

        def flush(block):
            rows = pool.imap(_tokenise, block, chunksize=64) if pool else map(_tokenise, block)
            batch = []
            for inputs, labels, length, truncated in rows:
                targets = int((labels[1:] != IGNORE).sum())
                if targets == 0:  # nothing to learn and a zero divisor for the mean loss
                    skipped["no_loss_after_truncation"] += 1
                    continue
                stats["written"] += 1
                stats["truncated"] += int(truncated)
                stats["tokens"] += length
                stats["loss_tokens"] += targets
                batch.append({"input_ids": inputs, "labels": labels})
            if batch:
                writer.write_raw_data(batch)

        block = []
        bar = tqdm(read_records(paths), unit=" rec", disable=args.quiet, file=sys.stderr, desc="records")
        for where, record in bar:
            stats["read"] += 1
            try:
                if isinstance(record, DataError):
                    raise record
                block.append(validate_record(record, where))
            except DataError as e:
                if args.strict:
                    raise DataError(e.reason, f"{e} (--strict: stopping; nothing was written)") from None
                skipped[e.reason] += 1
                print(f"skipped: {e}", file=sys.stderr)
                continue
            if len(block) >= BLOCK:
                flush(block)
                block = []
        flush(block)
        bar.close()
        if stats["written"] == 0:
            raise DataError("config", f"no valid record to write from {len(paths)} file(s) "
                                      f"(skipped: {dict(skipped) or 'none'}); nothing was written")
        writer.commit()
        # rename into place: the index first, so a visible .mindrecord always has its .db
        os.replace(tmp_out + ".db", out + ".db")
        os.replace(tmp_out, out)
    finally:
        if pool:
            pool.terminate()
        shutil.rmtree(tmp_dir, ignore_errors=True)

    stats["skipped"] = sum(skipped.values())
    stats["seconds"] = time.time() - start
    return {**stats, "skipped_by_reason": dict(sorted(skipped.items())),
            "loss_fraction": stats["loss_tokens"] / max(stats["tokens"], 1), "files": len(paths)}


def main(argv=None):
    args = parse_args(argv)
    try:
        stats = preprocess(args)
    except DataError as e:
        print(f"belle_preprocess: error: {e}", file=sys.stderr)
        return 2
    print(f"files: {stats['files']}  records read: {stats['read']}  written: {stats['written']}  "
          f"skipped: {stats['skipped']} {stats['skipped_by_reason'] or ''}")
    print(f"rows truncated: {stats['truncated']}  tokens: {stats['tokens']}  "
          f"tokens with loss: {stats['loss_fraction']:.1%}  seconds: {stats['seconds']:.1f}")
    print(f"wrote {os.path.abspath(args.output_file)} (+ .db), rows of {args.seq_length + 1} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
