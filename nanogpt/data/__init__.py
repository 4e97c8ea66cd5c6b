"""The data layer: any source read as a stream of documents (sources.py), encoded once into the memory-mapped token
cache (token_cache.py), another run's vocabulary reused (vocab.py), the training and validation splits (splits.py),
the global batch split over devices (batch_plan.py), and batches served to Lightning (datamodule.py, the only module
here that imports Lightning).

`nanogpt.data.TextDataModule` (and `CharDataModule`, its old name, which saved config.yaml files may name) is imported
on first use, so that importing the Lightning-free parts of this package stays free of Lightning.
"""

from typing import Any


def __getattr__(name: str) -> Any:
    if name in ("TextDataModule", "CharDataModule"):
        from nanogpt.data import datamodule

        return getattr(datamodule, name)
    raise AttributeError(f"module 'nanogpt.data' has no attribute {name!r}")
