"""`mechedit demo`: the main job on the embedded model."""

from __future__ import annotations

from mechedit.cli import app  # noqa: F401
