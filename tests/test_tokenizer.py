"""BaichuanTokenizer on the bundled tiny SentencePiece model."""
import os
import pickle

import pytest

from baichuan2.tokenization_baichuan import BaichuanTokenizer, write_tokenizer_files

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(REPO, "dataset", "tokenizer.model")


@pytest.fixture(scope="module")
def tok():
    return BaichuanTokenizer(MODEL)


def test_special_token_ids(tok):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>", "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.vocab_size == len(tok) == 1000


def test_no_bos_eos_added(tok):
    ids = tok.encode("What is 3 + 4?")
    assert ids == tok.sp_model.encode("What is 3 + 4?")
    assert tok.bos_token_id not in ids and tok.eos_token_id not in ids
    assert tok("hello")["input_ids"] == tok.sp_model.encode("hello")


def test_role_tokens_are_single_ids(tok):
    assert tok.encode("<reserved_106>") == [tok.convert_tokens_to_ids("<reserved_106>")]
    assert tok.encode("<reserved_107>") == [tok.convert_tokens_to_ids("<reserved_107>")]
    ids = tok.encode("<reserved_106>你好<reserved_107>")
    assert ids[0] == 3 and ids[-1] == 4 and tok.convert_ids_to_tokens(ids[0]) == "<reserved_106>"


@pytest.mark.parametrize("text", ["Hello world! 你好，世界。", "法国的首都是哪里？ Paris.", "  two  spaces\nand 😀 emoji 鬱"])
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.batch_decode([ids, ids]) == [text, text]


def test_byte_fallback_decodes_to_characters(tok):
    ids = tok.encode("😀")
    assert [tok.convert_ids_to_tokens(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert tok.decode(ids) == "😀"


def test_decode_special_tokens(tok):
    ids = tok.encode("hi") + [tok.eos_token_id]
    assert tok.decode(ids) == "hi</s>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"


def test_pickle_keeps_model(tok):
    assert pickle.loads(pickle.dumps(tok)).encode("你好 hello") == tok.encode("你好 hello")


def test_write_files_and_from_pretrained(tmp_path):
    write_tokenizer_files(str(tmp_path), MODEL)
    assert sorted(os.listdir(tmp_path)) == ["tokenization_baichuan.py", "tokenizer.model", "tokenizer_config.json"]
    loaded = BaichuanTokenizer.from_pretrained(str(tmp_path))
    assert isinstance(loaded, BaichuanTokenizer) and not loaded.add_bos_token and not loaded.add_eos_token
    assert loaded.encode("<reserved_106>hi") == BaichuanTokenizer(MODEL).encode("<reserved_106>hi")


def test_auto_tokenizer_remote_code(tmp_path):
    from mindformers import AutoTokenizer
    write_tokenizer_files(str(tmp_path), MODEL)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(loaded).__name__ == "BaichuanTokenizer"
    assert loaded.encode("<reserved_107>12") == BaichuanTokenizer(MODEL).encode("<reserved_107>12")


def test_save_pretrained_copies_model(tok, tmp_path):
    tok.save_pretrained(str(tmp_path), save_json=True)
    with open(tmp_path / "tokenizer.model", "rb") as a, open(MODEL, "rb") as b:
        assert a.read() == b.read()
    assert BaichuanTokenizer.from_pretrained(str(tmp_path)).encode("ok") == tok.encode("ok")


def test_missing_model_file_message(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        BaichuanTokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="not found"):
        write_tokenizer_files(str(tmp_path / "out"), str(tmp_path / "nope.model"))


def test_bundled_model_is_reproducible():
    """Retraining from the bundled corpus gives the committed tokenizer.model byte for byte."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_tokenizer", os.path.join(REPO, "dataset", "train_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    corpus = [os.path.join(REPO, "dataset", "belle_sample.json"), os.path.join(REPO, "dataset", "tokenizer_corpus.txt")]
    with open(MODEL, "rb") as f:
        assert module.train(corpus) == f.read()
