"""Reused vocabularies (--data.vocab): the tokenizer (characters or subwords) of a checkpoint, a run dir or a .json file.

Fine-tuning on new text keeps the vocabulary the model was trained with instead of building one from the text.
"""

from __future__ import annotations

import json
from pathlib import Path

from nanogpt.errors import NanoGPTError
from nanogpt.io import resolve_checkpoint, safe_load
from nanogpt.tokenizers.char import Tokenizer, tokenizer_from_dict


def load_vocab(path: str) -> Tokenizer:
    """The vocabulary stored in a checkpoint, a run dir (its best, else last, checkpoint) or a .json file.

    A .json file holds a tokenizer dict ({"type": "char", "chars": [...]}, or {"type": "subword", "json": ...})
    or an object with one under "tokenizer" (as a corpus cache entry's meta.json does).
    """
    p = Path(path).expanduser()
    if p.suffix.lower() == ".json" and p.is_file():
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise NanoGPTError(f"vocabulary file {path} is not valid JSON ({e})") from None
        if isinstance(d, dict) and "tokenizer" in d:
            d = d["tokenizer"]
        try:
            return tokenizer_from_dict(d)
        except NanoGPTError as e:
            raise NanoGPTError(f"vocabulary file {path}: {e}") from None
    if not p.exists():
        raise NanoGPTError(f"--data.vocab {path} does not exist; pass a checkpoint, a run dir or a vocabulary .json")
    file = resolve_checkpoint(path)
    try:  # plain data only, and memory-mapped: the weights are never read
        ckpt = safe_load(file, mmap=True)
    except NanoGPTError as e:  # unreadable, empty, damaged or unsafe: the reader's one line says which
        raise NanoGPTError(f"--data.vocab {file} is not a readable checkpoint ({e})") from None
    if not isinstance(ckpt, dict) or "tokenizer" not in ckpt:
        raise NanoGPTError(f"--data.vocab {file}: the checkpoint stores no vocabulary; pass one written by train.py")
    try:
        return tokenizer_from_dict(ckpt["tokenizer"])
    except NanoGPTError as e:
        raise NanoGPTError(f"--data.vocab {file}: {e}") from None
