"""generation_settings.resolve: the caller's arguments over the model directory's generation_config.json over the
family's defaults, and every entry point (example/chat.py, example/inference.py, the server, the openmind pipeline)
generating what an edited generation_config.json says.

The entry-point tests edit a copy of the tiny Baichuan2-7B Chat directory and compare each entry point with greedy
generation called in process with the settings spelled out (never through the resolver)."""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import mindspore as ms
import pytest
import requests

from baichuan2.chat import build_chat_input, chat
from baichuan2.chat_format import BASE_DEFAULTS, CHAT_DEFAULTS
from baichuan2.generation import Generator
from baichuan2.generation_settings import NEUTRAL, add_arguments, arguments_of, resolve
from baichuan2.model_dir import MODEL_CODE_FILES
from baichuan2.runtime import load_model_dir
from helpers import REPO, call_script, chat_script_replies, running

USER, ASSISTANT, EOS = 3, 4, 2
PROMPT = "你好"


def chat_config(**extra):
    return SimpleNamespace(chat_format="baichuan2", user_token_id=USER, assistant_token_id=ASSISTANT,
                           eos_token_id=EOS, **extra)


BASE = SimpleNamespace(chat_format=None, user_token_id=None, assistant_token_id=None, eos_token_id=EOS)


# ---------------------------------------------------------------------------------------------- the resolver
def test_family_then_file_then_arguments():
    assert resolve(chat_config(), generation_config={}) == dict(NEUTRAL, **CHAT_DEFAULTS)
    assert resolve(BASE, generation_config={}) == dict(NEUTRAL, **BASE_DEFAULTS)
    saved = {"max_new_tokens": 3, "top_k": 2, "eos_token_id": 7, "bos_token_id": 1, "user_token_id": USER}
    from_file = resolve(chat_config(), generation_config=saved)
    assert (from_file["max_new_tokens"], from_file["top_k"], from_file["eos_token_id"]) == (3, 2, 7)
    assert from_file["temperature"] == CHAT_DEFAULTS["temperature"]  # what the file leaves out: the family's
    assert "bos_token_id" not in from_file  # other keys of the file are not generation settings
    given = resolve(chat_config(), {"max_new_tokens": 9, "top_k": None, "seed": 5}, generation_config=saved)
    assert (given["max_new_tokens"], given["top_k"], given["seed"]) == (9, 2, 5)  # None does not mask the file


def test_the_file_is_read_from_the_config_directory(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 4}))
    assert resolve(chat_config(name_or_path=str(tmp_path)))["max_new_tokens"] == 4
    assert resolve(chat_config(name_or_path=str(tmp_path / "none")))["max_new_tokens"] == 2048
    (tmp_path / "generation_config.json").write_text("{\"do_sample\": tru")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        resolve(chat_config(name_or_path=str(tmp_path)))


def test_greedy_stays_plain_greedy():
    # asking a sampling family / file for greedy decoding drops their sampling knobs, the penalty included
    plain = resolve(chat_config(), {"do_sample": False}, generation_config=dict(CHAT_DEFAULTS))
    assert plain == dict(NEUTRAL, max_new_tokens=CHAT_DEFAULTS["max_new_tokens"])
    # a file that is greedy itself keeps its penalty; the caller's own knobs always count
    greedy_file = {"do_sample": False, "repetition_penalty": 1.2}
    assert resolve(chat_config(), generation_config=greedy_file)["repetition_penalty"] == 1.2
    assert resolve(chat_config(), {"do_sample": False, "top_k": 3})["top_k"] == 3
    # a file without do_sample samples as the family does: its knobs are sampling knobs
    assert resolve(chat_config(), {"do_sample": False}, generation_config={"top_p": 0.5})["top_p"] == 1.0


def test_chat_adds_the_formats_stop_ids():
    assert "stop_token_ids" not in resolve(chat_config(), generation_config={})
    assert resolve(chat_config(), generation_config={}, chat=True)["stop_token_ids"] == [USER]
    assert resolve(chat_config(), {"stop_token_ids": [9, USER]}, generation_config={},
                   chat=True)["stop_token_ids"] == [9, USER]


def test_bad_values_name_where_they_came_from(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps({"top_p": 1.5}))
    with pytest.raises(ValueError) as bad_file:
        resolve(chat_config(name_or_path=str(tmp_path)))
    message = str(bad_file.value)
    assert str(tmp_path / "generation_config.json") in message and "top_p must be in (0, 1]" in message
    assert "fix the file" in message and "\n" not in message
    with pytest.raises(ValueError, match="the arguments: max_new_tokens must be an integer"):
        resolve(chat_config(), {"max_new_tokens": "3"}, generation_config={})
    with pytest.raises(ValueError, match="temperature must be > 0 when sampling"):
        resolve(chat_config(), {"temperature": 0.0}, generation_config={})  # the family samples
    with pytest.raises(TypeError, match="unknown generation setting"):
        resolve(chat_config(), {"max_tokens": 3}, generation_config={})
    with pytest.raises(ValueError, match="the arguments: seed must be >= 0, got -1"):
        resolve(chat_config(), {"seed": -1}, generation_config={})
    for knob in ("temperature", "top_p", "repetition_penalty"):
        for value in (float("inf"), float("nan")):
            with pytest.raises(ValueError, match=f"{knob} must be a finite number"):
                resolve(chat_config(), {knob: value}, generation_config={})


def test_command_line_options_default_to_none():
    parser = add_arguments(argparse.ArgumentParser())
    assert arguments_of(parser.parse_args([])) == {}
    assert arguments_of(parser.parse_args(["--greedy", "--max_new_tokens", "3"])) == {"do_sample": False,
                                                                                    "max_new_tokens": 3}
    assert arguments_of(parser.parse_args(["--do_sample", "--top_k", "0"])) == {"do_sample": True, "top_k": 0}
    with pytest.raises(SystemExit):
        parser.parse_args(["--greedy", "--do_sample"])


def test_model_directories_carry_every_module_generation_imports():
    """mindformers' remote-code loader copies into its module cache the auto_map module and that module's own
    relative imports (not theirs in turn), then hashes every file reachable by relative imports, never finishing on
    a cycle. So each module generation.py reaches must be model code imported by modeling_baichuan.py itself."""
    here = os.path.join(REPO, "research", "baichuan2")
    pattern = re.compile(r"^\s*from\s+\.(\S+)\s+import", re.MULTILINE)  # the loader's own pattern

    def relative_imports(name):
        with open(os.path.join(here, name + ".py"), encoding="utf-8") as f:
            return set(pattern.findall(f.read()))

    direct = relative_imports("modeling_baichuan")
    seen = set()

    def visit(name, path):  # depth first; a module met again on its own import path is a cycle
        assert name not in path, f"import cycle: {' -> '.join(path + (name,))}"
        assert name + ".py" in MODEL_CODE_FILES, f"{name}.py is imported for generation but not copied"
        assert name in direct, f"{name}.py is imported for generation but not by modeling_baichuan.py itself"
        seen.add(name)
        for imported in sorted(relative_imports(name)):
            visit(imported, path + (name,))

    visit("generation", ())
    assert {"generation_settings", "chat_format", "engine", "kv_pool", "sampling"} <= seen


# ---------------------------------------------------------------------------------------------- entry points
@pytest.fixture(scope="module")
def reference(parity_model_dir):
    """(source directory, model, tokenizer) of the tiny Chat fixture, for expected replies."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model_dir = parity_model_dir("baichuan2_7b")
    model, tokenizer, _ = load_model_dir(model_dir)
    return model_dir, model, tokenizer


def edited(reference, tmp_path, **changes):
    """A copy of the fixture directory whose generation_config.json has `changes`."""
    model_dir = str(tmp_path / "edited")
    shutil.copytree(reference[0], model_dir)
    path = os.path.join(model_dir, "generation_config.json")
    with open(path, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["do_sample"] is True  # the fixture is a Chat model: it samples unless edited
    saved.update(changes)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(saved, f)
    return model_dir


def greedy_ids(reference, prompt_ids, max_new_tokens, **options):
    _, model, _ = reference
    ms.set_context(mode=ms.PYNATIVE_MODE)
    return Generator(model).generate([prompt_ids], max_new_tokens=max_new_tokens, do_sample=False, **options)[0]


def test_pipeline_generate_follows_the_file(reference, tmp_path):
    """BaichuanForCausalLM.generate, what mindformers' and openmind's pipelines call (in process here)."""
    _, _, tokenizer = reference
    prompt_ids = tokenizer.encode("<reserved_106>你好<reserved_107>")
    longer = greedy_ids(reference, prompt_ids, 4, repetition_penalty=1.0)
    assert len(longer) == 4, "the fixture's greedy reply should not end within 4 tokens"
    model_dir = edited(reference, tmp_path, do_sample=False, max_new_tokens=3, repetition_penalty=1.0)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, _, _ = load_model_dir(model_dir)
    assert model.generate([prompt_ids]) == [prompt_ids + longer[:3]]
    assert model.generate([prompt_ids], max_new_tokens=4) == [prompt_ids + longer]  # the call still wins


def test_inference_script_follows_the_file(reference, tmp_path):
    _, _, tokenizer = reference
    longer = greedy_ids(reference, tokenizer.encode(PROMPT), 4, repetition_penalty=1.0)
    assert len(longer) == 4, "the fixture's greedy reply should not end within 4 tokens"
    model_dir = edited(reference, tmp_path, do_sample=False, max_new_tokens=3, repetition_penalty=1.0)
    script = os.path.join(REPO, "example", "inference.py")
    code, out, err = call_script(script, ["--model_dir", model_dir, "--prompt", PROMPT, "--mode", "pynative"])
    assert code == 0, err[-3000:]
    assert f"### prompt: {PROMPT}\n{tokenizer.decode(longer[:3], skip_special_tokens=True)}\n" in out, out
    code, out, err = call_script(script, ["--model_dir", model_dir, "--prompt", PROMPT, "--mode", "pynative",
                                          "--max_new_tokens", "4"])  # an option given wins over the file
    assert code == 0 and f"\n{tokenizer.decode(longer, skip_special_tokens=True)}\n" in out, err[-3000:]
    with open(os.path.join(model_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"max_new_tokens": 0}, f)
    code, _, err = call_script(script, ["--model_dir", model_dir, "--prompt", PROMPT, "--mode", "pynative"])
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "max_new_tokens must be >= 1" in lines[0], err[-3000:]


def test_server_follows_the_file(reference, tmp_path):
    from baichuan2.server import create_app  # pylint: disable=import-outside-toplevel
    _, model, tokenizer = reference
    prompt = build_chat_input(model.config, tokenizer.encode, [{"role": "user", "content": PROMPT}], 6)
    ids = greedy_ids(reference, prompt, 6, stop_token_ids=[USER])
    cut = next((k for k in range(1, len(ids)) if ids[k] not in ids[:k]), None)
    assert cut is not None, f"the fixture's greedy reply {ids} has no new token to make an eos of"
    # greedy from the file, and the file's eos ends the reply before ids[cut]
    model_dir = edited(reference, tmp_path, do_sample=False, repetition_penalty=1.0, eos_token_id=ids[cut])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    with running(create_app(model_dir, model_name="tiny")) as url:
        reply = requests.post(url + "/v1/chat/completions", timeout=300, json={
            "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(ids[:cut], skip_special_tokens=True)
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == cut


@pytest.mark.slow
def test_chat_script_follows_the_file(reference, tmp_path):
    _, model, tokenizer = reference
    messages = [{"role": "user", "content": PROMPT}]
    # the file is greedy itself, so it keeps its own repetition_penalty (Chat's 1.05)
    spelled_out = dict(generation_config={}, do_sample=False, repetition_penalty=CHAT_DEFAULTS["repetition_penalty"])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    expected = chat(model, tokenizer, messages, max_new_tokens=3, **spelled_out)
    assert expected != chat(model, tokenizer, messages, max_new_tokens=5, **spelled_out), \
        "the fixture's reply should go on past 3 tokens"
    model_dir = edited(reference, tmp_path, do_sample=False, max_new_tokens=3)
    assert chat_script_replies(["--model_dir", model_dir, "--mode", "pynative"], tmp_path, [PROMPT]) == \
        [expected.strip()]


OPENMIND = """
import json, sys
from openmind import pipeline
generator = pipeline(task="text_generation", model=sys.argv[1], framework="ms", trust_remote_code=True)
print(json.dumps([generator("<reserved_106>你好<reserved_107>")[0]["text_generation_text"][0],
                  generator("<reserved_106>你好<reserved_107>", max_new_tokens=4)[0]["text_generation_text"][0]],
                 ensure_ascii=False))
"""


@pytest.mark.slow
def test_openmind_pipeline_follows_the_file(reference, tmp_path):
    _, _, tokenizer = reference
    longer = greedy_ids(reference, tokenizer.encode("<reserved_106>你好<reserved_107>"), 4, repetition_penalty=1.0)
    assert len(longer) == 4, "the fixture's greedy reply should not end within 4 tokens"
    model_dir = edited(reference, tmp_path, do_sample=False, max_new_tokens=3, repetition_penalty=1.0)
    done = subprocess.run([sys.executable, "-c", OPENMIND, model_dir], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    from_file, given = json.loads(done.stdout.strip().splitlines()[-1])
    assert from_file.endswith(tokenizer.decode(longer[:3], skip_special_tokens=True)), from_file
    assert given.endswith(tokenizer.decode(longer, skip_special_tokens=True)), given
    assert len(given) > len(from_file)
