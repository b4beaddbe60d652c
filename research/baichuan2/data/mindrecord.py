"""MindRecord output: one shard (+ .db index) of int32 rows input_ids and labels, written atomically.
Packed files (--pack) have a third int32 column, actual_seq_len [pack width] (schema in packing.py).

The shard is written into a temporary folder next to the output and renamed into place by `commit` (MindRecord
files embed their own file name, so the temporary file already has the final name; nothing time-dependent is
embedded, so equal rows give equal bytes). Until then nothing appears at the output path, and `close` removes
the temporary folder whatever happened. The folder's name holds the writing process's id: a writer that was killed
(SIGKILL: no `close`) leaves one behind, which the next writer of the same output removes once that process is gone. Read it with `mindspore.dataset.MindDataset(path, num_shards=k,
shard_id=r)`: shards are disjoint and cover every row; when the row count is not a multiple of k, MindDataset
itself repeats a row so that every shard has ceil(rows / k).
"""
import os
import shutil
import tempfile

from .errors import DataError


def check_output(out, overwrite):
    """DataError unless `out` (absolute) may be written: not there yet (or overwrite) and its folder exists."""
    if not overwrite and (os.path.exists(out) or os.path.exists(out + ".db")):
        raise DataError("config", f"{out} already exists; pass --overwrite to replace it or choose another "
                                  f"--output_file")
    if not os.path.isdir(os.path.dirname(out)):
        raise DataError("config", f"output folder {os.path.dirname(out)} does not exist")


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(out):
    """Removes the temporary folders of earlier writers of `out` whose process no longer runs; returns them."""
    prefix = "." + os.path.basename(out) + ".tmp-"
    folder = os.path.dirname(out)
    removed = []
    for name in os.listdir(folder):
        pid = name[len(prefix):].split("-", 1)[0]
        if name.startswith(prefix) and pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(os.path.join(folder, name))
    return removed


class RowWriter:
    """Rows of seq_length + 1 tokens into `out` (absolute path); use as a context manager, call commit() last.
    pack_width > 0 adds the int32 column actual_seq_len of that width (packed rows)."""

    def __init__(self, out, seq_length, description, pack_width=0):
        from mindspore.mindrecord import FileWriter  # pylint: disable=import-outside-toplevel

        self.out = out
        try:
            remove_stale_temporaries(out)
            self.tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-{os.getpid()}-",
                                            dir=os.path.dirname(out))
        except OSError as e:  # a read-only file system, no permission
            raise DataError("config", f"cannot write in {os.path.dirname(out)} ({e.strerror or e}); choose "
                                      "another --output_file") from None
        self.tmp_out = os.path.join(self.tmp_dir, os.path.basename(out))  # MindRecord embeds its name
        try:
            self.writer = FileWriter(self.tmp_out, shard_num=1, overwrite=True)
            # the defaults (16 MB header, 32 MB pages) make even a tiny file 50 MB (sparse, but copies fill it in)
            self.writer.set_header_size(1 << 20)
            self.writer.set_page_size(max(1 << 22, 16 * (seq_length + 1) * 8))
            shape = [seq_length + 1]
            schema = {"input_ids": {"type": "int32", "shape": shape}, "labels": {"type": "int32", "shape": shape}}
            if pack_width:
                schema["actual_seq_len"] = {"type": "int32", "shape": [pack_width]}
            self.writer.add_schema(schema, description)
        except BaseException:
            self.close()
            raise

    def write(self, rows):
        """rows: [{"input_ids": int32 array, "labels": int32 array[, "actual_seq_len": int32 array]}]"""
        if rows:
            self.writer.write_raw_data(rows)

    def commit(self):
        self.writer.commit()
        # rename into place: the index first, so a visible .mindrecord always has its .db
        os.replace(self.tmp_out + ".db", self.out + ".db")
        os.replace(self.tmp_out, self.out)

    def close(self):
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
