"""Benchmark of packing (belle_preprocess.py --pack): fill ratio and target tokens trained per second, packed vs
unpacked, side by side in one run.

For each data set (the bundled BELLE sample at --seq_length, and a longer synthetic BELLE set from
bench_preprocess.py, ~350 tokens a conversation, at each of --synthetic_seq_lengths: 512 and the longer rows of the
real recipes, where unpacked rows are mostly padding) it writes
the MindRecord twice (without and with --pack) and finetunes the tiny recipe (configs/finetune_tiny.yaml, context
widened to the rows) a few steps on each, one process, same batch. Target tokens per second = the targets (labels
the loss counts) of the rows each step trained on (read from the run's debug sample log) / the step times, the first
step (graph compilation) left out.

    python example/dataset/bench_packing.py [--seq_length 512] [--synthetic_seq_lengths 512,2048] [--steps 8]
        [--batch_size 4] [--synthetic 1500]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

import baichuan2.data as bp
from baichuan2.chat_format import IGNORE

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def cpu_model():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown CPU"


def synthetic_lines(num):
    """bench_preprocess.py's deterministic synthetic BELLE records."""
    import runpy  # pylint: disable=import-outside-toplevel
    return runpy.run_path(os.path.join(HERE, "bench_preprocess.py"))["synthetic"](num)


def row_targets(path):
    """Targets the loss counts in each row: labels[1:] != IGNORE, without targets crossing a conversation end."""
    import mindspore.dataset as ds  # pylint: disable=import-outside-toplevel
    data = ds.MindDataset(path, shuffle=False)
    packed = "actual_seq_len" in data.get_col_names()
    out = []
    for row in data.create_dict_iterator(output_numpy=True, num_epochs=1):
        valid = row["labels"][1:] != IGNORE
        if packed:
            slots = np.arange(len(row["labels"]))
            segment = (slots[:, None] >= row["actual_seq_len"][None, :]).sum(-1)
            valid &= segment[:-1] == segment[1:]
        out.append(int(valid.sum()))
    return out


def train(tmp, name, data, seq_length, steps, batch_size):
    """Finetunes the tiny recipe `steps` steps on `data`; returns (target tokens/s, s/step) without step 1."""
    recipe = os.path.join(tmp, f"{name}.yaml")
    with open(recipe, "w", encoding="utf-8") as f:
        f.write(f"model: {{preset: tiny, overrides: {{max_position_embeddings: {seq_length + 1}, "
                f"model_max_length: {seq_length + 1}}}}}\n"
                f"data: {{seq_length: {seq_length}, shuffle: true}}\n"
                f"train: {{seed: 1, max_steps: {steps}, batch_size: {batch_size}}}\n"
                f"output: {{save_steps: 100000, log_steps: 1, tokenizer_dir: dataset}}\n")
    out = os.path.join(tmp, f"{name}_run")
    env = dict(os.environ, BAICHUAN_FINETUNE_DEBUG="1", GLOG_v="3")
    env.pop("RANK_SIZE", None)
    env.pop("MS_WORKER_NUM", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "example", "finetune.py"), "--config", recipe,
                           "--train_dataset", data, "--output_dir", out], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"finetune failed on {data}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    targets = row_targets(data)
    with open(os.path.join(out, "train_log.jsonl"), encoding="utf-8") as f:
        seconds = {r["step"]: batch_size * seq_length / r["tokens_per_s"] for r in map(json.loads, f)}
    with open(os.path.join(out, "debug", "samples_rank0.jsonl"), encoding="utf-8") as f:
        trained = {r["step"]: sum(targets[i] for i in r["indices"]) for r in map(json.loads, f)}
    timed = [s for s in seconds if s > 1]
    total_time = sum(seconds[s] for s in timed)
    return sum(trained[s] for s in timed) / total_time, total_time / len(timed)


def bench(tmp, name, input_glob, args, seq_length):
    args = argparse.Namespace(**{**vars(args), "seq_length": seq_length})
    name = f"{name} at {seq_length}"
    results = {}
    for mode, extra in (("unpacked", []), ("packed", ["--pack"])):
        folder = os.path.join(tmp, f"{name}_{mode}".replace(" ", "_"))
        os.makedirs(folder)
        data = os.path.join(folder, "rows.mindrecord")
        stats = bp.preprocess(bp.parse_args(["--input_glob", input_glob, "--model_file", args.model_file,
                                             "--output_file", data, "--seq_length", str(args.seq_length),
                                             "--quiet", *extra]))
        rate, step_s = train(tmp, folder, data, args.seq_length, args.steps, args.batch_size)
        results[mode] = (stats, rate, step_s)
    stats = results["packed"][0]
    print(f"\n{name}: {stats['conversations']} conversations, {stats['tokens']} tokens, {stats['loss_tokens']} "
          f"targets")
    print(f"{'':>9} {'rows':>6} {'fill':>6} {'s/step':>7} {'targets/s':>10}")
    for mode, (st, rate, step_s) in results.items():
        print(f"{mode:>9} {st['written']:>6} {st['fill']:>6.1%} {step_s:>7.3f} {rate:>10.0f}")
    ratio = results["packed"][1] / results["unpacked"][1]
    print(f"packed / unpacked: x{ratio:.2f} target tokens per second")
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--synthetic_seq_lengths", default="512,2048", help="row lengths for the synthetic set")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--batch_size", type=int, default=4, help="rows per step (the same packed and unpacked)")
    parser.add_argument("--synthetic", type=int, default=1500, help="synthetic conversations")
    parser.add_argument("--model_file", default=os.path.join(REPO, "dataset", "tokenizer.model"))
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); tiny recipe, batch {args.batch_size}, "
          f"{args.steps} steps per run")
    with tempfile.TemporaryDirectory() as tmp:
        bench(tmp, "bundled sample", os.path.join(REPO, "dataset", "belle_sample.json"), args, args.seq_length)
        synthetic = os.path.join(tmp, "synthetic.jsonl")
        with open(synthetic, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in synthetic_lines(args.synthetic))
        for seq_length in map(int, args.synthetic_seq_lengths.split(",")):
            bench(tmp, "synthetic BELLE", synthetic, args, seq_length)


if __name__ == "__main__":
    main()
