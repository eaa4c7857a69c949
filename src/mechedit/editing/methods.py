"""The editing methods by name: one table, used by :func:`edit`, ``mechedit edit`` and ``mechedit eval``.

Every editor is a function ``editor(model, request_or_requests, hparams, progress=None) -> EditHandle`` that
edits ``model`` in place and returns the applied handle. A *batched* editor takes a list of
:class:`~mechedit.data.EditRecord` (all requests in one edit); the others take one record. Editors are imported
only when used.

>>> import mechedit
>>> from mechedit.editing.methods import edit
>>> m = mechedit.load()                                                       # doctest: +SKIP
>>> with edit(m, [request], "lora", {"rank": 4}) as handle:                  # doctest: +SKIP
...     ...

**A model's own defaults.** ROME kept one hyperparameter file per model (``hparams/ROME/gpt2-xl.json``, ...): a
setting tuned on GPT-2 XL is not always right for another model. A model directory may carry
``mechedit-hparams.json``, ``{"<method>": {"<field>": value, ...}, ...}``; :func:`make_hparams` given the model
starts from the class defaults with that model's entries applied, and the caller's overrides go on top. Every
edit handle records the full hyperparameters it was made with. The embedded model ships one (its
``clamp_norm_max`` for ROME: see ``docs/results/rome-embedded``).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mechedit.data import EditRecord
from mechedit.errors import DataFormatError, InputError

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Method:
    name: str
    editor: str  # "module:function"
    hparams: str  # "module:Class" (a frozen dataclass with to_dict/from_dict/with_overrides)
    batched: bool  # True: the editor takes a list of requests and makes one edit of all of them
    summary: str
    # "rewrite": the requests' prompts should now give target_new; "erase": what the model knows about the
    # requests' facts is removed (target_new is not used)
    goal: str = "rewrite"

    def load(self) -> tuple[Callable, type]:
        return _import(self.editor), _import(self.hparams)

    def default_hparams(self):
        return self.load()[1]()


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("rome", "mechedit.editing.rome.rome_main:rome", "mechedit.editing.rome.hparams:ROMEHyperParams",
           False, "ROME: a rank-one update of one MLP output projection (r-ROME keys)"),
    Method("memit", "mechedit.editing.memit:memit", "mechedit.editing.memit:MEMITHyperParams",
           True, "MEMIT: many facts at once, spread over a range of MLP layers"),
    Method("seq-rome", "mechedit.editing.sequential:sequential_rome",
           "mechedit.editing.sequential:SequentialHyperParams",
           True, "ROME edits one after another (each on the already-edited model)"),
    Method("alphaedit", "mechedit.editing.sequential:alphaedit", "mechedit.editing.sequential:SequentialHyperParams",
           True, "sequential edits projected onto the null space of preserved keys (AlphaEdit)"),
    Method("seq-memit", "mechedit.editing.sequential:sequential_memit",
           "mechedit.editing.sequential:SequentialHyperParams",
           True, "sequential MEMIT steps protecting earlier edits' keys in the covariance-weighted solve"),
    Method("ia3", "mechedit.editing.ia3:ia3", "mechedit.editing.ia3:IA3HyperParams",
           True, "(IA)³ adapter restricted to located (or named) modules, merged"),
    Method("ia3-unlearn-learn", "mechedit.editing.ia3:ia3_unlearn_learn",
           "mechedit.editing.ia3:UnlearnLearnHyperParams",
           True, "two-stage (IA)³: unlearn towards 'I am not sure', merge, then learn the new answer"),
    Method("ft", "mechedit.editing.finetune:finetune", "mechedit.editing.finetune:FTHyperParams",
           True, "fine-tuning of all weights or chosen layers"),
    Method("ft-l", "mechedit.editing.finetune:finetune_l", "mechedit.editing.finetune:FTHyperParams",
           True, "fine-tuning with an L-infinity norm constraint on the change (FT-L)"),
    Method("lora", "mechedit.editing.lora:lora", "mechedit.editing.lora:LoRAHyperParams",
           True, "LoRA (peft) on chosen modules, merged"),
    Method("reg-lora", "mechedit.editing.lora:reg_lora", "mechedit.editing.lora:RegLoRAHyperParams",
           True, "LoRA trained with retention data and a KL term to the unedited model"),
    Method("icl", "mechedit.editing.icl:icl", "mechedit.editing.icl:ICLHyperParams",
           True, "in-context editing: a context stating the new facts, no weight change"),
    Method("elm", "mechedit.editing.elm:elm", "mechedit.editing.elm:ELMHyperParams",
           True, "ELM concept erasure: LoRA trained towards the expert/novice-contrast distribution", "erase"),
]}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise InputError(f"unknown editing method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]


MODEL_HPARAMS_FILE = "mechedit-hparams.json"


def model_defaults(model, method: str) -> dict:
    """``method``'s entries in the model directory's ``mechedit-hparams.json`` ({} when there is none)."""
    path = getattr(model, "path", None)
    path = path / MODEL_HPARAMS_FILE if path is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataFormatError(f"{path}: not readable as JSON ({e})") from None
    entry = table.get(method, {}) if isinstance(table, dict) else None
    if not isinstance(entry, dict):
        raise DataFormatError(f"{path}: must map method names to {{field: value}} objects")
    return entry


def make_hparams(method: str, hparams=None, model=None):
    """``hparams`` as the method's hyperparameter object: None (defaults), a dict or ``["k=v", ...]``
    (overrides of the defaults), or already the right dataclass (used as it is). Given ``model``, the defaults
    are the class's with the model's own entries (``mechedit-hparams.json``) applied."""
    _, cls = get_method(method).load()
    if isinstance(hparams, cls):
        return hparams
    if hparams is not None and not isinstance(hparams, (dict, list, tuple)):
        raise InputError(f"hyperparameters for {method} must be a {cls.__name__}, a dict or a list of "
                         f"'name=value', got {type(hparams).__name__}")
    base = cls()
    own = model_defaults(model, method) if model is not None else {}
    if own:
        try:
            base = base.with_overrides(own)
        except InputError as e:
            raise DataFormatError(f"{model.path / MODEL_HPARAMS_FILE}: {method}: {e}") from None
    if hparams is None:
        return base
    return base.with_overrides(hparams if isinstance(hparams, dict) else list(hparams))


def edit(model, requests: EditRecord | Sequence[EditRecord], method: str = "rome", hparams=None,
         progress: Progress | None = None):
    """Edit ``model`` in place with ``method``; returns the applied :class:`~mechedit.editing.EditHandle`.

    A one-request method given several requests is refused (use ``"memit"``, ``"seq-rome"`` or
    ``"alphaedit"`` / ``"seq-memit"`` for many rank-one edits).
    """
    spec = get_method(method)
    fn, _ = spec.load()
    hp = make_hparams(method, hparams, model)
    reqs = [requests] if isinstance(requests, EditRecord) else list(requests)
    if not reqs or not all(isinstance(r, EditRecord) for r in reqs):
        raise InputError("requests must be one EditRecord or a non-empty list of them")
    if spec.batched:
        return fn(model, reqs, hp, progress)
    if len(reqs) != 1:
        raise InputError(f"{method} edits one fact at a time; got {len(reqs)} requests (use memit, seq-rome, "
                         "alphaedit or seq-memit for several)")
    return fn(model, reqs[0], hp, progress)


def _import(target: str):
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"editing method implementation {target} is not available ({e})") from None
