"""The evaluation loop: prompts -> batched scoring -> per-subject results (cached) -> report.

Results of each finished subject are cached in `<output>.cache/<task>_<subject>.json` together with the settings
they were made with, so an interrupted run continues with the first unfinished subject. A cache file made with
other settings (shots, split, limit, model) is ignored and rewritten.
"""
import json
import os
import sys

from tqdm import tqdm

from .categories import TASK_GROUPS
from .datasets import DEFAULT_SPLIT, LETTERS, load_task
from .prompts import fit_prompt
from .scoring import predict

CACHE_VERSION = 1


def model_fingerprint(model_dir):
    """Identifies the model in cache settings: its path and the newest modification time of its weights/config,
    so re-finetuned weights in the same directory are not mistaken for cached ones."""
    files = [os.path.join(model_dir, f) for f in os.listdir(model_dir)
             if f.endswith((".safetensors", ".json", ".model"))]
    newest = max((os.path.getmtime(f) for f in files), default=0.0)
    return f"{os.path.abspath(model_dir)}@{newest:.0f}"


def _write_json(path, data):
    """Written to a temporary name and renamed: an interruption never leaves half a file behind."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def _read_cache(path, settings):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if data.get("settings") == settings else None


def score_subject(subject, items, scorer, batch_size, bar=None):
    """Per-item records {id, answer, pred, shots} (in file order)."""
    fits = getattr(scorer, "fits", None) or (lambda text: True)
    prompts = [fit_prompt(subject, item, fits) for item in items]
    letters = LETTERS[:max((it.num_choices for it in items), default=4)]
    # longest prompts first: batches hold prompts of similar length, so little padding, and an out-of-memory
    # batch shows up at once rather than at the end
    order = sorted(range(len(items)), key=lambda i: -len(prompts[i][0]))
    preds = [None] * len(items)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        log_probs = scorer.score([prompts[i][0] for i in batch], letters, subject.style)
        for i, row in zip(batch, log_probs):
            preds[i] = predict(row, letters, items[i].num_choices)
        if bar is not None:
            bar.update(len(batch))
    return [{"id": item.id, "answer": item.answer, "pred": pred, "shots": shots, "fits": ok}
            for item, pred, (_, shots, ok) in zip(items, preds, prompts)]


def subject_summary(subject, records):
    scored = [r for r in records if r["answer"] is not None]
    correct = sum(r["pred"] == r["answer"] for r in scored)
    return {
        "accuracy": correct / len(scored) if scored else None,
        "correct": correct,
        "total": len(scored),
        "groups": subject.groups,
        "shots_available": len(subject.shots),
        "items_with_shots_dropped": sum(r["shots"] < len(subject.shots) for r in records),
        "shots_dropped": sum(len(subject.shots) - r["shots"] for r in records),
        "truncated": sum(not r["fits"] for r in records),
        "skipped_multi_answer": subject.skipped,  # and cloze items
        "shots_taken_from_items": subject.shots_from_items,
        "source": subject.source,
    }


def _average(rows):
    rows = [r for r in rows if r["total"]]
    if not rows:
        return None
    correct, total = sum(r["correct"] for r in rows), sum(r["total"] for r in rows)
    return {"average": sum(r["accuracy"] for r in rows) / len(rows),  # mean of subject accuracies
            "micro": correct / total,                                  # all questions pooled
            "subjects": len(rows), "correct": correct, "total": total}


def summarize(task, per_subject):
    groups = {}
    for name in TASK_GROUPS[task]:
        avg = _average([s for s in per_subject.values() if name in s["groups"]])
        if avg:
            groups[name] = avg
    return {"subjects": per_subject, "categories": groups, "overall": _average(list(per_subject.values()))}


def evaluate(task, data_dir, scorer, *, split=None, shots=5, subjects=None, limit=None, output=None,
             batch_size=8, model_id=None, progress=True):
    """Runs one benchmark and returns the report dict (also written to `output` as JSON when given).

    `model_id` names the model in the cache settings (see `model_fingerprint`): cached subjects of another model
    are not reused.

    For C-Eval's test split (labels hidden) `output` receives the leaderboard submission {subject: {id: letter}}
    instead, and the report carries it under "submission".
    """
    split = DEFAULT_SPLIT[task] if task in ("gaokao", "agieval") else (split or DEFAULT_SPLIT[task])
    loaded = load_task(task, data_dir, split, subjects, shots)
    hidden = task == "ceval" and split == "test"
    settings = {"version": CACHE_VERSION, "task": task, "split": split, "shots": shots, "limit": limit,
                "model": model_id}
    cache_dir = output + ".cache" if output else None

    todo, records = [], {}
    for subject in loaded:
        items = subject.items[:limit] if limit else subject.items
        cached = _read_cache(os.path.join(cache_dir, f"{task}_{subject.name}.json"), settings) if cache_dir else None
        if cached is not None:
            records[subject.name] = cached["records"]
        else:
            todo.append((subject, items))
    total = sum(len(items) for _, items in todo)
    with tqdm(total=total, desc=task, unit="q", disable=not progress or total == 0, file=sys.stderr) as bar:
        for subject, items in todo:
            bar.set_postfix_str(subject.name)
            records[subject.name] = score_subject(subject, items, scorer, batch_size, bar)
            if cache_dir:
                _write_json(os.path.join(cache_dir, f"{task}_{subject.name}.json"),
                            {"settings": settings, "subject": subject.name, "records": records[subject.name]})

    per_subject = {s.name: subject_summary(s, records[s.name]) for s in loaded}
    report = {"task": task, "split": split, "shots": shots, "limit": limit, "model": model_id,
              "resumed_subjects": [s.name for s in loaded if s.name not in {t[0].name for t in todo}],
              "letter_tokens": getattr(scorer, "letter_tokens", None), "notes": _notes(task, loaded, shots)}
    if hidden:
        report["submission"] = {s.name: {r["id"]: r["pred"] for r in records[s.name]} for s in loaded}
        report.update(subjects=per_subject)
    else:
        report.update(summarize(task, per_subject))
    if output:
        _write_json(output, report["submission"] if hidden else report)
    return report


def _notes(task, loaded, shots):
    notes = []
    if any(s.shots_from_items for s in loaded) and shots:
        notes.append(f"{task} has no dev split: the first {shots} items of each file are the shots and are not scored")
    if any(s.skipped for s in loaded):
        notes.append("multi-answer and cloze items are not single-choice questions and were skipped "
                     "(skipped_multi_answer)")
    notes.append("prediction = argmax of the next-token log-probability over the option letters' tokens "
                 "(see letter_tokens); shots are dropped from the end while a prompt exceeds the context")
    return notes


def format_table(report):
    """A plain-text table of the report (subjects, categories, overall)."""
    lines = [f"{report['task']} ({report['split']}, {report['shots']}-shot)"]
    if "submission" in report:
        n = sum(len(v) for v in report["submission"].values())
        return "\n".join(lines + [f"labels hidden: {n} answers in {len(report['submission'])} subjects written "
                                  "in the leaderboard submission format"])
    width = max([len(n) for n in report["subjects"]] + [len(n) for n in report["categories"]] + [12])
    head = f"{'subject':<{width}}  {'acc':>6}  {'n':>6}  {'shots dropped':>13}"
    lines += [head, "-" * len(head)]
    for name, s in report["subjects"].items():
        acc = "-" if s["accuracy"] is None else f"{100 * s['accuracy']:.2f}"
        lines.append(f"{name:<{width}}  {acc:>6}  {s['total']:>6}  {s['shots_dropped']:>13}")
    if report["categories"]:
        lines += ["-" * len(head), f"{'category':<{width}}  {'avg':>6}  {'n':>6}  {'micro':>13}"]
        for name, c in report["categories"].items():
            lines.append(f"{name:<{width}}  {100 * c['average']:>6.2f}  {c['total']:>6}  {100 * c['micro']:>13.2f}")
    overall = report["overall"]
    if overall:
        lines += ["-" * len(head),
                  f"{'overall':<{width}}  {100 * overall['average']:>6.2f}  {overall['total']:>6}  "
                  f"{100 * overall['micro']:>13.2f}",
                  "(avg = mean of subject accuracies; micro = all questions pooled)"]
    return "\n".join(lines)
