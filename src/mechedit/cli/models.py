"""`mechedit models ...`: fetch real models into the local cache so they load offline."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mechedit.cli import app

models_app = typer.Typer(help="Fetch and list models that mechedit can load offline.", no_args_is_help=True)
app.add_typer(models_app, name="models")

NameArg = Annotated[str, typer.Argument(help="Which model: one of `mechedit models list`, e.g. smollm2-135m.")]


@models_app.command("fetch")
def fetch(name: NameArg,
          force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if cached.")] = False
          ) -> None:
    """Download and convert a model into the local cache (once); afterwards `--model NAME` works offline."""
    from mechedit.fetch import fetch_model

    with Console(stderr=True).status(f"fetching {name}") as status:
        path = fetch_model(name, force=force, progress=status.update)
    typer.echo(f"{name.lower()} is at {path}")


@models_app.command("list")
def list_models() -> None:
    """Show the models mechedit can fetch, whether each is cached, and where."""
    from mechedit.fetch import is_cached, model_dir
    from mechedit.hub import KNOWN_MODELS

    table = Table("name", "cached", "what")
    table.add_column("path", overflow="fold")
    for name, what in sorted(KNOWN_MODELS.items()):
        table.add_row(name, "yes" if is_cached(name) else "no", what, str(model_dir(name)))
    Console().print(table)
