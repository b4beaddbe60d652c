"""Our side of check_peft_adapter.py: runs in the project venv (MindSpore), never in .venv-ref.

    python tools/parity/peft_adapter_ours.py save --fixture DIR --work WORK   # WORK/model, WORK/ours_adapter, logits
    python tools/parity/peft_adapter_ours.py load --work WORK --adapter ADAPTER_DIR --out FILE

`save` converts the parity fixture to our model directory, puts a LoRA with random A and B (seeded; a fresh B is
zero and would check nothing) on W_pack (q/k/v), o_proj, up_proj and down_proj, writes the adapter with
save_adapter (PEFT layout) and our logits of the fixture's first input row. `load` reads an adapter written by peft
into the same base twice, with load_adapter and merged into the weights (merge_into_weights), and writes both
logits. Files are safetensors of float32 arrays.
"""
import argparse
import os

import mindspore as ms
import numpy as np
from safetensors.numpy import load_file, save_file

from baichuan2.convert_weight import convert
from baichuan2.lora import adapter_params, apply_lora, load_adapter, merge_into_weights, read_adapter, save_adapter
from baichuan2.modeling_baichuan import BaichuanForCausalLM

RANK, ALPHA, TARGETS = 4, 8.0, ["W_pack", "o_proj", "up_proj", "down_proj"]


def base_model(work):
    return BaichuanForCausalLM.from_pretrained(os.path.join(work, "model"))


def input_ids(fixture):
    return load_file(os.path.join(fixture, "reference.safetensors"))["input_ids"][:1].astype(np.int32)


def logits(model, ids):
    model.set_train(False)
    return model(ms.Tensor(ids)).asnumpy().astype(np.float32)


def save(fixture, work):
    convert(fixture, os.path.join(work, "model"), show_progress=False)
    model = apply_lora(base_model(work), RANK, ALPHA, 0.0, TARGETS)
    rng = np.random.default_rng(11)
    for p in adapter_params(model):
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    save_adapter(model, os.path.join(work, "ours_adapter"), base_model_name_or_path=fixture)
    ids = input_ids(fixture)
    save_file({"input_ids": ids, "logits": logits(model, ids)}, os.path.join(work, "ours_logits.safetensors"))


def load(fixture, work, adapter, out):
    ids = input_ids(fixture)
    with_adapter = logits(load_adapter(base_model(work), adapter), ids)
    merged = base_model(work)
    params = {p.name: p for p in merged.get_parameters()}
    weights = merge_into_weights({n: p.asnumpy() for n, p in params.items()}, *read_adapter(adapter)[:2])
    for name, array in weights.items():
        params[name].set_data(ms.Tensor(array))
    save_file({"adapter": with_adapter, "merged": logits(merged, ids)}, out)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["save", "load"])
    p.add_argument("--fixture", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--adapter")
    p.add_argument("--out")
    args = p.parse_args()
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.set_seed(0)
    if args.command == "save":
        save(args.fixture, args.work)
    else:
        load(args.fixture, args.work, args.adapter, args.out)


if __name__ == "__main__":
    main()
