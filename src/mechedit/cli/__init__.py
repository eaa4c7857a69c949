"""The command line: a thin Typer layer over the library, one command per library entry point.

Errors the user can fix (:class:`mechedit.errors.MecheditError`) print one line and exit with status 2.
"""

from __future__ import annotations

import typer
from typer.core import TyperGroup

from mechedit.errors import MecheditError

USER_ERROR_EXIT = 2


class _Group(TyperGroup):
    """Turns a MecheditError raised anywhere below into one clear message on stderr and exit status 2, never a
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MecheditError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(USER_ERROR_EXIT) from None


app = typer.Typer(
    cls=_Group, no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    help="Locate where a language model stores a fact, show it, edit it surgically, and prove nothing else moved.",
)

# Each module registers its commands on `app` (or a sub-app) when imported.
from mechedit.cli import info as _info  # noqa: E402,F401
from mechedit.cli import models as _models  # noqa: E402,F401
from mechedit.cli import toy as _toy  # noqa: E402,F401
from mechedit.cli import trace as _trace  # noqa: E402,F401
from mechedit.cli import patch as _patch  # noqa: E402,F401
from mechedit.cli import lens as _lens  # noqa: E402,F401
from mechedit.cli import attention as _attention  # noqa: E402,F401
from mechedit.cli import locate as _locate  # noqa: E402,F401
from mechedit.cli import edit as _edit  # noqa: E402,F401
from mechedit.cli import demo as _demo  # noqa: E402,F401
from mechedit.cli import eval as _eval  # noqa: E402,F401
from mechedit.cli import report as _report  # noqa: E402,F401


def main() -> None:
    app(prog_name="mechedit")
