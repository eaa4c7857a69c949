"""Build the embedded world model: world -> tokenizer -> training -> an ordinary HF checkpoint directory.

The directory holds ``config.json`` + ``model.safetensors`` (plain ``AutoModelForCausalLM`` loads it), the
tokenizer files (plain ``AutoTokenizer`` loads it; it prepends ``<|bos|>`` exactly as in training),
``world.json`` (the world's facts and templates) and ``build.json`` (recipe, timings, measured recall).

``mechedit toy build`` runs this; the package ships the result of ``build(ToyModelConfig())``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from mechedit.toy.quality import recall
from mechedit.toy.tokenizer import build_tokenizer
from mechedit.toy.train import ToyModelConfig, train
from mechedit.toy.world import World


def build(out_dir: str | Path, cfg: ToyModelConfig = ToyModelConfig(), world_seed: int = 0,
          progress: Callable[[int, float], None] | None = None, threads: int | None = None) -> dict:
    """Train the world model and write it to ``out_dir`` (replaced atomically). Returns the build record."""
    out_dir = Path(out_dir)
    if threads is not None:
        torch.set_num_threads(threads)
    t0 = time.time()
    world = World.generate(seed=world_seed)
    tok = build_tokenizer(world)
    model = train(world, tok, cfg, progress=progress)
    train_s = time.time() - t0
    rec = recall(model, tok, world)
    record = {
        "recipe": cfg.to_dict(), "world_seed": world_seed, "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
        "recall": rec.to_dict(), "n_params": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tok),
    }
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    world.save(tmp / "world.json")
    (tmp / "build.json").write_text(json.dumps(record, indent=1))
    tuned = out_dir / "mechedit-hparams.json"  # the model's tuned editing defaults: kept (re-tune after a rebuild)
    if tuned.is_file():
        shutil.copy2(tuned, tmp / tuned.name)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return record
