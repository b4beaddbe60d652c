"""Scoring a multiple-choice item: the letter whose token has the highest next-token log-probability.

A scorer is any object with
    score(prompts, letters, style) -> array [len(prompts), len(letters)] of log-probabilities of each letter as
                                      the token following the prompt
    fits(prompt) -> bool              (optional) whether the prompt fits the model's context
Tests inject a fake one; `ModelScorer` runs a Baichuan-family model.

Which token is "the letter": the token the answer letter gets in the shots themselves. After "答案：" that is the
piece of "A"; after "Answer:" it is the piece of " A" (SentencePiece "▁A"), as the MMLU reference compares the
letters as they follow "Answer:". It is found by encoding prefix + letter and taking the one token added after the
prefix; when the tokenizer merges differently the bare letter piece is used (see `letter_tokens` in the report).
"""
import numpy as np

from .prompts import ANSWER_PREFIX, ANSWER_SEPARATOR


def predict(log_probs, letters, num_choices):
    """The chosen letter: argmax over the item's own options only (A-D for 4-option items)."""
    row = np.asarray(log_probs, dtype=np.float64)[:num_choices]
    return letters[int(np.argmax(row))]


def log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


class ModelScorer:
    """Next-token letter log-probabilities from a causal LM, prompts batched with LEFT padding.

    Args:
        model: a `BaichuanForCausalLM` ready for inference; `model(ids, attention_mask=mask)` -> logits [B, S, V].
        tokenizer: the model directory's tokenizer (adds no BOS/EOS).
        max_length: longest prompt in tokens (default: config.max_context); longer prompts keep their end.
        pad_multiple: batches are padded to a multiple of this length (fewer distinct shapes to compile).
    """

    def __init__(self, model, tokenizer, max_length=None, pad_multiple=16):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = int(max_length or model.config.max_context)
        self.pad_id = model.config.pad_token_id or 0
        self.pad_multiple = pad_multiple
        self.letter_tokens = {}     # style -> {letter: [piece, id]}, reported
        self.calls = 0
        self._encoded = {}
        self._letter_ids = {}
        # prompts are cut to max_length here; silence the tokenizer's own length warning
        tokenizer.model_max_length = 1 << 30

    @classmethod
    def from_model_dir(cls, model_dir, **kwargs):
        from ..runtime import load_model_dir
        model, tokenizer, _ = load_model_dir(model_dir)
        return cls(model, tokenizer, **kwargs)

    def encode(self, text):
        if text not in self._encoded:
            if len(self._encoded) > 4096:
                self._encoded.clear()
            self._encoded[text] = list(self.tokenizer.encode(text))
        return self._encoded[text]

    def fits(self, prompt):
        return len(self.encode(prompt)) <= self.max_length

    def _in_context_id(self, style, letter):
        """The one token the letter adds after the answer prefix, or None when it merges with the prefix or
        splits into several tokens."""
        prefix = ANSWER_PREFIX[style]
        base = self.tokenizer.encode(prefix)
        full = self.tokenizer.encode(prefix + ANSWER_SEPARATOR[style] + letter)
        return full[-1] if len(full) == len(base) + 1 and full[:len(base)] == base else None

    def letter_ids(self, letters, style):
        """Token ids of the letters for this prompt style; one form for all letters (all in-context pieces, or
        all bare letter pieces) so no letter is favoured by its tokenisation."""
        key = (style, letters)
        if key not in self._letter_ids:
            ids = [self._in_context_id(style, letter) for letter in letters]
            if None in ids:
                ids = []
                for letter in letters:
                    bare = self.tokenizer.encode(letter)
                    if len(bare) != 1:
                        raise ValueError(f"the tokenizer has no single token for the answer letter {letter!r}")
                    ids.append(bare[0])
            self._letter_ids[key] = [int(i) for i in ids]
            self.letter_tokens.setdefault(style, {}).update(
                {letter: [self.tokenizer.convert_ids_to_tokens(i), int(i)] for letter, i in zip(letters, ids)})
        return self._letter_ids[key]

    def score(self, prompts, letters, style):
        import mindspore as ms
        self.calls += 1
        letter_ids = self.letter_ids(letters, style)
        rows = [self.encode(p)[-self.max_length:] for p in prompts]
        width = max(len(r) for r in rows)
        width = min(-(-width // self.pad_multiple) * self.pad_multiple, self.max_length)
        ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):  # left padding: the last position is every prompt's last token
            ids[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
        logits = self.model(ms.Tensor(ids), attention_mask=ms.Tensor(mask))
        last = logits[:, -1, :].asnumpy()
        return log_softmax(last)[:, letter_ids]
