"""Streaming readers of record files: a JSON array (never loaded whole) or JSON Lines, with file:line locations.

Readers yield (where, record | DataError): a bad record is an item, so the caller decides to skip or stop. A JSON
array whose syntax breaks (or whose bytes are not UTF-8) cannot be resynchronised: reading that file stops there,
reported with file and line. In JSON Lines only the bad line is lost. What a record must contain is checked later
(records.py), so a new record format needs no new reader.
"""
import codecs
import json

from .errors import DataError

CHUNK_BYTES = 1 << 20  # streaming read size


def _decoded_chunks(path, progress=None):
    """Non-empty text chunks, then the end; DataError (with the byte offset) on bytes that are not UTF-8.
    progress(n) is called with the number of bytes of each read."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            if progress:
                progress(len(raw))
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


def is_json_array(path):
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def read_json_array(path, progress=None):
    """Streams the elements of a top-level JSON array with JSONDecoder.raw_decode over growing chunks."""
    decoder = json.JSONDecoder()
    chunks = _decoded_chunks(path, progress)
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
    pos += 1  # the "[" checked by is_json_array
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


def read_json_lines(path, progress=None):
    """One record per non-blank line; a bad line is yielded as a DataError and reading goes on."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if progress:
                progress(len(raw))
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


def read_file(path, progress=None):
    """The records of one file in order: (where, record | DataError); progress(n) gets each read's byte count."""
    try:
        reader = read_json_array(path, progress) if is_json_array(path) else read_json_lines(path, progress)
        yield from reader
    except DataError as e:  # file-level stop (JSON array syntax, non-UTF-8)
        yield path, e


def read_records(paths, progress=None):
    """All records of all files in order: (where, record | DataError)."""
    for path in paths:
        yield from read_file(path, progress)
