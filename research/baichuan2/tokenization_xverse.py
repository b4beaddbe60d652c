"""XverseTokenizer: XVERSE's BPE `tokenizer.json` (Hugging Face `tokenizers`) as a MindFormers `PreTrainedTokenizer`.

XVERSE ships no SentencePiece model: its tokenizer is a `tokenizer.json` read by the `tokenizers` library. This
class wraps that file so it can be used wherever mindformers expects a tokenizer (pipelines, AutoTokenizer with
`trust_remote_code=True`), exactly like BaichuanTokenizer for the SentencePiece families.

Special tokens are those of the public XVERSE-7B files: bos `<|startoftext|>` (id 2), eos `<|endoftext|>` (id 3),
pad `<pad>` (id 1); `<unk>` (id 0) exists but byte-level BPE never needs it. No BOS/EOS is added unless asked:
chat prompts ("Human: {q}\\n\\nAssistant: ") and training rows are built from plain text. Text is split around
special tokens first (they encode to their single ids wherever they appear), then each piece goes through the
`tokenizers` pipeline, so `encode` gives the same ids as `tokenizers.Tokenizer.encode(text).ids`.

This file imports nothing from the project (only mindformers, tokenizers and the standard library): it is copied
into model directories for `trust_remote_code=True`. Where mindformers is absent (a PyTorch environment) the same
class is built on transformers' `PreTrainedTokenizer`, so transformers' `AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)` and `apply_chat_template` give the same ids there.
"""
import json
import os
import shutil
from typing import List, Optional

from tokenizers import Tokenizer
try:  # MindSpore side: a MindFormers tokenizer, registered for its pipelines
    from mindformers.models.tokenization_utils import AddedToken, PreTrainedTokenizer
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    _register = MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
except ImportError:  # transformers alone (PyTorch tools): the same class on transformers' base, same ids
    from transformers import AddedToken, PreTrainedTokenizer

    def _register(cls):
        return cls

VOCAB_FILES_NAMES = {"tokenizer_file": "tokenizer.json"}
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "pad_token": "<pad>"}


def _added(token):
    # keep the spaces around special tokens: the text must survive a round trip
    return AddedToken(token, lstrip=False, rstrip=False, normalized=False) if isinstance(token, str) else token


@_register
class XverseTokenizer(PreTrainedTokenizer):
    """BPE tokenizer of the XVERSE family, read from a `tokenizer.json`.

    Args:
        tokenizer_file: path of the `tokenizer.json`.
        unk_token / bos_token / eos_token / pad_token: special tokens (XVERSE's by default).
        add_bos_token / add_eos_token: add bos / eos around encoded text (both off).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    FILE_LIST = ["tokenizer_config.json"]

    def __init__(self, tokenizer_file=None, unk_token="<unk>", bos_token="<|startoftext|>",
                 eos_token="<|endoftext|>", pad_token="<pad>", add_bos_token=False, add_eos_token=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        if not tokenizer_file or not os.path.isfile(tokenizer_file):
            raise FileNotFoundError(
                f"XverseTokenizer: tokenizer file {tokenizer_file!r} not found. Pass tokenizer_file=<path to "
                f"tokenizer.json>, or a directory holding tokenizer.json to from_pretrained().")
        self.tokenizer_file = tokenizer_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # the base class asks for the vocabulary while it initialises, so the file must be read first (named bpe:
        # transformers 5's base class uses `backend` for itself)
        self.bpe = Tokenizer.from_file(tokenizer_file)
        for name, token in (("unk", unk_token), ("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            if token is not None and self.bpe.token_to_id(str(token)) is None:
                raise ValueError(f"XverseTokenizer: {name}_token {str(token)!r} is not in {tokenizer_file}")
        super().__init__(unk_token=_added(unk_token), bos_token=_added(bos_token), eos_token=_added(eos_token),
                         pad_token=_added(pad_token), add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self):
        return self.bpe.get_vocab_size(with_added_tokens=True)

    def __len__(self):
        # the special tokens are already entries of tokenizer.json: do not count them twice
        return len(self.get_vocab())

    def get_vocab(self):
        vocab = dict(self.bpe.get_vocab(with_added_tokens=True))
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.bpe.encode(text, add_special_tokens=False).tokens

    def _convert_token_to_id(self, token):
        token_id = self.bpe.token_to_id(token)
        return self.bpe.token_to_id(str(self.unk_token)) if token_id is None else token_id

    def _convert_id_to_token(self, index):
        return self.bpe.id_to_token(int(index))

    def convert_tokens_to_string(self, tokens):
        # special tokens verbatim; runs of ordinary tokens through the byte-level decoder (joins split characters)
        out, run = [], []
        for token in tokens:
            if token in self.all_special_tokens:
                out.append(self.bpe.decoder.decode(run) + token)
                run = []
            else:
                run.append(token)
        out.append(self.bpe.decoder.decode(run))
        return "".join(out)

    def build_inputs_with_special_tokens(self, token_ids_0: List[int], token_ids_1: Optional[List[int]] = None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        output = bos + token_ids_0 + eos
        if token_ids_1 is not None:
            output += bos + token_ids_1 + eos
        return output

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0=token_ids_0, token_ids_1=token_ids_1,
                                                   already_has_special_tokens=True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        n_special = int(self.add_bos_token) + int(self.add_eos_token)
        types = [0] * (len(token_ids_0) + n_special)
        if token_ids_1 is not None:
            types += [1] * (len(token_ids_1) + n_special)
        return types

    def save_vocabulary(self, save_directory, filename_prefix=None):
        """Writes tokenizer.json into `save_directory`; returns (path,)."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"XverseTokenizer.save_vocabulary: {save_directory!r} is not a directory")
        out_file = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                                + VOCAB_FILES_NAMES["tokenizer_file"])
        if os.path.abspath(self.tokenizer_file) != os.path.abspath(out_file):
            if os.path.isfile(self.tokenizer_file):
                shutil.copyfile(self.tokenizer_file, out_file)
            else:  # the source file is gone: write the tokenizer we hold in memory
                self.bpe.save(out_file)
        return (out_file,)


def write_tokenizer_files(out_dir, tokenizer_file, model_max_length=None, chat_template=None):
    """Makes `out_dir` loadable by `XverseTokenizer.from_pretrained(out_dir)` and by mindformers'
    `AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)`: copies tokenizer.json and this file
    (tokenization_xverse.py, the `auto_map` target) and writes tokenizer_config.json (with `chat_template` when
    given). Returns the config dict."""
    if not os.path.isfile(tokenizer_file):
        raise FileNotFoundError(f"write_tokenizer_files: tokenizer file {tokenizer_file!r} not found "
                                f"(the bundled one is dataset/xverse/tokenizer.json)")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, VOCAB_FILES_NAMES["tokenizer_file"])
    if os.path.abspath(tokenizer_file) != os.path.abspath(target):
        shutil.copyfile(tokenizer_file, target)
    code_target = os.path.join(out_dir, "tokenization_xverse.py")
    if os.path.abspath(__file__) != os.path.abspath(code_target):
        shutil.copyfile(__file__, code_target)
    config = {"tokenizer_class": "XverseTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_xverse.XverseTokenizer", None]},
              "add_bos_token": False, "add_eos_token": False, **SPECIAL_TOKENS,
              "clean_up_tokenization_spaces": False}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if chat_template is not None:  # the Jinja template apply_chat_template renders (chat_format.py writes it)
        config["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return config
