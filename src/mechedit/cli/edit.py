"""`mechedit edit`: edit one fact, print before/after answers, write the edit handle (and the edited model)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.errors import InputError

METHODS = ("rome",)


def default_request(model):
    """An edit request from the embedded world (its first exported record) for runs with no request."""
    from mechedit.toy.export import world_records
    from mechedit.toy.world import World

    world_file = model.path / "world.json" if model.path else None
    if world_file is None or not world_file.exists():
        raise InputError("pass --prompt, --subject and --target-new (only the embedded world model has a "
                         "default request)")
    return world_records(World.load(world_file), n=1, seed=0)[0]


def build_request(model, prompt, subject, target_new, target_true, paraphrases, neighbours):
    from mechedit.data import EditRecord

    if prompt is None and subject is None and target_new is None:
        return default_request(model)
    if not (prompt and subject and target_new):
        raise InputError("pass --prompt, --subject and --target-new together")
    if subject not in prompt:
        raise InputError(f"subject {subject!r} is not in the prompt {prompt!r}")
    template = prompt.replace(subject, "{}", 1)
    pairs = []
    for item in neighbours:
        if "=>" not in item:
            raise InputError(f"--neighbour {item!r}: write it as 'PROMPT => ANSWER'")
        p, a = (s.strip() for s in item.split("=>", 1))
        pairs.append((p, a))
    return EditRecord(case_id=0, template=template, subject=subject, target_new=target_new,
                      target_true=target_true, paraphrases=tuple(paraphrases), neighborhood=tuple(pairs))


@app.command()
def edit(
    model: ModelOpt = None,
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)}.")] = "rome",
    prompt: Annotated[Optional[str], typer.Option(help="The edit prompt, subject included.")] = None,
    subject: Annotated[Optional[str], typer.Option(help="The subject's words as in the prompt.")] = None,
    target_new: Annotated[Optional[str], typer.Option(help="The new answer.")] = None,
    target_true: Annotated[Optional[str], typer.Option(help="The current answer (used to locate).")] = None,
    paraphrase: Annotated[Optional[list[str]], typer.Option(help="A paraphrase prompt (repeatable).")] = None,
    neighbour: Annotated[Optional[list[str]], typer.Option(help="'PROMPT => ANSWER' about another subject that "
                                                          "must not change (repeatable).")] = None,
    layer: Annotated[str, typer.Option(help="Layer to edit, or 'auto' (peak of the MLP causal trace at the "
                                       "last subject token).")] = "auto",
    out: Annotated[Optional[Path], typer.Option(help="Directory for the edit handle and a JSON report.")] = None,
    save_model: Annotated[Optional[Path], typer.Option(help="Also write the edited model as an HF "
                                                       "checkpoint directory.")] = None,
) -> None:
    """Edit one fact (ROME: a rank-one update of one MLP output projection) and show what changed."""
    import json
    from dataclasses import replace

    from mechedit.answering import answers
    from mechedit.editing import ROMEHyperParams, export_model, rome
    from mechedit.model import load

    if method not in METHODS:
        raise InputError(f"unknown method {method!r}; available: {', '.join(METHODS)}")
    m = load(model)
    request = build_request(m, prompt, subject, target_new, target_true, paraphrase or [], neighbour or [])
    hp = ROMEHyperParams()
    if layer != "auto":
        if not layer.lstrip("-").isdigit():
            raise InputError(f"--layer must be an integer or 'auto', got {layer!r}")
        hp = replace(hp, layer=int(layer))
    prompts = [request.prompt, *request.paraphrases, *(p for p, _ in request.neighborhood)]
    targets = (request.target_new, request.target_true or "")
    before = answers(m, prompts, targets)
    handle = rome(m, request, hp)
    after = answers(m, prompts, targets)
    typer.echo(f"edited layer {handle.evidence.get('layer')} ({method}): {request.prompt!r} -> "
               f"{request.target_new!r}")
    kinds = ["edit"] + ["paraphrase"] * len(request.paraphrases) + ["neighbour"] * len(request.neighborhood)
    rows = []
    for kind, b, a in zip(kinds, before, after):
        typer.echo(f"  {kind:10s} {b.prompt!r}: {b.top!r} ({b.top_prob:.2f}) -> {a.top!r} ({a.top_prob:.2f})")
        rows.append({"kind": kind, "prompt": b.prompt, "before": b.top, "after": a.top,
                     "before_probs": b.target_probs, "after_probs": a.target_probs})
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        handle.save(out / "edit")
        (out / "report.json").write_text(json.dumps({"request": request.to_dict(), "answers": rows,
                                                     "evidence": handle.evidence}, indent=1, default=str))
        typer.echo(f"wrote {out / 'edit'} and {out / 'report.json'}")
    if save_model is not None:
        export_model(m, save_model)
        typer.echo(f"wrote the edited model to {save_model}")
