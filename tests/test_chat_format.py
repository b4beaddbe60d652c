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
def test_training_rows_teach_what_chat_asks_for(name):
    fmt, ids = chat_format.for_config(config(name))
    encode = ENCODERS[name]
    inputs, labels = fmt.label_turns(TURNS, encode, ids)
    # targets (labels shifted by one): every answer token, then eos right after it; nothing else
    answers = [encode(text) + [ids["eos"]] for role, text in TURNS if role == "assistant"]
    assert [t for t in labels[1:] if t != IGNORE] == answers[0] + answers[1]
    # eos is the target exactly after each answer's last token
    assert [inputs[i] for i, t in enumerate(labels[1:]) if t == ids["eos"]] == [a[-2] for a in answers]
    # the row up to the first answer is exactly the first round's chat prompt
    first = build_chat_input(config(name), encode, [{"role": r, "content": t} for r, t in TURNS[:1]], 8)
    assert inputs[:len(first)] == first and inputs[len(first):len(first) + len(answers[0]) - 1] == encode(TURNS[1][1])


def test_baichuan2_rows_are_the_whole_chat_prompt():
    # role tokens end every text run: the row is the prompt of the whole history, plus the closing eos
    fmt, ids = chat_format.for_config(config("baichuan2"))
    inputs, _ = fmt.label_turns(TURNS, SP.encode, ids)
    assert inputs == build_chat_input(config("baichuan2"), SP.encode, [{"role": r, "content": t} for r, t in TURNS],
                                      8) + [ids["eos"]]


def test_xverse_rows_keep_answers_as_generated_where_prompts_reread_them_merged():
    # a prompt is the rendered text tokenised whole: "Assistant: " + an earlier answer merges the space into the
    # answer's first token; a row encodes each answer alone, as the model generates it after the prompt's space
    encode = ENCODERS["xverse"]
    fmt, ids = chat_format.for_config(config("xverse"))
    eos = ids["eos"]
    inputs, _ = fmt.label_turns(TURNS, encode, ids)
    assert inputs == (encode("Human: 你好 Hello!\n\nAssistant: ") + encode("不客气") + [eos]
                      + encode("Human: 谢谢\n\nAssistant: ") + encode("Yo") + [eos])
    prompt = build_chat_input(config("xverse"), encode, [{"role": r, "content": t} for r, t in TURNS[:3]], 8)
    assert prompt == (encode("Human: 你好 Hello!\n\nAssistant: 不客气") + [eos]
                      + encode("Human: 谢谢\n\nAssistant: "))
    assert encode("Assistant: 不客气") != encode("Assistant: ") + encode("不客气")  # the merge this is about


def test_system_text_layout_and_labels():
    # Baichuan2: plain text before the first user token; XVERSE: text and a blank line before "Human: ".
    # Never a target, and (Baichuan2) the user token after it is not labelled eos: nothing to stop after
    turns = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Yo")]
    ids = {"user": 3, "assistant": 4, "eos": 2}
    char = lambda text: [ord(c) for c in text]  # noqa: E731  (one id per character)
    inputs, labels = BAICHUAN2.label_turns(turns, char, ids)
    assert inputs == char("Be brief.") + [3] + char("Hi") + [4] + char("Yo") + [2]
    assert labels == [IGNORE] * 9 + [IGNORE, IGNORE, IGNORE, IGNORE] + char("Yo") + [2]
    inputs, labels = XVERSE.label_turns(turns, char, {"eos": 2})
    assert inputs == char("Be brief.\n\nHuman: Hi\n\nAssistant: ") + char("Yo") + [2]
    assert labels == [IGNORE] * len(char("Be brief.\n\nHuman: Hi\n\nAssistant: ")) + char("Yo") + [2]


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
