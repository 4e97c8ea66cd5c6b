"""`hf:NAME`: files of a Hugging Face model repository, by one policy for tokenizers and whole models alike.

The local Hugging Face cache comes first and is all that is read when it holds the files (so a cached name
works offline); otherwise, unless HF_HUB_OFFLINE is set, the files asked for are downloaded once into it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from nanogpt.errors import NanoGPTError, first_line


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def hub_folder(name: str, patterns: Sequence[str], required: str) -> Path:
    """The snapshot folder of Hugging Face model repository name holding the files that match patterns, from the
    cache when required (one of them) is there, else downloaded; an error says what to do without a network."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, local_files_only=True, allow_patterns=list(patterns)))
        if (folder / required).is_file():
            return folder
    except Exception:  # not in the cache (LocalEntryNotFoundError) or no valid ref there: try the network once
        pass
    if hub_offline():
        error = "HF_HUB_OFFLINE is set"
    else:
        try:
            folder = Path(snapshot_download(name, allow_patterns=list(patterns)))
            if (folder / required).is_file():
                return folder
            error = f"the repository has no {required}"
        except Exception as e:  # connection, unknown repository, gated model: one line says which
            error = first_line(e)[:200]
    from huggingface_hub.constants import HF_HUB_CACHE

    raise NanoGPTError(
        f"hf:{name} is not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be downloaded ({error}); "
        f"check the name {name!r}, and without a network put its files in the local Hugging Face cache "
        f"(`hf download {name}` on a machine with a network once), or pass a local folder"
    )
