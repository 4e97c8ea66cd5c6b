"""nanogpt: train GPT language models from scratch with PyTorch Lightning, on characters or subword tokens.

The network and tokenizer import without Lightning; the training parts live in
nanogpt.training.module (LightningModule), nanogpt.data (LightningDataModule) and nanogpt.training.cli (LightningCLI).
"""

from nanogpt.errors import NanoGPTError
from nanogpt.model import GPT, GPTConfig
from nanogpt.tokenizers.char import CharTokenizer

__version__ = "0.1.0"
__all__ = ["GPT", "GPTConfig", "CharTokenizer", "NanoGPTError", "__version__"]
