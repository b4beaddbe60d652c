"""Training memory per device for a full finetune, and whether it fits the device (assumptions:
research/baichuan2/memory_budget.py's docstring).

    python example/memory_budget.py                          # the shipped 7B/13B recipes, one and two nodes
    python example/memory_budget.py --published              # MindFormers' published settings, for comparison
    python example/memory_budget.py --recipe configs/finetune_baichuan2_13b.yaml
    python example/memory_budget.py --preset baichuan2_13b --data_parallel 8 --parallel_optimizer level1 \\
        --recompute select --param_dtype float16 --compute_dtype float16

A recipe supplies model.preset, model.overrides.param_dtype/compute_dtype, data.seq_length, train.batch_size,
train.grad_accum_steps, train.moment_dtype and its parallel:/recompute: sections; the options override them.
"""
import argparse
import os
import sys

import yaml

from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.memory_budget import SETTINGS, describe
from baichuan2.training.parallel import ParallelRecipeError

RECOMPUTE = {"none": {}, "full": {"recompute": True}, "select": {"select_recompute": True}}
RECIPES = ("finetune_baichuan2_7b.yaml", "finetune_baichuan2_7b_2nodes.yaml", "finetune_baichuan2_13b.yaml",
           "finetune_baichuan2_13b_2nodes.yaml")
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def from_recipe(path):
    """The budget settings a finetune recipe yaml asks for."""
    try:
        with open(path, encoding="utf-8") as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"cannot read recipe {path}: {e.strerror}") from e
    model, data, train = recipe.get("model") or {}, recipe.get("data") or {}, recipe.get("train") or {}
    overrides = model.get("overrides") or {}
    return dict(preset=model.get("preset", "tiny"), parallel=recipe.get("parallel") or {},
                recompute=recipe.get("recompute") or {}, param_dtype=overrides.get("param_dtype", "float32"),
                compute_dtype=overrides.get("compute_dtype", "float32"),
                moment_dtype=train.get("moment_dtype", "float32"), seq_length=data.get("seq_length", 4096),
                batch_size=train.get("batch_size", 1), grad_accum_steps=train.get("grad_accum_steps", 1),
                master_weights=train.get("master_weights", True))  # the finetune recipe's default


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", help="finetune recipe yaml")
    p.add_argument("--preset", help="BaichuanConfig preset (without --recipe: plain data parallelism on 1 device)")
    p.add_argument("--published", action="store_true",
                   help="MindFormers' published settings (and our old float32 one) instead of the shipped recipes")
    for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
        p.add_argument(f"--{name}", type=int)
    p.add_argument("--parallel_optimizer", choices=["off", "level1", "level2", "level3"])
    p.add_argument("--recompute", choices=sorted(RECOMPUTE))
    for name in ("param_dtype", "compute_dtype", "moment_dtype"):
        p.add_argument(f"--{name}", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--seq_length", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--grad_accum_steps", type=int)
    p.add_argument("--device_gb", type=float, default=59.0,
                   help="device memory limit in GiB (MindFormers' max_device_memory on a 64 GB device: 59)")
    p.add_argument("--headroom", type=float, default=0.10, help="share of the limit left for workspace")
    args = p.parse_args(argv)

    try:
        if args.recipe or args.preset:
            settings = from_recipe(args.recipe) if args.recipe else dict(
                preset=args.preset, parallel={}, recompute={}, param_dtype="float32", compute_dtype="float32",
                moment_dtype="float32", seq_length=4096, batch_size=1, grad_accum_steps=1, master_weights=False)
            if args.preset:
                settings["preset"] = args.preset
            parallel = dict(settings["parallel"])
            for name in ("data_parallel", "model_parallel", "pipeline_stage", "micro_batch_num"):
                if getattr(args, name) is not None:
                    parallel[name] = getattr(args, name)
            if args.parallel_optimizer:
                parallel["enable_parallel_optimizer"] = args.parallel_optimizer != "off"
                if args.parallel_optimizer != "off":
                    parallel["optimizer_level"] = args.parallel_optimizer
            settings["parallel"] = parallel
            if args.recompute:
                settings["recompute"] = RECOMPUTE[args.recompute]
            for name in ("param_dtype", "compute_dtype", "moment_dtype", "seq_length", "batch_size",
                         "grad_accum_steps"):
                if getattr(args, name) is not None:
                    settings[name] = getattr(args, name)
            named = {args.recipe or args.preset: settings}
        elif args.published:
            named = SETTINGS
        else:
            named = {f"configs/{name}": from_recipe(os.path.join(CONFIGS, name)) for name in RECIPES}
        blocks = []
        for name, s in named.items():
            s = dict(dict(seq_length=4096, batch_size=1), **s)
            config = BaichuanConfig.from_preset(s.pop("preset"))
            blocks.append("\n".join(describe(name, config, limit_gib=args.device_gb, headroom=args.headroom, **s)))
    except (ValueError, ParallelRecipeError) as e:
        p.error(str(e))
    print("\n\n".join(blocks))


if __name__ == "__main__":
    sys.exit(main())
