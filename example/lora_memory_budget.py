"""Training memory budget on one device: full finetuning vs LoRA, from a model preset and a LoRA recipe.

    python example/lora_memory_budget.py                                  # Baichuan2-7B, seq 4096, 64 GB device
    python example/lora_memory_budget.py --preset baichuan2_13b --seq_length 2048 --lora_rank 16

Counted per device, batch --batch_size, no model or optimizer sharding:
- full: fp32 master weights + a bf16 compute copy, fp32 gradients, AdamW m and v in fp32.
- LoRA: the frozen base in bf16 (no gradients, no optimizer state), fp32 adapters with fp32 gradients and moments.
- activations kept for the backward pass, in bf16, with fused (flash) attention, which stores no [S, S] scores:
  per layer the attention norm input and output, q/k/v, the attention output, the MLP norm input and output, and
  gate/up/silu(gate)/product of the SwiGLU; plus float32 logits and their log-softmax (counted by
  baichuan2.memory_budget, which also budgets sharded full finetunes: example/memory_budget.py). LoRA keeps the same set
  (counted conservatively: a frozen projection's input is not needed for a weight gradient, but the autodiff keeps
  most of them anyway). With full recomputation only each layer's input is kept, plus one layer's working set.
Not counted: framework workspace, communication buffers, fragmentation (budget ~10% for them).
"""
import argparse
import os
import sys

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 1024 ** 3


def activation_bytes(config, seq, batch, recompute):
    """bf16 activations of one device holding every layer (counted by baichuan2.memory_budget, whose docstring
    lists what is kept): no recomputation, or full recomputation."""
    from baichuan2.memory_budget import activation_bytes as kept_activations
    return kept_activations(config, seq * batch, 2, mode="full" if recompute else "none")


def budget(config, lora_params, seq, batch):
    """{row: (full bytes, lora bytes)} for the table."""
    p = config.num_parameters()
    rows = {
        "weights": (4 * p + 2 * p, 2 * p + 4 * lora_params),
        "gradients": (4 * p, 4 * lora_params),
        "optimizer states (AdamW m, v)": (8 * p, 8 * lora_params),
    }
    static = tuple(sum(r[k] for r in rows.values()) for k in (0, 1))
    act = activation_bytes(config, seq, batch, recompute=False)
    act_rc = activation_bytes(config, seq, batch, recompute=True)
    rows["activations, no recomputation"] = (act, act)
    rows["activations, full recomputation"] = (act_rc, act_rc)
    rows["total, no recomputation"] = (static[0] + act, static[1] + act)
    rows["total, full recomputation"] = (static[0] + act_rc, static[1] + act_rc)
    return rows


def main(argv=None):
    from baichuan2.configuration_baichuan import BaichuanConfig
    from baichuan2.lora import lora_parameter_count, resolve_targets

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
    lora_params = lora_parameter_count(config, rank, targets)
    rows = budget(config, lora_params, args.seq_length, args.batch_size)

    print(f"{args.preset}: {config.num_parameters() / 1e9:.2f}B parameters; LoRA rank {rank} on "
          f"{', '.join(resolve_targets(targets))}: {lora_params / 1e6:.2f}M trainable "
          f"({100 * lora_params / config.num_parameters():.3f}%)")
    print(f"batch {args.batch_size} x seq {args.seq_length}, one {args.device_gb:g} GiB device, bf16 compute\n")
    print(f"| {'GiB':33} | {'full finetune':>13} | {'LoRA':>8} |")
    print(f"|{'-' * 35}|{'-' * 14}:|{'-' * 9}:|")
    for name, (full, lo) in rows.items():
        print(f"| {name:33} | {full / GIB:13.1f} | {lo / GIB:8.1f} |")
    fits = lambda b: "yes" if b / GIB <= 0.9 * args.device_gb else "no"  # noqa: E731 (10% for workspace)
    for label, key in (("no recomputation", "total, no recomputation"),
                       ("full recomputation", "total, full recomputation")):
        full, lo = rows[key]
        print(f"| {'fits (<= 90%), ' + label:33} | {fits(full):>13} | {fits(lo):>8} |")


if __name__ == "__main__":
    main()
