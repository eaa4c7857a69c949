"""Which layer ROME rewrites: ``layer="auto"`` and ``layer="fact"``.

ROME edits one layer per model, not per fact: its layer 17 of GPT-2 XL is where the MLP causal-trace effect at the
subject's last token peaks *averaged over ~1,000 facts the model knows* (Meng et al. 2022, Figure 2). One fact's own
trace is a noisy estimate of that (one prompt, ten noise samples), and Hase et al. (2023) found the per-fact peak a
poor guide to the best edit layer. On the embedded world the per-fact peaks spread over layers 0-3 while the
averaged peak is layer 1, and editing at the per-fact peak lost efficacy on 11 of 200 records
(``docs/results/rome-embedded``).

* ``"auto"``: the averaged trace of ``layer_n_facts`` facts the model knows - the embedded world's facts when the
  model ships a ``world.json``, or the CounterFact / ``known_1000`` file named by ``layer_facts``. The layer is
  cached on disk by the weights' fingerprint and the facts, so it is traced once per model. A model with no fact
  set falls back to the request's own trace, and the evidence says so.
* ``"fact"``: the peak of the request's own MLP trace (what ``"auto"`` meant before; cheap, noisy).

Both trace the MLPs with ROME's noise and a window of a fifth of the layers, as :func:`mechedit.locate` does.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from mechedit.data import EditRecord
from mechedit.editing.rome.hparams import ROMEHyperParams
from mechedit.errors import InputError
from mechedit.hub import cache_dir
from mechedit.model import LoadedModel

Progress = Callable[[str, int, int], None]

_MEMORY: dict[tuple[str, str], dict] = {}  # (fingerprint, facts key) -> evidence, for this process


def choose_layer(model: LoadedModel, request: EditRecord, hparams: ROMEHyperParams,
                 progress: Progress | None = None) -> tuple[int, dict]:
    """The edit layer and the evidence for it (see the module docstring)."""
    if isinstance(hparams.layer, int):
        if not 0 <= hparams.layer < model.n_layers:
            raise InputError(f"layer {hparams.layer} is out of range; the model has layers 0..{model.n_layers - 1}")
        return hparams.layer, {"layer": hparams.layer, "layer_choice": "given"}
    if hparams.layer == "auto":
        facts = _reference_facts(model, hparams)
        if facts is not None:
            evidence = model_layer(model, facts, hparams, progress)
            return evidence["layer"], evidence
    return fact_layer(model, request, progress)


def _window(model: LoadedModel) -> int:
    return max(1, round(model.n_layers / 5))


def fact_layer(model: LoadedModel, request: EditRecord, progress: Progress | None = None) -> tuple[int, dict]:
    """The peak of the MLP causal-trace effect at the request's last subject token."""
    from mechedit.tracing import CausalTraceConfig, causal_trace

    config = CausalTraceConfig(kinds=("mlp",), window=_window(model))
    trace = causal_trace(model, request.prompt, request.subject, request.target_true, config,
                         progress=(lambda d, t: progress("trace", d, t)) if progress else None)
    column = trace.subject_range[1] - 1  # the subject's last token
    scores = trace.scores["mlp"][:, column]  # (n_layers,)
    layer = int(scores.argmax())
    return layer, {
        "layer": layer,
        "layer_choice": "fact: peak of this fact's MLP causal-trace effect at the subject's last token",
        "trace": {"kind": "mlp", "window": config.window, "samples": config.samples, "token": trace.tokens[column],
                  "position": column, "answer": trace.answer, "scores": [float(s) for s in scores],
                  "low_score": trace.low_score, "high_score": trace.high_score},
    }


def _reference_facts(model: LoadedModel, hparams: ROMEHyperParams):
    """The facts ``"auto"`` averages over (TraceFacts), with a description; None when the model has none."""
    from mechedit.tracing.summary import TraceFact, read_trace_facts

    if hparams.layer_facts != "auto":
        path = Path(hparams.layer_facts)
        if not path.is_file():
            raise InputError(f"layer_facts: no such file {str(path)!r} (a CounterFact or known_1000 JSON file)")
        facts = read_trace_facts(path, n=None)
        return facts, f"{path.name} ({len(facts)} facts)"
    world_file = model.path / "world.json" if model.path else None
    if world_file is None or not world_file.is_file():
        return None
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    records = world_records(World.load(world_file))
    facts = [TraceFact(index=i, id=r.case_id, prompt=r.prompt, subject=r.subject, target=r.target_true,
                       source="world") for i, r in enumerate(records)]
    return facts, f"the embedded world's facts ({len(facts)})"


def model_layer(model: LoadedModel, reference, hparams: ROMEHyperParams,
                progress: Progress | None = None) -> dict:
    """The evidence (``layer`` included) of the averaged MLP trace over up to ``layer_n_facts`` known facts,
    traced once per weights and facts and cached on disk."""
    from mechedit.tracing import CausalTraceConfig
    from mechedit.tracing.summary import choose_facts, summarize_traces, trace_facts

    facts, source = reference
    n, seed = hparams.layer_n_facts, hparams.seed
    chosen = choose_facts(facts, min(n * 2, len(facts)), seed)  # twice as many: unknown facts are skipped
    config = CausalTraceConfig(kinds=("mlp",), window=_window(model), seed=seed)
    ident = json.dumps({"facts": [[f.prompt, f.subject, f.target] for f in chosen], "n": n,
                        "config": config.to_dict()}, sort_keys=True)
    key = (model.fingerprint(), hashlib.sha256(ident.encode()).hexdigest()[:16])
    if key in _MEMORY:
        return dict(_MEMORY[key])
    path = cache_dir() / "layers" / key[0] / f"{key[1]}.json"
    if path.is_file():
        try:
            evidence = json.loads(path.read_text())
            _MEMORY[key] = evidence
            return dict(evidence)
        except (OSError, ValueError):
            pass  # a damaged cache entry is traced afresh
    traced, skipped = [], 0
    for i, done in enumerate(trace_facts(model, chosen, config)):
        if done.result is not None:
            traced.append(done.result)
        else:
            skipped += 1
        if progress:
            progress("trace", min(len(traced), n), n)
        if len(traced) >= n:
            break
    if not traced:
        raise InputError(f"layer='auto': the model answers none of the {len(chosen)} reference facts from "
                         f"{source} correctly, so there is no averaged trace; give layer=N or layer='fact'")
    summary = summarize_traces(traced)
    row = summary.roles.index("last_subject")
    effects = [float(e) for e in summary.effects["mlp"][row]]
    layer = max(range(len(effects)), key=lambda i: -math.inf if math.isnan(effects[i]) else effects[i])
    evidence = {
        "layer": layer,
        "layer_choice": "auto: peak of the MLP causal-trace effect at the last subject token, averaged over "
                        f"{len(traced)} known facts from {source}",
        "averaged_trace": {"kind": "mlp", "window": config.window, "samples": config.samples,
                           "n_facts": len(traced), "skipped": skipped, "effects": effects,
                           "low_score": summary.low_score, "high_score": summary.high_score},
    }
    _write_atomic(path, json.dumps(evidence, indent=1))
    _MEMORY[key] = evidence
    return dict(evidence)


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a second trace
