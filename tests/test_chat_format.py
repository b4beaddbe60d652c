"""chat_format.py: one layout per family, so training rows, chat prompts, text prompts and defaults agree."""
import os
from types import SimpleNamespace

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer

from baichuan2 import chat_format
from baichuan2.chat import build_chat_input, chat_options
from baichuan2.chat_format import BAICHUAN2, IGNORE, XVERSE
from baichuan2.model_dir import generation_config
from conftest import REPO

SP = spm.SentencePieceProcessor(model_file=os.path.join(REPO, "dataset", "tokenizer.model"))
XV = Tokenizer.from_file(os.path.join(REPO, "dataset", "xverse", "tokenizer.json"))
ENCODERS = {"baichuan2": SP.encode, "xverse": lambda text: XV.encode(text, add_special_tokens=False).ids}
TURNS = [("user", "你好 Hello!"), ("assistant", "不客气"), ("user", "谢谢"), ("assistant", "Yo")]


def config(name):
    # the bundled tokenizers: <reserved_106>/<reserved_107>/</s> are 3/4/2; XVERSE's <|endoftext|> is 3
    return SimpleNamespace(chat_format=name, family=name, model_max_length=4096, max_context=4096,
                           user_token_id=3 if name == "baichuan2" else None,
                           assistant_token_id=4 if name == "baichuan2" else None,
                           eos_token_id=2 if name == "baichuan2" else 3, bos_token_id=1, pad_token_id=0)


def changed(namespace, **fields):
    return SimpleNamespace(**{**vars(namespace), **fields})


@pytest.mark.parametrize("name", ["baichuan2", "xverse"])
def test_training_rows_are_the_chat_prompt(name):
    fmt, ids = chat_format.for_config(config(name))
    encode = ENCODERS[name]
    inputs, labels = fmt.label_turns(TURNS, encode, ids)
    prompt = build_chat_input(config(name), encode, [{"role": r, "content": t} for r, t in TURNS], 8)
    closing = [ids["eos"]] if name == "baichuan2" else []
    assert inputs == prompt + closing  # the model is trained on exactly what chat feeds it
    # targets (labels shifted by one): every answer token, then eos right after it; nothing else
    answers = [encode(text) + [ids["eos"]] for role, text in TURNS if role == "assistant"]
    assert [t for t in labels[1:] if t != IGNORE] == answers[0] + answers[1]
    # eos is the target exactly after each answer's last token
    assert [inputs[i] for i, t in enumerate(labels[1:]) if t == ids["eos"]] == [a[-2] for a in answers]


def test_render_text_is_what_the_tokenizer_reads():
    # a text prompt (what a chat_template renders) encodes to the token layout chat.py builds
    messages = [{"role": r, "content": t} for r, t in TURNS[:3]]
    text = BAICHUAN2.render_text(messages)
    assert text == "<reserved_106>你好 Hello!<reserved_107>不客气<reserved_106>谢谢<reserved_107>"
    assert SP.encode(text) == build_chat_input(config("baichuan2"), SP.encode, messages, 8)
    one = [{"role": "user", "content": "Hi"}]
    assert XVERSE.render_text(one) == "Human: Hi\n\nAssistant: "
    assert ENCODERS["xverse"](XVERSE.render_text(one)) == build_chat_input(config("xverse"), ENCODERS["xverse"],
                                                                              one, 8)


def test_stop_ids_and_defaults_come_from_the_format():
    assert chat_options(config("baichuan2"))["stop_token_ids"] == [3]  # a new user turn ends the reply
    assert chat_options(config("xverse"))["stop_token_ids"] == []     # eos ends it
    base = changed(config("baichuan2"), chat_format=None, user_token_id=None, assistant_token_id=None)
    assert generation_config(base)["do_sample"] is False and generation_config(base)["max_new_tokens"] == 512
    chat = generation_config(config("baichuan2"))
    assert {k: chat[k] for k in BAICHUAN2.generation} == dict(chat_format.CHAT_DEFAULTS)
    assert (chat["user_token_id"], chat["assistant_token_id"]) == (3, 4)


def test_base_model_and_missing_role_ids_are_refused():
    with pytest.raises(ValueError, match="no chat format"):
        chat_format.for_config(changed(config("baichuan2"), chat_format=None))
    with pytest.raises(ValueError, match="needs user_token_id and assistant_token_id"):
        chat_format.for_config(changed(config("baichuan2"), user_token_id=None, assistant_token_id=None))
    with pytest.raises(ValueError, match="unknown chat format"):
        chat_format.get("llama3")
