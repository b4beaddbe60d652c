"""A Hugging Face fast tokenizer (`tokenizer.json`, the `tokenizers` library) from a SentencePiece BPE model.

Used by `convert_weight.py --reverse --to llama`, so a Llama export tokenizes with `PreTrainedTokenizerFast` (vLLM,
SGLang, transformers without remote code) exactly as our `BaichuanTokenizer` does. The SentencePiece model is read
piece by piece (ids kept) and rebuilt as:

- model: BPE over the same vocabulary, byte fallback on (characters outside it become `<0xNN>` pieces). SentencePiece
  BPE merges, at every step, the adjacent pair whose concatenation is the best-scored piece; `tokenizers` merges the
  pair of lowest merge rank. So every way of splitting a piece into two pieces is a merge, ranked by the score of
  the piece it makes (then by ids, to be deterministic).
- normalizer: spaces become `▁` (as SentencePiece escapes them); a dummy `▁` prefix, whitespace squeezing and the
  model's precompiled character map only when the model asks for them (Baichuan's asks for none).
- added tokens: the control pieces and `<unk>` as special tokens, user-defined pieces (Baichuan2's
  `<reserved_106>`/`<reserved_107>`) as plain added tokens: each encodes to its one id wherever it appears in text,
  which is what our tokenizer does (it splits text at its special tokens, SentencePiece matches user-defined pieces
  whole). No BOS/EOS is added (no post-processor), as in Baichuan.
- decoder: `▁` back to spaces, byte pieces joined into characters.

Only BPE models are handled (every Baichuan-family SentencePiece model is one); a unigram model is refused.
"""
import json
import os

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2


class TokenizerConversionError(ValueError):
    pass


def _model_proto(model_file):
    from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
    proto = sentencepiece_model_pb2.ModelProto()
    with open(model_file, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def merges_from_pieces(pieces):
    """BPE merges (left, right) for `pieces` [(piece, score, type)], best-scored result first."""
    ids = {piece: i for i, (piece, _, kind) in enumerate(pieces) if kind == _NORMAL}
    ranked = []
    for piece, score, kind in pieces:
        if kind != _NORMAL or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-score, ids[piece], ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def sentencepiece_to_tokenizer(model_file):
    """A `tokenizers.Tokenizer` giving the ids of the SentencePiece BPE model at `model_file`."""
    # pylint: disable=import-outside-toplevel
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    if not os.path.isfile(model_file):
        raise TokenizerConversionError(f"SentencePiece model {model_file} not found")
    proto = _model_proto(model_file)
    if proto.trainer_spec.model_type != _BPE:
        raise TokenizerConversionError(f"{model_file} is not a BPE SentencePiece model (model_type "
                                       f"{proto.trainer_spec.model_type}); only BPE models are converted")
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    unk = next((piece for piece, _, kind in pieces if kind == _UNKNOWN), "<unk>")
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges_from_pieces(pieces), unk_token=unk,
                                     fuse_unk=True, byte_fallback=bool(proto.trainer_spec.byte_fallback)))
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    tokenizer.normalizer = normalizers.Sequence(steps)
    tokenizer.pre_tokenizer = None
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(decode)
    tokenizer.add_special_tokens([AddedToken(piece, special=True, normalized=False)
                                  for piece, _, kind in pieces if kind in (_UNKNOWN, _CONTROL)])
    tokenizer.add_tokens([AddedToken(piece, special=False, normalized=False)
                          for piece, _, kind in pieces if kind == _USER_DEFINED])
    return tokenizer


def write_fast_tokenizer(out_dir, model_file=None, tokenizer_file=None, special_tokens=None, model_max_length=None,
                         chat_template=None, keep_model_file=True):
    """Writes tokenizer.json (from `model_file`, a SentencePiece model, or copied from `tokenizer_file`) and a
    tokenizer_config.json naming `PreTrainedTokenizerFast` (no remote code), with `special_tokens` (unk/bos/eos/pad
    names), no BOS/EOS added and `chat_template`. keep_model_file: also copy tokenizer.model (llama.cpp's converter
    reads it). Returns the tokenizer_config dict."""
    # pylint: disable=import-outside-toplevel
    import shutil
    from tokenizers import Tokenizer

    if (model_file is None) == (tokenizer_file is None):
        raise TypeError("write_fast_tokenizer takes exactly one of model_file= and tokenizer_file=")
    target = os.path.join(out_dir, "tokenizer.json")
    if model_file is not None:
        sentencepiece_to_tokenizer(model_file).save(target)
        if keep_model_file:
            shutil.copyfile(model_file, os.path.join(out_dir, "tokenizer.model"))
    else:
        Tokenizer.from_file(tokenizer_file)  # a damaged file fails here, not in the user's loader
        shutil.copyfile(tokenizer_file, target)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
              **(special_tokens or {}), "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return config
