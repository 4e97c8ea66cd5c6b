"""Tokenizers, stored in full inside every checkpoint: one token per character (char.py, the default), a byte-level
BPE or any Hugging Face tokenizer.json (bpe.py), and tiktoken encoding a corpus for GPT-2-style BPEs
(tiktoken_bpe.py). Plain Python and numpy: no Lightning."""
