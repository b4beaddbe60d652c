"""The preprocessing driver: record files -> validated turns -> labelled rows -> one MindRecord shard.

    read (readers.py) -> validate (records.py) -> label in workers (workers.py, labelling.py) -> write (mindrecord.py)

Bad input is reported, never lost silently: by default a bad record is skipped, printed and counted by reason (a
malformed record costs that record only: the readers resynchronise at the next one); with `strict` the first problem
stops the run (DataError) and nothing is written. A file that cannot be read at all (not UTF-8, no permission) stops
the run before anything is read, unless `skip_bad_files` (then it is left out and reported). Counts are kept per
file: records read, written (in a row) and skipped. Rows whose every target is masked after truncation (the user
turn alone fills the row) are dropped and counted: they carry no loss and would make a batch's mean loss divide by
zero. With `pack` (packing.py) the workers return uncut conversations and each block is packed several
conversations per row in the main process (so rows do not depend on the worker count).
"""
import glob
import os
import sys
import time
from collections import Counter

from ..chat_format import IGNORE
from .errors import DataError
from .mindrecord import RowWriter, check_output
from .packing import pack_block, pack_width
from .readers import check_readable, read_file
from .records import detect_format, record_turns
from .tokens import default_template, template_ids
from .workers import Labeller

BLOCK = 2048  # records labelled per batch (bounds memory whatever the input size)


def preprocess(args):
    """Runs the conversion described by `args` (the attributes of belle_preprocess.py's flags: input_glob,
    model_file, template, format, output_file, seq_length, num_workers, strict, overwrite, user_token,
    assistant_token, quiet, pack); returns the stats dict. Raises DataError for anything that must stop the run."""
    start = time.time()
    paths = sorted(glob.glob(args.input_glob))
    if not paths:
        raise DataError("config", f"--input_glob {args.input_glob!r} matches no file; check the pattern "
                                  f"(quote it so the shell does not expand it)")
    for path in paths:  # before anything is read or written: a wrong pattern is not a data problem
        if os.path.isdir(path):
            raise DataError("config", f"--input_glob {args.input_glob!r} matches the directory {path!r}; give a "
                                      f"pattern of files, e.g. '{os.path.join(path, '*.json')}'")
        if os.path.getsize(path) == 0:
            raise DataError("config", f"{path} is empty (0 bytes): no record to read; fill it or leave it out of "
                                      "--input_glob")
    if not os.path.isfile(args.model_file):
        raise DataError("config", f"--model_file {args.model_file!r}: tokenizer file not found")
    if args.seq_length < 1 or args.num_workers < 1:
        raise DataError("config", "--seq_length and --num_workers must be positive")
    bad_files = _unreadable_files(paths, getattr(args, "skip_bad_files", False))
    paths = [p for p in paths if p not in bad_files]
    out = os.path.abspath(args.output_file)
    check_output(out, args.overwrite)
    template = args.template or default_template(args.model_file)
    ids = template_ids(template, args.model_file, args.user_token, args.assistant_token)

    stats, skipped = Counter(), Counter()
    per_file = {path: Counter() for path in paths}  # read / written / skipped records of each file
    pack = getattr(args, "pack", False)
    width = pack_width(args.seq_length) if pack else 0
    # the Labeller forks its workers before RowWriter imports MindSpore
    with Labeller(args.model_file, ids, args.seq_length, template, args.num_workers) as labeller, \
            RowWriter(out, args.seq_length, f"{template} chat rows" + (" (packed)" if pack else ""),
                      width) as writer:
        for block in _blocks(_valid_turns(paths, args, stats, skipped, per_file)):
            sources, turns = [b[0] for b in block], [b[1] for b in block]
            if pack:
                writer.write(_packed_rows(labeller.conversations(turns), args.seq_length, ids, width, stats,
                                          skipped, sources, per_file))
            else:
                writer.write(_keep_rows(labeller.rows(turns), stats, skipped, sources, per_file))
        if stats["written"] == 0:
            raise DataError("config", f"no valid record to write from {len(paths)} file(s) "
                                      f"(skipped: {dict(skipped) or 'none'}); nothing was written")
        writer.commit()

    stats["skipped"] = sum(skipped.values())
    stats["seconds"] = time.time() - start
    if not pack:
        stats["conversations"] = stats["written"]
    slots = args.seq_length + 1
    return {**stats, "skipped_by_reason": dict(sorted(skipped.items())),
            "loss_fraction": stats["loss_tokens"] / max(stats["tokens"], 1), "files": len(paths) + len(bad_files),
            "per_file": {path: dict(read=c["read"], written=c["written"], skipped=c["skipped"])
                         for path, c in per_file.items()}, "bad_files": bad_files,
            # fill: real tokens / token slots, of the rows written and of one row per conversation (unpacked)
            "fill": stats["tokens"] / max(stats["written"] * slots, 1),
            "fill_unpacked": stats["tokens"] / max(stats["conversations"] * slots, 1)}


def _unreadable_files(paths, skip_bad_files):
    """{path: problem} of the files that cannot be read as UTF-8 text; without skip_bad_files the first stops the
    run (DataError naming it) before anything is read or written."""
    bad = {}
    for path in paths:
        problem = check_readable(path)
        if problem is None:
            continue
        if not skip_bad_files:
            raise DataError("unreadable_file", f"{problem}; nothing was written (fix the file, leave it out of "
                                               "--input_glob, or pass --skip_bad_files to go on without it)")
        print(f"skipped file: {problem} (--skip_bad_files)", file=sys.stderr)
        bad[path] = problem
    if bad and len(bad) == len(paths):
        raise DataError("unreadable_file", f"no file of --input_glob can be read ({len(bad)} skipped); nothing was "
                                           "written")
    return bad


def _valid_turns(paths, args, stats, skipped, per_file):
    """(file, turns) of every good record in order; a bad one is skipped and counted, or (strict) stops the run. With
    --format auto each file's format comes from its first record; a first record of no known format stops the run.
    Progress: bytes read of all files, on stderr when it is a terminal (as tqdm does by default), never --quiet."""
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel

    bar = tqdm(total=sum(os.path.getsize(p) for p in paths), unit="B", unit_scale=True, unit_divisor=1024,
               desc="reading", file=sys.stderr, disable=True if args.quiet else None)
    for path in paths:
        record_format = None if args.format == "auto" else args.format
        for where, record in read_file(path, bar.update):
            stats["read"] += 1
            per_file[path]["read"] += 1
            if record_format is None and not isinstance(record, DataError):
                record_format = detect_format(record, where)  # not one bad record: the file cannot be read
            try:
                if isinstance(record, DataError):
                    raise record
                yield path, record_turns(record, where, record_format)
            except DataError as e:
                if args.strict:
                    raise DataError(e.reason, f"{e} (--strict: stopping; nothing was written)") from None
                skipped[e.reason] += 1
                per_file[path]["skipped"] += 1
                print(f"skipped: {e}", file=sys.stderr)
    bar.close()


def _blocks(items):
    block = []
    for item in items:
        block.append(item)
        if len(block) >= BLOCK:
            yield block
            block = []
    yield block


def _packed_rows(conversations, seq_length, ids, width, stats, skipped, sources, per_file):
    """One block's packed rows (packing.pack_block), counted into stats (per_file: by the sources' files)."""
    rows, counts = pack_block(list(conversations), ids, seq_length, width)
    if counts["no_loss"]:
        skipped["no_loss_after_truncation"] += counts["no_loss"]
    dropped = set(counts["no_loss_at"])
    for at, source in enumerate(sources):
        per_file[source]["skipped" if at in dropped else "written"] += 1
    for members, length, targets, truncated in counts["rows"]:
        stats["written"] += 1
        stats["conversations"] += members
        stats["truncated"] += int(truncated)
        stats["tokens"] += length
        stats["loss_tokens"] += targets
    return rows


def _keep_rows(rows, stats, skipped, sources, per_file):
    """The rows worth writing, counted into stats (per_file: by the sources' files); drops those with no target
    left."""
    kept = []
    for (inputs, labels, length, truncated), source in zip(rows, sources):
        targets = int((labels[1:] != IGNORE).sum())
        per_file[source]["written" if targets else "skipped"] += 1
        if targets == 0:  # nothing to learn and a zero divisor for the mean loss
            skipped["no_loss_after_truncation"] += 1
            continue
        stats["written"] += 1
        stats["truncated"] += int(truncated)
        stats["tokens"] += length
        stats["loss_tokens"] += targets
        kept.append({"input_ids": inputs, "labels": labels})
    return kept
