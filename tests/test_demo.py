"""The README's first command, `make demo`, end to end: preprocess, 2-worker msrun finetune, export, openmind.

The demo must really learn the bundled sample: its final loss must sit far below what a model that ignores the
context can reach (the unigram entropy of the trained tokens), and its greedy answers to training questions must
start like the training answers.
"""
import json
import os
import subprocess

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


@pytest.mark.slow
def test_make_demo_learns_the_sample_and_answers_through_openmind(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(["make", "-s", "-C", REPO, "demo",
                           f"DEMO_ARGS=--output_dir {out} --master_port {free_port()}"],
                          capture_output=True, text=True, timeout=900)
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
    starts_right = [answer.startswith(truth[:10]) for answer, truth in zip(answers, expected)]
    assert sum(starts_right) >= 2, list(zip(answers, expected))
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
