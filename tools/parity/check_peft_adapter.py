"""Cross-checks our PEFT-layout LoRA adapters with the real `peft` package on the transformers reference.

    .venv-ref/bin/python tools/parity/check_peft_adapter.py            # all four families, ~5 min (MindSpore starts)
    .venv-ref/bin/python tools/parity/check_peft_adapter.py --family baichuan2_7b

Runs in the reference venv (torch, transformers, peft: tools/parity/requirements.txt); our side runs in the project
venv through tools/parity/peft_adapter_ours.py (--project-python, default .venv/bin/python), with PYTHONPATH set
to this checkout's research/. Per family:
1. ours -> peft: our code writes an adapter (random A and B on W_pack, o_proj, up_proj, down_proj) and its logits;
   peft's PeftModel.from_pretrained loads that directory onto the reference; the logits are compared.
2. peft -> ours: peft builds a LoRA (init_lora_weights=False: random A and B) on the reference with Hugging Face
   names, save_pretrained writes it; our code loads it (load_adapter, and merged into the weights) and the logits
   are compared with peft's.
For the Baichuan families the reference is make_goldens.py's LlamaForCausalLM with q/k/v rebuilt as slices of one
`W_pack` Linear per layer, so peft sees the module names of the Hugging Face Baichuan code (W_pack fused, as there);
XVERSE keeps separate q_proj/k_proj/v_proj, as its Hugging Face code does.
Exit status 1 when any difference exceeds --atol (default 1e-4, float32 on both sides).
"""
import argparse
import os
import subprocess
import sys
import tempfile

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

import make_goldens

REPO = make_goldens.REPO
FIXTURES = make_goldens.OUT_ROOT


class QKVSlice(nn.Module):
    """q_proj / k_proj / v_proj as rows of the attention's W_pack, looked up at call time so that peft's LoRA
    wrapper, which replaces `attention.W_pack`, is what runs. The attention is held outside the module tree."""

    def __init__(self, attention, index, size):
        super().__init__()
        object.__setattr__(self, "attention", attention)
        self.index, self.size = index, size

    def forward(self, x):
        return self.attention.W_pack(x)[..., self.index * self.size:(self.index + 1) * self.size]


def reference(family):
    """The transformers reference of a parity fixture, with Hugging Face module names for peft."""
    spec = make_goldens.FAMILIES[family]
    cfg, hf_weights = make_goldens.load_checkpoint(os.path.join(FIXTURES, family))
    model = make_goldens.build_reference(cfg, spec, make_goldens.from_hf_layout(hf_weights, cfg))
    if spec["packed"]:
        h = cfg["hidden_size"]
        for n, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            attention.W_pack = nn.Linear(h, 3 * h, bias=False)
            with torch.no_grad():
                attention.W_pack.weight.copy_(hf_weights[f"model.layers.{n}.self_attn.W_pack.weight"])
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                setattr(attention, name, QKVSlice(attention, i, h))
    return model.eval(), spec


def ours(*args, python):
    env = dict(os.environ, PYTHONPATH=os.path.join(REPO, "research"))
    subprocess.run([python, os.path.join(REPO, "tools", "parity", "peft_adapter_ours.py"), *args], check=True,
                   env=env, cwd=tempfile.gettempdir())


def max_diff(a, b):
    return float((a.float() - b.float()).abs().max())


def check_family(family, work, python):
    fixture = os.path.join(FIXTURES, family)
    ids = load_file(os.path.join(fixture, "reference.safetensors"))["input_ids"][:1]
    results = {}

    # 1) our adapter, loaded by peft
    ours("save", "--fixture", fixture, "--work", work, python=python)
    mine = load_file(os.path.join(work, "ours_logits.safetensors"))
    model, spec = reference(family)
    base = make_goldens.reference_logits(model, spec, ids)
    peft_model = PeftModel.from_pretrained(model, os.path.join(work, "ours_adapter")).eval()
    theirs = make_goldens.reference_logits(peft_model, spec, ids)
    results["ours -> peft"] = max_diff(mine["logits"], theirs)
    results["(our adapter moves logits by)"] = max_diff(theirs, base)

    # 2) peft's adapter, loaded by our code
    model, spec = reference(family)
    targets = ["W_pack", "o_proj", "gate_proj"] if spec["packed"] else ["q_proj", "v_proj", "o_proj", "gate_proj"]
    torch.manual_seed(5)
    config = LoraConfig(r=3, lora_alpha=7, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM",
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    theirs = make_goldens.reference_logits(peft_model, spec, ids)
    peft_dir = os.path.join(work, "peft_adapter")
    peft_model.save_pretrained(peft_dir)
    out = os.path.join(work, "ours_from_peft.safetensors")
    ours("load", "--fixture", fixture, "--work", work, "--adapter", peft_dir, "--out", out, python=python)
    mine = load_file(out)
    results["peft -> ours (load_adapter)"] = max_diff(mine["adapter"], theirs)
    results["peft -> ours (merged)"] = max_diff(mine["merged"], theirs)
    with peft_model.disable_adapter():
        without = make_goldens.reference_logits(peft_model, spec, ids)
    results["(peft adapter moves logits by)"] = max_diff(theirs, without)
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(make_goldens.FAMILIES), action="append",
                   help="parity fixture (repeatable; default all)")
    p.add_argument("--project-python", default=os.path.join(REPO, ".venv", "bin", "python"),
                   help="the project venv's python (MindSpore), for our side")
    p.add_argument("--atol", type=float, default=1e-4)
    args = p.parse_args()
    torch.set_num_threads(1)
    worst = 0.0
    for family in args.family or sorted(make_goldens.FAMILIES):
        with tempfile.TemporaryDirectory(prefix=f"peft_check_{family}_") as work:
            results = check_family(family, work, args.project_python)
        for name, value in results.items():
            print(f"{family:14s} {name:32s} max |diff| {value:.3e}")
            if not name.startswith("("):
                worst = max(worst, value)
            elif value < 1e-2:
                print(f"{family}: the adapter barely changes the logits; the check would prove nothing")
                worst = float("inf")
    print(f"worst max |diff| over all checks: {worst:.3e} (atol {args.atol})")
    sys.exit(0 if worst <= args.atol else 1)


if __name__ == "__main__":
    main()
