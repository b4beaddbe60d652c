"""MindRecord output: one shard (+ .db index) of int32 rows input_ids and labels, written atomically.

The shard is written into a temporary folder next to the output and renamed into place by `commit` (MindRecord
files embed their own file name, so the temporary file already has the final name; nothing time-dependent is
embedded, so equal rows give equal bytes). Until then nothing appears at the output path, and `close` removes
the temporary folder whatever happened. Read it with `mindspore.dataset.MindDataset(path, num_shards=k,
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


class RowWriter:
    """Rows of seq_length + 1 tokens into `out` (absolute path); use as a context manager, call commit() last."""

    def __init__(self, out, seq_length, description):
        from mindspore.mindrecord import FileWriter  # pylint: disable=import-outside-toplevel

        self.out = out
        self.tmp_dir = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
        self.tmp_out = os.path.join(self.tmp_dir, os.path.basename(out))  # MindRecord embeds its name
        try:
            self.writer = FileWriter(self.tmp_out, shard_num=1, overwrite=True)
            # the defaults (16 MB header, 32 MB pages) make even a tiny file 50 MB (sparse, but copies fill it in)
            self.writer.set_header_size(1 << 20)
            self.writer.set_page_size(max(1 << 22, 16 * (seq_length + 1) * 8))
            shape = [seq_length + 1]
            self.writer.add_schema({"input_ids": {"type": "int32", "shape": shape},
                                    "labels": {"type": "int32", "shape": shape}}, description)
        except BaseException:
            self.close()
            raise

    def write(self, rows):
        """rows: [{"input_ids": int32 array, "labels": int32 array}]"""
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
