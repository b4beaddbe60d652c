"""Labelling in worker processes: blocks of validated conversations -> rows, in input order.

With num_workers > 1 a fork pool labels the blocks; each worker loads the tokenizer once. Rows do not depend on
the number of workers (imap keeps the order). Create the Labeller before MindSpore is imported: forking a process
that has loaded MindSpore is slow and unsafe, and workers need only the tokenizer.
"""
import multiprocessing

import numpy as np

from .labelling import build_row
from .tokens import load_encoder

_WORKER = {}  # this process's tokenizer and row settings


def _init_worker(model_file, ids, seq_length, template):
    _WORKER.update(encode=load_encoder(model_file), ids=ids, seq_length=seq_length, template=template)


def _label(turns):
    inputs, labels, length, truncated = build_row(turns, _WORKER["encode"], _WORKER["ids"], _WORKER["seq_length"],
                                                  _WORKER["template"])
    return np.asarray(inputs, np.int32), np.asarray(labels, np.int32), length, truncated


class Labeller:
    """rows(block) -> (input_ids, labels, length, truncated) per conversation; a context manager (ends the pool)."""

    def __init__(self, model_file, ids, seq_length, template, num_workers=1):
        args = (model_file, ids, seq_length, template)
        self.pool = None
        if num_workers > 1:
            self.pool = multiprocessing.get_context("fork").Pool(num_workers, _init_worker, args)
        else:
            _init_worker(*args)

    def rows(self, block):
        return self.pool.imap(_label, block, chunksize=64) if self.pool else map(_label, block)

    def close(self):
        if self.pool:
            self.pool.terminate()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
