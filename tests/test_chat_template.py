"""The chat_template of tokenizer_config.json: rendered as transformers' apply_chat_template renders it, it tokenises to
exactly the ids chat.py's build_chat_input feeds the model, for multi-turn histories with system text."""
import json
import os

import jinja2
import pytest
import sentencepiece as spm
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from baichuan2 import chat_format
from baichuan2.chat import build_chat_input
from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.model_dir import finish_model_dir, load_tokenizer
from conftest import REPO

SP = spm.SentencePieceProcessor(model_file=os.path.join(REPO, "dataset", "tokenizer.model"))
XV = Tokenizer.from_file(os.path.join(REPO, "dataset", "xverse", "tokenizer.json"))
ENCODERS = {"baichuan2": SP.encode, "xverse": lambda text: XV.encode(text, add_special_tokens=False).ids}
TOKENIZER_DIRS = {"baichuan2": os.path.join(REPO, "dataset"), "xverse": os.path.join(REPO, "dataset", "xverse")}

HISTORIES = {
    "one question": [{"role": "user", "content": "你好"}],
    "system and two rounds": [
        {"role": "system", "content": "You are a helpful assistant. 请简短回答。"},
        {"role": "user", "content": "你好 Hello!"}, {"role": "assistant", "content": "Hello there, 不客气"},
        {"role": "user", "content": " spaced  out "}, {"role": "assistant", "content": "\nOK\n"},
        {"role": "user", "content": "谢谢"}],
    "ends with the assistant": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Yo, what's up?"}],
}


def config(name):
    # role/eos ids of the bundled tokenizers: <reserved_106>/<reserved_107>/</s> are 3/4/2, <|endoftext|> is 3
    if name == "baichuan2":
        return BaichuanConfig.from_preset("baichuan2_7b", user_token_id=3, assistant_token_id=4, eos_token_id=2)
    return BaichuanConfig.from_preset("xverse_7b")


def render(template, messages, add_generation_prompt=True):
    """What transformers' apply_chat_template does before tokenising."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("history", sorted(HISTORIES))
@pytest.mark.parametrize("name", ["baichuan2", "xverse"])
def test_rendered_template_tokenises_to_the_chat_prompt(name, history):
    messages = HISTORIES[history]
    fmt = chat_format.get(name)
    text = render(fmt.chat_template(), messages)
    assert text == fmt.render_text(messages)
    assert ENCODERS[name](text) == build_chat_input(config(name), ENCODERS[name], messages, 8)


def test_the_rendered_text_spelled_out():
    messages = HISTORIES["system and two rounds"][:4]
    assert render(chat_format.BAICHUAN2.chat_template(), messages) == (
        "You are a helpful assistant. 请简短回答。<reserved_106>你好 Hello!<reserved_107>Hello there, 不客气"
        "<reserved_106> spaced  out <reserved_107>")
    assert render(chat_format.XVERSE.chat_template(), messages) == (
        "You are a helpful assistant. 请简短回答。\n\nHuman: 你好 Hello!\n\nAssistant: Hello there, 不客气"
        "<|endoftext|>"
        "Human:  spaced  out \n\nAssistant: ")
    # without add_generation_prompt Baichuan2 leaves the reply start out; XVERSE's user turn already holds it
    assert render(chat_format.BAICHUAN2.chat_template(), messages[:2], False).endswith("你好 Hello!")


def test_content_as_text_parts_and_bad_histories():
    template = chat_format.BAICHUAN2.chat_template()
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert render(template, parts) == "<reserved_106>a\nb<reserved_107>"  # joined as the server joins them
    late_system = [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="system message may only come first"):
        render(template, late_system)
    with pytest.raises(ValueError, match="system message may only come first"):
        build_chat_input(config("baichuan2"), SP.encode, late_system, 8)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role tool"):
        render(template, [{"role": "tool", "content": "x"}])


@pytest.mark.parametrize("name", ["baichuan2", "xverse"])
def test_model_directory_tokenizer_applies_the_template(tmp_path, name):
    # the model directory's own tokenizer (mindformers' apply_chat_template) reads chat_template from
    # tokenizer_config.json and gives the ids chat.py builds
    finish_model_dir(str(tmp_path), config(name), tokenizer_dir=TOKENIZER_DIRS[name])
    with open(tmp_path / "tokenizer_config.json", encoding="utf-8") as f:
        assert json.load(f)["chat_template"] == chat_format.get(name).chat_template()
    tokenizer = load_tokenizer(str(tmp_path))
    for messages in HISTORIES.values():
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert ids == build_chat_input(config(name), tokenizer.encode, messages, 8)
        assert ids == build_chat_input(config(name), ENCODERS[name], messages, 8)


def test_transformers_fast_tokenizer_applies_the_xverse_template(tmp_path):
    # XVERSE's tokenizer.json as transformers loads it (what vLLM and other Hugging Face tools do)
    transformers = pytest.importorskip("transformers")
    finish_model_dir(str(tmp_path), config("xverse"), tokenizer_dir=TOKENIZER_DIRS["xverse"])
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    for messages in HISTORIES.values():
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        assert ids == build_chat_input(config("xverse"), ENCODERS["xverse"], messages, 8)


def test_copied_tokenizer_config_gets_the_template_and_base_models_none(tmp_path):
    source = tmp_path / "hf"
    source.mkdir()
    (source / "tokenizer.model").write_bytes(open(os.path.join(REPO, "dataset", "tokenizer.model"), "rb").read())
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BaichuanTokenizer",
                                                              "model_max_length": 4096}))
    (tmp_path / "chat").mkdir()
    finish_model_dir(str(tmp_path / "chat"), config("baichuan2"), tokenizer_dir=str(source))
    copied = json.loads((tmp_path / "chat" / "tokenizer_config.json").read_text())
    assert copied == {"tokenizer_class": "BaichuanTokenizer", "model_max_length": 4096,
                      "chat_template": chat_format.BAICHUAN2.chat_template()}
    assert "chat_template" not in json.loads((source / "tokenizer_config.json").read_text())  # source untouched
    (tmp_path / "base").mkdir()
    base = BaichuanConfig.from_preset("baichuan2_7b", chat_format=None, user_token_id=None, assistant_token_id=None)
    finish_model_dir(str(tmp_path / "base"), base, tokenizer_dir=TOKENIZER_DIRS["baichuan2"])
    assert "chat_template" not in json.loads((tmp_path / "base" / "tokenizer_config.json").read_text())


@pytest.mark.parametrize("family", ["baichuan2_7b", "xverse_7b"])
def test_convert_weight_output_carries_the_template_both_ways(tmp_path, family):
    from baichuan2.convert_weight import convert
    source = os.path.join(REPO, "tests", "fixtures", "parity", family)
    config = convert(source, str(tmp_path / "ours"), show_progress=False)
    fmt = chat_format.get(config.chat_format)
    assert fmt.has_turns
    ours = json.loads((tmp_path / "ours" / "tokenizer_config.json").read_text())
    assert ours["chat_template"] == fmt.chat_template()
    tokenizer = load_tokenizer(str(tmp_path / "ours"))
    messages = HISTORIES["ends with the assistant"] + [{"role": "user", "content": "谢谢"}]  # fits the 64 positions
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=True) == \
        build_chat_input(config, tokenizer.encode, messages, 8)
    convert(str(tmp_path / "ours"), str(tmp_path / "hf"), reverse=True, show_progress=False)
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == fmt.chat_template()
