"""`mechedit trace`: ROME's causal trace of one fact, with a terminal summary and files in ``--out``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.errors import InputError

PromptOpt = Annotated[Optional[str], typer.Option(help="The prompt, subject included (default: a fact of the "
                                                  "embedded world).")]
SubjectOpt = Annotated[Optional[str], typer.Option(help="The subject's words as they appear in the prompt.")]
TargetOpt = Annotated[Optional[str], typer.Option(help="The answer to score (default: the model's own top "
                                                  "answer).")]
OutOpt = Annotated[Optional[Path], typer.Option(help="Directory for result.json, result.html and PNG figures.")]


def default_fact(model) -> tuple[str, str]:
    """A (prompt, subject) of the embedded world for commands run with no arguments."""
    from mechedit.toy.world import World

    world_file = model.path / "world.json" if model.path else None
    if world_file is None or not world_file.exists():
        raise InputError("pass --prompt and --subject (only the embedded world model has a default fact)")
    world = World.load(world_file)
    fact = world.facts[0]
    return world.relations[fact.relation]["train"][0].format(fact.subject), fact.subject


def progress_bar(label: str):
    """A rich progress bar and a ``progress(done, total)`` callback feeding it."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
    task = bar.add_task(label, total=None)
    return bar, lambda done, total: bar.update(task, completed=done, total=total)


@app.command()
def trace(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    subject: SubjectOpt = None,
    target: TargetOpt = None,
    samples: Annotated[int, typer.Option(help="Noise samples per cell (ROME: 10).")] = 10,
    noise: Annotated[Optional[float], typer.Option(help="Noise std; default 3x the std of subject "
                                                   "embeddings.")] = None,
    window: Annotated[int, typer.Option(help="Layers restored together for mlp/attn (ROME: 10).")] = 10,
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds: hidden, mlp, attn.")] = "hidden,mlp,attn",
    seed: Annotated[int, typer.Option(help="Seed of the noise.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass (memory is bounded by this).")] = 256,
    out: OutOpt = None,
) -> None:
    """Causal tracing (Meng et al. 2022): corrupt the subject with noise, restore one state at a time, and see
    which states bring the answer back."""
    from mechedit.model import load
    from mechedit.tracing.causal import CausalTraceConfig, causal_trace

    m = load(model)
    if prompt is None and subject is None:
        prompt, subject = default_fact(m)
    if prompt is None or subject is None:
        raise InputError("pass both --prompt and --subject")
    cfg = CausalTraceConfig(samples=samples, noise=noise, window=window, seed=seed, batch_size=batch_size,
                            kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()))
    bar, progress = progress_bar("tracing")
    with bar:
        result = causal_trace(m, prompt, subject, target, cfg, progress=progress)
    print_trace_summary(result)
    if out is not None:
        write_trace(result, out)


def print_trace_summary(result) -> None:
    s0, s1 = result.subject_range
    typer.echo(f"{result.prompt!r} -> {result.answer!r}: clean p={result.high_score:.4f}, "
               f"corrupted p={result.low_score:.4f}; subject tokens {s0}..{s1 - 1} "
               f"({''.join(result.tokens[s0:s1])!r})")
    for kind in result.scores:
        layer, pos, score = result.peak(kind)
        where = "last subject token" if pos == s1 - 1 else ("last token" if pos == len(result.tokens) - 1
                                                             else f"token {pos}")
        typer.echo(f"  {kind:6s} effect peaks at layer {layer}, {where} {result.tokens[pos]!r}: p={score:.4f} "
                   f"(indirect effect {score - result.low_score:+.4f})")


def write_trace(result, out: Path) -> None:
    from mechedit.viz.export import write_figures

    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "result.json")
    written, notes = write_figures({"result": result.plot()}, out)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {out / 'result.json'}, " + ", ".join(str(p) for p in written))
