"""Trains the bundled tiny XVERSE-style tokenizer (dataset/xverse/tokenizer.json) from bundled text.

XVERSE ships its tokenizer as a Hugging Face `tokenizer.json` (BPE, read by the `tokenizers` library), not as a
SentencePiece model. Special tokens follow the public XVERSE-7B files: `special_tokens_map.json` names
bos `<|startoftext|>`, eos `<|endoftext|>`, pad `<pad>`, and `config.json` gives them ids 2, 3 and 1. Id 0 is
not named in those files; here it holds `<unk>` (never produced: byte-level BPE can encode any text).

    <unk>=0  <pad>=1  <|startoftext|>=2  <|endoftext|>=3  then the 256 byte symbols, then 740 merges

One deliberate difference from the real tokenizer: this one is byte-level BPE (GPT-2 style pre-tokenisation)
rather than XVERSE's SentencePiece-converted Metaspace + byte fallback; both encode every UTF-8 string, and only
the ids matter to the model. The training text is the bundled BELLE sample laid out in the XVERSE chat format
("Human: {q}\\n\\nAssistant: {a}") plus dataset/tokenizer_corpus.txt, in file order, so "Human", "Assistant" and
"\\n\\n" become tokens of their own. Training runs on one thread over a fixed line list: reruns write the same bytes.

    python dataset/train_xverse_tokenizer.py [--out dataset/xverse/tokenizer.json]
"""
import argparse
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 1000
SPECIAL_TOKENS = ["<unk>", "<pad>", "<|startoftext|>", "<|endoftext|>"]  # ids 0..3, in this order
USER_PREFIX, ASSISTANT_PREFIX = "Human: ", "\n\nAssistant: "


def corpus_texts(belle_path, text_path):
    """One training text per BELLE conversation (in the XVERSE chat layout), then every line of the .txt file."""
    missing = [p for p in (belle_path, text_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"train_xverse_tokenizer: corpus file(s) not found: {missing}; "
                                f"run dataset/make_belle_sample.py first")
    texts = []
    with open(belle_path, encoding="utf-8") as f:
        for record in json.load(f):
            parts = []
            for turn in record["conversations"]:
                prefix = USER_PREFIX if turn["from"] in ("human", "user") else ASSISTANT_PREFIX
                parts.append(prefix + turn["value"])
            texts.append("".join(parts))
    with open(text_path, encoding="utf-8") as f:
        texts += [line.rstrip("\n") for line in f if line.strip()]
    return texts


def train(texts, vocab_size=VOCAB_SIZE):
    """Returns the tokenizer.json text."""
    # one worker thread: the merge order must not depend on scheduling (must be set before tokenizers starts)
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer.to_str(pretty=True)


def check(tokenizer_json, vocab_size=VOCAB_SIZE):
    """Raises AssertionError unless the tokenizer has the documented size and special ids."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tokenizer_json)
    assert tok.get_vocab_size() == vocab_size, f"vocab {tok.get_vocab_size()}, expected {vocab_size}"
    for token_id, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == token_id, (token, tok.token_to_id(token))
    text = "Human: 你是谁?\n\nAssistant: 我是一个助手。"
    assert tok.decode(tok.encode(text).ids) == text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--belle", default=os.path.join(HERE, "belle_sample.json"))
    parser.add_argument("--text", default=os.path.join(HERE, "tokenizer_corpus.txt"))
    parser.add_argument("--out", default=os.path.join(HERE, "xverse", "tokenizer.json"))
    args = parser.parse_args(argv)
    data = train(corpus_texts(args.belle, args.text))
    check(data)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(data + "\n")
    print(f"wrote {args.out}: vocab {VOCAB_SIZE}, {len(data)} characters")


if __name__ == "__main__":
    main()
