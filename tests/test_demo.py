"""The README's first command, `make demo`, end to end: preprocess, 2-worker msrun finetune, export, openmind.

The demo must really learn the bundled sample: its final loss must sit far below what a model that ignores the
context can reach (the unigram entropy of the trained tokens), and its greedy answers to training questions must
start like the training answers.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, free_port, run_module

STAGES = ("tokenise the BELLE sample into MindRecord", "finetune on 2 workers with msrun",
          "export the final weights as a model directory", "answer prompts with openmind.pipeline(framework='ms')")


def unigram_entropy(mindrecord):
    """Entropy (nats) of the trained target tokens: the best mean loss of a model that ignores its input."""
    import mindspore.dataset as ds
    counts = {}
    for row in ds.MindDataset(str(mindrecord), columns_list=["labels"], shuffle=False).create_dict_iterator(
            output_numpy=True):
        targets = row["labels"][1:]
        for token, n in zip(*np.unique(targets[targets != -100], return_counts=True)):
            counts[token] = counts.get(token, 0) + n
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    return float(-(p * np.log(p)).sum())


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One `make demo` run shared by the tests below (it takes minutes): (output dir, finished process)."""
    out = tmp_path_factory.mktemp("make_demo") / "demo"
    proc = subprocess.run(["make", "-s", "-C", REPO, "demo",
                           f"DEMO_ARGS=--output_dir {out} --master_port {free_port()}"],
                          capture_output=True, text=True, timeout=900)
    return out, proc


def starts_like_the_training_answers(answers, expected):
    """The demo's criterion: at least two of the three replies start with their training answer's first 10 chars."""
    starts_right = [answer.startswith(truth[:10]) for answer, truth in zip(answers, expected)]
    return sum(starts_right) >= 2


@pytest.mark.slow
def test_make_demo_learns_the_sample_and_answers_through_openmind(demo_run):
    out, proc = demo_run
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    for number, title in enumerate(STAGES, start=1):
        assert f"=== [{number}/5] {title}: done in" in proc.stdout, title

    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    entropy = unigram_entropy(out / "belle_sample.mindrecord")
    print(f"final loss {summary['final_loss']:.4f}, first {summary['first_loss']:.3f}, "
          f"unigram entropy of the targets {entropy:.3f}")
    assert entropy > 4.0  # the sample is not trivially predictable without context
    assert summary["final_loss"] < 0.5 < entropy / 8, summary["final_loss"]

    answers, expected = summary["answers"], summary["training_answers"]
    assert len(answers) == 4 and len(expected) == 3
    assert starts_like_the_training_answers(answers, expected), list(zip(answers, expected))
    for prompt, answer in zip(summary["prompts"], answers):
        assert f"Q: {prompt}\nA: {answer}" in proc.stdout

    train = out / "finetune"
    assert (train / "loss_curve.png").stat().st_size > 1000
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(train / "tensorboard"))
    assert os.listdir(train / "checkpoints")
    for name in ("config.json", "model.safetensors", "tokenizer.model", "modeling_baichuan.py"):
        assert (train / "model" / name).is_file(), name
    for path in (train / "loss_curve.png", train / "tensorboard", train / "checkpoints", train / "model"):
        assert str(path) in proc.stdout and f"{path}  (missing!)" not in proc.stdout


# Our model directory -> Hugging Face layout (--reverse) -> the stored format. (The direct path, --input_path <our
# directory> --quantize, is tested in test_quantized_entry_points.py.)
CONVERSIONS = {"bfloat16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}
# The demo's answering stage: the model card's call, greedy, on each prompt in the Baichuan2 chat layout.
ANSWER_WITH_THE_MODEL_CARD = """
import json, sys
from openmind import pipeline
from baichuan2.chat_format import BAICHUAN2
prompts, replies = json.loads(sys.argv[1]), {}
for model_dir in sys.argv[2:]:
    generator = pipeline(task="text_generation", model=model_dir, framework='ms', trust_remote_code=True)
    replies[model_dir] = []
    for prompt in prompts:
        chat_text = BAICHUAN2.render_text([{"role": "user", "content": prompt}])
        text = generator(chat_text, do_sample=False, max_new_tokens=48)[0]["text_generation_text"][0]
        replies[model_dir].append(text[len(chat_text):] if text.startswith(chat_text) else text)
print(json.dumps(replies, ensure_ascii=False))
"""


@pytest.mark.slow
def test_the_demo_model_converted_to_bf16_int8_and_int4_still_gives_the_training_answers(demo_run, tmp_path):
    out, proc = demo_run
    assert proc.returncode == 0, f"the demo failed: {proc.stderr[-2000:]}"
    summary = json.loads((out / "demo_summary.json").read_text(encoding="utf-8"))
    prompts, expected = summary["prompts"][:3], summary["training_answers"]
    hf_dir = tmp_path / "hf"
    convert = run_module("research/baichuan2/convert_weight.py", "--input_path", out / "finetune" / "model",
                         "--output_path", hf_dir, "--reverse")
    subprocess.run(convert, check=True, capture_output=True, timeout=300)
    dirs = {}
    for fmt, flags in CONVERSIONS.items():
        dirs[fmt] = tmp_path / fmt
        subprocess.run(run_module("research/baichuan2/convert_weight.py", "--input_path", hf_dir,
                                  "--output_path", dirs[fmt], *flags), check=True, capture_output=True, timeout=300)
        config = json.loads((dirs[fmt] / "config.json").read_text(encoding="utf-8"))
        assert (config.get("quantization_config") or {}).get("bits", config["torch_dtype"]) == \
            {"bfloat16": "bfloat16", "int8": 8, "int4": 4}[fmt], config
    answering = subprocess.run([sys.executable, "-c", ANSWER_WITH_THE_MODEL_CARD,
                                json.dumps(prompts, ensure_ascii=False), *map(str, dirs.values())],
                               capture_output=True, text=True, timeout=600)
    assert answering.returncode == 0, answering.stderr[-4000:]
    replies = json.loads(answering.stdout.strip().splitlines()[-1])
    for fmt, model_dir in dirs.items():
        answers = replies[str(model_dir)]
        print(fmt, answers)
        assert starts_like_the_training_answers(answers, expected), (fmt, list(zip(answers, expected)))


@pytest.mark.slow
def test_demo_refuses_an_output_dir_it_did_not_make(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = subprocess.run(run_module("example/demo.py", "--output_dir", tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2 and "was not made by the demo" in proc.stderr, proc.stderr
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_a_failing_stage_stops_the_demo_with_its_error(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(run_module("example/demo.py", "--output_dir", out, "--workers", "0"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "=== [1/5] tokenise the BELLE sample into MindRecord: done in" in proc.stdout
    assert "=== [2/5] finetune on 0 workers with msrun: FAILED after" in proc.stderr
    assert "command failed with exit status" in proc.stderr
    assert "[3/5]" not in proc.stdout and not (out / "demo_summary.json").exists()
