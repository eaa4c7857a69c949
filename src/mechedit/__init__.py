"""mechedit: locate where a language model stores a fact, show it, edit it surgically, prove nothing else moved.

Importing this package does nothing but define names: heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it (imported on first access)
_EXPORTS = {
    "load": "mechedit.model",
    "from_hf": "mechedit.model",
    "LoadedModel": "mechedit.model",
    "Site": "mechedit.sites",
    "MecheditError": "mechedit.errors",
    "World": "mechedit.toy.world",
    "EditRecord": "mechedit.data",
    "read_counterfact": "mechedit.data",
    "write_counterfact": "mechedit.data",
    "read_known": "mechedit.data",
    "locate": "mechedit.locating",
    "rome": "mechedit.editing",
    "EditHandle": "mechedit.editing",
    "causal_trace": "mechedit.tracing",
    "answers": "mechedit.answering",
    "evaluate": "mechedit.evaluation",
    "edit": "mechedit.editing",
    "layer_sweep": "mechedit.editing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mechedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
