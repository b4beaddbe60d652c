"""Turns a finetune checkpoint (any step) into a servable model directory.

    python example/export_model.py --checkpoint output/finetune_tiny/checkpoints/step_000050 \
        --config configs/finetune_tiny.yaml --output_path exported_model

The checkpoint's config.json and model.safetensors are checked by loading them into the model (names and
shapes), then written out by model_dir.write_servable_dir, exactly like the <output_dir>/model/ directory
finetune.py writes at the end (baichuan2.training.checkpoint.export_checkpoint). The tokenizer comes from
--tokenizer_dir, else the recipe's output.tokenizer_dir.
"""
import argparse
import os
import sys

from baichuan2.runtime import setup_logs

setup_logs()  # before mindformers loads: its log folder and INFO lines stay out of the cwd and the console
from baichuan2.training import DEFAULT_CONFIG, FinetuneError, load_recipe, resolve_config_path  # noqa: E402
from baichuan2.training.checkpoint import export_checkpoint  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_XXXXXX directory")
    p.add_argument("--output_path", required=True, help="new model directory to create")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe the run used (for output.tokenizer_dir)")
    p.add_argument("--tokenizer_dir", help="directory with tokenizer.model (overrides the recipe)")
    args = p.parse_args(argv)
    try:
        tokenizer_dir = args.tokenizer_dir or load_recipe(resolve_config_path(args.config))["output"]["tokenizer_dir"]
        out = export_checkpoint(os.path.abspath(args.checkpoint), os.path.abspath(args.output_path), tokenizer_dir)
    except FinetuneError as e:
        print(f"export_model.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"model directory written: {out}")


if __name__ == "__main__":
    main()
