"""Train a byte-level BPE tokenizer with the `tokenizers` library (no network), with V4's special tokens at
the ids the official tokenizer uses for BOS/EOS (0 and 1) and the chat-format markers after them."""
from __future__ import annotations

import json
import os
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ..generate.tokenizer import Tokenizer

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]


def train_bpe(texts: Iterable[str], vocab_size: int, directory: str | os.PathLike | None = None) -> Tokenizer:
    """Byte-level BPE of `vocab_size` entries (special tokens included) trained on `texts`; saved as
    `tokenizer.json` + `tokenizer_config.json` in `directory` when given."""
    if vocab_size < 256 + len(SPECIAL):
        raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL)} (bytes + special tokens)")
    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    if directory is not None:
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tok.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
            json.dump({"bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
                       "tokenizer_class": "PreTrainedTokenizerFast"}, f, indent=2)
    return Tokenizer(tok, tok.token_to_id(BOS), tok.token_to_id(EOS))
