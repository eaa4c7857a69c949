"""`mechedit report`: one self-contained HTML page for an edit (``--edit DIR``, the ``--out`` of ``mechedit
edit``) or for a study's results directory (``--study DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mechedit.cli import app
from mechedit.errors import InputError


@app.command()
def report(
    edit: Annotated[Optional[Path], typer.Option("--edit", help="An edit's directory: the --out of "
                                                 "`mechedit edit`.")] = None,
    study: Annotated[Optional[Path], typer.Option("--study", help="A study's results directory (JSON results, "
                                                  "markdown tables, PNG figures).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="The HTML file to write (default: DIR/report.html).")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="With --edit: the unedited model (default: "
                                                 "the one named in the saved edit).")] = None,
    generate: Annotated[Optional[list[str]], typer.Option(help="With --edit: another prompt for the free "
                                                          "generations (repeatable).")] = None,
    samples: Annotated[int, typer.Option(help="With --edit: noise samples per cell when the fact has to be "
                                         "traced (ROME: 10).")] = 10,
    window: Annotated[Optional[int], typer.Option(help="With --edit: layers restored together for mlp/attn when "
                                                  "the fact has to be traced (default: a fifth of the layers; "
                                                  "ROME: 10).")] = None,
) -> None:
    """Write an HTML report (opens offline): of one edit, or of a study's results."""
    if (edit is None) == (study is None):
        raise InputError("pass exactly one of --edit DIR or --study DIR")
    if study is not None:
        from mechedit.report import write_study_report

        if model is not None or generate:
            raise InputError("--model and --generate apply to --edit reports only")
        typer.echo(f"wrote {write_study_report(study, out)}")
        return
    from mechedit.report import EditOutput, write_edit_report
    EditOutput.read(edit)  # not an edit output: one clear line before loading a model
    page = write_edit_report(edit, out, model=model, generate=generate or [], trace_samples=samples,
                             trace_window=window,
                             progress=lambda msg: typer.echo(f"{msg} ...", err=True))
    typer.echo(f"wrote {page}")
