"""BaichuanTokenizer: the Baichuan2 SentencePiece tokenizer as a MindFormers `PreTrainedTokenizer`.

Behaviour follows Hugging Face's Baichuan2 tokenizer: the SentencePiece model does all the work (no dummy prefix,
byte fallback), no BOS/EOS is added unless asked, `<unk>`/`<s>`/`</s>` are the unk/bos/eos tokens and padding
reuses `<unk>` (id 0). The chat role tokens `<reserved_106>`/`<reserved_107>` are ordinary pieces of the model, so
they encode to single ids wherever they appear in text (and decode back as text, as in Hugging Face).
One deliberate difference: decoding never inserts a space before special tokens, so decode(encode(text)) == text.

This file imports nothing from the project (only mindformers, sentencepiece and the standard library): it is copied
into model directories for `trust_remote_code=True`. Where mindformers is absent (a PyTorch environment) the same
class is built on transformers' `PreTrainedTokenizer`, so transformers' `AutoTokenizer.from_pretrained(dir,
trust_remote_code=True)` and `apply_chat_template` give the same ids there.
"""
import json
import os
import shutil
from typing import Any, Dict, List, Optional

import sentencepiece as spm
try:  # MindSpore side: a MindFormers tokenizer, registered for its pipelines
    from mindformers.models.tokenization_utils import AddedToken, PreTrainedTokenizer
    from mindformers.tools.register import MindFormerModuleType, MindFormerRegister
    _register = MindFormerRegister.register(MindFormerModuleType.TOKENIZER)
except ImportError:  # transformers alone (PyTorch tools): the same class on transformers' base, same ids
    from transformers import AddedToken, PreTrainedTokenizer

    def _register(cls):
        return cls

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}
SPECIAL_TOKENS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"}


def _added(token):
    # no stripping of neighbouring spaces: the text around a special token must survive a round trip
    return AddedToken(token, lstrip=False, rstrip=False, normalized=False) if isinstance(token, str) else token


@_register
class BaichuanTokenizer(PreTrainedTokenizer):
    """SentencePiece tokenizer of the Baichuan family.

    Args:
        vocab_file: path of the SentencePiece `tokenizer.model`.
        unk_token / bos_token / eos_token / pad_token: special tokens (pad defaults to `<unk>`, id 0).
        add_bos_token / add_eos_token: add `<s>` / `</s>` around encoded text (both off, as in Baichuan2).
        sp_model_kwargs: passed to `sentencepiece.SentencePieceProcessor` (e.g. sampling options).
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    FILE_LIST = ["tokenizer_config.json"]

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                 sp_model_kwargs: Optional[Dict[str, Any]] = None, add_bos_token=False, add_eos_token=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        if not vocab_file or not os.path.isfile(vocab_file):
            raise FileNotFoundError(
                f"BaichuanTokenizer: SentencePiece model {vocab_file!r} not found. Pass vocab_file=<path to "
                f"tokenizer.model>, or a directory holding tokenizer.model to from_pretrained().")
        self.vocab_file = vocab_file
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        # the base class asks for the vocabulary while it initialises, so the model must be loaded first
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)
        super().__init__(unk_token=_added(unk_token), bos_token=_added(bos_token), eos_token=_added(eos_token),
                         pad_token=_added(pad_token), add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         sp_model_kwargs=self.sp_model_kwargs,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    # SentencePiece processors do not pickle; keep the model bytes instead (needed by multiprocessing workers)
    def __getstate__(self):
        state = self.__dict__.copy()
        state["sp_model"] = None
        state["sp_model_proto"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state):
        self.__dict__ = state
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.LoadFromSerializedProto(self.__dict__.pop("sp_model_proto"))

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def __len__(self):
        # the base class counts <unk>/<s>/</s> twice (vocabulary + added tokens); they are pieces of the model
        return len(self.get_vocab())

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        # special tokens are written out verbatim; runs of ordinary pieces go through SentencePiece, which joins
        # byte-fallback pieces (<0xE4><0xBD><0xA0>) back into characters
        out, run = [], []
        for token in tokens:
            if token in self.all_special_tokens:
                out.append(self.sp_model.decode(run) + token)
                run = []
            else:
                run.append(token)
        out.append(self.sp_model.decode(run))
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
        """Copies the SentencePiece model into `save_directory`; returns (path,)."""
        if not os.path.isdir(save_directory):
            raise NotADirectoryError(f"BaichuanTokenizer.save_vocabulary: {save_directory!r} is not a directory")
        out_file = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "")
                                + VOCAB_FILES_NAMES["vocab_file"])
        if os.path.abspath(self.vocab_file) != os.path.abspath(out_file):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, out_file)
            else:  # the source file is gone: write the model we hold in memory
                with open(out_file, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (out_file,)


def write_tokenizer_files(out_dir, model_file, model_max_length=None, chat_template=None):
    """Makes `out_dir` loadable by `BaichuanTokenizer.from_pretrained(out_dir)` and by mindformers'
    `AutoTokenizer.from_pretrained(out_dir, trust_remote_code=True)`: copies the SentencePiece model to
    tokenizer.model, this file to tokenization_baichuan.py (the `auto_map` target, as in Hugging Face's Baichuan2
    directories) and writes tokenizer_config.json (with `chat_template` when given). Returns the config dict."""
    if not os.path.isfile(model_file):
        raise FileNotFoundError(f"write_tokenizer_files: SentencePiece model {model_file!r} not found "
                                f"(the bundled one is dataset/tokenizer.model)")
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, VOCAB_FILES_NAMES["vocab_file"])
    if os.path.abspath(model_file) != os.path.abspath(target):
        shutil.copyfile(model_file, target)
    code_target = os.path.join(out_dir, "tokenization_baichuan.py")
    if os.path.abspath(__file__) != os.path.abspath(code_target):
        shutil.copyfile(__file__, code_target)
    config = {"tokenizer_class": "BaichuanTokenizer",
              "auto_map": {"AutoTokenizer": ["tokenization_baichuan.BaichuanTokenizer", None]},
              "add_bos_token": False, "add_eos_token": False,
              **SPECIAL_TOKENS, "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}}
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    if chat_template is not None:  # the Jinja template apply_chat_template renders (chat_format.py writes it)
        config["chat_template"] = chat_template
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    return config
