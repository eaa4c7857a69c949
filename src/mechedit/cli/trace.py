"""`mechedit trace`: causal tracing of a fact."""

from __future__ import annotations

from mechedit.cli import app  # noqa: F401
