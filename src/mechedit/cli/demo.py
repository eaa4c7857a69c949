"""`mechedit demo`: the main job on the embedded world model, end to end.

Trace a fact, show where it lives, edit it with ROME at that layer, show that the edit took (prompt and
paraphrase) and what else moved (a neighbour, and the top answer of other facts), then restore the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechedit.cli import app
from mechedit.cli.trace import print_trace_summary, progress_bar, write_trace


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's results and figures.")] = Path("mechedit-demo"),
    n_control: Annotated[int, typer.Option(help="Other facts checked for unintended changes.")] = 200,
) -> None:
    """Run the main job on the embedded world model: trace a fact, edit it, show what changed."""
    import random

    from mechedit.answering import answers
    from mechedit.cli.edit import default_request
    from mechedit.editing import rome
    from mechedit.model import load
    from mechedit.toy.world import World
    from mechedit.tracing.causal import CausalTraceConfig, causal_trace

    m = load()
    typer.echo(f"model: embedded world model ({m.architecture}, {m.n_layers} layers, d_model {m.d_model}) "
               f"at {m.path}")
    request = default_request(m)
    typer.echo(f"\n1. Where does the model keep this fact?  {request.prompt!r} -> {request.target_true!r}")
    cfg = CausalTraceConfig(window=max(1, round(m.n_layers / 5)))
    bar, progress = progress_bar("causal trace")
    with bar:
        trace = causal_trace(m, request.prompt, request.subject, request.target_true, cfg, progress=progress)
    print_trace_summary(trace)
    write_trace(trace, out / "trace")

    typer.echo(f"\n2. Edit it: {request.prompt!r} -> {request.target_new!r} (ROME at the layer where this model "
               "keeps facts: the MLP trace peak averaged over known facts, traced once per model)")
    world = World.load(m.path / "world.json")
    others = [(p, a) for p, a, f in world.recall_prompts("train") if f.subject != request.subject]
    control = [p for p, _ in random.Random(0).sample(others, min(n_control, len(others)))]
    prompts = [request.prompt, *request.paraphrases, *(p for p, _ in request.neighborhood)]
    targets = (request.target_new, request.target_true or "")
    before, before_ctl = answers(m, prompts, targets), answers(m, control)
    bar, progress = progress_bar("edit layer (averaged trace)")
    with bar:
        handle = rome(m, request, progress=lambda stage, done, total: progress(done, total) if stage == "trace"
                      else None)
    with handle:
        after, after_ctl = answers(m, prompts, targets), answers(m, control)
        handle.save(out / "edit")
        typer.echo(f"   edited layer {handle.evidence.get('layer')}; the edit is saved in {out / 'edit'}")
    kinds = ["edit prompt"] + ["paraphrase"] * len(request.paraphrases) + ["neighbour"] * len(request.neighborhood)
    typer.echo("\n3. Did it take, and what else moved?")
    for kind, b, a in zip(kinds, before, after):
        typer.echo(f"   {kind:11s} {b.prompt!r}: {b.top!r} -> {a.top!r}  "
                   f"(p new {b.target_probs[request.target_new]:.2f} -> {a.target_probs[request.target_new]:.2f})")
    same = sum(b.top == a.top for b, a in zip(before_ctl, after_ctl))
    typer.echo(f"   other facts with the same top answer: {same}/{len(control)}")
    restored = answers(m, control[:20])
    assert all(r.top == b.top for r, b in zip(restored, before_ctl)), "restore changed answers"
    typer.echo("   the model is restored (bit-exact); open "
               f"{out / 'trace' / 'result.html'} for the causal-trace heatmaps.")
