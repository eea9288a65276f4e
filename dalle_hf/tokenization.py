"""The prompt tokenizer: a BPE trained with `tokenizers` on the training captions, used as a transformers fast tokenizer.

Words keep their own token when they were frequent in training; any other word falls apart into sub-word pieces
(`##` marks a piece inside a word). That makes "has the model seen this word?" a question the tokenizer answers:
see `unknown_words`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789")


def train_tokenizer(captions: Iterable[str], vocab_size: int = 512, max_length: int = 32) -> PreTrainedTokenizerFast:
    """Train a BPE on `captions` and wrap it as a fast tokenizer that adds `<s> ... </s>` around each prompt."""
    if not isinstance(vocab_size, int) or vocab_size < len(_ALPHABET) + len(SPECIAL_TOKENS):
        raise ValueError(f"`vocab_size` must be an int >= {len(_ALPHABET) + len(SPECIAL_TOKENS)}, got {vocab_size!r}.")
    bpe = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"], continuing_subword_prefix="##"))
    bpe.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=_ALPHABET,
        limit_alphabet=len(_ALPHABET),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    bpe.train_from_iterator(captions, trainer=trainer)
    bos, eos = SPECIAL_TOKENS["bos_token"], SPECIAL_TOKENS["eos_token"]
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, bpe.token_to_id(bos)), (eos, bpe.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe, model_max_length=max_length, **SPECIAL_TOKENS)


def prompt_words(tokenizer, prompt: str) -> list[str]:
    """The prompt's words, normalised and split as the tokenizer splits them (punctuation dropped)."""
    backend = tokenizer.backend_tokenizer
    text = backend.normalizer.normalize_str(prompt) if backend.normalizer is not None else prompt.lower()
    return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(text) if re.search(r"\w", w)]


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of `prompt` that are not whole tokens of the vocabulary: the model never learned them as words."""
    unknown = []
    for word in prompt_words(tokenizer, prompt):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if (len(ids) != 1 or ids[0] == tokenizer.unk_token_id) and word not in unknown:
            unknown.append(word)
    return unknown
