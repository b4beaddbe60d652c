"""Training memory budget on one device: full finetuning vs LoRA, from a model preset and a LoRA recipe.

    python example/lora_memory_budget.py                                  # Baichuan2-7B, seq 4096, 64 GB device
    python example/lora_memory_budget.py --preset baichuan2_13b --seq_length 2048 --lora_rank 16

Counted per device by baichuan2.memory_budget (describe_lora; its docstring lists the assumptions), batch
--batch_size, no model or optimizer sharding:
- full: fp32 master weights + a bf16 compute copy, fp32 gradients, AdamW m and v in fp32.
- LoRA: the frozen base in bf16 (no gradients, no optimizer state), fp32 adapters with fp32 gradients and moments.
- activations kept for the backward pass, in bf16, with fused (flash) attention, which stores no [S, S] scores,
  plus float32 logits and their log-softmax; without recomputation, or with full recomputation (each layer's input
  plus one layer's working set). Sharded full finetunes: example/memory_budget.py.
Not counted: framework workspace, communication buffers, fragmentation (budget ~10% for them).
"""
import argparse
import os

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.memory_budget import describe_lora

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="baichuan2_7b", help="BaichuanConfig preset")
    p.add_argument("--recipe", default=os.path.join(REPO, "configs", "finetune_baichuan2_7b_lora.yaml"),
                   help="LoRA recipe yaml (its lora section: rank, targets)")
    p.add_argument("--lora_rank", type=int, help="overrides the recipe's rank")
    p.add_argument("--lora_targets", help="overrides the recipe's targets (comma-separated)")
    p.add_argument("--seq_length", type=int, default=4096)
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--device_gb", type=float, default=64, help="device memory in GiB")
    args = p.parse_args(argv)

    with open(args.recipe, encoding="utf-8") as f:
        lora = (yaml.safe_load(f) or {}).get("lora") or {}
    rank = args.lora_rank or int(lora.get("rank") or 0)
    targets = args.lora_targets.split(",") if args.lora_targets else lora.get("targets", ["W_pack"])
    if rank <= 0:
        p.error(f"{args.recipe} has no LoRA rank > 0; pass --lora_rank")
    config = BaichuanConfig.from_preset(args.preset)
    print("\n".join(describe_lora(args.preset, config, rank, targets, args.seq_length, args.batch_size,
                                  args.device_gb)))


if __name__ == "__main__":
    main()
