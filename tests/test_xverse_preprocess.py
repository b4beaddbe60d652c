"""belle_preprocess.py with the XVERSE template: role strings, eos after each answer, hand-computed ids and labels."""
import json
import os

import pytest
from tokenizers import Tokenizer

import baichuan2.data as bp
from conftest import REPO
from test_belle_preprocess import read_rows, record, write_json

TOKENIZER_JSON = os.path.join(REPO, "dataset", "xverse", "tokenizer.json")
EOS, PAD = 3, 1
X = -100

# Hand-computed from the vocabulary of dataset/xverse/tokenizer.json (byte-level BPE: "Ġ" is a space, "Ċ" "\n"):
# "Human: Hi\n\nAssistant: " -> Human(270) :(29) ĠH(373) i(76) Ċ(202) Ċ(202) Assistant(268) :(29) Ġ(224)
PROMPT_HI = [270, 29, 373, 76, 202, 202, 268, 29, 224]
YO = [60, 82]  # "Yo" -> Y(60) o(82)


@pytest.fixture(scope="module")
def encode():
    tok = Tokenizer.from_file(TOKENIZER_JSON)
    return lambda text: tok.encode(text, add_special_tokens=False).ids


def test_hand_computed_pieces(encode):
    vocab = Tokenizer.from_file(TOKENIZER_JSON).get_vocab()
    assert [vocab[t] for t in ("Human", ":", "ĠH", "i", "Ċ", "Assistant", "Ġ", "Y", "o")] == \
        [270, 29, 373, 76, 202, 268, 224, 60, 82]
    assert encode("Human: Hi\n\nAssistant: ") == PROMPT_HI and encode("Yo") == YO


def test_single_turn_row(encode):
    ids = bp.xverse_ids(TOKENIZER_JSON)
    assert ids == {"eos": EOS, "pad": PAD}
    inputs, labels, length, truncated = bp.build_xverse_row([("user", "Hi"), ("assistant", "Yo")], encode, ids, 15)
    assert inputs == PROMPT_HI + YO + [EOS] + [PAD] * 4
    assert labels == [X] * 9 + YO + [EOS] + [X] * 4
    assert (length, truncated) == (12, False)
    # the model is fed inputs[:-1] and learns labels[1:]: "Yo" after "Assistant: ", then eos after "Yo"
    assert [(i, l) for i, l in zip(inputs[:-1], labels[1:]) if l != X] == [(224, 60), (60, 82), (82, EOS)]


def test_two_turns_keep_eos_between_answers(encode):
    ids = {"eos": EOS, "pad": PAD}
    turns = [("user", "Hi"), ("assistant", "Yo"), ("user", "Hi"), ("assistant", "Yo")]
    inputs, labels, length, _ = bp.build_xverse_row(turns, encode, ids, 24)
    assert inputs[:length] == PROMPT_HI + YO + [EOS] + PROMPT_HI + YO + [EOS]
    assert labels[:length] == [X] * 9 + YO + [EOS] + [X] * 9 + YO + [EOS]
    assert inputs[length:] == [PAD] * (25 - length) and labels[length:] == [X] * (25 - length)


def test_truncation_cuts_on_the_right(encode):
    inputs, labels, length, truncated = bp.build_xverse_row([("user", "Hi"), ("assistant", "Yo")], encode,
                                                            {"eos": EOS, "pad": PAD}, 9)
    assert truncated and length == 10
    assert inputs == PROMPT_HI + [60] and labels == [X] * 9 + [60]


def test_end_to_end_mindrecord_defaults_to_xverse_for_json(tmp_path):
    data = write_json(tmp_path / "d.json", [record(0, "Hi", "Yo"),
                                            {"id": 1, "conversations": [{"from": "system", "value": "S"},
                                                                        {"from": "human", "value": "Hi"},
                                                                        {"from": "gpt", "value": "Yo"}]}])
    out = tmp_path / "x.mindrecord"
    code = bp.main(["--input_glob", data, "--model_file", TOKENIZER_JSON, "--output_file", str(out),
                    "--seq_length", "15", "--quiet"])
    assert code == 0
    rows = read_rows(out)
    assert rows[0] == (PROMPT_HI + YO + [EOS] + [PAD] * 4, [X] * 9 + YO + [EOS] + [X] * 4)
    # the system text and a blank line come before "Human: ", encoded with it as the chat prompt encodes them
    tok = Tokenizer.from_file(TOKENIZER_JSON)
    prompt = tok.encode("S\n\nHuman: Hi\n\nAssistant: ", add_special_tokens=False).ids
    assert rows[1][0][:len(prompt) + 3] == prompt + YO + [EOS]
    assert rows[1][1][:len(prompt) + 3] == [X] * len(prompt) + YO + [EOS]


def test_same_rows_with_two_workers(tmp_path):
    data = write_json(tmp_path / "d.json", [record(i, f"What is {i} + 1?", f"{i + 1}.") for i in range(40)])
    outs = []
    for workers in ("1", "2"):
        out = tmp_path / f"w{workers}.mindrecord"
        assert bp.main(["--input_glob", data, "--model_file", TOKENIZER_JSON, "--output_file", str(out),
                        "--seq_length", "32", "--num_workers", workers, "--quiet"]) == 0
        outs.append(read_rows(out))
    assert outs[0] == outs[1] and len(outs[0]) == 40


def test_template_and_tokenizer_must_agree(tmp_path, capsys):
    data = write_json(tmp_path / "d.json", [record(0, "Hi", "Yo")])
    sp_model = os.path.join(REPO, "dataset", "tokenizer.model")
    for model_file, template, message in ((sp_model, "xverse", "needs a Hugging Face tokenizer.json"),
                                          (TOKENIZER_JSON, "baichuan2", "needs a SentencePiece tokenizer.model")):
        code = bp.main(["--input_glob", data, "--model_file", model_file, "--output_file",
                        str(tmp_path / "o.mindrecord"), "--template", template, "--quiet"])
        assert code == 2 and message in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}}))
    code = bp.main(["--input_glob", data, "--model_file", str(bad), "--output_file", str(tmp_path / "o.mindrecord"),
                    "--quiet"])
    assert code == 2 and "no eos / pad token" in capsys.readouterr().err
    bad.write_text("not json")
    code = bp.main(["--input_glob", data, "--model_file", str(bad), "--output_file", str(tmp_path / "o.mindrecord"),
                    "--quiet"])
    assert code == 2 and "not a readable tokenizer.json" in capsys.readouterr().err
