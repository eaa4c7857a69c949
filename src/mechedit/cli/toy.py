"""`mechedit toy ...`: the embedded world model: rebuild it, export its facts, measure its quality."""

from __future__ import annotations

import typer

from mechedit.cli import app

toy_app = typer.Typer(help="The embedded world model: build, export, quality.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
