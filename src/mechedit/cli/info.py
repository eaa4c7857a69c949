"""`mechedit info`: the loaded model's facts."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mechedit.cli import app

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Local HF directory, 'smollm2-135m', or a hub "
                                                 "name. Default: the embedded world model.")]


@app.command()
def info(model: ModelOpt = None,
         as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Print the model's architecture facts: layers, heads, widths, module names, checkpoint path."""
    from mechedit.model import load

    facts = load(model).info()
    if as_json:
        typer.echo(json.dumps(facts, indent=1))
        return
    table = Table(show_header=False, box=None)
    for k, v in facts.items():
        table.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    Console().print(table)
