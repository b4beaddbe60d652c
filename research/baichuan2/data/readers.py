"""Streaming readers of record files: a JSON array (never loaded whole) or JSON Lines, with file:line locations.

Readers yield (where, record | DataError): a bad record is an item, so the caller decides to skip or stop. In JSON
Lines only the bad line is lost. In a JSON array a malformed element costs that element only: the reader
resynchronises at the next element, found by the file's layout (see _Resync); only when no later element can be
found is the rest of the file lost, and the error says so. Bytes that are not UTF-8 make a file unreadable
(check_readable, run on every file before anything is read). What a record must contain is checked later
(records.py), so a new record format needs no new reader.
"""
import codecs
import json
import re
import sys

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


def check_readable(path):
    """None when the whole file can be read as UTF-8 text, else the one-line problem naming it."""
    try:
        for _ in _decoded_chunks(path):
            pass
    except DataError as e:
        return str(e)
    except OSError as e:
        return f"{path}: cannot be read ({e.strerror or e})"
    return None


class _Resync:
    """Where the next element of a JSON array starts after a malformed one. Layout, learnt from the first elements:
    elements that start lines at one indentation (one record a line, or pretty-printed) -> the next line starting
    with '{' at that indentation after a line ending in ','. JSON strings hold no raw newline, so such a line is
    never inside a string, whatever the broken element did to the quoting. Otherwise (several elements on a line)
    -> the next ',' + '{' whose object decodes and shares a key with the records read so far."""

    def __init__(self):
        self.indent = None  # the elements' indentation, when they start lines
        self.keys = set()  # keys of the good records so far (compact layout)

    def learn(self, buf, pos, record):
        line_start = buf.rfind("\n", 0, pos) + 1
        prefix = buf[line_start:pos]
        if self.indent is None and not prefix.strip() and line_start > 0:
            self.indent = prefix
        if isinstance(record, dict):
            self.keys.update(record)

    def find(self, buf, start, decoder, eof):
        """Index in buf of the next element at or after `start`, or None (none in buf: read more, or at eof none)."""
        if self.indent is not None:
            pattern = re.compile("\n" + re.escape(self.indent) + "(?=\\{)")
            for match in pattern.finditer(buf, max(start - 1, 0)):
                before = match.start() - 1
                while before >= 0 and buf[before] in " \t\r\n":
                    before -= 1
                if before >= 0 and buf[before] == "," and self._decodes(buf, match.end(), decoder, eof):
                    return match.end()
            return None
        if not self.keys and not eof:
            return None  # nothing known yet to tell a record from a nested object: read on
        for match in re.finditer(r",\s*(?=\{)", buf[start:]):
            at = start + match.end()
            if self._decodes(buf, at, decoder, eof, need_keys=True):
                return at
        return None

    def _decodes(self, buf, at, decoder, eof, need_keys=False):
        try:
            value, end = decoder.raw_decode(buf, at)
        except json.JSONDecodeError:
            return False
        if not isinstance(value, dict) or (end >= len(buf) and not eof):
            return False
        return not need_keys or not self.keys or bool(self.keys & set(value))


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

    def resynchronised(message):
        """After a malformed element at pos (message: what is wrong, with its line): (the DataError for it, the next
        element's index in buf or None)."""
        while True:
            found = resync.find(buf, pos + 1, decoder, eof)
            if found is not None or eof:
                break
            more()
        lost = "" if found is not None else "; no later record could be found, the rest of this file was not read"
        return DataError("malformed_json", message + lost), found

    resync = _Resync()
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
                # malformed, or only cut by the chunk's end: a later element already in buf tells them apart
                if eof or resync.find(buf, pos + 1, decoder, eof) is not None:
                    at = where(pos)
                    error, found = resynchronised(f"{where(e.pos)}: malformed JSON in array element {index} "
                                                  f"({e.msg})")
                    yield at, error
                    if found is None:
                        return
                    index, pos = index + 1, found
                    continue
            more()
        resync.learn(buf, pos, record)
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
            message = f"{where(pos)}: expected ',' or ']' after array element {index - 1}, got {got}"
            if pos < len(buf) and buf[pos] == "{":  # a missing comma: the next element starts right here
                print(f"warning: {message}; read on as if the ',' were there", file=sys.stderr)
                continue
            at = where(pos)
            error, found = resynchronised(message)  # something that is no element: lost as one
            yield at, error
            if found is None:
                return
            index, pos = index + 1, found


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
