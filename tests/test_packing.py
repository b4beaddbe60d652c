"""Packing (belle_preprocess.py --pack, data/packing.py) and packed rows in the model and finetune.py.

A packed row must train exactly as its conversations one by one: same loss (token-weighted) and gradients, for a
RoPE and an ALiBi family; packing keeps every conversation whole, once, with unchanged labels; output does not
depend on the worker count; a packed MindRecord trains through msrun.sh on 2 workers.
"""
import json
import os
import subprocess

import mindspore as ms
import numpy as np
import pytest
from mindspore import Tensor

import baichuan2.data as bp
from baichuan2.chat_format import IGNORE
from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.data.packing import first_fit_decreasing, pack_block, pack_width
from baichuan2.modeling_baichuan import BaichuanForCausalLM, segments_from_ends
from helpers import REPO, free_port

MODEL = os.path.join(REPO, "dataset", "tokenizer.model")
SAMPLE = os.path.join(REPO, "dataset", "belle_sample.json")
IDS = {"user": 3, "assistant": 4, "eos": 2, "pad": 0}


def read(path, columns=("input_ids", "labels", "actual_seq_len")):
    import mindspore.dataset as ds
    data = ds.MindDataset(str(path), columns_list=list(columns), shuffle=False)
    return [{c: r[c] for c in columns} for r in data.create_dict_iterator(output_numpy=True)]


def preprocess(tmp_path, name, seq_length, *extra, input_glob=SAMPLE):
    (tmp_path / name).mkdir()
    out = tmp_path / name / "rows.mindrecord"  # same file name everywhere: MindRecord embeds it in the header
    assert bp.main(["--input_glob", input_glob, "--model_file", MODEL, "--output_file", str(out),
                    "--seq_length", str(seq_length), "--quiet", *extra]) == 0
    return out


def conversations_of(row):
    """(inputs, labels) of each conversation in a packed row, cut at its actual_seq_len ends (the segment of
    padding after the last conversation, if any, starts with the pad id: a conversation starts with a role token)."""
    starts = [0] + [int(e) for e in row["actual_seq_len"][:-1]]
    return [(tuple(row["input_ids"][s:e]), tuple(row["labels"][s:e]))
            for s, e in zip(starts, (int(e) for e in row["actual_seq_len"])) if e > s and row["input_ids"][s] != 0]


def unpacked_conversation(row, pad):
    """(inputs, labels) of the real tokens of an unpacked row (conversations end with eos, never with pad)."""
    real = np.nonzero(row["input_ids"] != pad)[0]
    length = int(real[-1]) + 1
    return tuple(row["input_ids"][:length]), tuple(row["labels"][:length])


# ---------------------------------------------------------------------------------------------- packing
def test_first_fit_decreasing_hand_computed():
    lengths = [3, 7, 5, 4, 1, 3]
    # longest first, ties in input order: i1 (7), i2 (5), i3 (4), i0 (3), i5 (3), i4 (1); capacity 8:
    # i1 -> new [7]; i2 -> new [5]; i3 -> new [4]; i0 -> bin1 (5+3=8); i5 -> bin2 (4+3=7); i4 -> bin0 (7+1=8)
    assert first_fit_decreasing(lengths, 8, 4) == [[1, 4], [2, 0], [3, 5]]
    # the width caps the conversations per row
    assert first_fit_decreasing([1, 1, 1], 8, 2) == [[0, 1], [2]]


def test_pack_block_schema_and_cut_conversation():
    def conv(n, first=10):
        inputs = np.arange(first, first + n, dtype=np.int32)
        return inputs, np.where(np.arange(n) % 2 == 0, inputs, IGNORE).astype(np.int32)
    rows, counts = pack_block([conv(5), conv(14, 50), conv(4, 30)], IDS, seq_length=11, width=4)
    # the 14-token conversation is longer than the 12-token row: cut, alone, first
    assert rows[0]["actual_seq_len"].tolist() == [12, 12, 12, 12]
    assert rows[0]["input_ids"].tolist() == list(range(50, 62))
    # then the 5 and the 4 tokens side by side, padding after them
    assert rows[1]["actual_seq_len"].tolist() == [5, 9, 12, 12]
    assert rows[1]["input_ids"].tolist() == list(range(10, 15)) + list(range(30, 34)) + [0, 0, 0]
    assert rows[1]["labels"].tolist()[9:] == [IGNORE] * 3
    assert [c[3] for c in counts["rows"]] == [True, False] and counts["no_loss"] == 0
    assert segments_from_ends(Tensor(rows[1]["actual_seq_len"][None]), 12).asnumpy().tolist() == \
        [[0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2]]


def test_packed_sample_keeps_every_conversation_once_with_its_labels(tmp_path, capsys):
    # seq_length 64: some sample conversations are longer than a row and are cut, as without packing
    plain = read(preprocess(tmp_path, "plain", 64), ("input_ids", "labels"))
    capsys.readouterr()
    packed_path = preprocess(tmp_path, "packed", 64, "--pack")
    summary = capsys.readouterr().out
    packed = read(packed_path)
    assert len(packed) < len(plain) * 3 // 4
    assert all(r["actual_seq_len"].shape == (pack_width(64),) for r in packed)
    from collections import Counter
    from_packed = Counter(c for row in packed for c in conversations_of(row))
    from_plain = Counter(unpacked_conversation(row, IDS["pad"]) for row in plain)
    assert from_packed == from_plain  # same conversations, each once, labels unchanged
    cut = sum(1 for row in plain if row["input_ids"][-1] != IDS["pad"] and row["input_ids"][-1] != IDS["eos"])
    assert cut > 0
    assert f"420 conversations (rows before packing) -> {len(packed)} rows" in summary
    assert f"rows truncated: {cut} " in summary


def test_packed_output_identical_for_1_and_2_workers(tmp_path):
    outs = [preprocess(tmp_path, f"w{n}", 64, "--pack", "--num_workers", str(n)).read_bytes() for n in (1, 2)]
    assert outs[0] == outs[1]


def test_pack_strict_still_stops(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    records = json.load(open(SAMPLE, encoding="utf-8"))[:5] + [{"id": "x", "conversations": "oops"}]
    bad.write_text(json.dumps(records), encoding="utf-8")
    (tmp_path / "o").mkdir()
    out = tmp_path / "o" / "rows.mindrecord"
    code = bp.main(["--input_glob", str(bad), "--model_file", MODEL, "--output_file", str(out), "--seq_length",
                    "64", "--pack", "--strict", "--quiet"])
    assert code == 2 and "--strict" in capsys.readouterr().err
    assert os.listdir(tmp_path / "o") == []  # atomic: nothing written


# ---------------------------------------------------------------------------------------------- model
FAMILY_OVERRIDES = {"rope": {}, "alibi": {"position_encoding": "alibi", "num_attention_heads": 4}}


def random_conversation(rng, length, user_token=3, assistant_token=4, eos=2):
    """A baichuan2-layout conversation: labels start with eos at the user token (so a packed row's crossing target
    would be a real one), user text masked, answer learned."""
    split = int(rng.integers(2, length - 2))
    inputs = np.concatenate([[user_token], rng.integers(10, 1000, split - 2), [assistant_token],
                             rng.integers(10, 1000, length - split - 1), [eos]]).astype(np.int32)
    labels = inputs.copy()
    labels[0] = eos
    labels[1:split] = IGNORE
    return inputs, labels


def loss_and_grads(model, *inputs):
    params = model.trainable_params()
    loss, grads = ms.value_and_grad(lambda *a: model(*a), None, params)(*inputs)
    return float(loss.asnumpy()), [g.asnumpy() for g in grads]


@pytest.mark.parametrize("family", sorted(FAMILY_OVERRIDES))
def test_packed_batch_trains_as_its_conversations_one_by_one(family, pynative):
    ms.set_seed(3)
    config = BaichuanConfig.from_preset("tiny", **FAMILY_OVERRIDES[family])
    model = BaichuanForCausalLM(config)
    model.set_train(True)
    rng = np.random.default_rng(0)
    seq_length, width = 31, 4
    rows = [[random_conversation(rng, n) for n in (9, 12, 7)], [random_conversation(rng, n) for n in (14, 11)]]
    packed, _ = zip(*[pack_block(convs, IDS, seq_length, width) for convs in rows])
    packed = [r[0] for r in packed]
    assert [len(conversations_of(r)) for r in packed] == [3, 2]
    batch = {c: Tensor(np.stack([r[c] for r in packed])) for c in ("input_ids", "labels", "actual_seq_len")}
    loss, grads = loss_and_grads(model, batch["input_ids"], batch["labels"], None, batch["actual_seq_len"])

    # reference: every conversation alone in its own (unpacked, padded) row, losses weighted by their targets
    total, weighted, weighted_grads = 0, 0.0, None
    for inputs, labels in (c for convs in rows for c in convs):
        row_in, row_lab, _, _ = bp.cut_and_pad(list(inputs), list(labels), IDS, seq_length)
        targets = int((np.asarray(row_lab[1:]) != IGNORE).sum())
        one_loss, one_grads = loss_and_grads(model, Tensor([row_in], ms.int32), Tensor([row_lab], ms.int32))
        total += targets
        weighted += one_loss * targets
        weighted_grads = [g * targets for g in one_grads] if weighted_grads is None else \
            [w + g * targets for w, g in zip(weighted_grads, one_grads)]
    ref_loss, ref_grads = weighted / total, [g / total for g in weighted_grads]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * float(np.abs(r).max()))

    # without their ends (attention and targets leaking across conversations) the rows give another loss, by
    # far more than the tolerance above (an untrained model predicts almost uniformly, hence no larger gap)
    leaky, _ = loss_and_grads(model, batch["input_ids"], batch["labels"])
    assert abs(leaky - ref_loss) > 1e-4 * abs(ref_loss)


# ---------------------------------------------------------------------------------------------- finetune
def test_finetune_detects_packed_files_and_refuses_bad_ends(tmp_path):
    from mindspore.mindrecord import FileWriter
    from baichuan2.training import FinetuneError
    from baichuan2.training.plan import build_dataset, dataset_columns, inspect_dataset
    packed = preprocess(tmp_path, "packed", 64, "--pack")
    assert dataset_columns(str(packed)) == ["input_ids", "labels", "actual_seq_len"]
    assert inspect_dataset(str(packed), 64) == len(read(packed))
    batch = next(build_dataset(str(packed), [[0, 1]], 2).create_dict_iterator(output_numpy=True))
    assert batch["actual_seq_len"].shape == (2, pack_width(64))
    bad = str(tmp_path / "bad.mindrecord")
    writer = FileWriter(bad, shard_num=1, overwrite=True)
    writer.add_schema({"input_ids": {"type": "int32", "shape": [65]}, "labels": {"type": "int32", "shape": [65]},
                       "actual_seq_len": {"type": "int32", "shape": [4]}}, "rows")
    row = np.arange(65, dtype=np.int32)
    writer.write_raw_data([{"input_ids": row, "labels": row, "actual_seq_len": np.array([30, 20, 65, 65], np.int32)}])
    writer.commit()
    with pytest.raises(FinetuneError, match="non-decreasing conversation ends"):
        inspect_dataset(bad, 64)


@pytest.mark.slow
def test_packed_mindrecord_trains_through_msrun(tmp_path):
    data = preprocess(tmp_path, "data", 64, "--pack")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: {preset: tiny, overrides: {max_position_embeddings: 128, model_max_length: 128}}\n"
                      "data: {seq_length: 64, shuffle: true}\n"
                      "train: {seed: 5, max_steps: 3, batch_size: 2, grad_accum_steps: 2, lr: 1.0e-3}\n"
                      "output: {save_steps: 3, log_steps: 1, tokenizer_dir: dataset}\n")
    out = tmp_path / "run"
    proc = subprocess.run(["bash", os.path.join(REPO, "msrun.sh"),
                           f"{REPO}/example/finetune.py --config {recipe} --train_dataset {data} --output_dir {out}",
                           "2", str(free_port()), str(tmp_path / "logs")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "train_log.jsonl", encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    assert (out / "model" / "model.safetensors").is_file()
