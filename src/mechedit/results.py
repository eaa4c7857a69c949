"""Persistence shared by every result type: JSON with a format tag, tensors as nested lists.

A result is a frozen dataclass that subclasses :class:`JsonResult`, sets ``FORMAT`` (e.g.
``"mechedit.patching/1"``) and implements ``to_json_dict`` / ``from_json_dict``. ``save`` and ``load`` then
behave the same everywhere: atomic write, a clear :class:`~mechedit.errors.DataFormatError` for a file that is
not JSON, not this kind of result, or missing a field.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import ClassVar, TypeVar

import torch

from mechedit.errors import DataFormatError

R = TypeVar("R", bound="JsonResult")


class JsonResult:
    FORMAT: ClassVar[str] = ""

    def to_json_dict(self) -> dict:  # pragma: no cover - every result overrides
        raise NotImplementedError

    @classmethod
    def from_json_dict(cls: type[R], d: dict) -> R:  # pragma: no cover - every result overrides
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON (atomically: a temp file beside ``path``, then renamed)."""
        path = Path(path)
        d = {"format": self.FORMAT, **self.to_json_dict()}
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(d))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls: type[R], path: str | Path) -> R:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise DataFormatError(f"{path}: no such file") from e
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataFormatError(f"{path}: not JSON ({e})") from e
        if not isinstance(d, dict) or d.get("format") != cls.FORMAT:
            got = d.get("format") if isinstance(d, dict) else type(d).__name__
            raise DataFormatError(f"{path}: not a {cls.__name__} (format {got!r}, expected {cls.FORMAT!r})")
        try:
            return cls.from_json_dict(d)
        except KeyError as e:
            raise DataFormatError(f"{path}: {cls.__name__} is missing field {e.args[0]!r}") from e


def tensor_from(value) -> torch.Tensor:
    """Nested lists (as saved) back to a float32 tensor."""
    return torch.tensor(value, dtype=torch.float32)
