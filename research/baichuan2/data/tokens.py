"""Tokenizer access for labelling: text -> ids, and the special token ids a chat format needs.

--model_file is a SentencePiece tokenizer.model (Baichuan families) or a Hugging Face tokenizer.json (XVERSE).
"""
from ..chat_format import XVERSE_EOS
from .errors import DataError


def default_template(model_file):
    """The chat format a tokenizer file implies: .json -> xverse, anything else -> baichuan2."""
    return "xverse" if model_file.endswith(".json") else "baichuan2"


def load_encoder(model_file):
    """text -> ids of a SentencePiece model or (for a .json file) a Hugging Face tokenizer.json, no bos/eos added."""
    # pylint: disable=import-outside-toplevel
    if model_file.endswith(".json"):
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(model_file)
        return lambda text: tok.encode(text, add_special_tokens=False).ids
    import sentencepiece as spm
    return spm.SentencePieceProcessor(model_file=model_file).encode


def resolve_token(sp, value, flag):
    """Id of a role token given as a piece ('<reserved_106>') or an id ('195'); must be one piece of the model."""
    if value.isdigit():
        token_id = int(value)
        if token_id >= sp.get_piece_size():
            raise DataError("config", f"{flag} {value}: id is outside the vocabulary (size {sp.get_piece_size()})")
        return token_id
    token_id = sp.piece_to_id(value)
    if token_id == sp.unk_id() or sp.encode(value) != [token_id]:
        raise DataError("config", f"{flag} {value!r} is not a single piece of the tokenizer (it encodes to "
                                  f"{sp.encode(value)}); pass a piece of the model or its id")
    return token_id


def baichuan2_ids(model_file, user_token, assistant_token):
    """Role, eos and pad ids of a SentencePiece model (pad falls back to unk when the model has none)."""
    import sentencepiece as spm  # pylint: disable=import-outside-toplevel
    if model_file.endswith(".json"):
        raise DataError("config", f"--template baichuan2 needs a SentencePiece tokenizer.model, got {model_file}")
    sp = spm.SentencePieceProcessor(model_file=model_file)
    return {"user": resolve_token(sp, user_token, "--user_token"),
            "assistant": resolve_token(sp, assistant_token, "--assistant_token"),
            "eos": sp.eos_id(), "pad": sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()}


def xverse_ids(model_file):
    """eos/pad ids of an XVERSE tokenizer.json (`<|endoftext|>`, `<pad>`); both must exist."""
    if not model_file.endswith(".json"):
        raise DataError("config", f"--template xverse needs a Hugging Face tokenizer.json, got {model_file}")
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    try:
        tok = Tokenizer.from_file(model_file)
    except Exception as e:  # the tokenizers library raises bare Exceptions for unreadable files
        raise DataError("config", f"--model_file {model_file}: not a readable tokenizer.json ({e})") from None
    ids = {"eos": tok.token_to_id(XVERSE_EOS.piece), "pad": tok.token_to_id("<pad>")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise DataError("config", f"--model_file {model_file}: no {' / '.join(missing)} token "
                                  f"(XVERSE uses <|endoftext|> as eos and <pad> as pad)")
    return ids


def template_ids(template, model_file, user_token, assistant_token):
    """The token ids rows in `template` are labelled with; DataError when the tokenizer does not fit."""
    if template == "xverse":
        return xverse_ids(model_file)
    return baichuan2_ids(model_file, user_token, assistant_token)
