"""`mechedit models ...`: fetch real models into the local cache so they load offline."""

from __future__ import annotations

import typer

from mechedit.cli import app

models_app = typer.Typer(help="Fetch and list models that mechedit can load offline.", no_args_is_help=True)
app.add_typer(models_app, name="models")
