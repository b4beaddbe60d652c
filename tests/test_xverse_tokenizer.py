"""XverseTokenizer on the bundled tiny XVERSE-style tokenizer.json, and its training script."""
import importlib.util
import os
import pickle

import pytest
from tokenizers import Tokenizer

from baichuan2.tokenization_xverse import XverseTokenizer, write_tokenizer_files
from helpers import REPO

TOKENIZER_JSON = os.path.join(REPO, "dataset", "xverse", "tokenizer.json")
CHAT_PROMPT = "Human: 你是谁?\n\nAssistant: "


@pytest.fixture(scope="module")
def tok():
    return XverseTokenizer(TOKENIZER_JSON)


def test_special_token_ids_follow_xverse(tok):
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<pad>")
    assert (tok.unk_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) == 1000


@pytest.mark.parametrize("text", [CHAT_PROMPT, "Hello world! 你好，世界。", "a<|endoftext|>Human: x  y\n😀 鬱",
                                  "  two  spaces\n"])
def test_same_ids_as_tokenizers_library_and_round_trip(tok, text):
    ids = tok.encode(text)
    assert ids == Tokenizer.from_file(TOKENIZER_JSON).encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.bos_token_id not in ids


def test_eos_in_text_is_one_id(tok):
    ids = tok.encode("ok<|endoftext|>Human: ")
    assert ids.count(3) == 1 and tok.convert_ids_to_tokens(3) == "<|endoftext|>"


def test_pickles_for_worker_processes(tok):
    assert pickle.loads(pickle.dumps(tok)).encode(CHAT_PROMPT) == tok.encode(CHAT_PROMPT)


def test_model_dir_files_and_auto_tokenizer(tmp_path):
    from mindformers import AutoTokenizer
    write_tokenizer_files(str(tmp_path), TOKENIZER_JSON)
    assert sorted(os.listdir(tmp_path)) == ["tokenization_xverse.py", "tokenizer.json", "tokenizer_config.json"]
    direct = XverseTokenizer.from_pretrained(str(tmp_path))
    auto = AutoTokenizer.from_pretrained(str(tmp_path), trust_remote_code=True)
    assert type(direct).__name__ == type(auto).__name__ == "XverseTokenizer"
    assert auto.encode(CHAT_PROMPT) == direct.encode(CHAT_PROMPT) == XverseTokenizer(TOKENIZER_JSON).encode(CHAT_PROMPT)
    save = tmp_path / "saved"
    save.mkdir()
    direct.save_pretrained(str(save), save_json=True)
    assert XverseTokenizer.from_pretrained(str(save)).encode("ok") == direct.encode("ok")


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        XverseTokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(ValueError, match="eos_token"):
        XverseTokenizer(TOKENIZER_JSON, eos_token="</s>")


def test_bundled_tokenizer_is_reproducible():
    """Retraining from the bundled text gives the committed tokenizer.json byte for byte."""
    spec = importlib.util.spec_from_file_location(
        "train_xverse_tokenizer", os.path.join(REPO, "dataset", "train_xverse_tokenizer.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    texts = module.corpus_texts(os.path.join(REPO, "dataset", "belle_sample.json"),
                                os.path.join(REPO, "dataset", "tokenizer_corpus.txt"))
    with open(TOKENIZER_JSON, encoding="utf-8") as f:
        assert module.train(texts) + "\n" == f.read()
