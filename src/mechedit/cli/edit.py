"""`mechedit edit`: edit one fact, print before/after answers, write the edit handle (and the edited model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.errors import InputError

from mechedit.editing.methods import METHODS


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


def where_edited(handle) -> str:
    """One phrase for what an edit changed: its layer(s), its trained modules, or its context."""
    ev = handle.evidence
    if handle.context and not handle.deltas:
        return "in context, no weight changed"
    for key, word in (("layer", "layer"), ("layers", "layers")):
        if ev.get(key) is not None:
            return f"{word} {ev[key]}"
    names = sorted({n.rsplit(".", 1)[0] for n in handle.deltas})
    return f"{len(names)} module(s): {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"


def method_hparams(method: str, overrides: list[str], layer: str | None, modules: str | None, model=None):
    """The method's hyperparameters from ``--hp name=value`` items plus the ``--layer`` / ``--modules``
    shortcuts (mapped onto the method's ``layer``/``layers`` and ``modules`` fields), on top of ``model``'s own
    defaults when it is given (call once without it to check the options before loading a model)."""
    from dataclasses import fields

    from mechedit.editing.methods import make_hparams

    defaults = make_hparams(method)
    names = {f.name for f in fields(defaults)}
    items = list(overrides)
    if layer is not None:
        value = layer.strip()
        if value not in ("auto", "fact") and not all(p.strip().lstrip("-").isdigit() for p in value.split(",")):
            raise InputError(f"--layer must be an integer, a comma-separated list of integers, 'auto' or 'fact', "
                             f"got {layer!r}")
        if "layer" in names and "," not in value:
            items.append(f"layer={value if value in ('auto', 'fact') else int(value)}")
        elif "layers" in names:
            items.append("layers=" + (json.dumps(value) if value == "auto" else f"[{value}]"))
        else:
            raise InputError(f"--layer does not apply to {method}")
    if modules is not None:
        if "modules" not in names:
            raise InputError(f"--modules does not apply to {method}")
        value = modules.strip()
        items.append("modules=" + (json.dumps("auto") if value == "auto"
                                   else json.dumps([x.strip() for x in value.split(",") if x.strip()])))
    return make_hparams(method, items, model)


@app.command()
def edit(
    model: ModelOpt = None,
    method: Annotated[str, typer.Option(help=f"Editing method: {', '.join(METHODS)}.")] = "rome",
    hp: Annotated[Optional[list[str]], typer.Option(help="A hyperparameter of the method as name=value "
                                                    "(repeatable; values are JSON or plain strings).")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="The edit prompt, subject included.")] = None,
    subject: Annotated[Optional[str], typer.Option(help="The subject's words as in the prompt.")] = None,
    target_new: Annotated[Optional[str], typer.Option(help="The new answer.")] = None,
    target_true: Annotated[Optional[str], typer.Option(help="The current answer (used to locate).")] = None,
    paraphrase: Annotated[Optional[list[str]], typer.Option(help="A paraphrase prompt (repeatable).")] = None,
    neighbour: Annotated[Optional[list[str]], typer.Option(help="'PROMPT => ANSWER' about another subject that "
                                                          "must not change (repeatable).")] = None,
    layer: Annotated[Optional[str], typer.Option(help="Layer(s) to edit: N, 'N,M,..', 'auto' (ROME: the peak of "
                                                 "the MLP causal trace at the last subject token averaged over "
                                                 "known facts) or 'fact' (ROME: this fact's own trace peak).")] = None,
    modules: Annotated[Optional[str], typer.Option(help="Modules an adapter/fine-tuning method trains: 'auto' "
                                                   "(locate's module set) or comma-separated names.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Directory for the edit handle and a JSON report.")] = None,
    save_model: Annotated[Optional[Path], typer.Option(help="Also write the edited model as an HF "
                                                       "checkpoint directory.")] = None,
    report: Annotated[bool, typer.Option("--report", help="Also write an HTML report of the edit into --out "
                                         "(as `mechedit report --edit OUT`).")] = False,
    evaluate_edit: Annotated[bool, typer.Option("--evaluate/--no-evaluate", help="Evaluate the edit (as "
                                                "`mechedit eval`: CounterFact scores, locality, KL, fluency ...), "
                                                "print the summary and write evaluation.json into --out.")] = True,
) -> None:
    """Edit one fact and show what changed (default: ROME, a rank-one update of one MLP output projection)."""
    import json

    from mechedit.answering import answers
    from mechedit.editing import export_model
    from mechedit.editing.methods import edit as run_edit
    from mechedit.editing.methods import get_method
    from mechedit.model import load

    get_method(method)  # unknown method: one clear line before loading anything
    if report and out is None:
        raise InputError("--report writes into the --out directory; pass --out too")
    method_hparams(method, hp or [], layer, modules)  # bad options: one clear line before loading anything
    m = load(model)
    hparams = method_hparams(method, hp or [], layer, modules, m)
    request = build_request(m, prompt, subject, target_new, target_true, paraphrase or [], neighbour or [])
    prompts = [request.prompt, *request.paraphrases, *(p for p, _ in request.neighborhood)]
    targets = (request.target_new, request.target_true or "")
    before = answers(m, prompts, targets)
    handle = run_edit(m, [request], method, hparams)
    after = answers(m, [handle.prompt(p) for p in prompts], targets)
    goal = (f"erase what the model knows in {request.prompt!r} ({request.target_true or 'its answer'})"
            if get_method(method).goal == "erase" else f"{request.prompt!r} -> {request.target_new!r}")
    typer.echo(f"{method} edit ({where_edited(handle)}): {goal}")
    kinds = ["edit"] + ["paraphrase"] * len(request.paraphrases) + ["neighbour"] * len(request.neighborhood)
    rows = []
    for kind, b, a in zip(kinds, before, after):
        typer.echo(f"  {kind:10s} {b.prompt!r}: {b.top!r} ({b.top_prob:.2f}) -> {a.top!r} ({a.top_prob:.2f})")
        rows.append({"kind": kind, "prompt": b.prompt, "before": b.top, "after": a.top,
                     "before_probs": b.target_probs, "after_probs": a.target_probs})
    result = None
    if evaluate_edit:  # leaves the handle applied, as it found it
        from mechedit.cli.eval import print_summary
        from mechedit.evaluation import evaluate

        result = evaluate(m, handle, [request])
        print_summary(result, title=f"evaluation of this {method} edit")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        handle.save(out / "edit")
        (out / "report.json").write_text(json.dumps({"request": request.to_dict(), "answers": rows,
                                                     "evidence": handle.evidence}, indent=1, default=str))
        typer.echo(f"wrote {out / 'edit'} and {out / 'report.json'}")
        if result is not None:
            from mechedit.cli.eval import write_result

            typer.echo("wrote " + ", ".join(str(p) for p in write_result(result, out)))
    if save_model is not None:
        export_model(m, save_model)
        typer.echo(f"wrote the edited model to {save_model}")
    if report:  # last: the report applies the saved handle to the unedited model itself
        from mechedit.report import write_edit_report

        handle.restore()
        typer.echo(f"wrote {write_edit_report(out, model=m)}")
