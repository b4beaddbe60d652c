"""A second, independent forward pass in plain numpy (float64) for the parity goldens.

It exists to guard the transformers-based reference in make_goldens.py: if both agree, the goldens describe a
Baichuan/XVERSE decoder and not a quirk of how transformers was driven. Written from the architecture description
(LLaMA-style pre-norm decoder, RMSNorm, SwiGLU, half-rotation RoPE or ALiBi, optional NormHead), not from any
model's source.
"""
import math

import numpy as np


def alibi_slopes(num_heads):
    """ALiBi head slopes (Press et al.): for n a power of two, 2^(-8i/n) for i = 1..n.

    Otherwise take the n' = largest power of two below n slopes, then fill the remaining n - n' heads with every
    other slope (the 1st, 3rd, 5th, ...) of the 2n' set: the interleaved extension Baichuan2-13B uses.
    """
    def geometric(n):
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    base = 2 ** int(math.floor(math.log2(num_heads)))
    slopes = geometric(base)
    if base != num_heads:
        slopes += geometric(2 * base)[0::2][: num_heads - base]
    return np.array(slopes, dtype=np.float64)


def split_w_pack(w_pack, hidden_size):
    """W_pack stacks q, k and v on the output dimension."""
    return w_pack[:hidden_size], w_pack[hidden_size:2 * hidden_size], w_pack[2 * hidden_size:]


def rms_norm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rotate_half(x):
    """[x1, x2] -> [-x2, x1] on the two halves of the last axis (HF Llama convention)."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope(x, positions, base):
    """x [B, H, S, D]; positions [B, S]."""
    dim = x.shape[-1]
    inv_freq = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    angles = positions[..., None].astype(np.float64) * inv_freq          # [B, S, D/2]
    angles = np.concatenate([angles, angles], axis=-1)[:, None]            # [B, 1, S, D]
    return x * np.cos(angles) + rotate_half(x) * np.sin(angles)


def silu(x):
    return x / (1.0 + np.exp(-x))


def forward(weights, cfg, input_ids, attention_mask=None):
    """Logits [B, S, V] (float64).

    weights: HF names, q/k/v either separate or as W_pack, lm_head un-normalised.
    cfg: hidden_size, num_attention_heads, num_hidden_layers, rms_norm_eps, position ("rope" | "alibi"),
         rope_theta, norm_head.
    Padding is on the left; positions are cumsum(mask) - 1 clipped at 0. Query rows that are padding see no keys;
    their outputs are meaningless and callers should ignore them.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    head_dim = hidden // heads
    eps = cfg["rms_norm_eps"]
    ids = np.asarray(input_ids)
    batch, seq = ids.shape
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    positions = np.maximum(np.cumsum(mask, axis=-1) - 1, 0)

    # allowed[b, i, j]: query i may look at key j
    causal = np.tril(np.ones((seq, seq), dtype=bool))
    allowed = causal[None] & (mask[:, None, :] > 0)
    bias = np.where(allowed, 0.0, -1e30)[:, None]                          # [B, 1, S, S]
    if cfg["position"] == "alibi":
        # slope * absolute key index: differs from slope * (key - query) by a per-row constant, which softmax drops
        bias = bias + alibi_slopes(heads)[None, :, None, None] * np.arange(seq, dtype=np.float64)[None, None, None, :]

    def heads_first(t):
        return t.reshape(batch, seq, heads, head_dim).transpose(0, 2, 1, 3)

    x = w["model.embed_tokens.weight"][ids]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        if p + "self_attn.W_pack.weight" in w:
            wq, wk, wv = split_w_pack(w[p + "self_attn.W_pack.weight"], hidden)
        else:
            wq, wk, wv = (w[p + f"self_attn.{name}_proj.weight"] for name in "qkv")
        q, k, v = heads_first(h @ wq.T), heads_first(h @ wk.T), heads_first(h @ wv.T)
        if cfg["position"] == "rope":
            q, k = rope(q, positions, cfg["rope_theta"]), rope(k, positions, cfg["rope_theta"])
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(head_dim) + bias
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        attn = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, seq, hidden)
        x = x + attn @ w[p + "self_attn.o_proj.weight"].T

        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate = silu(h @ w[p + "mlp.gate_proj.weight"].T)
        x = x + (gate * (h @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T

    x = rms_norm(x, w["model.norm.weight"], eps)
    head = w["lm_head.weight"]
    if cfg["norm_head"]:
        head = head / np.maximum(np.linalg.norm(head, axis=-1, keepdims=True), 1e-12)
    return x @ head.T
