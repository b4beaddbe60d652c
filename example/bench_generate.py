"""Generation speed, with and without the static KV cache, side by side.

    python example/bench_generate.py                 # configs S and M, on --device auto
    python example/bench_generate.py --configs S --threads 2

For each Baichuan2-shaped config (random weights, the device's inference dtype: float32 on CPU, GRAPH mode):
  prefill  batch 1, 512-token prompt: the cached prefill graph (fills the caches, logits of the last position only)
           and the plain forward (logits of every position, what a no-cache step costs)
  decode   32-token prompt, 64 new tokens, batch 1 and 4: tokens/s after the first token, with the cache and
           without (the no-cache step recomputes a fixed 128-slot buffer, so its cost is the same every step:
           it is timed over --no_cache_steps steps to keep the run short; --no_cache_steps 64 times them all)
Compilation is excluded (one warm-up run of each shape first).
"""
import argparse
import sys
import time

from baichuan2 import runtime


CONFIGS = {
    "S": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, intermediate_size=1376, vocab_size=32000,
              max_position_embeddings=1024, model_max_length=1024),
    "M": dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=16, intermediate_size=2816,
              vocab_size=125696, max_position_embeddings=1024, model_max_length=1024),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=["S", "M"], choices=sorted(CONFIGS))
    parser.add_argument("--no_cache_steps", type=int, default=16)
    runtime.add_device_argument(parser)
    return parser.parse_args(argv)


def timed_decode(generator, prompts, new_tokens, use_cache, steps=None):
    """Tokens/s of the steps after the first token (the first one includes the prefill)."""
    stream = generator.stream(prompts, max_new_tokens=new_tokens, eos_token_id=(), use_cache=use_cache)
    next(stream)
    start, count = time.perf_counter(), 0
    for count, _ in enumerate(stream, start=1):
        if steps and count >= steps:
            break
    return len(prompts) * count / (time.perf_counter() - start)


def bench_config(name, fields, args, compute_dtype):
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from baichuan2 import BaichuanConfig, BaichuanForCausalLM  # pylint: disable=import-outside-toplevel
    from baichuan2.generation import Generator  # pylint: disable=import-outside-toplevel

    config = BaichuanConfig.from_preset("baichuan2_7b", compute_dtype=compute_dtype, **fields)
    ms.set_seed(0)
    model = BaichuanForCausalLM(config)
    generator = Generator(model)
    rng = np.random.default_rng(0)
    row = {"config": name, "params": config.num_parameters()}

    # prefill, batch 1 x 512 tokens (warm-up compiles; then the best of 2)
    ids = rng.integers(3, config.vocab_size, size=(1, 512)).astype(np.int32)
    mask = np.ones_like(ids)
    k, v = model.empty_caches(1, 512 + 64)
    generator.prefill(ms.Tensor(ids), ms.Tensor(mask), k, v)[0].asnumpy()
    best = min(_seconds(lambda: generator.prefill(ms.Tensor(ids), ms.Tensor(mask), *model.empty_caches(1, 576))[0]
                        .asnumpy()) for _ in range(2))
    row["prefill_cache"] = 512 / best
    model(ms.Tensor(ids), attention_mask=ms.Tensor(mask)).asnumpy()
    best = min(_seconds(lambda: model(ms.Tensor(ids), attention_mask=ms.Tensor(mask)).asnumpy()) for _ in range(2))
    row["prefill_forward"] = 512 / best

    for batch in (1, 4):
        prompts = rng.integers(3, config.vocab_size, size=(batch, 32)).tolist()
        for use_cache in (True, False):
            steps = None if use_cache else args.no_cache_steps
            timed_decode(generator, prompts, 64, use_cache, steps=2)  # warm-up: compiles this shape
            row[f"decode_b{batch}_{'cache' if use_cache else 'nocache'}"] = timed_decode(
                generator, prompts, 64, use_cache, steps=steps)
    return row


def _seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    rt = runtime.setup_inference(args.device, mode="graph", threads=args.threads, prog="bench_generate.py")
    rows = [bench_config(name, CONFIGS[name], args, rt.compute_dtype) for name in args.configs]

    print(f"\n{rt.device}, {rt.compute_dtype}, random weights, GRAPH mode, {rt.threads} threads; "
          "tokens/s (compile excluded)")
    header = ["config", "params", "prefill 512 (cache)", "prefill 512 (forward)", "decode b1 cache",
              "decode b1 no-cache", "decode b4 cache", "decode b4 no-cache"]
    keys = ["prefill_cache", "prefill_forward", "decode_b1_cache", "decode_b1_nocache", "decode_b4_cache",
            "decode_b4_nocache"]
    print(" | ".join(header))
    for row in rows:
        cells = [row["config"], f"{row['params'] / 1e6:.0f}M"] + [f"{row[k]:.1f}" for k in keys]
        print(" | ".join(cells))
    for row in rows:
        print(f"{row['config']}: cache speed-up in decode x{row['decode_b1_cache'] / row['decode_b1_nocache']:.1f} "
              f"(batch 1), x{row['decode_b4_cache'] / row['decode_b4_nocache']:.1f} (batch 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
