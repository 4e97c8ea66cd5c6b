"""Hugging Face GPT-2 interop: a GPT-2 folder or `hf:NAME` into our model (pretrained.py), and a checkpoint out to a
folder transformers loads (export.py). No Lightning."""
