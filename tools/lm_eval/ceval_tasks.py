"""lm-eval task files for C-Eval / CMMLU subjects in their published layout, scoring what example/evaluate.py scores.

    .venv/bin/python tools/lm_eval/ceval_tasks.py --task ceval --data_dir data/ceval --out /tmp/lm_eval_tasks \
        [--split val] [--subjects computer_network logic] [--shots 5]
    .venv-ref/bin/lm-eval run --model local-completions --include_path /tmp/lm_eval_tasks --tasks baichuan2_ceval \
        --model_args base_url=http://127.0.0.1:8000/v1/completions,model=MODEL,tokenizer=MODEL_DIR,\
trust_remote_code=True,tokenized_requests=False

Each subject becomes one multiple-choice task (`baichuan2_<task>_<subject>.yaml`) over two local JSON Lines files
written beside it (the scored items and the dev shots, read by baichuan2.evaluation's own reader), and all of them
one group (`baichuan2_<task>.yaml`, accuracy pooled over every question). The YAML rebuilds evaluate.py's prompt
(evaluation/prompts.py): the header as `description`, the first --shots dev items with their answers, the question,
its options and "答案：", and scores each letter as the text that follows it directly (`target_delimiter: ""`;
lm-eval's stock C-Eval task puts a space there). So lm-eval's acc is evaluate.py's accuracy, item for item, when both
read the same tokens (tokenized_requests=False: lm-eval sends text, the server tokenizes it as evaluate.py does).
Nothing is downloaded: the YAML names the JSON Lines files by absolute path.
"""
import argparse
import json
import os
import sys

import yaml

from baichuan2.evaluation import DataLayoutError, load_task
from baichuan2.evaluation.datasets import LETTERS
from baichuan2.evaluation.prompts import ANSWER_PREFIX, HEADERS

TASKS = ("ceval", "cmmlu")  # the Chinese CSV benchmarks: four options, "答案：" and the letter straight after it


def _write_jsonl(path, items):
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            row = {"id": item.id, "question": item.question, "answer": item.answer}
            row.update(zip(LETTERS[:4], item.choices))
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def task_config(task, subject, items_path, dev_path, shots):
    """The lm-eval task dict of one subject (style "zh": evaluation/prompts.py's Chinese prompt)."""
    options = "".join(f"\n{letter}. {{{{{letter}}}}}" for letter in LETTERS[:4])
    return {
        "task": f"baichuan2_{task}_{subject.name}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"items": items_path, "dev": dev_path}},
        "test_split": "items",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": min(shots, len(subject.shots)),  # evaluate.py uses the dev shots there are
        "output_type": "multiple_choice",
        "description": HEADERS["zh"].format(subject=subject.prompt_name),
        "doc_to_text": "{{question}}" + options + "\n" + ANSWER_PREFIX["zh"],
        "doc_to_choice": list(LETTERS[:4]),
        "doc_to_target": "{{" + repr(list(LETTERS[:4])) + ".index(answer)}}",
        "target_delimiter": "",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def write_tasks(task, data_dir, out, split=None, subjects=None, shots=5):
    """Writes the task files into `out`; returns the group's task name."""
    loaded = load_task(task, data_dir, split, subjects, shots)
    os.makedirs(out, exist_ok=True)
    names = []
    for subject in loaded:
        items_path = os.path.abspath(os.path.join(out, f"{task}_{subject.name}_items.jsonl"))
        dev_path = os.path.abspath(os.path.join(out, f"{task}_{subject.name}_dev.jsonl"))
        _write_jsonl(items_path, subject.items)
        _write_jsonl(dev_path, subject.shots)
        config = task_config(task, subject, items_path, dev_path, shots)
        _write_yaml(os.path.join(out, config["task"] + ".yaml"), config)
        names.append(config["task"])
    group = f"baichuan2_{task}"
    _write_yaml(os.path.join(out, group + ".yaml"), {
        "group": group, "task": names,
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0}})
    return group


def _write_yaml(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, allow_unicode=True, sort_keys=False, width=4096)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    p.add_argument("--task", choices=TASKS, default="ceval")
    p.add_argument("--data_dir", required=True, help="the benchmark's files, in the published layout")
    p.add_argument("--out", required=True, help="folder for the task YAML and JSON Lines files")
    p.add_argument("--split", default=None, help="ceval: val (default); cmmlu: test")
    p.add_argument("--subjects", nargs="+", default=None)
    p.add_argument("--shots", type=int, default=5)
    args = p.parse_args(argv)
    try:
        group = write_tasks(args.task, args.data_dir, args.out, args.split, args.subjects, args.shots)
    except DataLayoutError as e:
        print(f"ceval_tasks.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote the lm-eval tasks in {args.out}: --include_path {args.out} --tasks {group}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
