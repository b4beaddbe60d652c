"""Real-size check, run by hand (minutes, ~15 GB of disk for the 7B shape): do bf16 / int8 / int4 directories of a
Baichuan2-7B-shaped model convert and answer within their memory goals?

    python example/real_size_check.py --workdir /tmp/real_size            # the full Baichuan2-7B shape
    python example/real_size_check.py --workdir /tmp/real_size --layers 2  # quick try: 2 layers of the real width

1. writes a random Baichuan2-7B-shaped Hugging Face checkpoint in bfloat16 shards (W_pack, NormHead), streamed one
   block of rows at a time, never whole in memory;
2. converts it with research/baichuan2/convert_weight.py to a bfloat16, an int8 and an int4 directory;
3. asks each one chat question through example/inference.py;
and prints, per format, the conversion's and the inference process's peak RSS (each a separate process, measured
with os.wait4) beside their goals (the memory table of docs/PERFORMANCE.md).

The bundled 1000-piece test tokenizer stands in for Baichuan2's; lm_head rows of ids it does not know are zero,
so every generated id decodes. The answers are random text: this checks memory and plumbing, not quality.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

# pylint: disable=wrong-import-position
# the children's environment as the user set it: importing mindspore (below) sets OMP_NUM_THREADS=1, which the
# inference child would otherwise inherit as its thread count
CHILD_ENV = dict(os.environ)

import numpy as np  # noqa: E402

from baichuan2 import runtime  # noqa: E402

runtime.setup_logs()  # before mindformers loads: no INFO lines, and its log folder not in the current directory

from baichuan2.configuration_baichuan import PRESETS, BaichuanConfig, to_hf_config  # noqa: E402
from baichuan2.convert_weight import expected_shapes  # noqa: E402
from baichuan2.quantization import bf16_bits  # noqa: E402
from baichuan2.safetensors_io import SafetensorsWriter  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = os.path.join(REPO, "dataset", "tokenizer.model")
TOKENIZER_VOCAB = 1000
GOALS_GIB = {"bfloat16": 17.0, "int8": 9.5, "int4": 5.5}  # inference peak RSS goals for the full 7B
FORMATS = {"bfloat16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4"]}
GIB = 1024 ** 3


def write_checkpoint(path, config, shard_bytes, seed=0):
    """Random bfloat16 weights in the Hugging Face layout, cut into shards of about `shard_bytes`."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(config, hf_layout=True)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    os.makedirs(path)
    weight_map = {}
    for number, names in enumerate(shards, start=1):
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        with SafetensorsWriter(os.path.join(path, file), [(n, "BF16", shapes[n]) for n in names]) as writer:
            for name in names:
                shape = shapes[name]
                if len(shape) == 1:
                    writer.write(bf16_bits(np.ones(shape, np.float32)))
                    continue
                step = max(1, (8 << 20) // shape[1])
                for first in range(0, shape[0], step):
                    rows = min(step, shape[0] - first)
                    block = rng.uniform(-0.04, 0.04, (rows, shape[1])).astype(np.float32)
                    if name == "lm_head.weight":  # ids the stand-in tokenizer cannot decode never win
                        block[max(0, TOKENIZER_VOCAB - first):] = 0.0
                    writer.write(bf16_bits(block))
        weight_map.update({n: file for n in names})
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(to_hf_config(config), torch_dtype="bfloat16"), f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:  # a Chat checkpoint
        json.dump({"user_token_id": 3, "assistant_token_id": 4}, f)
    shutil.copy2(TOKENIZER, os.path.join(path, "tokenizer.model"))
    return max(os.path.getsize(os.path.join(path, f)) for f in set(weight_map.values()))


def run_measured(argv):
    """Runs a command; returns (exit status, peak RSS in bytes, seconds, output tail)."""
    start = time.perf_counter()
    # pylint: disable-next=consider-using-with
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=CHILD_ENV)
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in output.splitlines() if " - INFO - " not in line and " - WARNING - " not in line]
    return proc.returncode, usage.ru_maxrss * 1024, time.perf_counter() - start, "\n".join(lines)[-3000:]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="scratch directory (created; ~15 GB for the 7B shape)")
    parser.add_argument("--layers", type=int, default=PRESETS["baichuan2_7b"]["num_hidden_layers"],
                        help="decoder layers (32 is the real 7B; fewer for a quick try of the real width)")
    parser.add_argument("--shard_gb", type=float, default=2.0, help="size of the random checkpoint's shards")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--mode", choices=["pynative", "graph"], default="pynative",
                        help="inference.py's mode. Without kernels.py the weights are dequantised per call by stock "
                             "ops: PyNative frees each block at once, GRAPH mode keeps every dequantised block of a "
                             "step alive (measured), so GRAPH mode fits only with the kernels")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir afterwards")
    args = parser.parse_args(argv)
    if os.path.exists(args.workdir):
        print(f"real_size_check.py: error: {args.workdir} exists; pass a new directory", file=sys.stderr)
        return 2
    config = BaichuanConfig.from_preset("baichuan2_7b", num_hidden_layers=args.layers)
    print(f"shape: Baichuan2-7B with {args.layers} layers, {config.num_parameters() / 1e9:.2f} B parameters", flush=True)
    source = os.path.join(args.workdir, "hf-bf16")
    start = time.perf_counter()
    shard = write_checkpoint(source, config, int(args.shard_gb * GIB))
    print(f"wrote the bf16 checkpoint in {time.perf_counter() - start:.0f} s (largest shard {shard / GIB:.2f} GiB)", flush=True)
    rows, failed = [], False
    print("columns: format, weights, conversion peak RSS (goal: largest shard + 2 GiB), conversion seconds, "
          f"inference peak RSS (goal for the full 7B), inference seconds, answer", flush=True)
    for fmt in args.formats:
        out = os.path.join(args.workdir, fmt)
        code, convert_rss, convert_s, log = run_measured(
            [sys.executable, os.path.join(REPO, "research", "baichuan2", "convert_weight.py"), "--input_path",
             source, "--output_path", out] + FORMATS[fmt])
        if code:
            print(f"{fmt}: conversion failed ({code}):\n{log}")
            failed = True
            continue
        code, infer_rss, infer_s, log = run_measured(
            [sys.executable, os.path.join(REPO, "example", "inference.py"), "--model_dir", out, "--chat",
             "--prompt", "你是谁?", "--greedy", "--max_new_tokens", "8", "--mode", args.mode])
        answer = log.split("### prompt: 你是谁?\n", 1)[-1].split("\n", 1)[0] if code == 0 else f"FAILED ({code})"
        if code:
            print(f"{fmt}: inference failed ({code}):\n{log}")
            failed = True
        weights = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".safetensors"))
        rows.append(f"{fmt:9} {weights / GIB:8.2f}G {convert_rss / GIB:11.2f}G {shard / GIB + 2:7.2f}G "
                    f"{convert_s:9.0f} {infer_rss / GIB:13.2f}G {GOALS_GIB[fmt]:8.1f}G {infer_s:8.0f}  {answer!r}")
        print(rows[-1], flush=True)  # as soon as it is known: a long run may be interrupted
        if not args.keep:
            shutil.rmtree(out)
    print(f"\n{'format':9} {'weights':>9} {'convert RSS':>12} {'(goal)':>8} {'convert s':>9} "
          f"{'inference RSS':>14} {'(7B goal)':>9} {'infer s':>8}  answer")
    print("\n".join(rows))
    if not args.keep:
        shutil.rmtree(args.workdir)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
