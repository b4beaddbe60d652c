"""Every entry point takes bfloat16, int8 and int4 model directories: the openmind pipeline call, example/chat.py,
example/inference.py, the server (create_app on a directory), example/evaluate.py and merge_lora.py.

Each directory is the tiny Baichuan2-7B parity fixture converted with convert_weight.py. An entry point must give
what the stored-format model gives in process (greedy replies from runtime.load_model_dir + generation), so a path
that silently fell back to another format or another model would fail here.
"""
import json
import os
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import requests

from baichuan2 import BaichuanForCausalLM
from baichuan2.chat import chat
from baichuan2.convert_weight import convert
from baichuan2.generation import Generator
from baichuan2.lora import adapter_params, apply_lora, save_adapter
from baichuan2.merge_lora import main as merge_main
from baichuan2.quantization import bf16_bits
from baichuan2.runtime import load_model_dir
from baichuan2.safetensors_io import SafetensorsFile
from helpers import FIXTURES, chat_script_replies, run_module, running

FORMATS = {"bfloat16": dict(dtype="bfloat16"), "int8": dict(quantize="int8"), "int4": dict(quantize="int4")}
PROMPT = "你好"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Format -> a converted tiny Chat model directory (plus "float32", the reference)."""
    root = tmp_path_factory.mktemp("formats")
    source = os.path.join(FIXTURES, "parity", "baichuan2_7b")
    out = {}
    for fmt, options in dict(FORMATS, float32={}).items():
        out[fmt] = str(root / fmt)
        convert(source, out[fmt], show_progress=False, variant="chat", **options)
    return out


def greedy_reply(model_dir, max_new_tokens):
    """The greedy chat reply to PROMPT, computed in process from the directory as loaded for inference."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, tokenizer, _ = load_model_dir(model_dir)
    return chat(model, tokenizer, [{"role": "user", "content": PROMPT}], do_sample=False, repetition_penalty=1.0,
                max_new_tokens=max_new_tokens)


def plain_greedy_text(model_dir, max_new_tokens):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, tokenizer, _ = load_model_dir(model_dir)
    ids = Generator(model).generate([tokenizer.encode(PROMPT)], max_new_tokens=max_new_tokens, do_sample=False)[0]
    return tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_inference_script(dirs, fmt, tmp_path):
    expected = plain_greedy_text(dirs[fmt], 2)
    done = subprocess.run(run_module("example/inference.py", "--model_dir", dirs[fmt], "--prompt", PROMPT,
                                     "--greedy", "--max_new_tokens", "2", "--mode", "pynative"),
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"### prompt: {PROMPT}\n{expected}\n" in done.stdout, (expected, done.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_chat_script_one_turn(dirs, fmt, tmp_path):
    expected = greedy_reply(dirs[fmt], 4)
    args = ["--model_dir", dirs[fmt], "--greedy", "--max_new_tokens", "4", "--mode", "pynative"]
    assert chat_script_replies(args, tmp_path, [PROMPT]) == [expected.strip()]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_server_app_on_a_directory(dirs, fmt):
    from baichuan2.server import create_app  # pylint: disable=import-outside-toplevel
    expected = greedy_reply(dirs[fmt], 3)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        # float32 cache rows, as greedy_reply's generate(): the server's default bfloat16 rows may flip a token
        with running(create_app(dirs[fmt], model_name="tiny", kv_cache_dtype="float32")) as url:
            reply = requests.post(url + "/v1/chat/completions", timeout=300, json={
                "model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3,
                "temperature": 0})
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_evaluation_scorer_on_a_directory(dirs, fmt):
    from baichuan2.evaluation import ModelScorer  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=ms.PYNATIVE_MODE)
    scores = ModelScorer.from_model_dir(dirs[fmt]).score(["以下是题目。\n答案："], "ABCD", "zh")
    reference = ModelScorer.from_model_dir(dirs["float32"]).score(["以下是题目。\n答案："], "ABCD", "zh")
    assert scores.shape == (1, 4) and np.all(np.isfinite(scores))
    assert not np.array_equal(scores, reference)  # the stored format was used, not a float32 copy
    # within the documented first-order bound of test_quantization.py: log-probabilities move, ranks barely
    assert np.max(np.abs(scores - reference)) < {"bfloat16": 0.05, "int8": 0.2, "int4": 2.0}[fmt]


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["bfloat16", "int4"])
def test_evaluate_script(dirs, fmt, tmp_path):
    out = tmp_path / "ceval.json"
    done = subprocess.run(run_module("example/evaluate.py", "--model_dir", dirs[fmt], "--task", "ceval",
                                     "--data_dir", os.path.join(FIXTURES, "eval", "ceval"), "--shots", "0",
                                     "--limit", "1", "--output", out), capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["overall"]["total"] == 3 and 0 <= report["overall"]["average"] <= 1


OPENMIND = """
import json, sys
from openmind import pipeline
replies = {}
for model_dir in sys.argv[1:]:
    generator = pipeline(task="text_generation", model=model_dir, framework="ms", trust_remote_code=True)
    replies[model_dir] = generator("<reserved_106>你好<reserved_107>", do_sample=False, max_new_tokens=3)
print(json.dumps(replies, ensure_ascii=False))
"""


@pytest.mark.slow
def test_openmind_pipeline_on_every_format(dirs, tmp_path):
    done = subprocess.run([sys.executable, "-c", OPENMIND, *(dirs[fmt] for fmt in FORMATS)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    replies = json.loads(done.stdout.strip().splitlines()[-1])
    for fmt in FORMATS:
        text = replies[dirs[fmt]][0]["text_generation_text"][0]
        expected = greedy_reply(dirs[fmt], 3)
        assert text.startswith("<reserved_106>你好<reserved_107>") or text.startswith("你好"), text
        assert text.endswith(expected), (fmt, text, expected)


# ---------------------------------------------------------------------------------------------- merge_lora
@pytest.fixture(scope="module")
def adapter(dirs, tmp_path_factory):
    """A LoRA adapter with non-zero B matrices, as finetune.py writes it (PEFT layout)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = BaichuanForCausalLM.from_pretrained(dirs["float32"], backend="composed")
    apply_lora(model, 4, 8.0, 0.0, ["W_pack", "o_proj"])
    rng = np.random.default_rng(0)
    for p in adapter_params(model):
        p.set_data(ms.Tensor(rng.normal(0, 0.05, p.shape).astype(np.float32)))
    path = str(tmp_path_factory.mktemp("adapter") / "adapter")
    save_adapter(model, path)
    return path


def test_merge_onto_a_bf16_base_writes_bf16(dirs, adapter, tmp_path):
    out = tmp_path / "merged_bf16"
    reference = tmp_path / "merged_f32_of_the_bf16_weights"
    merge_main(["--base", dirs["bfloat16"], "--adapter", adapter, "--output_path", str(out)])
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["torch_dtype"] == "bfloat16" and config.get("quantization_config") is None
    # the same merge in float32 on the bf16 weights widened, then rounded to bf16, is what must be stored
    widened = tmp_path / "widened"
    convert_back = subprocess.run(run_module("research/baichuan2/convert_weight.py", "--reverse", "--input_path",
                                             dirs["bfloat16"], "--output_path", tmp_path / "hf"),
                                  capture_output=True, text=True, timeout=300)
    assert convert_back.returncode == 0, convert_back.stderr
    convert(str(tmp_path / "hf"), str(widened), show_progress=False, variant="chat")  # float32, bf16 values exact
    merge_main(["--base", str(widened), "--adapter", adapter, "--output_path", str(reference)])
    merged, expected = SafetensorsFile(str(out / "model.safetensors")), SafetensorsFile(
        str(reference / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert merged.dtype(name) == "BF16"
    got = merged.read_rows(name, 0, merged.shape(name)[0])
    want = bf16_bits(expected.read_rows(name, 0, expected.shape(name)[0]))
    assert np.array_equal(np.asarray(got).view(np.uint16), want)
    with open(os.path.join(dirs["bfloat16"], "model.safetensors.index.json"), encoding="utf-8") as f:
        shard = json.load(f)["weight_map"][name]
    base = SafetensorsFile(os.path.join(dirs["bfloat16"], shard))
    assert base.dtype(name) == "BF16"
    assert not np.array_equal(np.asarray(base.read_rows(name, 0, 4)), np.asarray(merged.read_rows(name, 0, 4)))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_merge_onto_a_quantised_base_is_refused_clearly(dirs, adapter, fmt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        merge_main(["--base", dirs[fmt], "--adapter", adapter, "--output_path", str(tmp_path / "merged")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"holds {fmt} weights" in err and "--dtype bfloat16" in err, err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_training_on_a_quantised_base_is_refused_in_one_line(dirs, fmt):
    from baichuan2.training.recipe import FinetuneError, model_config  # pylint: disable=import-outside-toplevel
    with pytest.raises(FinetuneError) as refused:
        model_config({"preset": "tiny", "overrides": {}, "load_checkpoint": dirs[fmt]})
    message = str(refused.value)
    assert "\n" not in message and f"holds {fmt} weights" in message and "LoRA included" in message, message


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_one_of_our_directories_converts_like_its_hugging_face_source(dirs, fmt, tmp_path):
    """convert_weight.py --input_path <our float32 dir> --quantize: what the Hugging Face source converts to."""
    from baichuan2.convert_weight import main as convert_main  # pylint: disable=import-outside-toplevel
    out = tmp_path / fmt
    convert_main(["--input_path", dirs["float32"], "--output_path", str(out), "--quantize", fmt])
    ours, direct = json.loads((out / "config.json").read_text(encoding="utf-8")), json.loads(
        open(os.path.join(dirs[fmt], "config.json"), encoding="utf-8").read())
    assert ours == direct  # format, chat format and role ids alike
    mine, theirs = stored_tensors(str(out)), stored_tensors(dirs[fmt])
    assert sorted(mine) == sorted(theirs)
    for name, (dtype, rows) in mine.items():
        assert dtype == theirs[name][0] and np.array_equal(rows, theirs[name][1]), name


def stored_tensors(model_dir):
    """name -> (safetensors dtype, array as stored) of a model directory, sharded or not."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for file_name in files:
        shard = SafetensorsFile(os.path.join(model_dir, file_name))
        for name in shard.keys():
            tensors[name] = (shard.dtype(name), shard.read_rows(name, 0, shard.shape(name)[0]))
    return tensors
