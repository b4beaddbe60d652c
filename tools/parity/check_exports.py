"""The PyTorch side of tests/test_export_llama.py: runs in .venv-ref (torch, transformers, peft, no MindSpore).

    .venv-ref/bin/python tools/parity/check_exports.py SPEC.json

SPEC.json (written by the test, with what our MindSpore side computed) holds any of
  llama_dir + input_ids + logits_file     LlamaForCausalLM.from_pretrained(llama_dir) (no trust_remote_code): its
                                          logits of input_ids against ours (a float32 .npy)
  llama_dir + texts + ids                 AutoTokenizer.from_pretrained(llama_dir): ids of every text
  llama_dir + messages + chat_ids         its apply_chat_template(messages, add_generation_prompt=True)
  remote_dir + texts + ids (+ chat_ids)   AutoTokenizer.from_pretrained(remote_dir, trust_remote_code=True): our
                                          own directory's tokenizer files, loaded with transformers alone
  adapter_dir + merged_logits_file        PeftModel.from_pretrained(Llama, adapter_dir): logits against our merged
                                          model's
and prints one JSON object of findings (the test asserts on them): max differences, the scale they are measured
against, and every text whose ids differ.
"""
import json
import sys

import numpy as np


def _ids(value):
    """apply_chat_template returns a list, or (transformers 5) a BatchEncoding."""
    return list(value["input_ids"]) if not isinstance(value, list) else list(value)


def tokenizer_findings(tokenizer, spec):
    found = {"class": type(tokenizer).__name__, "mismatches": []}
    for text, expected in zip(spec["texts"], spec["ids"]):
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != expected:
            found["mismatches"].append({"text": text, "ours": expected, "theirs": got})
    if "chat_ids" in spec:
        found["chat_ids"] = _ids(tokenizer.apply_chat_template(spec["messages"], add_generation_prompt=True,
                                                               tokenize=True))
    return found


def main(spec_path):
    # pylint: disable=import-outside-toplevel
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(1)
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    out = {}
    if "llama_dir" in spec:
        with open(f"{spec['llama_dir']}/config.json", encoding="utf-8") as f:
            config = json.load(f)
        out["model_type"], out["auto_map"] = config.get("model_type"), "auto_map" in config
        if "texts" in spec:
            out["llama_tokenizer"] = tokenizer_findings(AutoTokenizer.from_pretrained(spec["llama_dir"]), spec)
        if "logits_file" in spec:
            model = AutoModelForCausalLM.from_pretrained(spec["llama_dir"], dtype=torch.float32)
            out["model_class"] = type(model).__name__
            model.eval()
            ids = torch.tensor(spec["input_ids"])
            ours = np.load(spec["logits_file"])
            with torch.no_grad():
                theirs = model(ids).logits.float().numpy()
            out["logits_max_diff"] = float(np.abs(theirs - ours).max())
            out["logits_scale"] = float(np.abs(ours).max())
            if "adapter_dir" in spec:
                from peft import PeftModel
                adapted = PeftModel.from_pretrained(model, spec["adapter_dir"])
                adapted.eval()
                with torch.no_grad():
                    with_adapter = adapted(ids).logits.float().numpy()
                merged = np.load(spec["merged_logits_file"])
                out["adapter_max_diff"] = float(np.abs(with_adapter - merged).max())
                out["adapter_scale"] = float(np.abs(merged).max())
                out["adapter_moves_logits"] = float(np.abs(with_adapter - theirs).max())
    if "remote_dir" in spec:
        tokenizer = AutoTokenizer.from_pretrained(spec["remote_dir"], trust_remote_code=True)
        out["remote_tokenizer"] = tokenizer_findings(tokenizer, spec)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
