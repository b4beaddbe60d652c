"""Benchmark of belle_preprocess.py: records/s with 1 worker and with N workers, side by side.

Generates a synthetic BELLE file (JSON Lines, mixed English/Chinese, 1-3 turns, long-ish answers so that
tokenisation dominates) in a temporary folder, converts it once per worker count, checks that the outputs are
byte-identical and prints the rates.

    python example/dataset/bench_preprocess.py [--num 20000] [--workers 2] [--seq_length 512]
"""
import argparse
import json
import os
import random
import tempfile
import time

import baichuan2.data as bp

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))

WORDS_EN = "the model reads text and predicts the next token from what came before it quickly".split()
WORDS_ZH = list("我们今天学习语言模型训练数据处理分词器预测下一个词元并且计算损失函数")


def synthetic(num, seed=0):
    """num conversation records as JSON lines (deterministic)."""
    rng = random.Random(seed)
    for i in range(num):
        zh = rng.random() < 0.5
        turns = []
        for t in range(rng.choice([1, 2, 3])):
            if zh:
                q = "".join(rng.choices(WORDS_ZH, k=rng.randint(8, 30))) + "？"
                a = "".join(rng.choices(WORDS_ZH, k=rng.randint(40, 160))) + "。"
            else:
                q = " ".join(rng.choices(WORDS_EN, k=rng.randint(5, 20))) + "?"
                a = " ".join(rng.choices(WORDS_EN, k=rng.randint(30, 120))) + "."
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        yield json.dumps({"id": i, "conversations": turns}, ensure_ascii=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=20000, help="conversations to generate")
    parser.add_argument("--workers", type=int, default=2, help="N for the parallel run")
    parser.add_argument("--seq_length", type=int, default=512)
    parser.add_argument("--model_file", default=os.path.join(REPO, "dataset", "tokenizer.model"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.jsonl")
        with open(data, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in synthetic(args.num))
        print(f"{args.num} conversations, {os.path.getsize(data) / 2**20:.1f} MiB, seq_length {args.seq_length}")
        results, outputs = {}, []
        for n in sorted({1, args.workers}):
            os.makedirs(os.path.join(tmp, f"w{n}"))
            out = os.path.join(tmp, f"w{n}", "bench.mindrecord")  # same name in both: compare bytes
            start = time.time()
            stats = bp.preprocess(bp.parse_args(["--input_glob", data, "--model_file", args.model_file,
                                                 "--output_file", out, "--seq_length", str(args.seq_length),
                                                 "--num_workers", str(n), "--quiet"]))
            results[n] = (stats["written"] / (time.time() - start), stats)
            with open(out, "rb") as f:
                outputs.append(f.read())
        print(f"{'workers':>8} {'records/s':>10} {'tokens/s':>10}")
        for n, (rate, stats) in results.items():
            print(f"{n:>8} {rate:>10.0f} {rate * stats['tokens'] / stats['written']:>10.0f}")
        if len(results) > 1:
            rates = [r for r, _ in results.values()]
            print(f"speed-up x{rates[-1] / rates[0]:.2f} on {os.cpu_count()} CPU(s); outputs identical: "
                  f"{all(o == outputs[0] for o in outputs)}")


if __name__ == "__main__":
    main()
