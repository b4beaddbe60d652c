"""Finetuning a Baichuan-family model with MindSpore: the logic behind example/finetune.py and export_model.py.

    recipe.py      the yaml recipe schema (DEFAULTS), loading, command-line overrides, FinetuneError
    plan.py        the MindRecord check, the per-rank sample plan (resumable), the MindDataset reading it
    schedule.py    the learning-rate table (warmup + cosine)
    step.py        TrainStep: one optimizer step with accumulation, loss scale, clipping, grad norm
    checkpoint.py  checkpoints/step_XXXXXX save and restore, the final model/ and adapter/ directories, export
    monitor.py     the per-step callback (log, TensorBoard, NaN stop, periodic checkpoints), the loss curve
    parallel.py    the parallel: and recompute: recipe sections, their checks, recompute, the Ascend-only layout
    optim.py       FP32StateAdamW: AdamW with float32 moments (and master weights) for float16/bfloat16 parameters
    run.py         run(recipe, resume): the whole training run, step by step
"""
from .recipe import DEFAULT_CONFIG, DEFAULTS, REPO, FinetuneError, apply_overrides, load_recipe, resolve_config_path

__all__ = ["DEFAULT_CONFIG", "DEFAULTS", "REPO", "FinetuneError", "apply_overrides", "load_recipe",
           "resolve_config_path"]
