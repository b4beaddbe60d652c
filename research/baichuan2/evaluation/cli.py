"""Few-shot multiple-choice evaluation of a model directory, as in the Baichuan model cards.

    python example/evaluate.py --model_dir DIR --task ceval --data_dir data/ceval [--shots 5] [--split val]
        [--subjects computer_network logic] [--limit N] [--output results.json] [--batch_size 8]

Tasks and the layouts read from --data_dir (the published files, unpacked; nothing is downloaded):
    ceval    {dev,val,test}/<subject>_<split>.csv      mmlu   {dev,val,test}/<subject>_<split>.csv (no header)
    cmmlu    {dev,test}/<subject>.csv                  gaokao [Objective_Questions/]*.json
    agieval  *.jsonl
Prints a per-subject / per-category table and writes the report as JSON (--output, default
<task>_<split>_results.json). For C-Eval's test split the output is the leaderboard submission {subject: {id: letter}}.
Finished subjects are cached in <output>.cache/: rerun the same command to continue an interrupted run.

Installed as the command `baichuan2-eval`; example/evaluate.py is the same command line for a checkout.
"""
import argparse
import sys

from baichuan2 import runtime
from baichuan2.evaluation import (TASKS, DataLayoutError, ModelScorer, evaluate, format_table, load_task,
                                  model_fingerprint)
from baichuan2.evaluation.datasets import DEFAULT_SPLIT


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True, help="config.json + model.safetensors + tokenizer.model")
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--data_dir", required=True, help="the benchmark's files, in the published layout")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--split", choices=("val", "test"), default=None,
                   help="ceval: val (default) or test; mmlu: test (default) or val; cmmlu: test")
    p.add_argument("--subjects", nargs="+", default=None, help="subject (file) names; default: all found")
    p.add_argument("--limit", type=int, default=None, help="score only the first N items of each subject")
    p.add_argument("--output", default=None)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--max_length", type=int, default=None, help="prompt token limit (default: the model's context)")
    runtime.add_device_argument(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # prompt lengths vary: graph mode would recompile per shape
    runtime.setup_inference(args.device, mode="pynative", threads=args.threads, prog="evaluate.py")
    split = args.split or DEFAULT_SPLIT[args.task]
    output = args.output or f"{args.task}_{split}_results.json"
    try:
        # layout errors show before the (slow) model load
        load_task(args.task, args.data_dir, args.split, args.subjects, args.shots)
        scorer = ModelScorer.from_model_dir(args.model_dir, max_length=args.max_length)
        report = evaluate(args.task, args.data_dir, scorer, split=args.split, shots=args.shots,
                          subjects=args.subjects, limit=args.limit, output=output, batch_size=args.batch_size,
                          model_id=model_fingerprint(args.model_dir))
    except (DataLayoutError, FileNotFoundError, ValueError) as e:  # ValueError: a damaged model directory
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    for note in report["notes"]:
        print(f"note: {note}")
    if report["resumed_subjects"]:
        print(f"note: {len(report['resumed_subjects'])} subject(s) taken from the cache {output}.cache")
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
