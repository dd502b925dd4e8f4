"""The WordLevel tokenizer every offline-built family uses, in place of the real checkpoints' BPEs.

A BPE needs trained merges, a word list needs nothing. Pre-tokenization splits on whitespace, isolates punctuation
and digits, so "The answer is (B)." becomes known words. Decoding joins words with spaces and removes the space
before punctuation (WordPiece decoder with cleanup), which is lossy for text such as "( B )" but fine for answers.
A config's ``vocab_size`` pads the word list with filler words, so embedding, lm_head and logits keep their size.
"""

from __future__ import annotations

import string
from types import ModuleType

__all__ = ["BASE_WORDS", "family_tokenizer", "text_config_with_tokens"]

BASE_WORDS = (
    "the answer is a an of and or in on at to with this that what which how many where color colour shape "
    "image picture photo shows there are it its one two three four five six seven eight nine ten zero "
    "yes no true false circle square triangle star rectangle hexagon diamond ellipse oval cross heart "
    "red green blue yellow orange purple pink black white gray grey brown cyan magenta "
    "cat dog bird fish horse car tree house boat plane person flower "
    "left right top bottom center middle small large big "
    "question choices choice options option label labels number count please select pick only "
    "letter word answer correct i think see not none unknown"
).split()

PUNCTUATION = tuple(string.punctuation)
TEMPLATE_WORDS = ("User", "Assistant", "System", "user", "assistant", "system")


def _specials_list(spec: dict) -> list[str]:
    out = [spec["unk"], spec["pad"], spec["eos"]] + ([spec["bos"]] if spec["bos"] else []) + spec["extra"]
    return list(dict.fromkeys(out))


def _vocab_words(words) -> list[str]:
    base = list(TEMPLATE_WORDS) + list(string.ascii_uppercase) + list(string.ascii_lowercase)
    base += list(string.digits) + list(PUNCTUATION) + list(BASE_WORDS) + [w.capitalize() for w in BASE_WORDS]
    for w in words or ():
        base += _pre_tokenize(str(w))
    return list(dict.fromkeys(base))


def _pre_tokenizer():
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Punctuation(behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )


def _pre_tokenize(text: str) -> list[str]:
    return [piece for piece, _ in _pre_tokenizer().pre_tokenize_str(text)]


def _build(spec: dict, words, template: str, padding_side: str):
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = _specials_list(spec)
    vocab = {tok: i for i, tok in enumerate(specials + [w for w in _vocab_words(words) if w not in specials])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=spec["unk"]))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(specials)
    kwargs = {"unk_token": spec["unk"], "pad_token": spec["pad"], "eos_token": spec["eos"]}
    if spec["bos"]:
        kwargs["bos_token"] = spec["bos"]
    kwargs.update(spec.get("named", {}))  # model-specific named tokens (InternVL's start_image_token, ...)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, **kwargs)
    fast.add_special_tokens({"additional_special_tokens": spec["extra"]})
    fast.padding_side = padding_side
    return fast


def _filler_words(count: int) -> list[str]:
    """``count`` distinct lowercase letter strings (digits would be split by the pre-tokenizer)."""
    letters = string.ascii_lowercase
    words = []
    i = 0
    while len(words) < count:
        n, word = i, ""
        while True:
            word = letters[n % 26] + word
            n //= 26
            if n == 0:
                break
        words.append("zq" + word)
        i += 1
    return words


def family_tokenizer(family: ModuleType, words, vocab_size: int | None):
    """The WordLevel tokenizer of a family module (its ``SPECIAL``, ``TEMPLATE``, ``PADDING_SIDE``) with ``words``
    added, padded with filler words up to ``vocab_size``."""
    args = (family.SPECIAL, words, family.TEMPLATE, family.PADDING_SIDE)
    tokenizer = _build(*args)
    if vocab_size and len(tokenizer) < vocab_size:
        filled = [*(words or ()), *_filler_words(vocab_size - len(tokenizer))]
        tokenizer = _build(family.SPECIAL, filled, family.TEMPLATE, family.PADDING_SIDE)
    return tokenizer


def text_config_with_tokens(config: dict, tokenizer, **token_ids) -> dict:
    """The text config with a vocabulary that holds the tokenizer and the tokenizer's special ids."""
    text = dict(config["text_config"])
    text["vocab_size"] = max(text.get("vocab_size", 0), len(tokenizer))
    text.update(token_ids)
    return text
