"""`mechedit toy ...`: the embedded world model: rebuild it, export its facts, measure its quality."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app

toy_app = typer.Typer(help="The embedded world model: build, export, quality.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")


# -- mechedit toy export ---------------------------------------------------------------------------------------


@toy_app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="Where to write the records (JSON, CounterFact's EasyEdit layout).")],
    n: Annotated[Optional[int], typer.Option("-n", "--n", help="Export a seeded random subset of N facts. "
                                             "Default: every fact.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the subset, the counterfactual targets, the templates and "
                                      "the neighbours.")] = 0,
) -> None:
    """Write the embedded world's facts as CounterFact-style edit requests, readable by `read_counterfact`."""
    from mechedit.data import write_counterfact
    from mechedit.toy.export import embedded_world, world_records

    records = world_records(embedded_world(), n=n, seed=seed)
    write_counterfact(records, path)
    typer.echo(f"wrote {len(records)} records to {path}")
