"""Few-shot evaluation (research/baichuan2/evaluation, example/evaluate.py) on the fixture files in
tests/fixtures/eval/, written for this project in each benchmark's published layout."""
import json
import os
import shutil
import subprocess

import pytest

from baichuan2.evaluation import DataLayoutError, evaluate, fit_prompt, format_table, load_task, model_fingerprint
from baichuan2.evaluation.prompts import build_prompt

from helpers import FIXTURES, REPO, run_module

EVAL = os.path.join(FIXTURES, "eval")


def data(task):
    return os.path.join(EVAL, task)


def last_question(prompt):
    """The question of the scored item: the first line of the prompt's last block."""
    return prompt.split("\n\n")[-1].split("\n")[0]


class FakeScorer:
    """Letter log-probabilities looked up by question text; counts calls and can fail on a chosen subject."""

    def __init__(self, table, fail_on=None, max_chars=None):
        self.table, self.fail_on, self.max_chars = table, fail_on, max_chars
        self.calls, self.seen = 0, []

    def fits(self, prompt):
        return self.max_chars is None or len(prompt) <= self.max_chars

    def score(self, prompts, letters, style):
        self.calls += 1
        rows = []
        for p in prompts:
            q = last_question(p)
            if self.fail_on and self.fail_on in q:
                raise KeyboardInterrupt("simulated interruption")
            self.seen.append(q)
            row = list(self.table.get(q, [0.0] * len(letters)))[:len(letters)]
            rows.append(row + [-99.0] * (len(letters) - len(row)))  # letters the table leaves out: unlikely
        return rows


# hand-made log-probabilities for the C-Eval val fixtures (A, B, C, D); answers in the comments
CEVAL_TABLE = {
    "IP地址192.168.1.1属于____类地址。": [-2.0, -1.5, -0.3, -3.0],        # C, predicted C: right
    "TCP协议工作在____。": [-0.5, -1.0, -2.0, -0.9],                        # D, predicted A: wrong
    "DNS的主要作用是____。": [-0.1, -2.0, -2.0, -2.0],                      # A, predicted A: right
    "“有的学生是党员”与“所有学生都不是党员”的关系是____。": [-1.2, -0.2, -3.0, -3.0],  # A, predicted B: wrong
    "概念“书”和“教科书”的关系是____。": [-2.0, -0.7, -1.0, -4.0],           # B, predicted B: right
    "光在真空中的传播速度约为____。": [-0.01, -5.0, -6.0, -7.0],             # A, predicted A: right
}


def test_two_shot_prompt_text_ceval():
    subject = load_task("ceval", data("ceval"), "val", ["computer_network"], shots=2)[0]
    assert build_prompt(subject, subject.items[1], 2) == (
        "以下是中国关于计算机网络考试的单项选择题，请选出其中的正确答案。\n\n"
        "以太网使用的介质访问控制方法是____。\nA. CSMA/CD\nB. 令牌环\nC. 令牌总线\nD. FDDI\n答案：A\n\n"
        "HTTP默认使用的端口号是____。\nA. 21\nB. 25\nC. 80\nD. 110\n答案：C\n\n"
        "TCP协议工作在____。\nA. 物理层\nB. 数据链路层\nC. 网络层\nD. 传输层\n答案：")


def test_two_shot_prompt_text_mmlu():
    subject = load_task("mmlu", data("mmlu"), "test", ["philosophy"], shots=2)[0]
    assert build_prompt(subject, subject.items[0], 2) == (
        "The following are multiple choice questions (with answers) about philosophy.\n\n"
        "Who wrote the Republic?\nA. Aristotle\nB. Plato\nC. Kant\nD. Hume\nAnswer: B\n\n"
        "Cogito, ergo sum is attributed to\nA. Descartes\nB. Locke\nC. Spinoza\nD. Mill\nAnswer: A\n\n"
        "Utilitarianism judges actions by their\nA. motives\nB. consequences\nC. duties\nD. virtues\nAnswer:")


def test_known_log_probs_give_hand_computed_accuracy(tmp_path):
    report = evaluate("ceval", data("ceval"), FakeScorer(CEVAL_TABLE), split="val", shots=2, progress=False,
                      output=str(tmp_path / "r.json"))
    subj = report["subjects"]
    assert (subj["computer_network"]["correct"], subj["computer_network"]["total"]) == (2, 3)
    assert subj["logic"]["accuracy"] == 0.5 and subj["high_school_physics"]["accuracy"] == 1.0
    cats = report["categories"]
    assert cats["STEM"]["average"] == pytest.approx((2 / 3 + 1) / 2) and cats["STEM"]["micro"] == 0.75
    assert cats["Humanities"]["average"] == 0.5 and cats["Hard"]["average"] == 1.0
    assert "Social Science" not in cats  # no subject of it in the fixtures
    assert report["overall"]["average"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert report["overall"]["micro"] == pytest.approx(4 / 6)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["overall"] == report["overall"]
    table = format_table(report)
    assert "computer_network" in table and "66.67" in table and "Hard" in table


def test_argmax_only_over_the_items_options():
    # sat-math's last item has five options (E); the others four: a high E score must not win there
    table = {"Which number is negative?": [-1.0, -2.0, -3.0, -4.0, 0.0],  # A among A-D (E ignored: 4 options)
             "What is 7 - 2?": [-3.0, -3.0, -0.5, -3.0, -1.0]}            # C
    report = evaluate("agieval", data("agieval"), FakeScorer(table), subjects=["sat-math"], shots=2, progress=False)
    assert report["subjects"]["sat-math"]["correct"] == 2


def test_shots_dropped_one_by_one_when_prompt_too_long():
    subject = load_task("mmlu", data("mmlu"), "test", ["philosophy"], shots=2)[0]
    item = subject.items[0]
    limit = len(build_prompt(subject, item, 1))
    text, used, ok = fit_prompt(subject, item, lambda t: len(t) <= limit)
    assert (used, ok) == (1, True) and text == build_prompt(subject, item, 1)
    _, used, ok = fit_prompt(subject, item, lambda t: False)
    assert (used, ok) == (0, False)
    report = evaluate("mmlu", data("mmlu"), FakeScorer({}, max_chars=limit), subjects=["philosophy"], shots=2,
                      progress=False)
    s = report["subjects"]["philosophy"]
    assert s["shots_dropped"] >= 1 and s["items_with_shots_dropped"] >= 1


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    out = str(tmp_path / "res.json")
    # logic (the last subject in file order) is interrupted
    with pytest.raises(KeyboardInterrupt):
        evaluate("ceval", data("ceval"), FakeScorer(CEVAL_TABLE, fail_on="党员"), split="val", shots=2,
                 output=out, batch_size=16, progress=False)
    cache = tmp_path / "res.json.cache"
    assert sorted(os.listdir(cache)) == ["ceval_computer_network.json", "ceval_high_school_physics.json"]
    scorer = FakeScorer(CEVAL_TABLE)
    report = evaluate("ceval", data("ceval"), scorer, split="val", shots=2, output=out, batch_size=16,
                      progress=False)
    logic_questions = [q for q in CEVAL_TABLE if "党员" in q or "教科书" in q]
    assert scorer.calls == 1 and sorted(scorer.seen) == sorted(logic_questions)
    assert report["resumed_subjects"] == ["computer_network", "high_school_physics"]
    assert report["overall"]["micro"] == pytest.approx(4 / 6)
    # other settings: the cache is not reused
    scorer = FakeScorer(CEVAL_TABLE)
    evaluate("ceval", data("ceval"), scorer, split="val", shots=1, output=out, batch_size=16, progress=False)
    assert scorer.calls == 3


def test_ceval_test_split_writes_submission(tmp_path):
    out = tmp_path / "submit.json"
    evaluate("ceval", data("ceval"), FakeScorer({"UDP是____的协议。": [-3, -0.1, -3, -3]}), split="test", shots=2,
             output=str(out), progress=False)
    sub = json.loads(out.read_text(encoding="utf-8"))
    assert set(sub) == {"computer_network", "high_school_physics", "logic"}
    assert sub["computer_network"]["0"] == "B" and set(sub["computer_network"]) == {"0", "1"}


@pytest.mark.parametrize("task", ["gaokao", "agieval"])
def test_no_dev_split_uses_first_items_as_shots(task):
    report = evaluate(task, data(task), FakeScorer({}), shots=2, progress=False)
    subjects = load_task(task, data(task), shots=2)
    for s in subjects:
        assert s.shots_from_items and len(s.shots) == 2
        assert report["subjects"][s.name]["total"] == len(s.items)
    assert sum(s.skipped for s in subjects) == 1  # the one multi-answer item of the fixture
    assert any("first 2 items" in n for n in report["notes"])
    assert any("multi-answer" in n for n in report["notes"])


def test_cmmlu_groups_and_layout():
    report = evaluate("cmmlu", data("cmmlu"), FakeScorer({}), shots=2, progress=False)
    assert set(report["categories"]) == {"Other", "Humanities", "China specific"}
    assert report["subjects"]["chinese_history"]["groups"] == ["Humanities", "China specific"]


def _copy(task, tmp_path):
    dst = tmp_path / task
    shutil.copytree(data(task), dst)
    return dst


def test_malformed_files_are_named(tmp_path):
    root = _copy("ceval", tmp_path)
    bad = root / "val" / "logic_val.csv"
    bad.write_text("id,question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")  # no answer column
    with pytest.raises(DataLayoutError, match=r"logic_val\.csv.*missing column\(s\) answer"):
        load_task("ceval", str(root), "val", shots=2)

    root = _copy("mmlu", tmp_path)
    (root / "test" / "philosophy_test.csv").write_text("q,a,b,c,d,A\nq2,a,b,c,d,E\n", encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"philosophy_test\.csv: row 2: answer 'E' is not one of A, B, C, D"):
        load_task("mmlu", str(root), "test", shots=2)

    root = _copy("cmmlu", tmp_path)
    (root / "dev" / "agronomy.csv").write_text(",Question,A,B,C,D\n0,q,a,b,c,d\n", encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"agronomy\.csv: missing column\(s\) Answer"):
        load_task("cmmlu", str(root), shots=2)

    root = _copy("agieval", tmp_path)
    (root / "cloze.jsonl").write_text('{"passage": null, "question": "1+1=?", "options": null, "answer": "2"}\n',
                                      encoding="utf-8")  # cloze items are skipped, not errors
    assert load_task("agieval", str(root), subjects=["cloze"], shots=0)[0].skipped == 1
    (root / "sat-math.jsonl").write_text('{"passage": null, "question": "q", "options": ["(A)1", "(B)2"], '
                                         '"label": "C"}\n', encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"sat-math\.jsonl: line 1: label 'C' is not one of A, B"):
        load_task("agieval", str(root), shots=0)


def test_gaokao_answers(tmp_path):
    root = tmp_path / "gaokao" / "Objective_Questions"
    root.mkdir(parents=True)
    examples = [{"question": "q1\nA．1\nB．2\nC．3\nD．4", "answer": ["B"]},
                {"question": "q2", "answer": ["BD"]},      # several correct options: skipped
                {"question": "q3", "answer": ["F"]}]
    (root / "2010-2022_Physics_MCQs.json").write_text(json.dumps({"keywords": "x", "example": examples}),
                                                      encoding="utf-8")
    with pytest.raises(DataLayoutError, match=r"2010-2022_Physics_MCQs\.json: example 2: answer \['F'\]"):
        load_task("gaokao", str(tmp_path / "gaokao"), shots=0)
    examples.pop()
    (root / "2010-2022_Physics_MCQs.json").write_text(json.dumps({"keywords": "x", "example": examples}),
                                                      encoding="utf-8")
    subject = load_task("gaokao", str(tmp_path / "gaokao"), shots=0)[0]
    assert (len(subject.items), subject.skipped, subject.prompt_name) == (1, 1, "高考物理")


@pytest.mark.slow
def test_cli_reports_layout_error(tmp_path):
    done = subprocess.run(run_module("example/evaluate.py", "--model_dir", tmp_path, "--task", "mmlu",
                                     "--data_dir", tmp_path), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "error: mmlu: no folder" in done.stderr and "without header" in done.stderr


def test_wrong_layout_says_what_was_expected(tmp_path):
    with pytest.raises(DataLayoutError, match=r"does not exist.*not downloaded"):
        load_task("ceval", str(tmp_path / "nowhere"))
    with pytest.raises(DataLayoutError, match=r"no folder .*val.*<subject>_<split>\.csv"):
        load_task("ceval", str(tmp_path))
    with pytest.raises(DataLayoutError, match=r"no file for subject\(s\) nosuch"):
        load_task("mmlu", data("mmlu"), subjects=["nosuch"])
    with pytest.raises(DataLayoutError, match=r"split 'val' cannot be evaluated"):
        load_task("cmmlu", data("cmmlu"), "val")


# ------------------------------------------------------------------------------------------- tiny model
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from baichuan2 import BaichuanConfig, BaichuanForCausalLM
    from baichuan2.model_dir import write_servable_dir
    config = BaichuanConfig.from_preset("tiny", max_position_embeddings=256, model_max_length=256)
    return write_servable_dir(str(tmp_path_factory.mktemp("tiny_eval") / "model"), config,
                              model=BaichuanForCausalLM(config), tokenizer_dir=os.path.join(REPO, "dataset"))


def test_model_scorer_left_padding_and_letter_tokens(tiny_model_dir):
    from baichuan2.evaluation import ModelScorer
    scorer = ModelScorer.from_model_dir(tiny_model_dir)
    prompts = ["以下是题目。\n答案：", "x\n答案："]
    together = scorer.score(prompts, "ABCD", "zh")
    alone = [scorer.score([p], "ABCD", "zh")[0] for p in prompts]
    assert together.shape == (2, 4)
    for a, b in zip(together, alone):  # left padding does not change a prompt's scores
        assert a == pytest.approx(b, abs=1e-4)
    assert [p for p, _ in scorer.letter_tokens["zh"].values()] == ["A", "B", "C", "D"]
    scorer.letter_ids("ABCD", "en")  # "Answer: D" splits as "▁", "D" in the tiny vocab: bare letters for all
    assert [p for p, _ in scorer.letter_tokens["en"].values()] == ["A", "B", "C", "D"]


@pytest.mark.slow
def test_cli_end_to_end_and_resume(tiny_model_dir, tmp_path):
    out = tmp_path / "ceval.json"
    cmd = run_module("example/evaluate.py", "--model_dir", tiny_model_dir, "--task", "ceval",
                     "--data_dir", data("ceval"), "--shots", "2", "--output", out, "--batch_size", "4")
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert set(report["subjects"]) == {"computer_network", "high_school_physics", "logic"}
    assert report["overall"]["total"] == 6 and 0 <= report["overall"]["average"] <= 1
    assert set(report["categories"]) == {"STEM", "Humanities", "Hard"}
    assert "overall" in done.stdout and "computer_network" in done.stdout
    assert len(os.listdir(str(out) + ".cache")) == 3
    # the same command again: everything comes from the cache (in process, counting model calls)
    from baichuan2.evaluation import ModelScorer
    scorer = ModelScorer.from_model_dir(tiny_model_dir)
    again = evaluate("ceval", data("ceval"), scorer, shots=2, output=str(out), progress=False,
                     model_id=model_fingerprint(tiny_model_dir))
    assert scorer.calls == 0 and again["overall"] == report["overall"]
