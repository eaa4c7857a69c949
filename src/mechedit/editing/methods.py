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
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mechedit.data import EditRecord
from mechedit.errors import InputError

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


def make_hparams(method: str, hparams=None):
    """``hparams`` as the method's hyperparameter object: None (defaults), a dict or ``["k=v", ...]``
    (overrides of the defaults), or already the right dataclass."""
    _, cls = get_method(method).load()
    if hparams is None:
        return cls()
    if isinstance(hparams, cls):
        return hparams
    if isinstance(hparams, (dict, list, tuple)):
        return cls().with_overrides(hparams if isinstance(hparams, dict) else list(hparams))
    raise InputError(f"hyperparameters for {method} must be a {cls.__name__}, a dict or a list of 'name=value', "
                     f"got {type(hparams).__name__}")


def edit(model, requests: EditRecord | Sequence[EditRecord], method: str = "rome", hparams=None,
         progress: Progress | None = None):
    """Edit ``model`` in place with ``method``; returns the applied :class:`~mechedit.editing.EditHandle`.

    A one-request method given several requests is refused (use ``"memit"``, ``"seq-rome"`` or
    ``"alphaedit"`` for many rank-one edits).
    """
    spec = get_method(method)
    fn, _ = spec.load()
    hp = make_hparams(method, hparams)
    reqs = [requests] if isinstance(requests, EditRecord) else list(requests)
    if not reqs or not all(isinstance(r, EditRecord) for r in reqs):
        raise InputError("requests must be one EditRecord or a non-empty list of them")
    if spec.batched:
        return fn(model, reqs, hp, progress)
    if len(reqs) != 1:
        raise InputError(f"{method} edits one fact at a time; got {len(reqs)} requests (use memit, seq-rome or "
                         "alphaedit for several)")
    return fn(model, reqs[0], hp, progress)


def _import(target: str):
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise InputError(f"editing method implementation {target} is not available ({e})") from None
