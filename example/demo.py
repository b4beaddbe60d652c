"""The whole suite on the bundled tiny default, end to end (`make demo`).

1. tokenise the bundled BELLE sample into MindRecord (example/dataset/belle_preprocess.py)
2. finetune a tiny Baichuan2-architecture model on 2 data-parallel workers (bash msrun.sh "finetune.py ...")
3. export the final weights as a servable model directory
4. answer three training prompts and one new prompt through the model card's openmind.pipeline call
5. say where the loss curve, TensorBoard logs, checkpoints and model directory are

Each stage prints its progress and time; a failing stage stops the run with its error. A summary of the run
(final loss, answers) is written to <output_dir>/demo_summary.json. Running the demo again replaces the previous
demo's output directory (only one that a demo made: it carries a marker file).
"""
import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time

from baichuan2 import runtime
from baichuan2.chat_format import BAICHUAN2

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "dataset", "belle_sample.json")
TOKENIZER = os.path.join(REPO, "dataset", "tokenizer.model")
CONFIG = os.path.join(REPO, "configs", "finetune_demo.yaml")
# Training conversations whose answers the demo asks for (ids in dataset/belle_sample.json), and one new prompt.
TRAINING_PROMPT_IDS = ("belle_sample_0000", "belle_sample_0150", "belle_sample_0300")
NEW_PROMPT = "你好，请介绍一下你自己。"
MARKER = ".baichuan_demo_output"  # marks a directory this script made, so a rerun may replace it


class StageError(RuntimeError):
    pass


def run_stage(number, total, title, action):
    print(f"\n=== [{number}/{total}] {title}", flush=True)
    start = time.time()
    try:
        result = action()
    except Exception as exc:  # the stage's own error, then stop
        print(f"=== [{number}/{total}] {title}: FAILED after {time.time() - start:.1f} s\n{exc}", file=sys.stderr)
        raise SystemExit(1) from exc
    print(f"=== [{number}/{total}] {title}: done in {time.time() - start:.1f} s", flush=True)
    return result


def run(cmd, cwd=REPO):
    """Runs a command with its output shown live; raises StageError with the command on failure."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # MindSpore's C++ warnings (msrun's cluster handshake retries) would bury the demo's own lines; errors still
    # show, and an explicit GLOG_v from the user wins.
    env.setdefault("GLOG_v", "3")
    code = subprocess.call(cmd, cwd=cwd, env=env)
    if code != 0:
        raise StageError(f"command failed with exit status {code}: {' '.join(cmd)}")


def first_turns(ids):
    """(question, answer) of the first exchange of each chosen training conversation."""
    with open(SAMPLE, encoding="utf-8") as f:
        records = {r["id"]: r for r in json.load(f)}
    pairs = []
    for record_id in ids:
        turns = records[record_id]["conversations"]
        pairs.append((turns[0]["value"], turns[1]["value"]))
    return pairs


def final_loss(output_dir):
    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    if not losses:
        raise StageError("training wrote no loss to train_log.jsonl")
    return losses[0], sum(losses[-5:]) / len(losses[-5:])


def fresh_output_dir(out):
    """Creates `out`, replacing the output of an earlier demo run; never touches a directory the demo did not make."""
    if os.path.isdir(out) and os.listdir(out):
        if not os.path.isfile(os.path.join(out, MARKER)):
            raise StageError(f"{out} exists and was not made by the demo; choose another --output_dir or remove it")
        print(f"replacing the previous demo output in {out}")
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    open(os.path.join(out, MARKER), "w", encoding="utf-8").close()


def answer(model_dir, prompts):
    """Greedy replies through the model card's call, verbatim apart from the local model directory."""
    from openmind import pipeline
    from mindformers.tools.logger import get_logger
    get_logger().setLevel(logging.WARNING)  # loading logs the whole config at INFO; the demo shows the answers
    generator = pipeline(task="text_generation", model=model_dir, framework='ms', trust_remote_code=True)
    replies = []
    for prompt in prompts:
        chat_text = BAICHUAN2.render_text([{"role": "user", "content": prompt}])  # <reserved_106>q<reserved_107>
        result = generator(chat_text, do_sample=False, max_new_tokens=48)
        text = result[0]["text_generation_text"][0]  # the prompt followed by the reply
        replies.append(text[len(chat_text):] if text.startswith(chat_text) else text)
    return replies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join(REPO, "output", "demo"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--master_port", type=int, default=8129)
    runtime.add_device_argument(parser)
    args = parser.parse_args(argv)
    runtime.setup_inference(args.device, threads=args.threads, prog="demo.py")  # exits 2 if the device is unusable
    out = os.path.abspath(args.output_dir)
    try:
        fresh_output_dir(out)
    except StageError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    mindrecord = os.path.join(out, "belle_sample.mindrecord")
    train_dir = os.path.join(out, "finetune")
    model_dir = os.path.join(train_dir, "model")
    total, started = 5, time.time()

    run_stage(1, total, "tokenise the BELLE sample into MindRecord", lambda: run([
        sys.executable, "example/dataset/belle_preprocess.py", "--input_glob", SAMPLE, "--model_file", TOKENIZER,
        "--output_file", mindrecord, "--seq_length", "128"]))

    finetune_args = (f"finetune.py --config {CONFIG} --train_dataset {mindrecord} --output_dir {train_dir} "
                     f"--device {args.device}")
    run_stage(2, total, f"finetune on {args.workers} workers with msrun", lambda: run([
        "bash", "msrun.sh", finetune_args, str(args.workers), str(args.master_port),
        os.path.join(out, "msrun_log")], cwd=os.path.join(REPO, "example")))
    first, last = final_loss(train_dir)
    print(f"loss: first step {first:.3f} -> last steps {last:.3f}")

    def export():
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise StageError(f"training left no model directory at {model_dir}")
        print(f"servable model directory: {model_dir} ({', '.join(sorted(os.listdir(model_dir)))})")
    run_stage(3, total, "export the final weights as a model directory", export)

    pairs = first_turns(TRAINING_PROMPT_IDS)
    prompts = [q for q, _ in pairs] + [NEW_PROMPT]
    answers = run_stage(4, total, "answer prompts with openmind.pipeline(framework='ms')",
                        lambda: answer(model_dir, prompts))
    for i, (prompt, text) in enumerate(zip(prompts, answers)):
        origin = f"training answer: {pairs[i][1]!r}" if i < len(pairs) else "new prompt"
        print(f"\nQ: {prompt}\nA: {text}\n   ({origin})")

    summary = {"first_loss": first, "final_loss": last, "prompts": prompts, "answers": answers,
               "training_answers": [a for _, a in pairs], "model_dir": model_dir}
    with open(os.path.join(out, "demo_summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, ensure_ascii=False, indent=2)

    def where():
        for label, path in (("loss curve", os.path.join(train_dir, "loss_curve.png")),
                            ("TensorBoard logs", os.path.join(train_dir, "tensorboard")),
                            ("checkpoints", os.path.join(train_dir, "checkpoints")),
                            ("model directory", model_dir),
                            ("worker logs", os.path.join(out, "msrun_log")),
                            ("summary", os.path.join(out, "demo_summary.json"))):
            print(f"  {label:17s} {path}{'' if os.path.exists(path) else '  (missing!)'}")
    run_stage(5, total, "outputs", where)
    print(f"\ndemo finished in {time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
