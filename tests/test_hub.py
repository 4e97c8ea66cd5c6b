"""hf:NAME has one resolution policy (nanogpt/hub.py) for a tokenizer and a whole model: the cache first, then one
download, and the same one-line error when neither works."""

import pytest

from nanogpt.errors import NanoGPTError
from nanogpt.hf.pretrained import resolve_pretrained
from nanogpt.hub import hub_folder
from nanogpt.tokenizers.bpe import SubwordTokenizer


def message(call) -> str:
    with pytest.raises(NanoGPTError) as e:
        call()
    return str(e.value)


def test_a_tokenizer_and_a_model_are_looked_up_alike(tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    rev = "0" * 40
    snapshot = cache / "models--someone--tiny" / "snapshots" / rev
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")  # a model cached without its tokenizer
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text(rev)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert hub_folder("someone/tiny", ["config.json"], "config.json") == snapshot  # offline (conftest): the cache
    assert resolve_pretrained("hf:someone/tiny") == snapshot
    # the file asked for is not in the cache and the network is off: both say so the same way
    tokenizer = message(lambda: SubwordTokenizer.from_hub("someone/tiny"))
    model = message(lambda: resolve_pretrained("hf:other/model"))
    for text, name in ((tokenizer, "someone/tiny"), (model, "other/model")):
        assert text.startswith(f"hf:{name} is not in the Hugging Face cache ({cache})")
        assert "HF_HUB_OFFLINE is set" in text and f"`hf download {name}`" in text
