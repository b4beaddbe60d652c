"""A synthetic vocabulary that gives every id of a large embedding a distinct, printable piece of text.

Random-weight benchmarks at real size (a 125,696-row head) emit arbitrary ids; with a small tokenizer most ids
would have no text and a server could not answer. Both sides of a side-by-side benchmark use these same pieces:
our random model directory's tokenizer and the random GGUF for llama.cpp (example/make_random_gguf.py).

`pieces(vocab_size)` -> list of `vocab_size` distinct strings, in id order, SentencePiece conventions:
  0 "<unk>", 1 "<s>", 2 "</s>"               specials (unknown, BOS, EOS), as Baichuan2's ids 0..2
  3 "\\n"                                      newline (llama.cpp looks for one in an SPM vocabulary)
  "▁" and the other printable ASCII characters  so any ASCII text tokenises without unknowns
  then "▁" + w and w for the lowercase strings w of length 1, 2, 3, ... in order (a..z, aa..zz, ...), skipping
  the single letters already present: word-start and word-continuation pieces, decoding to plain words
`scores(vocab_size)` -> SentencePiece-style log scores (earlier pieces score higher), and `SPECIAL_IDS`.
`sentencepiece_model(vocab_size)` -> a serialized SentencePiece model of these pieces (a tokenizer.model).
Pure Python (sentencepiece's protobuf for the last only; importable without MindSpore), deterministic.
"""
import itertools
import string

SPACE = "\u2581"  # SentencePiece's word-boundary mark
SPECIALS = ("<unk>", "<s>", "</s>")
SPECIAL_IDS = {"unk": 0, "bos": 1, "eos": 2}


def _stream():
    yield from SPECIALS
    yield "\n"
    yield SPACE
    singles = [c for c in string.printable if c.isprintable() and c != " "]  # 94 printable ASCII characters
    yield from singles
    for length in itertools.count(1):
        for letters in itertools.product(string.ascii_lowercase, repeat=length):
            word = "".join(letters)
            yield SPACE + word
            if length > 1:
                yield word


def pieces(vocab_size):
    """The first `vocab_size` pieces (see the module docstring); at least the 3 specials."""
    if vocab_size < len(SPECIALS):
        raise ValueError(f"vocab_size must be at least {len(SPECIALS)} (the special pieces); got {vocab_size}")
    return list(itertools.islice(_stream(), vocab_size))


def scores(vocab_size):
    """Log-probability-like scores for the pieces, decreasing with the id (specials 0.0)."""
    return [0.0 if i < len(SPECIALS) else -float(i) for i in range(vocab_size)]


def sentencepiece_model(vocab_size):
    """Serialized SentencePiece model (BPE, the Baichuan2 tokenizer's normalisation: none, whitespace kept, no dummy
    prefix) whose pieces are pieces(vocab_size), id for id: <unk> <s> </s>, then pieces that all
    decode to text. Scores rank the pieces as scores() does, as llama.cpp's SPM tokenizer reads them."""
    from sentencepiece import sentencepiece_model_pb2 as pb  # pylint: disable=import-outside-toplevel
    proto = pb.ModelProto()
    kind = pb.ModelProto.SentencePiece
    types = {SPECIAL_IDS["unk"]: kind.UNKNOWN, SPECIAL_IDS["bos"]: kind.CONTROL, SPECIAL_IDS["eos"]: kind.CONTROL}
    for i, (piece, score) in enumerate(zip(pieces(vocab_size), scores(vocab_size))):
        proto.pieces.add(piece=piece, score=score, type=types.get(i, kind.NORMAL))
    spec = proto.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE
    spec.vocab_size = vocab_size
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = SPECIAL_IDS["unk"], SPECIAL_IDS["bos"], SPECIAL_IDS["eos"], -1
    spec.byte_fallback = False
    spec.allow_whitespace_only_pieces = True
    spec.split_digits = True
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = False
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()
