"""Build tiny Hugging Face-format Baichuan/XVERSE checkpoints and reference outputs for the parity tests.

Run in the torch venv (see tools/parity/README.md):

    .venv-ref/bin/python tools/parity/make_goldens.py

Writes tests/fixtures/parity/<family>/ for each family below: config.json, safetensors weights in the family's
own Hugging Face layout (W_pack or separate q/k/v; one file or two shards with an index), tokenizer.model when
dataset/tokenizer.model exists (Baichuan families; XVERSE gets dataset/xverse/tokenizer.json and its "Human: ..."
chat goldens), and reference.safetensors with input ids, masks, reference logits and greedy continuations. Then it checks itself (see self_check). Deterministic: the same
command writes the same bytes, so re-running only changes files when something real changed (e.g. the tokenizer
appeared).

The reference is transformers' LlamaForCausalLM, float32, eager attention, with the Baichuan differences applied
around it: W_pack split into q/k/v, NormHead (lm_head rows L2-normalised) for Baichuan2, and for Baichuan2-13B RoPE
switched off plus an ALiBi bias passed in as a 4D float attention mask.
"""
import argparse
import contextlib
import json
import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes, build_alibi_tensor
from transformers.models.llama import modeling_llama

import numpy_reference  # a sibling module: a script's own directory is first on the import path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_ROOT = os.path.join(REPO, "tests", "fixtures", "parity")
TOKENIZER = os.path.join(REPO, "dataset", "tokenizer.model")
CHAT_TEXT = "<reserved_106>你是谁?<reserved_107>"
# XVERSE: a Hugging Face tokenizer.json and a text chat format instead of role tokens
XVERSE_TOKENIZER = os.path.join(REPO, "dataset", "xverse", "tokenizer.json")
XVERSE_CHAT_TEXT = "Human: 你是谁?\n\nAssistant: "

SEED = 20240607
BATCH, SEQ, PAD_LEFT = 2, 16, 5        # reference batch: row 1 is left-padded with PAD_LEFT pad tokens
LONG_SEQ = 48                          # ALiBi family only: longer than its model_max_length (32)
NEW_TOKENS = 16
GREEDY_PROMPT_LENGTHS = (5, 11)

# Baichuan2-*-Chat ships this generation_config.json (role ids 195/196 there; <reserved_106>/<reserved_107> are 3/4
# in the tiny tokenizer). The Baichuan2 fixtures carry it so that they convert as the Chat variant; Base ships none.
CHAT_GENERATION_CONFIG = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 3,
                          "assistant_token_id": 4, "max_new_tokens": 2048, "temperature": 0.3, "top_k": 5,
                          "top_p": 0.85, "repetition_penalty": 1.05, "do_sample": True}
AUTO_MAP_BAICHUAN2 = {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                      "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}

# Family -> Hugging Face config.json (shaped like the real one, tiny dims) and how the checkpoint is laid out.
# position: "rope" | "alibi"; packed: q/k/v stored as W_pack; norm_head: Baichuan2's NormHead; shards: 1 or 2.
FAMILIES = {
    "baichuan2_7b": dict(
        position="rope", packed=True, norm_head=True, shards=2, tokenizer=True, chat_generation=True,
        config={
            "architectures": ["BaichuanForCausalLM"],
            "auto_map": AUTO_MAP_BAICHUAN2,
            "tokenizer_class": "BaichuanTokenizer",
            "model_type": "baichuan",
            "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_hidden_layers": 2,
            "vocab_size": 1000, "rms_norm_eps": 1e-6, "max_position_embeddings": 64, "model_max_length": 64,
            "hidden_act": "silu", "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "use_cache": True, "z_loss_weight": 0, "torch_dtype": "float32",
        }),
    "baichuan_7b": dict(
        position="rope", packed=True, norm_head=False, shards=1, tokenizer=True,
        config={
            "architectures": ["BaiChuanForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_baichuan.BaiChuanConfig",
                         "AutoModelForCausalLM": "modeling_baichuan.BaiChuanForCausalLM"},
            "model_type": "baichuan",
            "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_hidden_layers": 2,
            "vocab_size": 1000, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
            "hidden_act": "silu", "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "float32",
        }),
    "baichuan2_13b": dict(
        # 6 heads (not a power of two) so the interleaved ALiBi slope extension is exercised
        position="alibi", packed=True, norm_head=True, shards=1, tokenizer=True, chat_generation=True,
        config={
            "architectures": ["BaichuanForCausalLM"],
            "auto_map": AUTO_MAP_BAICHUAN2,
            "tokenizer_class": "BaichuanTokenizer",
            "model_type": "baichuan",
            "hidden_size": 96, "intermediate_size": 176, "num_attention_heads": 6, "num_hidden_layers": 2,
            "vocab_size": 1000, "rms_norm_eps": 1e-6, "model_max_length": 32,
            "hidden_act": "silu", "initializer_range": 0.02,
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
            "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "float32",
        }),
    "xverse_7b": dict(
        position="rope", packed=False, norm_head=False, shards=1, tokenizer="json",
        config={
            "architectures": ["XverseForCausalLM"],
            "auto_map": {"AutoConfig": "configuration_xverse.XverseConfig",
                         "AutoModelForCausalLM": "modeling_xverse.XverseForCausalLM"},
            "model_type": "xverse",
            "hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_hidden_layers": 2,
            "vocab_size": 1000, "rms_norm_eps": 1e-6, "max_position_embeddings": 64,
            "hidden_act": "silu", "initializer_range": 0.02,
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1,
            "tie_word_embeddings": False, "use_cache": True, "torch_dtype": "float32",
        }),
}
ROPE_THETA = 10000.0   # none of the real configs sets it; their code uses the LLaMA default


# ----------------------------------------------------------------------------------------------- weights
def random_weights(cfg, gen):
    """Our (Llama) names, q/k/v separate. Scales chosen so logits are far from uniform and greedy decoding moves."""
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]

    def normal(*shape, std):
        return torch.randn(*shape, generator=gen) * std

    def norm_weight():
        return 1.0 + normal(h, std=0.2)

    w = {"model.embed_tokens.weight": normal(vocab, h, std=1.0)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            w[p + f"self_attn.{name}.weight"] = normal(h, h, std=0.15)
        w[p + "mlp.gate_proj.weight"] = normal(inter, h, std=0.15)
        w[p + "mlp.up_proj.weight"] = normal(inter, h, std=0.15)
        w[p + "mlp.down_proj.weight"] = normal(h, inter, std=0.1)
        w[p + "input_layernorm.weight"] = norm_weight()
        w[p + "post_attention_layernorm.weight"] = norm_weight()
    w["model.norm.weight"] = norm_weight()
    # rows of very different norms: a forgotten NormHead then changes the ranking of tokens, not just the scale
    row_scale = torch.empty(vocab, 1).uniform_(0.3, 3.0, generator=gen)
    w["lm_head.weight"] = normal(vocab, h, std=0.15) * row_scale
    return w


def to_hf_layout(weights, spec):
    """Our names -> the family's checkpoint names (W_pack = concat(q, k, v) on dim 0 for Baichuan)."""
    if not spec["packed"]:
        return dict(weights)
    out = {}
    for name, tensor in weights.items():
        if ".self_attn.q_proj." in name:
            p = name.split("self_attn.")[0]
            out[p + "self_attn.W_pack.weight"] = torch.cat(
                [weights[p + f"self_attn.{x}_proj.weight"] for x in "qkv"], dim=0)
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue
        else:
            out[name] = tensor
    return out


def from_hf_layout(hf_weights, cfg):
    """Checkpoint names -> our names (splits W_pack)."""
    out = {}
    for name, tensor in hf_weights.items():
        if name.endswith("self_attn.W_pack.weight"):
            p = name[: -len("W_pack.weight")]
            for x, part in zip("qkv", numpy_reference.split_w_pack(tensor, cfg["hidden_size"])):
                out[p + f"{x}_proj.weight"] = part.clone()
        else:
            out[name] = tensor
    return out


def save_checkpoint(hf_weights, spec, directory):
    meta = {"format": "pt"}
    if spec["shards"] == 1:
        save_file(hf_weights, os.path.join(directory, "model.safetensors"), metadata=meta)
        return
    # Two shards plus model.safetensors.index.json, the way transformers writes large checkpoints
    names = sorted(hf_weights)
    first = {n for n in names if n.startswith(("model.embed_tokens.", "model.layers.0."))}
    files = {"model-00001-of-00002.safetensors": [n for n in names if n in first],
             "model-00002-of-00002.safetensors": [n for n in names if n not in first]}
    weight_map = {}
    for filename, shard_names in files.items():
        save_file({n: hf_weights[n] for n in shard_names}, os.path.join(directory, filename), metadata=meta)
        weight_map.update({n: filename for n in shard_names})
    total = sum(t.numel() * t.element_size() for t in hf_weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(os.path.join(directory, "model.safetensors.index.json"), index)


def load_checkpoint(directory):
    """(config dict, checkpoint-named weights) read back from disk, through the index when there is one."""
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    weights = {}
    for filename in files:
        weights.update(load_file(os.path.join(directory, filename)))
    return cfg, weights


def write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# ----------------------------------------------------------------------------------------------- reference
def build_reference(cfg, spec, weights):
    """transformers Llama holding `weights` (our names, lm_head un-normalised)."""
    llama_cfg = LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
        num_key_value_heads=cfg["num_attention_heads"], hidden_act=cfg["hidden_act"],
        max_position_embeddings=cfg.get("max_position_embeddings", cfg.get("model_max_length")),
        rms_norm_eps=cfg["rms_norm_eps"], tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
        bos_token_id=cfg["bos_token_id"], eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"],
        attn_implementation="eager")
    model = LlamaForCausalLM(llama_cfg).float().eval()
    # The ALiBi path hands in its own 4D mask, which only the eager kernel adds verbatim
    assert model.config._attn_implementation == "eager", model.config._attn_implementation
    state = dict(weights)
    if spec["norm_head"]:
        # Baichuan2 NormHead: each output row divided by its L2 norm before the output matmul
        state["lm_head.weight"] = F.normalize(state["lm_head.weight"], dim=-1, eps=1e-12)
    model.load_state_dict(state, strict=True)
    return model


@contextlib.contextmanager
def rope_disabled():
    """LlamaAttention looks apply_rotary_pos_emb up in its module at call time; make it the identity for ALiBi."""
    original = modeling_llama.apply_rotary_pos_emb
    modeling_llama.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        modeling_llama.apply_rotary_pos_emb = original


def alibi_attention_mask(mask, num_heads):
    """[B, H, S, S] float: 0 / finfo.min for causal + padding, plus the ALiBi bias from transformers' Bloom code.

    Bloom's bias is slope * (index among real tokens) of the key; per query row it differs from Baichuan2-13B's
    slope * absolute key index only by a constant, which softmax ignores.
    """
    batch, seq = mask.shape
    alibi = build_alibi_tensor(mask, num_heads, torch.float32).view(batch, num_heads, 1, seq)
    allowed = torch.tril(torch.ones(seq, seq, dtype=torch.bool))[None] & mask[:, None, :].bool()
    blocked = torch.zeros(batch, 1, seq, seq).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    return blocked + alibi


@torch.no_grad()
def reference_logits(model, spec, input_ids, attention_mask=None):
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    if spec["position"] == "alibi":
        with rope_disabled():
            mask4d = alibi_attention_mask(attention_mask, model.config.num_attention_heads)
            out = model(input_ids=input_ids, attention_mask=mask4d, position_ids=positions, use_cache=False)
    else:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=False)
    return out.logits.float()


def greedy(model, spec, prompt, new_tokens=NEW_TOKENS):
    """Plain argmax loop over full forward passes (no cache, no eos stop). Returns the new ids and the smallest
    top-1/top-2 logit gap seen (a small gap would make the golden fragile)."""
    ids = prompt.clone()[None]
    margin = math.inf
    for _ in range(new_tokens):
        last = reference_logits(model, spec, ids)[0, -1]
        top2 = torch.topk(last, 2).values
        margin = min(margin, float(top2[0] - top2[1]))
        ids = torch.cat([ids, last.argmax().view(1, 1)], dim=1)
    return ids[0, prompt.numel():], margin


# ----------------------------------------------------------------------------------------------- build
def chat_prompt_ids():
    if not os.path.exists(TOKENIZER):
        return None
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=TOKENIZER)
    return torch.tensor(sp.encode(CHAT_TEXT), dtype=torch.long)


def xverse_chat_prompt_ids():
    if not os.path.exists(XVERSE_TOKENIZER):
        return None
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(XVERSE_TOKENIZER).encode(XVERSE_CHAT_TEXT, add_special_tokens=False).ids
    return torch.tensor(ids, dtype=torch.long)


def build_family(index, family, spec, chat_ids):
    tokenizer_file = TOKENIZER
    if spec["tokenizer"] == "json":
        chat_ids, tokenizer_file = xverse_chat_prompt_ids(), XVERSE_TOKENIZER
        if chat_ids is not None:
            print(f"{family} chat prompt {XVERSE_CHAT_TEXT!r} -> {chat_ids.tolist()}")
    cfg = spec["config"]
    gen = torch.Generator().manual_seed(SEED + index)
    directory = os.path.join(OUT_ROOT, family)
    shutil.rmtree(directory, ignore_errors=True)
    os.makedirs(directory)

    weights = random_weights(cfg, gen)
    write_json(os.path.join(directory, "config.json"), cfg)
    save_checkpoint(to_hf_layout(weights, spec), spec, directory)
    if spec["tokenizer"] and chat_ids is not None:
        shutil.copyfile(tokenizer_file, os.path.join(directory, os.path.basename(tokenizer_file)))
        if spec.get("chat_generation"):  # role ids exist only with the tokenizer
            write_json(os.path.join(directory, "generation_config.json"), CHAT_GENERATION_CONFIG)

    model = build_reference(cfg, spec, weights)
    vocab, pad = cfg["vocab_size"], cfg["pad_token_id"]
    low = 4  # keep pad/bos/eos of every family out of the random ids

    input_ids = torch.randint(low, vocab, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    input_ids[1, :PAD_LEFT] = pad
    attention_mask[1, :PAD_LEFT] = 0

    ref = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "logits": reference_logits(model, spec, input_ids, attention_mask),
        "logits_nopad": reference_logits(model, spec, input_ids[:1]),
    }
    if spec["position"] == "alibi":
        ref["long_input_ids"] = torch.randint(low, vocab, (1, LONG_SEQ), generator=gen)
        ref["long_logits"] = reference_logits(model, spec, ref["long_input_ids"])
    margins = []
    for i, length in enumerate(GREEDY_PROMPT_LENGTHS):
        prompt = torch.randint(low, vocab, (length,), generator=gen)
        ref[f"greedy_prompt_{i}"] = prompt
        ref[f"greedy_out_{i}"], margin = greedy(model, spec, prompt)
        margins.append(margin)
    if chat_ids is not None and spec["tokenizer"]:
        ref["chat_prompt_ids"] = chat_ids
        ref["chat_greedy_ids"], margin = greedy(model, spec, chat_ids)
        margins.append(margin)

    # one metadata key only: safetensors writes a multi-key map in random order, and the bytes must not change
    save_file({k: v.contiguous() for k, v in ref.items()}, os.path.join(directory, "reference.safetensors"),
              metadata={"family": family})

    greedy_text = ", ".join(str(ref[f"greedy_out_{i}"].tolist()) for i in range(len(GREEDY_PROMPT_LENGTHS)))
    print(f"{family}: logits std {ref['logits_nopad'].std():.2f}, min greedy top-2 gap {min(margins):.3g}, "
          f"greedy {greedy_text}")


# ----------------------------------------------------------------------------------------------- checks
def check_alibi_slopes():
    """Bloom's slopes vs our own formula (numpy_reference.alibi_slopes) for 1..64 heads."""
    worst = max(float(np.abs(_get_alibi_slopes(n, "cpu").double().numpy() - numpy_reference.alibi_slopes(n)).max())
                for n in range(1, 65))
    print(f"ALiBi slopes, transformers Bloom vs own formula, 1..64 heads: max |diff| {worst:.2e}")
    assert worst < 1e-6, worst


def self_check(family, spec):
    """Reload the checkpoint from disk and re-derive everything: transformers again (bit-identical) and the
    independent numpy forward (to 1e-5)."""
    directory = os.path.join(OUT_ROOT, family)
    cfg, hf_weights = load_checkpoint(directory)
    weights = from_hf_layout(hf_weights, cfg)
    ref = load_file(os.path.join(directory, "reference.safetensors"))
    model = build_reference(cfg, spec, weights)

    # 1) same logits from the checkpoint on disk
    ids, mask = ref["input_ids"], ref["attention_mask"]
    assert torch.equal(reference_logits(model, spec, ids, mask), ref["logits"])
    assert torch.equal(reference_logits(model, spec, ids[:1]), ref["logits_nopad"])
    if "long_logits" in ref:
        assert torch.equal(reference_logits(model, spec, ref["long_input_ids"]), ref["long_logits"])
    for i in range(len(GREEDY_PROMPT_LENGTHS)):
        assert torch.equal(greedy(model, spec, ref[f"greedy_prompt_{i}"])[0], ref[f"greedy_out_{i}"])
    if "chat_prompt_ids" in ref:
        assert torch.equal(greedy(model, spec, ref["chat_prompt_ids"])[0], ref["chat_greedy_ids"])

    # 2) left padding changes nothing on the real tokens
    real = mask[1].bool()
    alone = reference_logits(model, spec, ids[1:, real])
    pad_diff = float((ref["logits"][1, real] - alone[0]).abs().max())
    assert pad_diff < 1e-5, pad_diff

    # 3) independent numpy forward (float64)
    np_cfg = dict(cfg, position=spec["position"], rope_theta=ROPE_THETA, norm_head=spec["norm_head"])
    np_weights = {k: v.numpy() for k, v in hf_weights.items()}
    keep = mask.numpy().astype(bool)
    ours = numpy_reference.forward(np_weights, np_cfg, ids.numpy(), mask.numpy())
    np_diff = float(np.abs(ours[keep] - ref["logits"].numpy()[keep]).max())
    if "long_logits" in ref:
        long_np = numpy_reference.forward(np_weights, np_cfg, ref["long_input_ids"].numpy())
        np_diff = max(np_diff, float(np.abs(long_np - ref["long_logits"].numpy()).max()))
    print(f"{family}: reload identical; padding invariance {pad_diff:.1e}; numpy reference max |diff| {np_diff:.1e}")
    assert np_diff < 1e-5, np_diff

    # 4) the switches matter: without NormHead / with RoPE left on, the logits move a lot
    if spec["norm_head"]:
        plain = numpy_reference.forward(np_weights, dict(np_cfg, norm_head=False), ids[:1].numpy())
        assert np.abs(plain - ref["logits_nopad"].numpy()).max() > 1e-2
    if spec["position"] == "alibi":
        with torch.no_grad():
            with_rope = model(input_ids=ids[:1], position_ids=torch.arange(SEQ)[None],
                              attention_mask=alibi_attention_mask(torch.ones_like(ids[:1]), cfg["num_attention_heads"])
                              ).logits
        assert (with_rope - ref["logits_nopad"]).abs().max() > 1e-2, "RoPE patch had no effect?"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check-only", action="store_true", help="only run the self-check on existing fixtures")
    args = parser.parse_args()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # same reduction order every run

    check_alibi_slopes()
    chat_ids = chat_prompt_ids()
    if chat_ids is None:
        print(f"{TOKENIZER} not found: no chat goldens, no tokenizer.model copied (re-run once it exists)")
    else:
        print(f"chat prompt {CHAT_TEXT!r} -> {chat_ids.tolist()}")
    if not args.check_only:
        for index, (family, spec) in enumerate(FAMILIES.items()):
            build_family(index, family, spec, chat_ids)
    for family, spec in FAMILIES.items():
        self_check(family, spec)
    print("all goldens built and checked")


if __name__ == "__main__":
    main()
