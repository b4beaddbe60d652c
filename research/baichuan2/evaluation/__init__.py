"""Few-shot multiple-choice evaluation (C-Eval, MMLU, CMMLU, Gaokao-Bench, AGIEval) of Baichuan-family models.

    from baichuan2.evaluation import ModelScorer, evaluate
    report = evaluate("ceval", "data/ceval", ModelScorer.from_model_dir("my_model"), shots=5, output="r.json")
"""
from .datasets import TASKS, DataLayoutError, load_task
from .prompts import build_prompt, fit_prompt
from .runner import evaluate, format_table, model_fingerprint
from .scoring import ModelScorer

__all__ = ["TASKS", "DataLayoutError", "ModelScorer", "build_prompt", "evaluate", "fit_prompt", "format_table",
           "load_task", "model_fingerprint"]
