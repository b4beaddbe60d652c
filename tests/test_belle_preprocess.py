"""example/dataset/belle_preprocess.py: labelling, streaming readers, bad input, atomic output, sharded reading."""
import json
import os
import subprocess

import numpy as np
import pytest

import baichuan2.data as bp
from baichuan2.data import readers
from helpers import REPO, conv, read_rows, record, run_module, write_json

MODEL = os.path.join(REPO, "dataset", "tokenizer.model")
IDS = {"user": 3, "assistant": 4, "eos": 2, "pad": 0}


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def run(tmp_path, pattern, *extra, out_name="out.mindrecord", seq_length=24):
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / out_name
    code = bp.main(["--input_glob", pattern, "--model_file", MODEL, "--output_file", str(out),
                    "--seq_length", str(seq_length), "--quiet", *extra])
    return code, out


def good_records(n):
    return [record(i, f"What is {i} + 1?", f"{i + 1}.") for i in range(n)]


# ---------------------------------------------------------------------------------------------------- labelling

def test_two_turn_row_hand_computed(tmp_path):
    # pieces of the bundled tokenizer, written out:
    #   "Hello!" -> H el l o !  = 600 328 551 545 659     "你好"   -> 你好    = 496
    #   "谢谢"   -> 谢 谢        = 697 697                 "不客气" -> 不 客 气 = 767 780 620
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=MODEL)
    assert sp.encode("Hello!", out_type=str) == ["H", "el", "l", "o", "!"]
    assert [sp.encode(t) for t in ("Hello!", "你好", "谢谢", "不客气")] == [
        [600, 328, 551, 545, 659], [496], [697, 697], [767, 780, 620]]
    assert [sp.piece_to_id(p) for p in ("<reserved_106>", "<reserved_107>", "</s>", "<unk>")] == [3, 4, 2, 0]

    path = write_json(tmp_path / "a.json", [record(0, "Hello!", "你好", "谢谢", "不客气")])
    code, out = run(tmp_path, path, seq_length=19)
    assert code == 0
    M = -100
    expected_inputs = [3, 600, 328, 551, 545, 659, 4, 496, 3, 697, 697, 4, 767, 780, 620, 2, 0, 0, 0, 0]
    expected_labels = [2, M, M, M, M, M, M, 496, 2, M, M, M, 767, 780, 620, 2, M, M, M, M]
    assert read_rows(out) == [(expected_inputs, expected_labels)]


def test_build_row_truncates_on_the_right():
    encode = lambda text: [10 + int(c) for c in text]  # noqa: E731  (digits -> ids 10..19)
    inputs, labels, length, truncated = bp.build_row([("user", "12"), ("assistant", "345")], encode, IDS, 5)
    assert inputs == [3, 11, 12, 4, 13, 14] and labels == [2, -100, -100, -100, 13, 14]
    assert (length, truncated) == (6, True)
    inputs, labels, length, truncated = bp.build_row([("user", "1"), ("assistant", "2")], encode, IDS, 7)
    assert inputs == [3, 11, 4, 12, 2, 0, 0, 0] and labels == [2, -100, -100, 12, 2, -100, -100, -100]
    assert (length, truncated) == (5, False)


def test_system_turn_comes_first():
    # laid out by the chat format (Baichuan2: plain text before the first user token), never a target
    turns = bp.validate_record({"conversations": [{"from": "system", "value": "Be brief."}] + conv("Hi", "Yo")}, "x")
    assert turns == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo")]
    assert bp.validate_record({"conversations": conv("a", "b", roles=("user", "assistant"))}, "x") == [
        ("user", "a"), ("assistant", "b")]


def test_rows_without_loss_are_dropped(tmp_path):
    path = write_json(tmp_path / "a.json", [record(0, "x " * 40, "answer"), record(1, "hi", "ok")])
    code, out = run(tmp_path, path, seq_length=8)
    assert code == 3 and len(read_rows(out)) == 1  # written, with a record skipped: exit status 3


def test_role_token_flags(tmp_path, capsys):
    path = write_json(tmp_path / "a.json", [record(0, "Hello!", "你好")])
    code, out = run(tmp_path, path, "--user_token", "5", "--assistant_token", "<reserved_106>", seq_length=9)
    assert code == 0
    assert read_rows(out)[0][0][:8] == [5, 600, 328, 551, 545, 659, 3, 496]
    code, _ = run(tmp_path, path, "--user_token", "<reserved_999>", out_name="b.mindrecord")
    assert code == 2 and "not a single piece" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- readers

@pytest.mark.parametrize("chunk", [3, 7, 1 << 20])
def test_streaming_json_array_matches_json_load(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)
    records = [record(i, f"问题 {i} ü", f"answer {i} 😀") for i in range(5)] + [{"id": 5.25, "conversations": []}]
    path = write_json(tmp_path / "a.json", records)
    got = list(bp.read_json_array(path))
    assert [r for _, r in got] == records
    assert got[1][0] == f"{path}:15"  # line where the second element starts (14 lines per element + "[")


def test_jsonl_and_array_inputs_give_same_rows(tmp_path):
    records = good_records(6)
    write_json(tmp_path / "a.json", records[:3])
    write_jsonl(tmp_path / "b.jsonl", [json.dumps(r) for r in records[3:]])
    code, out = run(tmp_path, str(tmp_path / "*.json*"))
    (tmp_path / "c").mkdir()
    write_json(tmp_path / "c" / "all.json", records)
    code2, out2 = run(tmp_path, str(tmp_path / "c" / "all.json"), out_name="all.mindrecord")
    assert code == code2 == 0 and read_rows(out) == read_rows(out2) and len(read_rows(out)) == 6


# ---------------------------------------------------------------------------------------------------- bad input

BAD_RECORDS = {
    "missing_conversations": ({"id": 1}, "no 'conversations' field"),
    "conversations_not_list": ({"id": 1, "conversations": "hi"}, "expected a list"),
    "unknown_role": ({"conversations": conv("a", "b", roles=("human", "robot"))}, "unknown role 'robot'"),
    "empty_value": ({"conversations": conv("a", "  ")}, "empty 'value'"),
    "non_string_value": ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
                         "'value' is a int"),
    "bad_order": ({"conversations": conv("a", "b", roles=("human", "human"))}, "expected"),
    "starts_with_assistant": ({"conversations": conv("a", "b", roles=("gpt", "human"))}, "start with the user"),
}


def assert_nothing_written(tmp_path):
    assert os.listdir(tmp_path / "out") == [], "output or temporary files left behind"


@pytest.mark.parametrize("name", sorted(BAD_RECORDS))
def test_bad_record_strict_stops(tmp_path, capsys, name):
    bad, message = BAD_RECORDS[name]
    path = write_json(tmp_path / "a.json", good_records(2) + [bad] + good_records(2))
    code, _ = run(tmp_path, path, "--strict")
    err = capsys.readouterr().err
    assert code == 2 and message in err and f"{path}:" in err and "--strict" in err
    assert_nothing_written(tmp_path)


def test_bad_records_skipped_and_counted(tmp_path, capsys):
    lines = [json.dumps(r) for r in good_records(3)] + [json.dumps(b) for b, _ in BAD_RECORDS.values()]
    lines.insert(1, '{"id": 9, "conversations": [')  # malformed line: JSON Lines go on after it
    path = write_jsonl(tmp_path / "a.jsonl", lines)
    stats = bp.preprocess(bp.parse_args(["--input_glob", path, "--model_file", MODEL, "--output_file",
                                         str(tmp_path / "x.mindrecord"), "--seq_length", "16", "--quiet"]))
    assert stats["written"] == 3 and stats["read"] == 3 + len(BAD_RECORDS) + 1
    assert stats["skipped_by_reason"] == {"bad_order": 2, "conversations_not_list": 1, "empty_value": 1,
                                          "malformed_json": 1, "missing_conversations": 1, "non_string_value": 1,
                                          "unknown_role": 1}
    assert stats["per_file"] == {path: {"read": 3 + len(BAD_RECORDS) + 1, "written": 3,
                                        "skipped": len(BAD_RECORDS) + 1}}
    err = capsys.readouterr().err
    assert f"{path}:2: malformed JSON" in err


def test_malformed_json_array(tmp_path, capsys):
    text = json.dumps(good_records(2), indent=1)[:-1] + ',\n {"id": 7, "conversations": [}\n]'
    path = str(tmp_path / "a.json")
    open(path, "w").write(text)
    code, _ = run(tmp_path, path, "--strict")
    err = capsys.readouterr().err
    assert code == 2 and "malformed JSON in array element 2" in err and f"{path}:{text.count(chr(10))}" in err
    assert_nothing_written(tmp_path)
    code, out = run(tmp_path, path)  # default: the two good records before the error are kept
    assert code == 3 and len(read_rows(out)) == 2
    assert "rest of this file was not read" in capsys.readouterr().err


def break_record(text, number):
    """`text` with the closing quote of record `number`'s question removed (good_records' questions are unique)."""
    question = f'"{good_records(number + 1)[number]["conversations"][0]["value"]}"'
    assert text.count(question) == 1
    return text.replace(question, question[:-1])


@pytest.mark.parametrize("layout", ["pretty", "one_a_line", "compact", "json_lines"])
def test_a_malformed_record_costs_that_record_only(tmp_path, capsys, layout):
    """One missing quote in record 10 of 30 loses record 10, not the rest of the file; exit status 3."""
    records = good_records(30)
    text = {"pretty": lambda: json.dumps(records, indent=1, ensure_ascii=False),
            "one_a_line": lambda: "[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n]",
            "compact": lambda: json.dumps(records, ensure_ascii=False),
            "json_lines": lambda: "\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n"}[layout]()
    path = str(tmp_path / ("a.jsonl" if layout == "json_lines" else "a.json"))
    open(path, "w", encoding="utf-8").write(break_record(text, 10))
    code, out = run(tmp_path, path)
    captured = capsys.readouterr()
    assert code == 3 and len(read_rows(out)) == 29, captured.err
    assert "records read: 30  written: 29  skipped: 1" in captured.out
    assert captured.out.strip().splitlines()[-1] == f"records per file: {path}: read 30, written 29, skipped 1"
    skips = [line for line in captured.err.splitlines() if line.startswith("skipped: ")]
    assert len(skips) == 1 and "malformed JSON" in skips[0], captured.err
    assert "rest of this file" not in captured.err


def test_everything_written_exits_0_with_the_per_file_line(tmp_path, capsys):
    a = write_json(tmp_path / "a.json", good_records(3))
    write_jsonl(tmp_path / "b.jsonl", [json.dumps(r) for r in good_records(2)])
    code, out = run(tmp_path, str(tmp_path / "*.json*"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert code == 0 and last == (f"records per file: {a}: read 3, written 3, skipped 0; "
                                  f"{tmp_path / 'b.jsonl'}: read 2, written 2, skipped 0")


def test_an_unreadable_file_stops_the_run_unless_skip_bad_files(tmp_path, capsys):
    """One invalid UTF-8 byte in one file of a two-file glob: exit 2 naming it, nothing written; with
    --skip_bad_files the other file is written, the bad one reported, exit status 3."""
    good = write_json(tmp_path / "a.json", good_records(4))
    bad = tmp_path / "b.json"
    bad.write_bytes(json.dumps(good_records(3)).encode()[:-2] + b'"\xe9"]')
    code, _ = run(tmp_path, str(tmp_path / "*.json"))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and str(bad) in lines[0] and "not valid UTF-8" in lines[0], err
    assert "--skip_bad_files" in lines[0]
    assert_nothing_written(tmp_path)
    code, out = run(tmp_path, str(tmp_path / "*.json"), "--skip_bad_files")
    captured = capsys.readouterr()
    assert code == 3 and len(read_rows(out)) == 4
    assert f"skipped file: {bad}: bytes at offset" in captured.err
    assert captured.out.strip().splitlines()[-1] == (f"records per file: {good}: read 4, written 4, skipped 0; "
                                                     f"{bad}: not read (unreadable, --skip_bad_files)")


def test_non_utf8_file(tmp_path, capsys):
    path = tmp_path / "a.json"
    data = b'[{"conversations": [{"from": "human", "value": "caf\xe9"}, {"from": "gpt", "value": "x"}]}]'
    path.write_bytes(data)
    code, _ = run(tmp_path, str(path), "--strict")
    err = capsys.readouterr().err
    assert code == 2 and "not valid UTF-8" in err and f"offset {data.index(0xe9)}" in err
    assert_nothing_written(tmp_path)


def test_glob_matches_nothing(tmp_path, capsys):
    code, _ = run(tmp_path, str(tmp_path / "nothing*.json"))
    assert code == 2 and "matches no file" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def test_a_directory_or_an_empty_file_is_named(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    code, _ = run(tmp_path, str(tmp_path / "data"))
    err = capsys.readouterr().err
    assert code == 2 and "matches the directory" in err and os.path.join(str(tmp_path / "data"), "*.json") in err
    assert len(err.strip().splitlines()) == 1
    empty = tmp_path / "empty.json"
    empty.write_bytes(b"")
    code, _ = run(tmp_path, str(empty))
    err = capsys.readouterr().err
    assert code == 2 and f"{empty} is empty (0 bytes)" in err and len(err.strip().splitlines()) == 1
    assert_nothing_written(tmp_path)


def test_a_killed_writers_temporary_folder_is_removed_by_the_next_run(tmp_path):
    """A SIGKILL during writing leaves .NAME.tmp-PID-*/ behind (no cleanup runs): the next writer of that output
    removes it once PID is gone, and leaves a running writer's folder and anything else alone."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    finished = subprocess.Popen(["true"])  # its process id no longer runs once it is waited for
    finished.wait()
    dead_pid = finished.pid
    dead = out_dir / f".out.mindrecord.tmp-{dead_pid}-abc123"
    alive = out_dir / f".out.mindrecord.tmp-{os.getpid()}-def456"
    other = out_dir / ".other.mindrecord.tmp-1-xyz"
    for folder in (dead, alive, other):
        folder.mkdir()
        (folder / "out.mindrecord").write_bytes(b"partial")
    code, out = run(tmp_path, write_json(tmp_path / "a.json", good_records(3)))
    assert code == 0 and out.is_file()
    assert not dead.exists() and alive.is_dir() and other.is_dir()


def test_an_output_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    """A read-only file system (simulated: root writes anywhere else) is one line naming the folder, exit 2."""
    import errno  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    code, _ = run(tmp_path, write_json(tmp_path / "a.json", good_records(2)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Read-only file system" in err and str(tmp_path / "out") in err and "\n" not in err


def test_missing_tokenizer(tmp_path, capsys):
    path = write_json(tmp_path / "a.json", good_records(1))
    (tmp_path / "out").mkdir()
    code = bp.main(["--input_glob", path, "--model_file", str(tmp_path / "no.model"), "--output_file",
                    str(tmp_path / "out" / "o.mindrecord"), "--quiet"])
    assert code == 2 and "tokenizer file not found" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


def test_zero_valid_records(tmp_path, capsys):
    path = write_json(tmp_path / "a.json", [{"id": 1}])
    code, _ = run(tmp_path, path, "--format", "belle")  # (--format auto stops earlier: no format has such records)
    assert code == 2 and "no valid record" in capsys.readouterr().err
    assert_nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------------- output

def test_overwrite(tmp_path, capsys):
    path = write_json(tmp_path / "a.json", good_records(2))
    code, out = run(tmp_path, path)
    assert code == 0
    before = out.read_bytes()
    write_json(tmp_path / "a.json", good_records(3))
    code, _ = run(tmp_path, path)
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert out.read_bytes() == before
    code, _ = run(tmp_path, path, "--overwrite")
    assert code == 0 and len(read_rows(out)) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["out.mindrecord", "out.mindrecord.db"]


def test_workers_give_identical_bytes(tmp_path):
    path = write_json(tmp_path / "a.json", good_records(150))
    outs = []
    for n in (1, 2):
        (tmp_path / f"w{n}").mkdir()
        out = tmp_path / f"w{n}" / "rows.mindrecord"  # same name: MindRecord embeds it in the header
        assert bp.main(["--input_glob", path, "--model_file", MODEL, "--output_file", str(out),
                        "--seq_length", "16", "--num_workers", str(n), "--quiet"]) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_two_shards_disjoint_and_complete(tmp_path):
    path = write_json(tmp_path / "a.json", good_records(24))
    code, out = run(tmp_path, path)
    assert code == 0
    everything = read_rows(out)
    shards = [read_rows(out, 2, r) for r in range(2)]
    assert len(everything) == 24 and len({str(r) for r in everything}) == 24  # every row distinct
    assert sorted(map(str, shards[0] + shards[1])) == sorted(map(str, everything))
    assert all(np.array(r[0]).shape == (25,) for r in everything)


def test_two_shards_odd_row_count(tmp_path):
    # MindDataset gives every shard ceil(n / k) rows: with an odd count one row is read twice, none is lost
    path = write_json(tmp_path / "a.json", good_records(25))
    code, out = run(tmp_path, path)
    everything = {str(r) for r in read_rows(out)}
    shards = [read_rows(out, 2, r) for r in range(2)]
    assert code == 0 and [len(s) for s in shards] == [13, 13]
    assert {str(r) for r in shards[0] + shards[1]} == everything


@pytest.mark.slow
def test_cli_smoke_on_bundled_sample(tmp_path):
    out = tmp_path / "belle.mindrecord"
    proc = subprocess.run(run_module("example/dataset/belle_preprocess.py", "--input_glob",
                                     os.path.join(REPO, "dataset", "belle_sample.json"), "--model_file", MODEL,
                                     "--output_file", out, "--seq_length", 32, "--num_workers", 2),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "records read: 420  written: 420  skipped: 0" in proc.stdout
    assert len(read_rows(out)) == 420
