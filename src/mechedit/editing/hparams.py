"""What every editor's hyperparameters share: a frozen dataclass, JSON round-trip, and ``key=value`` overrides.

Each editor defines its hyperparameters as ``@dataclass(frozen=True) class XHyperParams(HyperParams)`` with a
comment per field explaining the default, and validates them in ``__post_init__`` (raising
:class:`~mechedit.errors.InputError`), so bad values fail before any weight changes.

>>> from dataclasses import dataclass
>>> @dataclass(frozen=True)
... class H(HyperParams):
...     steps: int = 10
...     layers: tuple[int, ...] = (1, 2)
>>> H().with_overrides(["steps=3", "layers=[0, 4]"])
H(steps=3, layers=(0, 4))
>>> H.from_dict(H(steps=5).to_dict())
H(steps=5, layers=(1, 2))
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, fields, replace
from typing import Any

from mechedit.errors import DataFormatError, InputError


class HyperParams:
    """Mixin for frozen hyperparameter dataclasses: ``to_dict``/``from_dict`` (lists ↔ tuples) and
    ``with_overrides(["name=value", ...])`` (values parsed as JSON, else taken as a string) for the CLI."""

    def to_dict(self) -> dict:
        """Plain JSON-ready data (lists for tuples); :meth:`from_dict` inverts it."""
        return json.loads(json.dumps(asdict(self)))  # tuples -> lists, recursively

    @classmethod
    def from_dict(cls, d: dict) -> Any:
        if not isinstance(d, dict):
            raise DataFormatError(f"{cls.__name__}: expected a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise DataFormatError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: _tuples(v) for k, v in d.items()})

    def with_overrides(self, items: list[str] | dict) -> Any:
        """A copy with fields replaced: ``["steps=20", "layers=[1,2]", "modules=auto"]`` or a dict."""
        known = {f.name for f in fields(self)}
        values = {}
        pairs = items.items() if isinstance(items, dict) else [_split(i) for i in items]
        for key, raw in pairs:
            if key not in known:
                raise InputError(f"{type(self).__name__} has no field {key!r}; known: {', '.join(sorted(known))}")
            values[key] = _parse(raw) if isinstance(raw, str) and not isinstance(items, dict) else raw
        return replace(self, **{k: _tuples(v) for k, v in values.items()})


def _split(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise InputError(f"hyperparameter {item!r}: write it as name=value")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def _parse(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


# -- field checks shared by the editors' __post_init__ ---------------------------------------------------------


def is_number(x) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def is_positive(x) -> bool:
    """A finite number above 0."""
    return is_number(x) and x > 0


def check_layers_field(layers) -> None:
    """A ``layers`` field: None (every layer) or a non-empty tuple of layer indices."""
    if layers is None:
        return
    if (not isinstance(layers, tuple) or not layers
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)):
        raise InputError(f"layers must be a non-empty list of layer indices (integers >= 0) or None, got {layers!r}")


def check_modules_field(modules, allow_none: bool = False) -> None:
    """A ``modules`` field: a module-set name ('auto', 'all', 'mlp' ...) or a non-empty tuple of names."""
    if modules is None and allow_none:
        return
    if isinstance(modules, str):
        if not modules.strip():
            raise InputError("modules is an empty string; name a module set such as 'mlp' or 'all'")
        return
    if not isinstance(modules, tuple) or not modules:
        raise InputError(f"the module set is empty or malformed ({modules!r}); name at least one module, or use "
                         "'mlp', 'attn', 'all' or 'auto'")
    if not all(isinstance(m, str) and m.strip() for m in modules):
        raise InputError(f"module names must be non-empty strings, got {modules!r}")
