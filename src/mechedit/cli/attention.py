"""`mechedit attention`: every head's attention pattern on one prompt, drawn by circuitsvis
(:func:`mechedit.viz.attention.attention_patterns`), written to ``--out``/attention.html (works offline), with a
terminal line per head saying where the last token looks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.cli.info import ModelOpt
from mechedit.cli.trace import PromptOpt, comma_list, default_fact
from mechedit.errors import InputError


@app.command()
def attention(
    model: ModelOpt = None,
    prompt: PromptOpt = None,
    layers: Annotated[Optional[str], typer.Option(
        "--layer", "--layers", help="Comma-separated layers to draw (default: all).")] = None,
    out: Annotated[Path, typer.Option(help="Directory for attention.html.")] = Path("."),
) -> None:
    """Attention patterns (circuitsvis): a thumbnail per head, click one to see it full size."""
    from mechedit.model import load
    from mechedit.viz import attention as lib

    m = load(model)
    if prompt is None:
        prompt, _ = default_fact(m)
    try:
        chosen = [int(x) for x in comma_list(layers)] if layers is not None else list(range(m.n_layers))
    except ValueError:
        raise InputError(f"--layer takes comma-separated layer numbers, got {layers!r}") from None
    tokens, pattern = lib.read_patterns(m, prompt, chosen)  # validates layers and prompt before drawing
    last = pattern[:, :, -1]  # (n, H, T_src): where the last token looks
    typer.echo(f"{prompt!r}: {len(tokens)} tokens; the last token {tokens[-1]!r} attends most to")
    for i, layer in enumerate(chosen):
        tops = [f"H{h} {tokens[int(row.argmax())]!r} ({float(row.max()):.2f})" for h, row in enumerate(last[i])]
        typer.echo(f"  layer {layer}: " + ", ".join(tops))
    rendered = lib.draw_patterns(tokens, pattern, chosen)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "attention.html"
    title = f"Attention patterns, layer{'s' if len(chosen) > 1 else ''} {', '.join(map(str, chosen))}: {prompt!r}"
    path.write_text(lib.attention_page(rendered, title))
    typer.echo(f"wrote {path}")
