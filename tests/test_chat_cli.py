"""Chat prompt building (hand-computed token lists) and the interactive chat CLI driven through a pseudo-terminal."""
import os
import sys
from types import SimpleNamespace

import mindspore as ms
import pytest

from baichuan2 import BaichuanForCausalLM
from baichuan2.chat import build_chat_input, chat, chat_options
from baichuan2.chat_format import CHAT_DEFAULTS
from baichuan2.model_dir import load_tokenizer
from helpers import REPO, Terminal

U, A = 3, 4  # role tokens in these tests


def encode(text):
    """One id per character: makes expected token lists easy to write by hand."""
    return [ord(c) for c in text]


def config(model_max_length=20, chat_format="baichuan2"):
    return SimpleNamespace(model_max_length=model_max_length, chat_format=chat_format, user_token_id=U,
                           assistant_token_id=A, eos_token_id=2, family="test", max_context=model_max_length)


def msgs(*texts):
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(texts)]


a, b, c, d, e, f = (ord(x) for x in "abcdef")


def test_whole_history_when_it_fits():
    # budget 20 - 8 = 12: both rounds (6 + 3 tokens) fit, then the assistant token
    assert build_chat_input(config(20), encode, msgs("ab", "cd", "ef"), max_new_tokens=8) == \
        [U, a, b, A, c, d, U, e, f, A]


def test_older_rounds_are_dropped_newest_first():
    # budget 14 - 8 = 6: the newest round (3) fits, adding the older one (6) would not
    assert build_chat_input(config(14), encode, msgs("ab", "cd", "ef"), max_new_tokens=8) == [U, e, f, A]


def test_an_oversized_newest_round_is_cut_from_the_left():
    # budget 6; newest round alone is 1 + 8 tokens, + assistant token = 10 -> keep the last 6
    assert build_chat_input(config(14), encode, msgs("abcdefgh"), max_new_tokens=8) == \
        [ord(x) for x in "defgh"] + [A]


def test_system_message_and_trailing_assistant_message():
    messages = [{"role": "system", "content": "f"}] + msgs("ab", "cd")
    # system text first; the last message is the assistant's, so no assistant token is appended
    assert build_chat_input(config(20), encode, messages, max_new_tokens=8) == [f, U, a, b, A, c, d]


def test_xverse_template_is_plain_text():
    got = build_chat_input(config(200, "xverse"), encode, msgs("ab", "cd", "ef"), max_new_tokens=8)
    assert got == encode("Human: ab\n\nAssistant: ") + encode("cd") + [2] + encode("Human: ef\n\nAssistant: ")


def test_base_models_have_no_chat_format():
    with pytest.raises(ValueError, match="no chat format"):
        build_chat_input(config(20, None), encode, msgs("ab"), max_new_tokens=8)


def test_chat_defaults():
    assert CHAT_DEFAULTS == {"do_sample": True, "temperature": 0.3, "top_k": 5, "top_p": 0.85,
                             "repetition_penalty": 1.05, "max_new_tokens": 2048}
    options = chat_options(config(4096))
    assert options["max_new_tokens"] == 2048 and options["stop_token_ids"] == [U]


# ---------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module", params=["baichuan2_7b", "xverse_7b"])
def model_dir(parity_model_dir, request):
    """A converted tiny checkpoint: Baichuan2 (role tokens, SentencePiece) or XVERSE (plain-text roles, BPE)."""
    return parity_model_dir(request.param)


def expected_replies(model_dir):
    """The greedy replies the CLI must stream, computed in-process with the same history."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = BaichuanForCausalLM.from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    options = dict(do_sample=False, repetition_penalty=1.0, max_new_tokens=6)
    first = chat(model, tokenizer, [{"role": "user", "content": "你好"}], **options)
    second = chat(model, tokenizer, [{"role": "user", "content": "你好"}, {"role": "assistant", "content": first},
                                     {"role": "user", "content": "你是谁?"}], **options)
    fresh = chat(model, tokenizer, [{"role": "user", "content": "你是谁?"}], **options)
    return first, second, fresh


@pytest.mark.slow
def test_chat_cli_two_turns_clear_exit(model_dir, tmp_path):
    first, second, fresh = expected_replies(model_dir)
    assert second != fresh, "the fixture should show the effect of the remembered turn"
    term = Terminal([sys.executable, os.path.join(REPO, "example", "chat.py"), "--model_dir", model_dir, "--greedy",
                     "--max_new_tokens", "6", "--mode", "pynative"], cwd=str(tmp_path))
    try:
        term.read_until("User: ")
        term.send("你好")
        assert term.read_until("User: ").split("Assistant: ", 1)[1].strip() == first.strip()
        term.send("你是谁?")  # remembers the first turn
        assert term.read_until("User: ").split("Assistant: ", 1)[1].strip() == second.strip()
        term.send("/clear")
        assert "(conversation cleared)" in term.read_until("User: ")
        term.send("你是谁?")  # forgot it
        assert term.read_until("User: ").split("Assistant: ", 1)[1].strip() == fresh.strip()
        term.send("/exit")
        term.read_until("bye")
        assert term.proc.wait(timeout=60) == 0
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
        os.close(term.master)
