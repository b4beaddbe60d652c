"""Which rows each rank trains on: the MindRecord check, the per-step sample plan and the dataset reading it.

The plan is a pure function of (rows, global batch, rank, seed, step range), so a resumed run continues exactly
where the interrupted one stopped.
"""
import os

import numpy as np

from .recipe import FinetuneError

COLUMNS = ("input_ids", "labels")


def inspect_dataset(path, seq_length):
    """Checks the MindRecord exists and holds int32 `input_ids`/`labels` rows of seq_length + 1; returns row count."""
    import mindspore.dataset as ds  # pylint: disable=import-outside-toplevel
    if not path:
        raise FinetuneError("no training data: pass --train_dataset PATH.mindrecord (make one with "
                            "example/dataset/belle_preprocess.py)")
    if not os.path.isfile(path):
        raise FinetuneError(f"train dataset not found: {path} (make one with example/dataset/belle_preprocess.py)")
    try:
        data = ds.MindDataset(path, shuffle=False)
        columns = data.get_col_names()
        count = data.get_dataset_size()
    except RuntimeError as e:
        raise FinetuneError(f"train dataset {path} is not a readable MindRecord file: {e}") from e
    missing = [c for c in COLUMNS if c not in columns]
    if missing:
        raise FinetuneError(f"train dataset {path} lacks column(s) {missing}; it has {columns}, expected int32 "
                            f"{list(COLUMNS)} of length seq_length + 1")
    row = next(data.project(list(COLUMNS)).create_dict_iterator(output_numpy=True, num_epochs=1))
    for name in COLUMNS:
        if row[name].shape != (seq_length + 1,):
            raise FinetuneError(f"train dataset {path}: column {name!r} has shape {row[name].shape}, the recipe wants "
                                f"rows of seq_length + 1 = {seq_length + 1} tokens (data.seq_length {seq_length}); "
                                f"pass --seq_length {row[name].shape[0] - 1} for these rows, or re-make the data")
    return count


def epoch_order(num_samples, epoch, seed, shuffle):
    """The sample order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same one."""
    if not shuffle:
        return np.arange(num_samples)
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def rank_sample_plan(num_samples, global_batch, rank, local_batch, first_step, last_step, seed, shuffle):
    """Sample indices this rank trains on for optimizer steps [first_step, last_step), one list per step.

    Each step takes the next `global_batch` samples of the epoch order; rank r gets the r-th contiguous slice of
    `local_batch`. Ranks are disjoint; the leftover samples of an epoch (< global_batch) are dropped.
    """
    steps_per_epoch = num_samples // global_batch
    plan, order, order_epoch = [], None, None
    for step in range(first_step, last_step):
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(num_samples, epoch, seed, shuffle), epoch
        start = k * global_batch + rank * local_batch
        plan.append(order[start:start + local_batch].tolist())
    return plan


def build_dataset(path, plan, local_batch):
    """MindDataset reading exactly the planned rows, in order, batched per optimizer step."""
    import mindspore.dataset as ds  # pylint: disable=import-outside-toplevel
    # A SubsetSampler may not list more indices than the file has rows, so a run of several epochs reads one
    # MindDataset per stretch of steps without a repeated row (one epoch each) and concatenates them.
    segments, current, seen = [], [], set()
    for step in plan:
        if seen.intersection(step):
            segments.append(current)
            current, seen = [], set()
        current.extend(step)
        seen.update(step)
    segments.append(current)
    parts = [ds.MindDataset(path, columns_list=list(COLUMNS), sampler=ds.SubsetSampler(rows), num_parallel_workers=1)
             for rows in segments]
    data = parts[0]
    for part in parts[1:]:
        data = data + part
    return data.batch(local_batch, drop_remainder=True)
