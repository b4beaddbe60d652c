"""Trains the bundled tiny SentencePiece tokenizer (dataset/tokenizer.model) from bundled text.

Settings mirror Baichuan2's tokenizer at a toy size: BPE, byte fallback (any UTF-8 text encodes, rare characters
become <0xNN> byte pieces), no dummy prefix, whitespace kept as is, identity normalisation, digits split one by
one, <unk>=0 <s>=1 </s>=2 (pad reuses <unk>), and the chat role tokens <reserved_106>/<reserved_107> as single
pieces. Training is single-threaded over a fixed, unshuffled sentence list, so reruns give the same bytes.

    python dataset/train_tokenizer.py [--corpus dataset/belle_sample.json ...] [--out dataset/tokenizer.model]
"""
import argparse
import io
import json
import os

import sentencepiece as spm

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB_SIZE = 1000
ROLE_TOKENS = ["<reserved_106>", "<reserved_107>"]


def corpus_lines(paths):
    """Text lines from BELLE json files (every turn's value) and plain .txt files (every non-empty line)."""
    for path in paths:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                for record in json.load(f):
                    for turn in record["conversations"]:
                        yield from (line for line in turn["value"].splitlines() if line.strip())
        else:
            with open(path, encoding="utf-8") as f:
                yield from (line.rstrip("\n") for line in f if line.strip())


def train(paths, vocab_size=VOCAB_SIZE):
    """Returns the serialized model bytes."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"train_tokenizer: corpus file(s) not found: {missing}; "
                                f"run dataset/make_belle_sample.py first or pass --corpus")
    lines = list(corpus_lines(paths))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model,
        model_type="bpe", vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, character_coverage=0.9995, max_sentencepiece_length=16,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=ROLE_TOKENS,
        # determinism: one thread, every sentence, no sampling/shuffling
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, seed_sentencepiece_size=1000000,
        minloglevel=2,
    )
    return model.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", nargs="+",
                        default=[os.path.join(HERE, "belle_sample.json"), os.path.join(HERE, "tokenizer_corpus.txt")])
    parser.add_argument("--out", default=os.path.join(HERE, "tokenizer.model"))
    args = parser.parse_args(argv)
    data = train(args.corpus)
    sp = spm.SentencePieceProcessor(model_proto=data)
    assert sp.get_piece_size() == VOCAB_SIZE, sp.get_piece_size()
    for piece in ROLE_TOKENS:
        assert sp.encode(piece) == [sp.piece_to_id(piece)], f"{piece} is not a single piece"
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"wrote {args.out}: vocab {sp.get_piece_size()}, {len(data)} bytes")


if __name__ == "__main__":
    main()
