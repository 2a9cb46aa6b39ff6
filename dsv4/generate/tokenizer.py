"""The checkpoint's tokenizer (`tokenizer.json`, read with the `tokenizers` library; no network)."""
from __future__ import annotations

import functools
import json
import os

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    """encode/decode plus the BOS/EOS ids from `tokenizer_config.json` or `config.json`."""

    def __init__(self, tok: _HFTokenizer, bos_id: int | None, eos_id: int | None):
        self.tok, self.bos_id, self.eos_id = tok, bos_id, eos_id

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        tok = _HFTokenizer.from_file(file)
        folder = os.path.dirname(file)
        bos, eos = _special_ids(folder, tok)
        return cls(tok, bos, eos)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @functools.cached_property
    def id_limit(self) -> int:
        """One past the largest id that has a token: larger ids (a model's vocabulary padded past its tokenizer's,
        or a random model's) decode to nothing."""
        return max(self.tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str, bos: bool = False) -> list[int]:
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, text: str) -> int | None:
        return self.tok.token_to_id(text)


def _special_ids(folder: str, tok: _HFTokenizer) -> tuple[int | None, int | None]:
    """BOS/EOS ids: tokenizer_config.json's token strings, else config.json's ids."""
    ids: list[int | None] = [None, None]
    cfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            d = json.load(f)
        for i, key in enumerate(("bos_token", "eos_token")):
            t = d.get(key)
            t = t.get("content") if isinstance(t, dict) else t
            if t is not None:
                ids[i] = tok.token_to_id(t)
    model_cfg = os.path.join(folder, "config.json")
    if os.path.isfile(model_cfg) and None in ids:
        with open(model_cfg) as f:
            d = json.load(f)
        for i, key in enumerate(("bos_token_id", "eos_token_id")):
            if ids[i] is None and isinstance(d.get(key), int):
                ids[i] = d[key]
    return ids[0], ids[1]
