"""k-shot prompt text, as the reference evaluation scripts write it.

Chinese style (C-Eval, CMMLU, Gaokao-Bench, Chinese AGIEval files):

    以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n
    {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：{answer}\n\n      (one block per shot)
    {question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案：                   (the item; the model continues)

English style (MMLU, English AGIEval files): header "The following are multiple choice questions (with answers)
about {subject}.\n\n", answer line "Answer: {answer}" and the item ending in "Answer:".

The scored continuation is therefore "A" after "答案：" and " A" after "Answer:" (see scoring.letter_token_ids).
"""
from .datasets import LETTERS

HEADERS = {
    "zh": "以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n",
    "en": "The following are multiple choice questions (with answers) about {subject}.\n\n",
}
ANSWER_PREFIX = {"zh": "答案：", "en": "Answer:"}
ANSWER_SEPARATOR = {"zh": "", "en": " "}  # between the answer prefix and the letter


def format_example(item, style, with_answer):
    text = item.passage + "\n" if item.passage else ""
    text += item.question
    for letter, choice in zip(LETTERS, item.choices):
        text += f"\n{letter}. {choice}"
    text += "\n" + ANSWER_PREFIX[style]
    if with_answer:
        text += f"{ANSWER_SEPARATOR[style]}{item.answer}\n\n"
    return text


def build_prompt(subject, item, num_shots):
    """Header + the first `num_shots` shots of the subject + the item without its answer."""
    text = HEADERS[subject.style].format(subject=subject.prompt_name)
    for shot in subject.shots[:num_shots]:
        text += format_example(shot, subject.style, with_answer=True)
    return text + format_example(item, subject.style, with_answer=False)


def fit_prompt(subject, item, fits):
    """The prompt with as many shots as fit: shots are dropped one by one from the end while `fits(text)` is false.

    Returns (text, shots_used, fits_at_all); when even the 0-shot prompt does not fit the scorer keeps its end.
    """
    num_shots = len(subject.shots)
    text = build_prompt(subject, item, num_shots)
    ok = fits(text)
    while num_shots > 0 and not ok:
        num_shots -= 1
        text = build_prompt(subject, item, num_shots)
        ok = fits(text)
    return text, num_shots, ok
