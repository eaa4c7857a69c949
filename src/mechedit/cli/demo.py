"""`mechedit demo`: the main job on the embedded world model, end to end.

Trace a fact, show where it lives, (once editing exists: edit it, show that the edit took and what else moved),
and write every figure to ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mechedit.cli import app
from mechedit.cli.trace import default_fact, print_trace_summary, progress_bar, write_trace


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's results and figures.")] = Path("mechedit-demo"),
) -> None:
    """Run the main job on the embedded world model: load it, trace a fact, show where it lives."""
    from mechedit.model import load
    from mechedit.tracing.causal import CausalTraceConfig, causal_trace

    m = load()
    typer.echo(f"model: embedded world model ({m.architecture}, {m.n_layers} layers, d_model {m.d_model}) "
               f"at {m.path}")
    prompt, subject = default_fact(m)
    typer.echo(f"\n1. Where does the model keep this fact?  {prompt!r} (subject {subject!r})")
    cfg = CausalTraceConfig(window=max(1, round(m.n_layers / 5)))
    bar, progress = progress_bar("causal trace")
    with bar:
        result = causal_trace(m, prompt, subject, None, cfg, progress=progress)
    print_trace_summary(result)
    write_trace(result, out / "trace")
    typer.echo(f"\nOpen {out / 'trace' / 'result.html'} to see the causal-trace heatmaps.")
