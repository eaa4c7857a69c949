"""`mechedit trace`: ROME's causal trace of one fact, with a terminal summary and files in ``--out``; with
``--data``, of many facts from a file, averaged by token role (ROME's picture).

Also the helpers the other tracer commands share: the default fact, the progress bar, writing a result."""

from __future__ import annotations

from dataclasses import replace
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


def comma_list(text: str) -> tuple[str, ...]:
    """``"a, b,c"`` -> ``("a", "b", "c")``."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


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
    window: Annotated[Optional[int], typer.Option(
        help="Layers restored together for mlp/attn, centred on each layer and clipped at the edges. Default: "
             "ROME's proportion (10 of GPT-2 XL's 48 layers), a fifth of the model's layers, rounded, at least 1: "
             "6 on SmolLM2 (30 layers), 2 on the embedded model (8 layers), where ROME's 10 would restore nearly "
             "every layer in every cell. Same default as mechedit locate.")] = None,
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds: hidden, mlp, attn.")] = "hidden,mlp,attn",
    seed: Annotated[int, typer.Option(help="Seed of the noise and, with --data, of the random choice of "
                                      "records.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Rows per forward pass (memory is bounded by this).")] = 256,
    out: OutOpt = None,
    data: Annotated[Optional[Path], typer.Option(help="Batch mode: trace records of this CounterFact-layout or "
                                                 "known_1000 file (detected) and average them by token role; "
                                                 "writes summary.json/.md/.html and records/NNNN/ into --out.")
                    ] = None,
    n_records: Annotated[Optional[int], typer.Option("-n", "--n-records", help="With --data: how many records, "
                                                     "chosen at random with --seed (default: all).")] = None,
    known_only: Annotated[bool, typer.Option("--known-only/--all-records", help="With --data: trace only records "
                                             "the model answers correctly (as ROME does), or every record.")
                          ] = True,
) -> None:
    """Causal tracing (Meng et al. 2022): corrupt the subject with noise, restore one state at a time, and see
    which states bring the answer back. With --data, many facts averaged by token role."""
    from mechedit.model import load
    from mechedit.tracing.causal import ROME_WINDOW, CausalTraceConfig, causal_trace, scaled_window

    if data is None and n_records is not None:
        raise InputError("-n/--n-records chooses records of a --data file; pass --data FILE too")
    if data is not None and (prompt, subject, target) != (None, None, None):
        raise InputError("--data traces the file's records; leave out --prompt, --subject and --target")
    cfg = CausalTraceConfig(samples=samples, noise=noise, window=ROME_WINDOW if window is None else window,
                            seed=seed, batch_size=batch_size, kinds=comma_list(kinds))  # checked before loading
    m = load(model)
    if window is None:
        cfg = replace(cfg, window=scaled_window(m.n_layers))
    if data is not None:
        trace_batch(m, data, n_records, seed, cfg, known_only, out)
        return
    if prompt is None and subject is None:
        prompt, subject = default_fact(m)
    if prompt is None or subject is None:
        raise InputError("pass both --prompt and --subject")
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
    if set(result.scores) & {"mlp", "attn"}:
        typer.echo(f"  mlp/attn cells restore a window of {result.config.window} layers centred on each layer "
                   "(clipped at the edges)")
    for kind in result.scores:
        layer, pos, score = result.peak(kind)
        where = "last subject token" if pos == s1 - 1 else ("last token" if pos == len(result.tokens) - 1
                                                             else f"token {pos}")
        typer.echo(f"  {kind:6s} effect peaks at layer {layer}, {where} {result.tokens[pos]!r}: p={score:.4f} "
                   f"(indirect effect {score - result.low_score:+.4f})")
        if pos != s1 - 1:
            col = result.scores[kind][:, s1 - 1]  # (L,) at the last subject token
            best = int(col.argmax())
            typer.echo(f"  {'':6s} at the last subject token it peaks at layer {best}: p={float(col[best]):.4f} "
                       f"(indirect effect {float(col[best]) - result.low_score:+.4f})")


def write_trace(result, out: Path) -> None:
    write_result(result, out)


def write_result(result, out: Path) -> None:
    """``result.json`` (the result's own ``save``), ``result.html`` and ``result.png`` (its ``plot()``) in
    ``out``; a note on stderr for PNGs that need a browser that is missing."""
    from mechedit.viz.export import write_figures

    out.mkdir(parents=True, exist_ok=True)
    result.save(out / "result.json")
    written, notes = write_figures({"result": result.plot()}, out)
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {out / 'result.json'}, " + ", ".join(str(p) for p in written))


# -- batch mode -------------------------------------------------------------------------------------------------


def trace_batch(m, data: Path, n_records: int | None, seed: int, config, known_only: bool, out: Path | None,
                ) -> None:
    """Trace records of ``data`` (through ``mechedit.tracing.summary``), write each record's result and heatmap
    to ``out/records/NNNN/`` (NNNN: the record's position in the file), then the summary."""
    from mechedit.tracing.summary import choose_facts, read_trace_facts, summarize_traces, trace_facts
    from mechedit.viz.export import write_figures

    everything = read_trace_facts(data)
    facts = choose_facts(everything, n_records, seed)
    typer.echo(f"{data}: {len(everything)} {everything[0].source} records; tracing {len(facts)}"
               + (f" chosen at random (seed {seed})" if len(facts) < len(everything) else ""))
    results, skipped, png_notes = [], [], set()
    bar, progress = progress_bar("records")
    with bar:
        progress(0, len(facts))
        for i, done in enumerate(trace_facts(m, facts, config, known_only=known_only,
                                             noise_subjects=[f.subject for f in everything]), start=1):
            if done.result is None:
                skipped.append(done.skip_record())
            else:
                results.append(done.result)
                if out is not None:
                    rec = out / "records" / f"{done.fact.index:04d}"
                    rec.mkdir(parents=True, exist_ok=True)
                    done.result.save(rec / "result.json")
                    png_notes.update(n.split(": ", 1)[-1] for n in write_figures({"result": done.result.plot()},
                                                                                 rec)[1])
            progress(i, len(facts))
    if skipped:
        why: dict[str, int] = {}
        for s in skipped:
            why[s["why"]] = why.get(s["why"], 0) + 1
        typer.echo(f"skipped {len(skipped)} of {len(facts)} records: "
                   + ", ".join(f"{n} {w}" for w, n in why.items())
                   + ("; --all-records traces them anyway" if known_only else ""))
        for s in skipped[:3]:
            typer.echo(f"  e.g. record {s['index']} ({s['prompt']!r}): {s['reason']}")
    summary = summarize_traces(results, skipped)
    print_summary(summary)
    if out is not None:
        summary.save(out / "summary.json")
        (out / "summary.md").write_text(summary.to_markdown())
        written, notes = write_figures({"summary": summary.plot()}, out)
        for note in sorted(png_notes | {n.split(": ", 1)[-1] for n in notes}):
            typer.echo(f"note: PNGs skipped: {note}", err=True)
        typer.echo(f"wrote {out / 'summary.json'}, {out / 'summary.md'}, " + ", ".join(str(p) for p in written)
                   + f" and {len(results)} records in {out / 'records'}")


def print_summary(summary) -> None:
    typer.echo(f"traced {summary.n_records} records: mean clean p={summary.high_score:.4f}, "
               f"corrupted p={summary.low_score:.4f}")
    for kind in summary.effects:
        label, layer, effect = summary.peak(kind)
        typer.echo(f"  {kind:6s} average effect peaks at layer {layer}, {label}: {effect:+.4f}")
