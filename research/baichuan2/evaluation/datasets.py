"""Readers for the benchmark files as their authors distribute them (nothing is downloaded here).

Layouts (DATA_DIR is what the user passes as --data_dir):

    ceval    DATA_DIR/{dev,val,test}/<subject>_{dev,val,test}.csv   header: id,question,A,B,C,D,answer[,explanation]
                                                                    (test files have no usable answer)
    mmlu     DATA_DIR/{dev,val,test}/<subject>_{dev,val,test}.csv   no header: question,A,B,C,D,answer
    cmmlu    DATA_DIR/{dev,test}/<subject>.csv                      header: <unnamed index>,Question,A,B,C,D,Answer
    gaokao   DATA_DIR/[Objective_Questions/]*.json                  {"keywords", "example": [{"question" (options
                                                                    inline), "answer": ["A"], ...}]}
    agieval  DATA_DIR/*.jsonl                                       {"passage", "question", "options": ["(A)..."],
                                                                    "label": "A"}

Gaokao-Bench and AGIEval have no dev split: the first k items of each file are the k shots and are not scored.
Their multi-answer items (several letters) and cloze items (no options) are skipped: only single-choice questions
are scored; the report counts them per subject.
"""
import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field
from typing import List, Optional

from .categories import prompt_subject_name, subject_groups

TASKS = ("ceval", "mmlu", "cmmlu", "gaokao", "agieval")
LETTERS = "ABCDE"
DEFAULT_SPLIT = {"ceval": "val", "mmlu": "test", "cmmlu": "test", "gaokao": "test", "agieval": "test"}
_CJK = re.compile(r"[\u4e00-\u9fff]")
_OPTION_PREFIX = re.compile(r"^\s*\(?\s*([A-E])\s*\)?\s*[.．:：、]?\s*")


class DataLayoutError(ValueError):
    """The data directory or a file in it does not look like the benchmark's published layout."""


@dataclass
class Item:
    id: str
    question: str
    choices: List[str]          # option texts without their letters; empty when the question holds them inline
    answer: Optional[str]       # "A".."E"; None when labels are hidden (C-Eval test)
    passage: str = ""
    num_choices: int = 4


@dataclass
class Subject:
    task: str
    name: str                   # file-level subject id, e.g. "computer_network"
    prompt_name: str            # how the prompt header names it, e.g. "计算机网络"
    style: str                  # "zh" (答案：) or "en" (Answer:)
    items: List[Item]           # items to score
    shots: List[Item]           # k-shot pool, in order
    groups: List[str] = field(default_factory=list)
    source: str = ""            # file the scored items come from
    shots_from_items: bool = False  # shots are the first items of the same file (no dev split)
    skipped: int = 0            # multi-answer and cloze items left out


def _check_answer(letter, path, row_no, num_choices=4, allow_missing=False):
    letter = (letter or "").strip()
    if not letter and allow_missing:
        return None
    if letter not in LETTERS[:num_choices]:
        raise DataLayoutError(f"{path}: row {row_no}: answer {letter!r} is not one of "
                              f"{', '.join(LETTERS[:num_choices])}")
    return letter


def _read_csv_rows(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.reader(f))


def _read_header_csv(path, wanted, allow_missing_answer=False):
    """Rows of a CSV with a header; `wanted` = (id column or None, question, A, B, C, D, answer) names."""
    rows = _read_csv_rows(path)
    if not rows:
        raise DataLayoutError(f"{path}: empty file (expected a header {', '.join(c for c in wanted if c)})")
    header = [h.strip() for h in rows[0]]
    id_col, q_col, *option_cols, answer_col = wanted
    needed = [c for c in (id_col, q_col, *option_cols) if c]
    if not allow_missing_answer:
        needed.append(answer_col)
    missing = [c for c in needed if c not in header]
    if missing:
        raise DataLayoutError(f"{path}: missing column(s) {', '.join(missing)}; header is {header} "
                              f"(expected {', '.join(c for c in wanted if c)})")
    pos = {name: header.index(name) for name in header}
    items = []
    for row_no, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataLayoutError(f"{path}: row {row_no} has {len(row)} cells, the header has {len(header)}")
        cells = {name: row[i] for name, i in pos.items()}
        # CMMLU's first column has no name: it is the index
        item_id = cells[id_col] if id_col else (row[0] if header[0] == "" else str(row_no - 2))
        answer = _check_answer(cells.get(answer_col, ""), path, row_no, allow_missing=allow_missing_answer)
        items.append(Item(id=str(item_id).strip(), question=cells[q_col],
                          choices=[cells[c] for c in option_cols], answer=answer))
    return items


def _read_mmlu_csv(path):
    items = []
    for row_no, row in enumerate(_read_csv_rows(path), start=1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 6:
            raise DataLayoutError(f"{path}: row {row_no} has {len(row)} cells; MMLU files have no header and "
                                  "6 columns: question,A,B,C,D,answer")
        items.append(Item(id=str(row_no - 1), question=row[0], choices=row[1:5],
                          answer=_check_answer(row[5], path, row_no)))
    return items


# ------------------------------------------------------------------------------------------- CSV benchmarks
def _split_file(task, data_dir, split, subject):
    if task == "cmmlu":  # CMMLU names files <subject>.csv; accept <subject>_<split>.csv as well
        for name in (f"{subject}.csv", f"{subject}_{split}.csv"):
            if os.path.isfile(os.path.join(data_dir, split, name)):
                return os.path.join(data_dir, split, name)
        return os.path.join(data_dir, split, f"{subject}.csv")
    return os.path.join(data_dir, split, f"{subject}_{split}.csv")


def _subjects_in(task, data_dir, split):
    folder = os.path.join(data_dir, split)
    suffix = ".csv" if task == "cmmlu" else f"_{split}.csv"
    names = []
    for path in sorted(glob.glob(os.path.join(folder, "*.csv"))):
        base = os.path.basename(path)
        if task == "cmmlu" and base.endswith(f"_{split}.csv"):
            base = base[:-len(f"_{split}.csv")] + ".csv"
        if base.endswith(suffix):
            names.append(base[:-len(suffix)])
    return names


_CSV_LAYOUT = {
    "ceval": "DATA_DIR/{dev,val,test}/<subject>_<split>.csv with header id,question,A,B,C,D,answer",
    "mmlu": "DATA_DIR/{dev,val,test}/<subject>_<split>.csv without header: question,A,B,C,D,answer",
    "cmmlu": "DATA_DIR/{dev,test}/<subject>.csv with header ,Question,A,B,C,D,Answer",
}


def _read_split(task, path, split):
    if task == "ceval":
        return _read_header_csv(path, ("id", "question", "A", "B", "C", "D", "answer"),
                                allow_missing_answer=(split == "test"))
    if task == "mmlu":
        return _read_mmlu_csv(path)
    return _read_header_csv(path, (None, "Question", "A", "B", "C", "D", "Answer"))


def load_csv_task(task, data_dir, split, subjects=None, shots=5):
    splits = ("dev", "test") if task == "cmmlu" else ("dev", "val", "test")
    if split not in splits or split == "dev":
        raise DataLayoutError(f"{task}: split {split!r} cannot be evaluated; choose one of "
                              f"{', '.join(s for s in splits if s != 'dev')}")
    folder = os.path.join(data_dir, split)
    if not os.path.isdir(folder):
        raise DataLayoutError(f"{task}: no folder {folder!r}; expected the published layout "
                              f"{_CSV_LAYOUT[task]}")
    available = _subjects_in(task, data_dir, split)
    if not available:
        raise DataLayoutError(f"{task}: no subject files in {folder!r}; expected {_CSV_LAYOUT[task]}")
    chosen = list(subjects) if subjects else available
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise DataLayoutError(f"{task}: no file for subject(s) {', '.join(unknown)} in {folder!r} "
                              f"(found: {', '.join(available)})")
    out = []
    for name in chosen:
        path = _split_file(task, data_dir, split, name)
        items = _read_split(task, path, split)
        dev = []
        if shots > 0:
            dev_path = _split_file(task, data_dir, "dev", name)
            if not os.path.isfile(dev_path):
                raise DataLayoutError(f"{task}: {shots}-shot prompts need the dev file {dev_path!r} "
                                      f"({_CSV_LAYOUT[task]}); pass --shots 0 to run without it")
            dev = _read_split(task, dev_path, "dev")
        out.append(Subject(task=task, name=name, prompt_name=prompt_subject_name(task, name),
                           style="en" if task == "mmlu" else "zh", items=items, shots=dev[:shots],
                           groups=subject_groups(task, name), source=path))
    return out


# ------------------------------------------------------------------------------------------- JSON benchmarks
def _letters_of(answer):
    """["A"] / "A" -> "A"; ["A", "D"] / ["AD"] -> "AD" (multi-answer); anything else unchanged as text."""
    if isinstance(answer, list):
        answer = "".join(a.strip() if isinstance(a, str) else repr(a) for a in answer)
    return answer.strip() if isinstance(answer, str) else repr(answer)


def _is_multi(answer):
    letters = _letters_of(answer)
    return len(letters) > 1 and all(c in LETTERS for c in letters)


def _gaokao_items(path):
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataLayoutError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("example"), list):
        raise DataLayoutError(f"{path}: expected a Gaokao-Bench object {{\"keywords\": ..., \"example\": [...]}}")
    items, skipped = [], 0
    for i, ex in enumerate(data["example"]):
        for key in ("question", "answer"):
            if key not in ex:
                raise DataLayoutError(f"{path}: example {i} has no {key!r} field")
        if _is_multi(ex["answer"]):
            skipped += 1
            continue
        letter = _letters_of(ex["answer"])
        if letter not in LETTERS[:4] or not letter:
            raise DataLayoutError(f"{path}: example {i}: answer {ex['answer']!r} is not one of A, B, C, D")
        items.append(Item(id=str(ex.get("index", i)), question=ex["question"].strip(), choices=[], answer=letter))
    return items, skipped


def _agieval_items(path):
    items, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataLayoutError(f"{path}: line {line_no} is not valid JSON ({e})") from e
            if "question" not in ex:
                raise DataLayoutError(f"{path}: line {line_no} has no 'question' field (expected passage, "
                                      "question, options, label)")
            if not ex.get("options"):  # cloze questions (gaokao-mathcloze, math): not multiple choice
                skipped += 1
                continue
            if "label" not in ex:
                raise DataLayoutError(f"{path}: line {line_no} has options but no 'label' field")
            if _is_multi(ex["label"]):
                skipped += 1
                continue
            options = [_OPTION_PREFIX.sub("", o, count=1).strip() for o in ex["options"]]
            n = len(options)
            if n > len(LETTERS):
                raise DataLayoutError(f"{path}: line {line_no} has {n} options (at most {len(LETTERS)} supported)")
            letter = _letters_of(ex["label"])
            if letter not in LETTERS[:n] or not letter:
                raise DataLayoutError(f"{path}: line {line_no}: label {ex['label']!r} is not one of "
                                      f"{', '.join(LETTERS[:n])}")
            items.append(Item(id=str(line_no - 1), question=ex["question"].strip(), choices=options, answer=letter,
                              passage=(ex.get("passage") or "").strip(), num_choices=n))
    return items, skipped


def load_json_task(task, data_dir, subjects=None, shots=5):
    if task == "gaokao":
        folder = os.path.join(data_dir, "Objective_Questions")
        folder = folder if os.path.isdir(folder) else data_dir
        pattern, layout = "*.json", "Gaokao-Bench DATA_DIR/[Objective_Questions/]<name>.json"
    else:
        folder, pattern, layout = data_dir, "*.jsonl", "AGIEval DATA_DIR/<name>.jsonl"
    if not os.path.isdir(folder):
        raise DataLayoutError(f"{task}: no folder {folder!r}; expected {layout}")
    files = {os.path.splitext(os.path.basename(p))[0]: p for p in sorted(glob.glob(os.path.join(folder, pattern)))}
    if not files:
        raise DataLayoutError(f"{task}: no {pattern} files in {folder!r}; expected {layout}")
    chosen = list(subjects) if subjects else list(files)
    unknown = [s for s in chosen if s not in files]
    if unknown:
        raise DataLayoutError(f"{task}: no file for subject(s) {', '.join(unknown)} in {folder!r} "
                              f"(found: {', '.join(files)})")
    out = []
    for name in chosen:
        items, skipped = (_gaokao_items if task == "gaokao" else _agieval_items)(files[name])
        text = " ".join(it.passage + it.question for it in items[:20])
        style = "zh" if task == "gaokao" or _CJK.search(text) else "en"
        out.append(Subject(task=task, name=name, prompt_name=prompt_subject_name(task, name), style=style,
                           items=items[shots:], shots=items[:shots], groups=subject_groups(task, name),
                           source=files[name], shots_from_items=True, skipped=skipped))
    return out


def load_task(task, data_dir, split=None, subjects=None, shots=5):
    """The subjects of a benchmark, each with the items to score and its k-shot examples."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    if not os.path.isdir(data_dir):
        raise DataLayoutError(f"{task}: data directory {data_dir!r} does not exist (the benchmark is not "
                              "downloaded by this tool; unpack the published files there)")
    if task in ("gaokao", "agieval"):
        return load_json_task(task, data_dir, subjects, shots)
    return load_csv_task(task, data_dir, split or DEFAULT_SPLIT[task], subjects, shots)
