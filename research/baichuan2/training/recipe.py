"""The finetune recipe: a yaml file merged over DEFAULTS, then command-line overrides. Unknown keys are errors."""
import inspect
import os

import yaml

from .parallel import PARALLEL_DEFAULTS, RECOMPUTE_DEFAULTS

# Paths written in a recipe are relative to the repository root (research/baichuan2/training/ -> three levels up).
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_CONFIG = os.path.join(REPO, "configs", "finetune_tiny.yaml")

# Every key a recipe may hold, with its default. An unknown key is an error (a typo must not be silently ignored).
DEFAULTS = {
    "model": {"preset": "tiny", "overrides": {}, "load_checkpoint": None},
    "data": {"train_dataset": None, "seq_length": 128, "shuffle": True},
    "train": {"seed": 1234, "epochs": 1, "max_steps": None, "batch_size": 2, "grad_accum_steps": 1, "lr": 1e-3,
              "min_lr": 0.0, "warmup_ratio": 0.0, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
              "grad_clip": 1.0, "loss_scale": None,
              # AdamW state for float16/bfloat16 parameters: float32 moments (and a float32 master copy of the
              # weights with master_weights) through training/optim.py; float32 parameters use nn.AdamWeightDecay.
              "moment_dtype": "float32", "master_weights": True},
    # training/parallel.py: MindFormers' field names. data_parallel null = the devices left over by
    # model_parallel x pipeline_stage (plain data parallelism over every msrun worker by default).
    "parallel": dict(PARALLEL_DEFAULTS, data_parallel=None),
    "recompute": dict(RECOMPUTE_DEFAULTS),
    # rank 0 = full finetuning. targets: W_pack (= q/k/v) or any of q_proj k_proj v_proj o_proj gate/up/down_proj.
    "lora": {"rank": 0, "alpha": 16, "dropout": 0.0, "targets": ["W_pack"]},
    "output": {"output_dir": "output/finetune", "save_steps": 100, "keep_checkpoints": 3, "log_steps": 1,
               "tokenizer_dir": "dataset"},
}
_PATH_KEYS = (("model", "load_checkpoint"), ("data", "train_dataset"), ("output", "output_dir"),
              ("output", "tokenizer_dir"))


class FinetuneError(Exception):
    """A problem with the user's input: reported as one clear message, exit status 2."""


def resolve_config_path(path):
    """The recipe path as given, else relative to the repository root (e.g. configs/... given from inside example/)."""
    if not os.path.isfile(path) and os.path.isfile(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    return os.path.abspath(path)


def load_recipe(path):
    """The yaml recipe merged over DEFAULTS; unknown sections or keys raise FinetuneError naming them."""
    if not os.path.isfile(path):
        raise FinetuneError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        user = yaml.safe_load(f) or {}
    recipe = {section: dict(values) for section, values in DEFAULTS.items()}
    for section, values in user.items():
        if section not in DEFAULTS:
            raise FinetuneError(f"{path}: unknown section {section!r}; valid sections: {sorted(DEFAULTS)}")
        for key, value in (values or {}).items():
            if key not in DEFAULTS[section]:
                raise FinetuneError(f"{path}: unknown key {section}.{key}; valid keys in {section}: "
                                    f"{sorted(DEFAULTS[section])}")
            recipe[section][key] = value
    # BaichuanConfig swallows unknown kwargs, so model overrides are checked against its signature here.
    from baichuan2.configuration_baichuan import BaichuanConfig  # pylint: disable=import-outside-toplevel
    fields = set(inspect.signature(BaichuanConfig.__init__).parameters) - {"self", "kwargs"}
    for key in recipe["model"]["overrides"] or {}:
        if key not in fields:
            raise FinetuneError(f"{path}: unknown key model.overrides.{key}; it must be a BaichuanConfig field "
                                f"({', '.join(sorted(fields))})")
    for section, key in _PATH_KEYS:
        value = recipe[section][key]
        if value and not os.path.isabs(value):
            recipe[section][key] = os.path.join(REPO, value)
    return recipe


def apply_overrides(recipe, args):
    """Command-line flags (an argparse namespace of example/finetune.py) over the recipe; returns the recipe."""
    for section, key in (("data", "train_dataset"), ("model", "load_checkpoint"), ("output", "output_dir"),
                         ("train", "max_steps"), ("train", "epochs"), ("train", "lr"), ("train", "batch_size"),
                         ("train", "seed"), ("output", "save_steps")):
        value = getattr(args, key)
        if value is not None:
            if key in ("train_dataset", "load_checkpoint", "output_dir"):
                value = os.path.abspath(value)  # command-line paths are relative to the current directory
            recipe[section][key] = value
    for key in ("rank", "alpha", "dropout", "targets"):
        value = getattr(args, f"lora_{key}")
        if value is not None:
            recipe["lora"][key] = value.split(",") if key == "targets" else value
    if args.epochs is not None and args.max_steps is None:
        recipe["train"]["max_steps"] = None  # --epochs on the command line beats a max_steps in the yaml
    return recipe
