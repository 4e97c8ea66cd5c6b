"""The old home of GPTFSDPStrategy: saved config.yaml files and configs name it as
`nanogpt.distributed.GPTFSDPStrategy`, so that class path keeps working. The code is nanogpt/training/strategies.py."""

from nanogpt.training.strategies import GPTFSDPStrategy

__all__ = ["GPTFSDPStrategy"]
