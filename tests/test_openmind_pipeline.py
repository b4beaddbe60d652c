"""The Baichuan2 model card's openmind call on a model directory made by convert_weight.py.

The call runs in a fresh interpreter exactly as a user types it, so it also proves that the openmind adaptation
(openmind_compat, activated by the .pth file scripts/setup_env.sh installs) needs no user code. The tiny parity
checkpoint's greedy continuation must match the transformers reference token by token."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from baichuan2 import openmind_compat
from helpers import FIXTURES, REPO

PARITY = os.path.join(FIXTURES, "parity", "baichuan2_7b")
PROMPT = "<reserved_106>你是谁?<reserved_107>"

USER_CODE = """
from openmind import pipeline
p = pipeline(task="text_generation", model=MODEL_DIR, framework='ms', trust_remote_code=True)
result = p("<reserved_106>你是谁?<reserved_107>", do_sample=False)
"""

CHECKS = """
import json, sys
from safetensors.numpy import load_file
ref = load_file(REFERENCE)
prompt_ids = ref["chat_prompt_ids"].tolist()
expected = ref["chat_greedy_ids"].tolist()
tokenizer, network = p.pipeline.tokenizer, p.pipeline.network
ids = network.generate([prompt_ids], do_sample=False, max_new_tokens=len(expected))[0]
print("CHECK " + json.dumps({
    "result": result,
    "encoded_prompt": tokenizer.encode("<reserved_106>你是谁?<reserved_107>"),
    "ids": ids,
    "expected_text": tokenizer.decode(prompt_ids + expected, skip_special_tokens=True),
    "tracebacklimit": getattr(sys, "tracebacklimit", None),
}, ensure_ascii=False))
"""


@pytest.fixture(scope="module")
def model_dir(parity_model_dir):
    return parity_model_dir("baichuan2_7b")


def test_model_dir_is_servable(model_dir):
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "configuration_baichuan.py", "modeling_baichuan.py", "tokenization_baichuan.py", "generation.py"):
        assert os.path.isfile(os.path.join(model_dir, name)), name
    with open(os.path.join(model_dir, "generation_config.json"), encoding="utf-8") as f:
        generation = json.load(f)
    assert generation["temperature"] == 0.3 and generation["top_k"] == 5 and generation["top_p"] == 0.85
    assert generation["repetition_penalty"] == 1.05 and generation["max_new_tokens"] == 2048
    assert (generation["user_token_id"], generation["assistant_token_id"]) == (3, 4)


def test_compat_hook_is_installed_in_this_environment():
    assert openmind_compat.is_installed(), (
        f"{openmind_compat.PTH_NAME} is missing from site-packages: run "
        "`python -m baichuan2.openmind_compat --install` (scripts/setup_env.sh does)")


def test_task_alias_and_relaxed_pins():
    assert openmind_compat.TASK_ALIASES["text_generation"] == "text-generation"
    assert openmind_compat._requirement_name("mindformers==1.3.0") == "mindformers"  # pylint: disable=W0212
    assert openmind_compat._requirement_name("mindspore>=2.4") == "mindspore"  # pylint: disable=W0212


@pytest.mark.slow
def test_model_card_call_matches_reference(model_dir, tmp_path):
    if not openmind_compat.is_installed():
        pytest.fail("openmind compatibility hook not installed (see test_compat_hook_is_installed_in_this_environment)")
    ref = load_file(os.path.join(PARITY, "reference.safetensors"))
    script = f"MODEL_DIR = {model_dir!r}\nREFERENCE = {os.path.join(PARITY, 'reference.safetensors')!r}\n" \
        + USER_CODE + CHECKS
    env = dict(os.environ)
    env.pop("OPENMIND_HIDE_STACKTRACE", None)  # the user's environment: nothing set
    proc = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                          text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    assert proc.returncode == 0 and lines, f"openmind call failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    check = json.loads(lines[-1][len("CHECK "):])
    expected = ref["chat_greedy_ids"].tolist()
    assert check["encoded_prompt"] == ref["chat_prompt_ids"].tolist()
    assert check["ids"][:len(ref["chat_prompt_ids"])] == ref["chat_prompt_ids"].tolist()
    new_ids = check["ids"][len(ref["chat_prompt_ids"]):]
    for step, (got, want) in enumerate(zip(new_ids, expected)):
        assert got == want, f"token {step}: got {got}, reference {want}"
    assert len(new_ids) == len(expected)
    text = check["result"][0]["text_generation_text"][0]
    assert text.startswith(check["expected_text"]), (text, check["expected_text"])
    assert check["tracebacklimit"] != 0, "openmind hid tracebacks (OPENMIND_HIDE_STACKTRACE not defaulted)"
