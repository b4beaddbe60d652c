"""Turns a finetune checkpoint (any step) into a servable model directory.

    python example/export_model.py --checkpoint output/finetune_tiny/checkpoints/step_000050 \
        --config configs/finetune_tiny.yaml --output_path exported_model

The checkpoint's config.json and model.safetensors are checked by loading them into the model (names and
shapes), then written out with save_pretrained + finish_model_dir, exactly like the <output_dir>/model/ directory
finetune.py writes at the end. The tokenizer comes from --tokenizer_dir, else the recipe's output.tokenizer_dir.
"""
import argparse
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune import DEFAULT_CONFIG, REPO, WEIGHTS_FILE, FinetuneError, load_recipe, write_model_dir  # noqa: E402


def export(checkpoint, output_path, tokenizer_dir):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.modeling_baichuan import BaichuanForCausalLM, load_safetensors_into
    for name in ("config.json", WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(checkpoint, name)):
            raise FinetuneError(f"{checkpoint} is not a finetune checkpoint: {name} is missing (expected a "
                                "<output_dir>/checkpoints/step_XXXXXX directory)")
    if os.path.exists(output_path):
        raise FinetuneError(f"--output_path {output_path} already exists; choose a new directory")
    config = BaichuanConfig.from_hf_config(checkpoint)
    model = BaichuanForCausalLM(config)
    try:
        load_safetensors_into(model, os.path.join(checkpoint, WEIGHTS_FILE))
    except ValueError as e:
        raise FinetuneError(str(e)) from e
    # write_model_dir builds <dir>/model atomically; build beside the target, then move it into place.
    staging = output_path + ".export_tmp"
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    built = write_model_dir(staging, model, config, tokenizer_dir)
    os.rename(built, output_path)
    shutil.rmtree(staging, ignore_errors=True)
    return output_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_XXXXXX directory")
    p.add_argument("--output_path", required=True, help="new model directory to create")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="recipe the run used (for output.tokenizer_dir)")
    p.add_argument("--tokenizer_dir", help="directory with tokenizer.model (overrides the recipe)")
    args = p.parse_args(argv)
    try:
        config_path = args.config
        if not os.path.isfile(config_path) and os.path.isfile(os.path.join(REPO, config_path)):
            config_path = os.path.join(REPO, config_path)
        tokenizer_dir = args.tokenizer_dir or load_recipe(config_path)["output"]["tokenizer_dir"]
        out = export(os.path.abspath(args.checkpoint), os.path.abspath(args.output_path), tokenizer_dir)
    except FinetuneError as e:
        print(f"export_model.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"model directory written: {out}")


if __name__ == "__main__":
    main()
