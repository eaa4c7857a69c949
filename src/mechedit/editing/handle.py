"""Edit handles: what every editor returns - the exact weight deltas, how they were made, and the way back.

An :class:`EditHandle` holds

* ``deltas``: parameter name (the HF name, without the bridge's ``._original_component`` segments) → the exact
  tensor added to that parameter (same shape and dtype);
* ``method``, ``hparams`` (the method's hyperparameters as a dict), ``requests`` (``EditRecord.to_dict()`` of
  each request), ``evidence`` (e.g. which layer was edited and why);
* ``model_name`` and ``model_fingerprint``: the fingerprint of the *unedited* model it was made for.

Applying adds each delta in place (``param.add_(delta)``), after keeping an exact copy of the original tensor, so

* ``restore()`` copies the originals back: the model is bit-identical to before;
* a saved handle applied to a freshly loaded copy of the same model gives bit-identical edited weights;
* the handle is a context manager: ``with rome(model, request) as edit: ...`` restores on exit, also when the
  block raises.

Applying checks everything first (fingerprint, names, shapes, dtypes), so a model is never half-edited.
``save(dir)`` writes ``deltas.safetensors`` and ``edit.json`` atomically; :meth:`EditHandle.load` reads them
back, refusing missing, corrupt or inconsistent files with a :class:`~mechedit.errors.DataFormatError`.
:func:`export_model` writes an edited model as an ordinary HF checkpoint directory.

>>> import mechedit
>>> from mechedit.editing import EditHandle, rome
>>> m = mechedit.load()                                                  # doctest: +SKIP
>>> with rome(m, request) as edit:                                       # doctest: +SKIP
...     edit.save("edits/danielle")                                      # the model is edited in here
>>> fresh = mechedit.load()                                              # doctest: +SKIP
>>> EditHandle.load("edits/danielle").apply(fresh)                       # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechedit.data import EditRecord
from mechedit.errors import DataFormatError, InputError, MecheditError
from mechedit.model import LoadedModel, canonical_param_name, resolve_module

FORMAT = "mechedit.edit/1"
DELTAS_FILE = "deltas.safetensors"
META_FILE = "edit.json"
ADAPTER_DIR = "adapter"


@dataclass(eq=False)
class EditHandle:
    method: str  # "rome", "memit", ...
    deltas: dict[str, torch.Tensor]  # canonical HF parameter name -> exact delta (param's shape and dtype)
    hparams: dict  # the method's hyperparameters (its frozen dataclass's to_dict())
    requests: list[dict]  # EditRecord.to_dict() of each request
    model_name: str
    model_fingerprint: str  # LoadedModel.fingerprint() of the unedited model
    evidence: dict = field(default_factory=dict)  # JSON-ready notes: chosen layer and why, losses, norms ...
    # In-context editing: text put before every prompt when the edited model is queried (see `prompt`); the
    # weights are untouched (deltas may then be empty).
    context: str = ""
    # Adapter methods ((IA)³, LoRA): the trained adapter in peft's own form, {"config": adapter_config.json as a
    # dict, "weights": {peft state-dict name: tensor}}. `save` writes it to <dir>/adapter/ (PeftModel-loadable).
    # The deltas are still the exact merged change, so apply/restore work the same for every method.
    adapter: dict | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.context, str):
            raise InputError(f"context must be a string, got {type(self.context).__name__}")
        if not isinstance(self.deltas, dict) or (not self.deltas and not self.context):
            raise InputError("an edit handle needs at least one weight delta (or, for in-context editing, a context)")
        if self.adapter is not None and not (isinstance(self.adapter, dict) and isinstance(self.adapter.get("config"), dict)
                                             and isinstance(self.adapter.get("weights"), dict)):
            raise InputError("adapter must be {'config': dict, 'weights': {name: tensor}}")
        for name, d in self.deltas.items():
            if not isinstance(name, str) or canonical_param_name(name) != name:
                raise InputError(f"delta names must be canonical HF parameter names, got {name!r}")
            if not isinstance(d, torch.Tensor):
                raise InputError(f"the delta for {name} is a {type(d).__name__}, not a tensor")
        self.deltas = {n: d.detach() for n, d in self.deltas.items()}
        self._model: LoadedModel | None = None
        self._originals: dict[str, torch.Tensor] = {}

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def applied(self) -> bool:
        return self._model is not None

    @property
    def model(self) -> LoadedModel | None:
        """The model this handle is applied to now (None when not applied)."""
        return self._model

    def records(self) -> list[EditRecord]:
        return [EditRecord.from_dict(r) for r in self.requests]

    def prompt(self, text: str) -> str:
        """``text`` as the edited model sees it: with the in-context edit's context before it (else unchanged)."""
        return f"{self.context}{text}" if self.context else text

    def __repr__(self) -> str:
        names = ", ".join(self.deltas)
        state = f"applied to {self._model.name!r}" if self._model is not None else "not applied"
        return (f"EditHandle(method={self.method!r}, {len(self.requests)} request(s), deltas on [{names}], "
                f"model {self.model_name!r} {self.model_fingerprint}, {state})")

    # -- apply / restore ------------------------------------------------------------------------------------
    def apply(self, model: LoadedModel) -> EditHandle:
        """Add the deltas to ``model``'s weights in place; returns self (so ``with h.apply(m):`` works).

        Refused, with nothing changed, when the handle is already applied, when ``model`` is not the unedited
        model the edit was made for (fingerprint), or when a parameter is missing or has another shape/dtype.
        """
        if self._model is not None:
            raise MecheditError(f"this {self.method} edit is already applied to {self._model.name!r}; "
                                "call restore() before applying it again")
        fp = model.fingerprint()
        if fp != self.model_fingerprint:
            raise MecheditError(
                f"this {self.method} edit was made for model {self.model_name!r} (fingerprint "
                f"{self.model_fingerprint}), but {model.name!r} has fingerprint {fp}: it is a different model, or "
                "already edited. Apply it to a fresh copy of the model it was made for (restore other edits first)")
        self._apply_checked(model)
        return self

    def _apply_checked(self, model: LoadedModel) -> None:
        """Apply without the fingerprint check (the caller has just made the edit on this very model)."""
        params = {name: self._resolve(model, name) for name in self.deltas}  # validate everything first
        originals = {name: p.detach().clone() for name, p in params.items()}
        done = []
        try:
            with torch.no_grad():
                for name, p in params.items():
                    p.add_(self.deltas[name].to(p.device))
                    done.append(name)
        except BaseException:
            with torch.no_grad():
                for name in done:
                    params[name].copy_(originals[name])
            raise
        self._model, self._originals = model, originals

    def _resolve(self, model: LoadedModel, name: str) -> torch.Tensor:
        path, _, attr = name.rpartition(".")
        try:
            p = getattr(resolve_module(model.hf_model, path), attr, None) if path else None
        except InputError:
            p = None
        if not isinstance(p, torch.Tensor):
            raise MecheditError(f"this {self.method} edit changes {name}, which model {model.name!r} does not have")
        d = self.deltas[name]
        if p.shape != d.shape or p.dtype != d.dtype:
            raise MecheditError(f"this {self.method} edit's delta for {name} has shape {tuple(d.shape)} and dtype "
                                f"{d.dtype}, but the model's parameter has shape {tuple(p.shape)} and dtype {p.dtype}")
        return p

    def restore(self) -> None:
        """Put back the exact original weights (a copy, not a subtraction: bit-exact). Does nothing when the
        handle is not applied. Restore stacked edits in reverse order of application."""
        if self._model is None:
            return
        with torch.no_grad():
            for name, orig in self._originals.items():
                self._resolve(self._model, name).copy_(orig)
        self._model, self._originals = None, {}

    def __enter__(self) -> EditHandle:
        if self._model is None:
            raise MecheditError("this edit is not applied; use `with handle.apply(model):`")
        return self

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write ``deltas.safetensors`` and ``edit.json`` into the directory ``path``, atomically (a temporary
        directory beside it, then renamed). An existing saved edit there is replaced; any other non-empty
        directory is refused."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / META_FILE).is_file())):
            raise MecheditError(f"{path} exists and is not a saved edit; choose another directory")
        tensors = {n: d.cpu().contiguous() for n, d in self.deltas.items()}
        meta = {"format": FORMAT, "method": self.method, "model_name": self.model_name,
                "model_fingerprint": self.model_fingerprint, "hparams": self.hparams, "requests": self.requests,
                "evidence": self.evidence, "context": self.context,
                "deltas": {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", ""),
                               "sha256": _digest(t)} for n, t in tensors.items()}}
        text = json.dumps(meta, indent=1)  # fails here, before anything is written, on non-JSON evidence
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file(tensors, str(tmp / DELTAS_FILE), metadata={"format": FORMAT})
            if self.adapter is not None:  # peft's own layout: PeftModel.from_pretrained(hf_model, <dir>/adapter)
                (tmp / ADAPTER_DIR).mkdir()
                save_file({n: t.detach().cpu().contiguous() for n, t in self.adapter["weights"].items()},
                          str(tmp / ADAPTER_DIR / "adapter_model.safetensors"), metadata={"format": "pt"})
                (tmp / ADAPTER_DIR / "adapter_config.json").write_text(json.dumps(self.adapter["config"], indent=1))
            (tmp / META_FILE).write_text(text)
            _swap_into_place(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> EditHandle:
        """Read a saved edit (not applied: call :meth:`apply`)."""
        from safetensors.torch import load_file

        path = Path(path)
        meta_file, deltas_file = path / META_FILE, path / DELTAS_FILE
        if not meta_file.is_file():
            raise DataFormatError(f"{path} is not a saved edit: no {META_FILE}")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataFormatError(f"{meta_file} is corrupt (not JSON: {e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise DataFormatError(f"{meta_file} is not a mechedit edit (format {got!r}, expected {FORMAT!r})")
        missing = [k for k in ("method", "model_name", "model_fingerprint", "hparams", "requests", "deltas")
                   if k not in meta]
        if missing:
            raise DataFormatError(f"{meta_file} lacks field(s) {', '.join(missing)}")
        if not deltas_file.is_file():
            raise DataFormatError(f"{path} is missing {DELTAS_FILE}")
        try:
            tensors = load_file(str(deltas_file))
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise DataFormatError(f"{deltas_file} is corrupt ({type(e).__name__}: {e})") from None
        expected = meta["deltas"]
        if not isinstance(expected, dict) or set(expected) != set(tensors):
            raise DataFormatError(f"{deltas_file} holds {sorted(tensors)} but {META_FILE} lists "
                                  f"{sorted(expected) if isinstance(expected, dict) else expected!r}")
        for name, t in tensors.items():
            e = expected[name]
            if (not isinstance(e, dict) or list(t.shape) != e.get("shape")
                    or str(t.dtype).replace("torch.", "") != e.get("dtype") or _digest(t) != e.get("sha256")):
                raise DataFormatError(f"{deltas_file}: the delta for {name} does not match its record in "
                                      f"{META_FILE} (shape, dtype or checksum): the file is corrupt")
        adapter = None
        if (path / ADAPTER_DIR).is_dir():
            try:
                adapter = {"config": json.loads((path / ADAPTER_DIR / "adapter_config.json").read_text()),
                           "weights": load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors"))}
            except Exception as e:
                raise DataFormatError(f"{path / ADAPTER_DIR} is corrupt ({type(e).__name__}: {e})") from None
        try:
            return cls(method=meta["method"], deltas=tensors, hparams=meta["hparams"], requests=meta["requests"],
                       model_name=meta["model_name"], model_fingerprint=meta["model_fingerprint"],
                       evidence=meta.get("evidence", {}), context=meta.get("context", ""), adapter=adapter)
        except InputError as e:
            raise DataFormatError(f"{path}: {e}") from None


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _swap_into_place(tmp: Path, path: Path) -> None:
    """Move the finished directory ``tmp`` to ``path``; an existing ``path`` is moved aside first and removed
    after, so ``path`` holds either the old complete directory or the new one."""
    if not path.exists():
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old{os.getpid()}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# -- export -------------------------------------------------------------------------------------------------------


def export_model(model: LoadedModel, path: str | Path, *, verify: bool = True) -> Path:
    """Write ``model`` - edited or not - as an ordinary HF checkpoint directory (config, safetensors weights,
    tokenizer; the embedded model's ``world.json`` too), loadable with ``AutoModelForCausalLM.from_pretrained``.

    The bridge wraps the HF modules in place and adds parameter aliases, so the weights are collected under
    their canonical HF names into an un-bridged skeleton of the same class, which is what gets saved. With
    ``verify`` the directory is reloaded with plain ``AutoModelForCausalLM`` and its logits on a probe prompt
    compared with the live model's; a mismatch raises and nothing is left at ``path``. Written atomically.
    """
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise MecheditError(f"{path} exists and is not empty; choose a new directory for the exported model")
    live = {canonical_param_name(k): v for k, v in model.hf_model.state_dict().items()}
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.hf_model.config)
    wanted = skeleton.state_dict()
    missing = [k for k in wanted if k not in live]
    if missing:
        raise MecheditError(f"cannot export: the loaded model has no tensor for {missing[:3]}")
    skeleton.load_state_dict({k: live[k] for k in wanted}, assign=True, strict=True)
    skeleton.tie_weights()
    skeleton.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    from mechedit.model import _quiet_hf

    try:
        with _quiet_hf():
            skeleton.save_pretrained(tmp)
            model.tokenizer.save_pretrained(tmp)
        if model.path is not None and (model.path / "world.json").is_file():
            shutil.copy2(model.path / "world.json", tmp / "world.json")
        if verify:
            _verify_export(model, tmp)
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _verify_export(model: LoadedModel, directory: Path) -> None:
    from transformers import AutoModelForCausalLM

    from mechedit.model import _quiet_hf

    with _quiet_hf():
        reloaded = AutoModelForCausalLM.from_pretrained(directory, dtype=model.hf_model.dtype,
                                                        attn_implementation="eager").to(model.device).eval()
    probe = torch.tensor([model.encode("The quick brown fox jumps over the lazy dog.")], device=model.device)
    with torch.no_grad():
        want = model.hf_model(input_ids=probe, use_cache=False).logits.float()  # (1, T, V)
        got = reloaded(input_ids=probe, use_cache=False).logits.float()
    err = float((want - got).abs().max())
    if not err <= 1e-3 * max(1.0, float(want.abs().max())):
        raise MecheditError(f"the exported checkpoint does not reproduce the loaded model (max logit difference "
                            f"{err:.3g}); nothing was written")
