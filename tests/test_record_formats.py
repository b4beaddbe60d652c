"""belle_preprocess.py --format: BELLE/ShareGPT, Alpaca and OpenAI messages records give the same hand-computed rows;
auto detection per file, the error for a file of no known format, and the byte progress bar."""
import io
import json
import os

import pytest

import baichuan2.data as bp
from helpers import REPO

MODEL = os.path.join(REPO, "dataset", "tokenizer.model")
U, A, EOS, PAD, M = 3, 4, 2, 0, -100  # role tokens, eos, pad of the bundled tokenizer; M: no target

# pieces of the bundled tokenizer, checked in test_piece_ids
HAO, XIEXIE, BUKEQI, NIHAO, HI, NEWLINE = [640], [697, 697], [767, 780, 620], [496], [600, 541], [15]

# system "好", then 谢谢 -> 不客气, 你好 -> Hi. Baichuan2 layout: system text before the first user token, not
# learned, and that user token gets no eos label (nothing to stop after); answers and their eos are the targets
TWO_ROUNDS = ([*HAO, U, *XIEXIE, A, *BUKEQI, U, *NIHAO, A, *HI, EOS, PAD, PAD],
              [M, M, M, M, M, *BUKEQI, EOS, M, M, *HI, EOS, M, M])

RECORDS = {
    "belle": {"id": 0, "conversations": [
        {"from": "system", "value": "好"}, {"from": "human", "value": "谢谢"}, {"from": "gpt", "value": "不客气"},
        {"from": "human", "value": "你好"}, {"from": "gpt", "value": "Hi"}]},
    "sharegpt": {"system": "好", "conversations": [  # top-level system, user/assistant as "from" values
        {"from": "user", "value": "谢谢"}, {"from": "assistant", "value": "不客气"},
        {"from": "user", "value": "你好"}, {"from": "assistant", "value": "Hi"}]},
    "alpaca": {"instruction": "你好", "input": "", "output": "Hi", "system": "好",
               "history": [["谢谢", "不客气"]]},
    "messages": {"messages": [
        {"role": "system", "content": "好"}, {"role": "user", "content": "谢谢"},
        {"role": "assistant", "content": [{"type": "text", "text": "不客气"}]},
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}]},
}


def write_json(path, records):
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return str(path)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run(tmp_path, pattern, *extra, seq_length=15):
    out = tmp_path / "out" / "out.mindrecord"
    out.parent.mkdir(exist_ok=True)
    code = bp.main(["--input_glob", pattern, "--model_file", MODEL, "--output_file", str(out),
                    "--seq_length", str(seq_length), "--quiet", *extra])
    return code, out


def read_rows(path):
    import mindspore.dataset as ds
    data = ds.MindDataset(str(path), columns_list=["input_ids", "labels"], shuffle=False)
    return [(r["input_ids"].tolist(), r["labels"].tolist()) for r in data.create_dict_iterator(output_numpy=True)]


def test_piece_ids():
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=MODEL)
    assert [sp.encode(t) for t in ("好", "谢谢", "不客气", "你好", "Hi", "\n")] == [
        HAO, XIEXIE, BUKEQI, NIHAO, HI, NEWLINE]


@pytest.mark.parametrize("flag", ["auto", "explicit"])
@pytest.mark.parametrize("name", sorted(RECORDS))
def test_every_format_gives_the_same_hand_computed_row(tmp_path, name, flag):
    path = write_jsonl(tmp_path / "a.jsonl", [RECORDS[name]])
    code, out = run(tmp_path, path, *(["--format", name] if flag == "explicit" else []))
    assert code == 0 and read_rows(out) == [TWO_ROUNDS]


def test_alpaca_input_and_message_text_parts_join_with_a_newline(tmp_path):
    # alpaca: instruction + "\n" + input is the user turn; messages: text parts joined with "\n"
    alpaca = write_json(tmp_path / "a.json", [{"instruction": "谢谢", "input": "你好", "output": "Hi"}])
    messages = write_jsonl(tmp_path / "b.jsonl", [{"messages": [
        {"role": "user", "content": [{"type": "text", "text": "谢谢"}, {"type": "text", "text": "你好"}]},
        {"role": "assistant", "content": "Hi"}]}])
    row = ([U, *XIEXIE, *NEWLINE, *NIHAO, A, *HI, EOS] + [PAD] * 7, [EOS, M, M, M, M, M, *HI, EOS] + [M] * 7)
    for path in (alpaca, messages):
        code, out = run(tmp_path, path, "--overwrite")
        assert code == 0 and read_rows(out) == [row]


def test_auto_detects_each_file_from_its_first_record(tmp_path):
    # one glob, three files in three formats (sorted order); a malformed first line does not decide the format
    (tmp_path / "d").mkdir()
    write_json(tmp_path / "d" / "a.json", [RECORDS["messages"]])
    write_jsonl(tmp_path / "d" / "b.jsonl", [RECORDS["alpaca"], RECORDS["alpaca"]])
    (tmp_path / "d" / "c.jsonl").write_text('{"conversations": [\n' + json.dumps(RECORDS["belle"]) + "\n")
    code, out = run(tmp_path, str(tmp_path / "d" / "*"))
    assert code == 3 and read_rows(out) == [TWO_ROUNDS] * 4  # 3: the malformed line was skipped
    assert [bp.detect_format(RECORDS[n], "x") for n in sorted(RECORDS)] == ["alpaca", "belle", "messages", "belle"]


@pytest.mark.parametrize("first", [{"prompt": "a", "completion": "b"}, ["a", "b"]])
def test_a_file_of_no_known_format_stops_the_run(tmp_path, capsys, first):
    good = write_json(tmp_path / "a.json", [RECORDS["belle"]])
    bad = write_jsonl(tmp_path / "b.jsonl", [first, RECORDS["belle"]])
    code, _ = run(tmp_path, str(tmp_path / "*.json*"))
    err = capsys.readouterr().err
    assert code == 2 and os.listdir(tmp_path / "out") == []  # nothing written, not even the good file's rows
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"belle_preprocess: error: {bad}:1: cannot tell the record format")
    for accepted in ("belle/sharegpt", "alpaca", "messages", "--format"):
        assert accepted in lines[0]
    assert good not in err


def test_unknown_format_flag_names_the_choices(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bp.parse_args(["--input_glob", "x", "--model_file", MODEL, "--output_file", "o", "--format", "csv"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "'auto', 'belle', 'sharegpt', 'alpaca', 'messages'" in err


BAD = {  # (format, record, reason, words of the message)
    "alpaca without output": ("alpaca", {"instruction": "a"}, "missing_field", "no 'output' field"),
    "alpaca empty question": ("alpaca", {"instruction": " ", "input": "", "output": "b"}, "empty_value",
                              "'instruction' and 'input' are both empty"),
    "alpaca bad history": ("alpaca", {"instruction": "a", "output": "b", "history": [["q"]]}, "bad_history",
                           "history[0] must be a [question, answer] pair"),
    "alpaca list output": ("alpaca", {"instruction": "a", "output": ["b", "c"]}, "non_string_value",
                           "'output' is a list"),
    "messages image part": ("messages", {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "b"}]}, "bad_content", "messages[0].content has image_url parts"),
    "messages tool role": ("messages", {"messages": [{"role": "user", "content": "a"},
                                                     {"role": "tool", "content": "b"}]},
                           "unknown_role", "messages[1] has unknown role 'tool'"),
    "messages late system": ("messages", {"messages": [
        {"role": "user", "content": "a"}, {"role": "system", "content": "s"},
        {"role": "assistant", "content": "b"}]}, "bad_order", "system text may only come first"),
    "messages no answer": ("messages", {"messages": [{"role": "user", "content": "a"}]}, "no_assistant_turn",
                           "no assistant turn"),
    "messages in a belle file": ("belle", {"messages": []}, "missing_conversations", "--format auto, alpaca or"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_records_of_each_format(tmp_path, capsys, case):
    record_format, bad, reason, words = BAD[case]
    with pytest.raises(bp.DataError) as error:
        bp.record_turns(bad, "f.jsonl:3", record_format)
    assert error.value.reason == reason and words in str(error.value) and str(error.value).startswith("f.jsonl:3: ")
    # in a file: skipped and counted by default, the good records of that format are kept
    good = RECORDS["belle" if record_format == "belle" else record_format]
    path = write_jsonl(tmp_path / "a.jsonl", [good, bad, good])
    stats = bp.preprocess(bp.parse_args(["--input_glob", path, "--model_file", MODEL, "--output_file",
                                         str(tmp_path / "o.mindrecord"), "--seq_length", "15", "--quiet"]))
    assert stats["written"] == 2 and stats["skipped_by_reason"] == {reason: 1}
    assert f"skipped: {path}:2: " in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- progress

@pytest.mark.parametrize("writer", [write_json, write_jsonl])
def test_readers_report_every_byte_read(tmp_path, monkeypatch, writer):
    monkeypatch.setattr(bp.readers, "CHUNK_BYTES", 64)
    path = writer(tmp_path / "a.json", [RECORDS["belle"]] * 5)
    counted = []
    assert len(list(bp.read_file(path, counted.append))) == 5
    assert sum(counted) == os.path.getsize(path) and len(counted) >= 5


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_counts_bytes_on_a_terminal_only(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "a.jsonl", [RECORDS["alpaca"]] * 3)
    size = os.path.getsize(path)
    args = ["--input_glob", path, "--model_file", MODEL, "--seq_length", "15"]
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    bp.preprocess(bp.parse_args(args + ["--output_file", str(tmp_path / "a.mindrecord")]))
    shown = terminal.getvalue()
    assert "reading: 100%" in shown and f" {size}/{size} " in shown  # bytes read of the bytes in all files
    quiet = Terminal()
    monkeypatch.setattr("sys.stderr", quiet)
    bp.preprocess(bp.parse_args(args + ["--output_file", str(tmp_path / "b.mindrecord"), "--quiet"]))
    assert quiet.getvalue() == ""
    piped = io.StringIO()  # not a terminal (a log file, a pipe, a captured test): no bar, as tqdm does by default
    monkeypatch.setattr("sys.stderr", piped)
    bp.preprocess(bp.parse_args(args + ["--output_file", str(tmp_path / "c.mindrecord")]))
    assert piped.getvalue() == ""
