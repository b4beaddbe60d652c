"""Merges a LoRA adapter into its base weights and writes a servable model directory.

    python research/baichuan2/merge_lora.py --base BASE_DIR --adapter output/lora/adapter --output_path MERGED_DIR

--base: the model directory the adapter was trained on (config.json + model.safetensors, e.g. convert_weight.py
output). --adapter: a LoRA checkpoint directory of finetune.py (checkpoints/step_XXXXXX or <output_dir>/adapter), its
adapter_model.safetensors, or a PEFT LoRA directory trained elsewhere (PEFT, LLaMA-Factory) on the same base. Every
adapted projection becomes W + B A * alpha/r (q/k/v are separate projections in our model, so a W_pack adapter lands
in each of them: its B split into three row blocks). The result is written by model_dir.write_servable_dir (the
writer of every model directory), with the tokenizer copied from the base directory, so openmind / mindformers
pipelines can serve it.

The merged directory keeps the base's weight format: a float32 base gives float32, a bfloat16 base (convert_weight.py
--dtype bfloat16) gives bfloat16 (the sum is computed in float32, then rounded to bfloat16 once). A quantised base
(int8 / int4) is refused: its original weights are gone; merge onto the bfloat16 directory, then quantise.
"""
import argparse
import os
import sys


def adapter_file(path):
    from baichuan2.lora import ADAPTER_FILE
    from baichuan2.peft_adapter import is_peft_dir
    if os.path.isdir(path) and is_peft_dir(path):
        return path  # read_adapter explains what is missing in a PEFT directory
    if os.path.isdir(path):
        path = os.path.join(path, ADAPTER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA adapter at {path} (pass a LoRA checkpoint directory of finetune.py or its "
                                f"{ADAPTER_FILE})")
    return path


def merge(base_dir, adapter_path, output_path):
    """Writes the merged model directory; returns its path."""
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.lora import ADAPTER_FILE, merge_into_weights, read_adapter
    from baichuan2.model_dir import write_servable_dir
    from baichuan2.modeling_baichuan import BaichuanForCausalLM
    from baichuan2.weights_check import check_model_dir, check_safetensors
    from mindspore import Tensor

    if os.path.exists(output_path):
        raise FileExistsError(f"--output_path {output_path} already exists; choose a new directory")
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise FileNotFoundError(f"--base {base_dir} is not a model directory (no config.json)")
    check_model_dir(base_dir)  # a damaged config.json or weights file: WeightsFileError naming it
    config = BaichuanConfig.from_hf_config(base_dir)
    if config.quantization_config is not None:
        raise ValueError(f"--base {base_dir} holds {config.weight_format()} weights: LoRA merges onto float32 or "
                         "bfloat16 weights only; convert the original checkpoint with --dtype bfloat16, merge onto "
                         "that, then quantise the merged directory (convert_weight.py --reverse, then --quantize)")
    adapter_path = adapter_file(adapter_path)
    weights = adapter_path if os.path.isfile(adapter_path) else os.path.join(adapter_path, ADAPTER_FILE)
    if os.path.isfile(weights):  # a PEFT directory without it: read_adapter says what is missing
        check_safetensors(weights)
    adapter, lora = read_adapter(adapter_path)
    model = BaichuanForCausalLM(config)
    model.load_weights(base_dir)  # checks names and shapes against the config
    params = {p.name: p for p in model.get_parameters()}
    merged = merge_into_weights({name: p.asnumpy() for name, p in params.items()}, adapter, lora)
    for name, array in merged.items():
        params[name].set_data(Tensor(array).astype(params[name].dtype))

    return write_servable_dir(output_path, config, model=model, tokenizer_dir=base_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base model directory the adapter was trained on")
    p.add_argument("--adapter", required=True,
                   help="LoRA checkpoint directory, its adapter_model.safetensors, or a PEFT LoRA directory")
    p.add_argument("--output_path", required=True, help="new model directory to create")
    args = p.parse_args(argv)
    try:
        out = merge(os.path.abspath(args.base), os.path.abspath(args.adapter), os.path.abspath(args.output_path))
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"merge_lora.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"merged model directory written: {out}")


if __name__ == "__main__":
    main()
