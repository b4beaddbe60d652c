"""Out of MindSpore and back: what PyTorch tools load from our directories, checked in the reference venv.

`.venv-ref` (torch CPU, transformers, peft; no MindSpore), made by scripts/setup_env.sh, runs
tools/parity/check_exports.py as a subprocess; this side computes what the MindSpore model and tokenizers give and
asserts on what the PyTorch side found:
- `convert_weight.py --reverse --to llama` of each RoPE family loads as a plain LlamaForCausalLM (no remote code),
  its logits equal ours to 1e-4 of the largest, its fast tokenizer gives our ids on texts with leading spaces,
  digits, CJK, newlines and special tokens, and its chat template our chat prompt ids;
- our own model directory's tokenizer (tokenization_baichuan.py / tokenization_xverse.py) loads with transformers
  alone (`trust_remote_code=True`) and gives the same ids;
- a LoRA adapter exported with `lora export --to llama` loads in PEFT onto the Llama export, and its logits equal
  those of our merged model (merge_lora.py);
- Baichuan2-13B (ALiBi) is refused with one line; `--to baichuan` copies the tokenizer module its auto_map names.
"""
import json
import os
import subprocess

import mindspore as ms
import numpy as np
import pytest
from safetensors.numpy import load_file

from baichuan2 import chat_format
from baichuan2.chat import formats
from baichuan2.configuration_baichuan import BaichuanConfig
from baichuan2.convert_weight import convert, main as convert_main
from baichuan2.lora import adapter_params, apply_lora, export_adapter, save_adapter
from baichuan2.merge_lora import merge
from baichuan2.model_dir import load_tokenizer
from baichuan2.modeling_baichuan import BaichuanForCausalLM
from helpers import PARITY, REPO, call_script

REF_PYTHON = os.path.join(REPO, ".venv-ref", "bin", "python")
CHECK = os.path.join(REPO, "tools", "parity", "check_exports.py")
ROPE_FAMILIES = ["baichuan2_7b", "baichuan_7b", "xverse_7b"]
TEXTS = ["Hello world", " leading space", "  two  spaces ", "12345 + 678 = 等于 0.5",
         "你好，世界！今天天气怎么样？",
         "line one\nline two\n\n\tindented", "<reserved_106>你是谁?<reserved_107>", "a</s>b<s>c<unk>d",
         "<|endoftext|>Human: hi<|startoftext|>", "ñ é ü 😀 ∑", " ", ""]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " 你好 12 34"},
            {"role": "assistant", "content": "Hello, 世界\n"}, {"role": "user", "content": "Why?"}]


def run_reference(tmp_path, spec):
    """The findings of check_exports.py in .venv-ref for `spec`."""
    assert os.path.isfile(REF_PYTHON), (
        f"{REF_PYTHON} is missing: scripts/setup_env.sh makes it (make setup), with tools/parity/requirements.txt")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", HF_HOME=str(tmp_path / "hf_home"),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([REF_PYTHON, CHECK, str(path)], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def input_ids(family):
    return load_file(os.path.join(PARITY, family, "reference.safetensors"))["input_ids"][:1].astype(np.int32)


def our_logits(model_dir, ids):
    model = BaichuanForCausalLM.from_pretrained(model_dir)
    model.set_train(False)
    return model(ms.Tensor(ids)).asnumpy().astype(np.float32)


def our_token_side(model_dir):
    """(ids of TEXTS, chat prompt ids of MESSAGES or None for a base model) from our own tokenizer and chat code."""
    tokenizer = load_tokenizer(model_dir)
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in TEXTS]
    config = BaichuanConfig.from_hf_config(model_dir)
    chat = None
    if config.chat_format:
        fmt, role_ids = formats.for_config(config)  # the whole history: build_chat_input would cut it to 64 tokens
        chat = fmt.prompt_ids(MESSAGES, lambda text: tokenizer.encode(text, add_special_tokens=False), role_ids)
    return ids, chat


@pytest.mark.slow
@pytest.mark.parametrize("family", ROPE_FAMILIES)
def test_llama_export_loads_natively_with_our_logits_ids_and_chat(tmp_path, parity_model_dir, family, pynative):
    ours = parity_model_dir(family, "chat") if family == "baichuan2_7b" else parity_model_dir(family)
    llama = str(tmp_path / "llama")
    assert convert_main(["--reverse", "--to", "llama", "--input_path", ours, "--output_path", llama]) == 0
    ids = input_ids(family)
    np.save(tmp_path / "ours.npy", our_logits(ours, ids))
    text_ids, chat_ids = our_token_side(ours)
    spec = {"llama_dir": llama, "input_ids": ids.tolist(), "logits_file": str(tmp_path / "ours.npy"),
            "texts": TEXTS, "ids": text_ids, "remote_dir": ours}
    if chat_ids is not None:
        spec.update(messages=MESSAGES, chat_ids=chat_ids)
    found = run_reference(tmp_path, spec)
    assert (found["model_type"], found["auto_map"], found["model_class"]) == ("llama", False, "LlamaForCausalLM")
    assert found["logits_max_diff"] <= 1e-4 * found["logits_scale"], found
    for side in ("llama_tokenizer", "remote_tokenizer"):
        assert found[side]["mismatches"] == [], (side, found[side]["mismatches"][:3])
        if chat_ids is not None:
            assert found[side]["chat_ids"] == chat_ids, side
    assert found["remote_tokenizer"]["class"] == ("XverseTokenizer" if family == "xverse_7b" else "BaichuanTokenizer")


@pytest.mark.slow
def test_exported_adapter_loads_in_peft_onto_the_llama_export(tmp_path, parity_model_dir, pynative):
    base = parity_model_dir("baichuan2_7b")
    model = BaichuanForCausalLM.from_pretrained(base, backend="composed")
    model = apply_lora(model, 4, 8.0, 0.0, ["W_pack", "o_proj", "down_proj"])
    rng = np.random.default_rng(3)
    for p in adapter_params(model):  # a fresh B is zero: random A and B, or the check proves nothing
        p.set_data(ms.Tensor(rng.standard_normal(p.shape).astype(np.float32) * 0.2))
    save_adapter(model, str(tmp_path / "adapter"), base_model_name_or_path=base)
    merge(base, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    export_adapter(str(tmp_path / "adapter"), str(tmp_path / "adapter_llama"), to="llama")
    config = json.loads((tmp_path / "adapter_llama" / "adapter_config.json").read_text())
    assert (config["r"], sorted(config["target_modules"])) == (4, ["down_proj", "k_proj", "o_proj", "q_proj",
                                                                    "v_proj"])
    convert(base, str(tmp_path / "llama"), reverse=True, to="llama", show_progress=False)
    ids = input_ids("baichuan2_7b")
    np.save(tmp_path / "base.npy", our_logits(base, ids))
    np.save(tmp_path / "merged.npy", our_logits(str(tmp_path / "merged"), ids))
    found = run_reference(tmp_path, {"llama_dir": str(tmp_path / "llama"), "input_ids": ids.tolist(),
                                     "logits_file": str(tmp_path / "base.npy"),
                                     "adapter_dir": str(tmp_path / "adapter_llama"),
                                     "merged_logits_file": str(tmp_path / "merged.npy")})
    assert found["adapter_moves_logits"] > 100 * found["adapter_max_diff"], found
    assert found["adapter_max_diff"] <= 1e-4 * found["adapter_scale"], found


@pytest.mark.slow
def test_baichuan_layout_export_is_self_consistent(tmp_path, parity_model_dir):
    ours = parity_model_dir("baichuan2_7b", "chat")
    hf = str(tmp_path / "hf")
    convert(ours, hf, reverse=True, show_progress=False)
    tokenizer_config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    module = tokenizer_config["auto_map"]["AutoTokenizer"][0].split(".")[0]
    assert (tmp_path / "hf" / f"{module}.py").is_file()
    assert "auto_map" not in json.loads((tmp_path / "hf" / "config.json").read_text())
    text_ids, chat_ids = our_token_side(ours)
    found = run_reference(tmp_path, {"remote_dir": hf, "texts": TEXTS, "ids": text_ids, "messages": MESSAGES,
                                     "chat_ids": chat_ids})
    assert found["remote_tokenizer"]["mismatches"] == [] and found["remote_tokenizer"]["chat_ids"] == chat_ids


def test_alibi_and_a_damaged_tokenizer_are_refused_in_one_line(tmp_path, parity_model_dir):
    """As the command line runs (the script as __main__), so its error class is the one that reaches main()."""
    import shutil
    script = os.path.join(REPO, "research", "baichuan2", "convert_weight.py")
    code, _, err = call_script(script, ["--reverse", "--to", "llama", "--input_path",
                                        parity_model_dir("baichuan2_13b"), "--output_path", str(tmp_path / "llama")])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "ALiBi" in err, err
    damaged = tmp_path / "damaged"
    shutil.copytree(parity_model_dir("baichuan_7b"), damaged)
    (damaged / "tokenizer.model").write_bytes(b"not a SentencePiece model")
    code, _, err = call_script(script, ["--reverse", "--to", "llama", "--input_path", str(damaged), "--output_path",
                                        str(tmp_path / "llama"), "--dtype", "float32"])
    lines = [line for line in err.strip().splitlines() if "shards" not in line]  # the progress bar
    assert code == 2 and len(lines) == 1 and "tokenizer.model" in lines[0], err
    assert not (tmp_path / "llama").exists()


def test_fast_tokenizer_gives_our_ids_on_the_bundled_corpus():
    """No torch needed: the tokenizers-library rebuild of the SentencePiece model against our tokenizer, on every
    line of the tokenizer's own training corpus and every BELLE sample turn."""
    from baichuan2.fast_tokenizer import sentencepiece_to_tokenizer
    from baichuan2.tokenization_baichuan import BaichuanTokenizer
    model = os.path.join(REPO, "dataset", "tokenizer.model")
    fast, ours = sentencepiece_to_tokenizer(model), BaichuanTokenizer(model)
    with open(os.path.join(REPO, "dataset", "tokenizer_corpus.txt"), encoding="utf-8") as f:
        texts = f.read().split("\n")[:2000] + TEXTS
    with open(os.path.join(REPO, "dataset", "belle_sample.json"), encoding="utf-8") as f:
        texts += [turn["value"] for record in json.load(f) for turn in record["conversations"]]
    differ = [t for t in texts if fast.encode(t).ids != ours.encode(t, add_special_tokens=False)]
    assert differ == [], differ[:3]
    assert all(fast.decode(fast.encode(t).ids, skip_special_tokens=False) == t for t in TEXTS)


def test_llama_config_and_card(tmp_path, parity_model_dir):
    ours = parity_model_dir("baichuan2_7b", "chat")
    out = tmp_path / "llama"
    convert(ours, str(out), reverse=True, to="llama", dtype="bfloat16", show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    assert "auto_map" not in config and not list(out.glob("*.py"))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast" and "auto_map" not in tokenizer_config
    assert tokenizer_config["chat_template"] == chat_format.get("baichuan2").chat_template()
    card = (out / "README.md").read_text()
    assert "Baichuan2-7B" in card and "LlamaForCausalLM" in card and "bfloat16" in card


def test_adapter_names_the_hugging_face_base_when_the_checkpoint_had_one(tmp_path, pynative):
    import shutil
    hf = tmp_path / "hf"
    shutil.copytree(os.path.join(PARITY, "baichuan_7b"), hf)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps(dict(config, _name_or_path="baichuan-inc/Baichuan-7B")))
    named, plain = str(tmp_path / "named"), str(tmp_path / "plain")
    convert(str(hf), named, show_progress=False)
    convert(os.path.join(PARITY, "baichuan_7b"), plain, show_progress=False)
    for base, expected in ((named, "baichuan-inc/Baichuan-7B"), (plain, plain)):
        model = BaichuanForCausalLM.from_pretrained(base, backend="composed")
        model = apply_lora(model, 2, 4.0, 0.0, ["W_pack"])
        model.lora_config["base_model"] = base  # what finetune records
        save_adapter(model, str(tmp_path / "adapter" / os.path.basename(base)))
        written = json.loads((tmp_path / "adapter" / os.path.basename(base) / "adapter_config.json").read_text())
        assert written["base_model_name_or_path"] == expected
        assert written["r"] == 3 * 2  # q, k and v each with its own A: one block-diagonal W_pack adapter
    assert "baichuan-inc/Baichuan-7B" in (tmp_path / "named" / "README.md").read_text()


def test_model_directories_get_the_users_umask_modes(tmp_path):
    """MindSpore sets the process umask to 077 when it makes a directory; what we publish still follows the user's."""
    import stat
    from baichuan2 import USER_UMASK
    from baichuan2.model_dir import atomic_dir
    previous = os.umask(0o077)  # as mindspore.log._make_directory leaves it
    try:
        with atomic_dir(str(tmp_path / "out")) as tmp:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                f.write("{}")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "out" / "config.json").st_mode) == 0o666 & ~USER_UMASK
    assert stat.S_IMODE(os.stat(tmp_path / "out").st_mode) == 0o777 & ~USER_UMASK
