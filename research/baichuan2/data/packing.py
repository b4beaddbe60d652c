"""Packing (belle_preprocess.py --pack): several whole conversations per row of seq_length + 1 tokens.

Each conversation is labelled exactly as without packing (labelling.label_conversation, uncut), then whole
conversations are laid side by side in a row; the row's tail is padded as usual (inputs with the pad id, labels with
IGNORE). Not a single label changes: a conversation's slice of a packed row equals the first `length` entries of its
unpacked row.

Packing is first-fit-decreasing per block of conversations (preprocess.BLOCK, in input order, so it does not depend
on --num_workers): the block's conversations are taken longest first (ties: input order) and each goes into the
first row, in creation order, that still has room for all of its tokens and holds fewer than `width` conversations;
otherwise it opens a new row. A conversation longer than a row is cut as without packing (labelling.cut_and_pad)
and fills a row alone. A block writes its cut conversations' rows first (input order), then the packed rows in
creation order.

Column `actual_seq_len` (int32 [width], MindFormers' name): the cumulative ends of the row's conversations in the
row of seq_length + 1 tokens (conversation k occupies [ends[k-1], ends[k]), ends[-1] := 0), padded on the right
with seq_length + 1. The padding tokens after the last conversation thus form a segment of their own. The model
(modeling_baichuan.segments_from_ends) turns the ends into segment ids: attention is causal within a segment only,
positions restart at 0 in each segment, and the target that would cross a conversation end (the last token of one
conversation predicting the first label of the next) is dropped, so a packed row trains exactly as its
conversations one by one.

    Worked example (seq_length 11, width 4; A has 5 tokens, B 4, pad p):
        input_ids      = [A A A A A B B B B p p p]
        actual_seq_len = [5, 9, 12, 12]      segment ids = [0 0 0 0 0 1 1 1 1 2 2 2]
"""
import numpy as np

from ..chat_format import IGNORE
from .labelling import cut_and_pad


def pack_width(seq_length):
    """Width of `actual_seq_len`, i.e. the most conversations one row holds: a conversation has at least 5 tokens
    (role tokens, one token of each text, eos), and rows of conversations averaging under 32 tokens are rare; the
    width is kept small because the model compares every position with every end."""
    return max(8, (seq_length + 1) // 32)


def targets_of(labels):
    """Targets the model trains on in one conversation: labels[1:] that are not IGNORE."""
    return int((np.asarray(labels[1:]) != IGNORE).sum())


def first_fit_decreasing(lengths, capacity, width):
    """Bins (lists of indices into `lengths`) by first-fit-decreasing, each bin at most `capacity` tokens and
    `width` items; longest first, ties in input order; bins in creation order, items in placement order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, room = [], []
    for i in order:
        for b, free in enumerate(room):
            if lengths[i] <= free and len(bins[b]) < width:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_block(conversations, ids, seq_length, width):
    """conversations: [(inputs, labels)] uncut int32 arrays of one block. Returns (rows, counts): rows are dicts
    {input_ids, labels, actual_seq_len} and per-row (conversations, real tokens, targets, truncated) are in counts;
    conversations without a target (none after a cut) are left out and counted in counts["no_loss"], their
    positions in `conversations` listed in counts["no_loss_at"]."""
    total = seq_length + 1
    counts = {"rows": [], "no_loss": 0, "no_loss_at": []}
    whole, long_ones = [], []
    for at, (inputs, labels) in enumerate(conversations):
        (whole if len(inputs) <= total else long_ones).append((inputs, labels, at))
    rows = []
    for inputs, labels, at in long_ones:  # cut as without packing, alone in its row
        cut_inputs, cut_labels, length, _ = cut_and_pad(list(inputs), list(labels), ids, seq_length)
        targets = targets_of(cut_labels[:length])
        if targets == 0:
            counts["no_loss_at"].append(at)
            continue
        rows.append((np.asarray(cut_inputs, np.int32), np.asarray(cut_labels, np.int32), [total]))
        counts["rows"].append((1, length, targets, True))
    counts["no_loss_at"] += [at for inputs, labels, at in whole if targets_of(labels) == 0]
    counts["no_loss"] = len(counts["no_loss_at"])
    kept = [(inputs, labels) for inputs, labels, at in whole if targets_of(labels) > 0]
    for members in first_fit_decreasing([len(c[0]) for c in kept], total, width):
        inputs = np.concatenate([kept[i][0] for i in members])
        labels = np.concatenate([kept[i][1] for i in members])
        ends = np.cumsum([len(kept[i][0]) for i in members])
        pad = total - len(inputs)
        rows.append((np.concatenate([inputs, np.full(pad, ids["pad"])]).astype(np.int32),
                     np.concatenate([labels, np.full(pad, IGNORE)]).astype(np.int32), ends.tolist()))
        counts["rows"].append((len(members), len(inputs), sum(targets_of(kept[i][1]) for i in members), False))
    packed = [{"input_ids": inputs, "labels": labels,
               "actual_seq_len": np.asarray(ends + [total] * (width - len(ends)), np.int32)}
              for inputs, labels, ends in rows]
    return packed, counts
