"""The model card's openmind call on every family's converted tiny checkpoint, against the reference greedy tokens.

    pipeline(task="text_generation", model=dir, framework='ms', trust_remote_code=True)(prompt, do_sample=False,
                                                                                       max_new_tokens=16)

Each family is given the text of its reference chat prompt (`chat_prompt_ids` in reference.safetensors; for
Baichuan-7B, a base model, the same string is just text its tokenizer encodes to those ids) and must continue it
with exactly `chat_greedy_ids`. A Baichuan2 *Base* model directory (convert_weight.py --variant base) must serve a
plain prompt with its own defaults (greedy, no chat template). All calls run in ONE fresh interpreter (openmind's
import is slow), exactly as a user types them; the ids the pipeline generated are recorded by wrapping
`network.generate`, which the pipeline calls.
"""
import json
import os
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from baichuan2 import openmind_compat
from helpers import PARITY

BAICHUAN_CHAT = "<reserved_106>你是谁?<reserved_107>"
XVERSE_CHAT = "Human: 你是谁?\n\nAssistant: "
NEW_TOKENS = 16
# family -> (parity fixture: HF source and reference, prompt text); oppo is its config on baichuan2_7b's weights
CASES = {
    "baichuan2_7b": ("baichuan2_7b", BAICHUAN_CHAT),
    "baichuan2_13b": ("baichuan2_13b", BAICHUAN_CHAT),
    "baichuan_7b": ("baichuan_7b", BAICHUAN_CHAT),
    "xverse_7b": ("xverse_7b", XVERSE_CHAT),
    "oppo_experiemental_7b": ("baichuan2_7b", BAICHUAN_CHAT),
}
BASE_PROMPT = "你好"

SCRIPT = """
import json
from openmind import pipeline

def run(model_dir, prompt, **kwargs):
    p = pipeline(task="text_generation", model=model_dir, framework='ms', trust_remote_code=True)
    network = p.pipeline.network
    calls, generate = [], network.generate
    def recording_generate(*args, **kw):  # what the pipeline really generated, as ids
        out = generate(*args, **kw)
        calls.append(out["sequences"] if isinstance(out, dict) else out)
        return out
    network.generate = recording_generate
    result = p(prompt, **kwargs)
    ids = [int(t) for t in calls[-1][0]]
    # the same prompt, plain greedy with no eos stop: what the base call must be a prefix of
    from baichuan2.generation import generator_for
    prompt_ids = p.pipeline.tokenizer.encode(prompt)
    free = generator_for(network).generate([prompt_ids], max_new_tokens=len(ids) - len(prompt_ids) or 1,
                                           eos_token_id=())[0]
    return {"result": result, "ids": ids, "prompt_ids": prompt_ids, "greedy_no_eos": free,
            "text": p.pipeline.tokenizer.decode(ids, skip_special_tokens=True)}

for name, (model_dir, prompt, kwargs) in CASES.items():
    print("CHECK " + json.dumps(dict(run(model_dir, prompt, **kwargs), name=name), ensure_ascii=False), flush=True)
"""


def reference(family):
    return load_file(os.path.join(PARITY, family, "reference.safetensors"))


@pytest.fixture(scope="module")
def checks(tmp_path_factory, parity_model_dir):
    """name -> what the pipeline returned (one subprocess for every family)."""
    if not openmind_compat.is_installed():
        pytest.fail("openmind compatibility hook not installed (see tests/test_openmind_pipeline.py)")
    root = tmp_path_factory.mktemp("family_pipeline")
    cases = {}
    for family, (source, prompt) in CASES.items():
        cases[family] = (parity_model_dir(family), prompt, {"do_sample": False, "max_new_tokens": NEW_TOKENS})
    base = parity_model_dir("baichuan2_7b", variant="base")
    # the base model's own defaults decide: generation_config.json says greedy
    cases["baichuan2_7b_base"] = (base, BASE_PROMPT, {"max_new_tokens": NEW_TOKENS})
    env = dict(os.environ)
    env.pop("OPENMIND_HIDE_STACKTRACE", None)
    proc = subprocess.run([sys.executable, "-c", f"CASES = {cases!r}\n" + SCRIPT], cwd=str(root), env=env,
                          capture_output=True, text=True, timeout=600)
    found = {}
    for line in proc.stdout.splitlines():
        if line.startswith("CHECK "):
            check = json.loads(line[len("CHECK "):])
            found[check["name"]] = check
    assert proc.returncode == 0 and len(found) == len(cases), \
        f"openmind calls failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return found


@pytest.mark.slow
@pytest.mark.parametrize("family", list(CASES))
def test_model_card_call_matches_reference_greedy(family, checks):
    ref = reference(CASES[family][0])
    prompt_ids, expected = ref["chat_prompt_ids"].tolist(), ref["chat_greedy_ids"].tolist()
    check = checks[family]
    assert check["prompt_ids"] == prompt_ids  # the family's tokenizer, loaded by the pipeline
    assert check["ids"][:len(prompt_ids)] == prompt_ids
    new_ids = check["ids"][len(prompt_ids):]
    for step, (got, want) in enumerate(zip(new_ids, expected)):
        assert got == want, f"{family} token {step}: got {got}, reference {want}"
    assert len(new_ids) == NEW_TOKENS  # no reference token is an eos, so all 16 come out
    assert check["result"][0]["text_generation_text"][0] == check["text"]


@pytest.mark.slow
def test_base_model_dir_serves_a_plain_prompt(checks):
    check = checks["baichuan2_7b_base"]
    new_ids = check["ids"][len(check["prompt_ids"]):]
    assert check["ids"][:len(check["prompt_ids"])] == check["prompt_ids"]
    assert 1 <= len(new_ids) <= NEW_TOKENS
    assert new_ids == check["greedy_no_eos"][:len(new_ids)]  # greedy: base generation_config has do_sample false
    assert len(new_ids) == NEW_TOKENS or new_ids[-1] == 2  # stopped only at eos
    assert check["result"][0]["text_generation_text"][0] == check["text"]
