"""Text <-> token ids for the generate CLI: a checkpoint's tokenizer.json through the `tokenizers`
package when there is one, else UTF-8 bytes (ids 0..255)."""
from __future__ import annotations

import os
from typing import List, Optional


class ByteTokenizer:
    """One token per UTF-8 byte. Ids >= 256 (a model's extra tokens) decode to nothing."""

    n_byte_tokens = 256

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: List[int]) -> str:
        return bytes(i for i in ids if 0 <= i < self.n_byte_tokens).decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer.json file (Hugging Face `tokenizers`); special tokens are skipped when decoding."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer  # only needed for checkpoints that ship one

        try:
            self.tokenizer = Tokenizer.from_file(path)
        except Exception as exc:  # noqa: BLE001  (tokenizers raises a bare Exception for a malformed file)
            raise ValueError(f"tokenizer file {path} could not be read ({exc}); expected a Hugging Face tokenizers "
                             "JSON file (tokenizer.json, as saved by tokenizers.Tokenizer.save)") from None

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: List[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: Optional[str], vocab_size: int):
    """model_dir's tokenizer.json if it has one, else bytes (which needs vocab_size >= 256)."""
    path = os.path.join(model_dir, "tokenizer.json") if model_dir else None
    if path and os.path.isfile(path):
        return HFTokenizer(path)
    if vocab_size < ByteTokenizer.n_byte_tokens:
        raise ValueError(f"no tokenizer.json in {model_dir} and the vocabulary ({vocab_size}) is too small for "
                         f"byte tokens ({ByteTokenizer.n_byte_tokens})")
    return ByteTokenizer()
