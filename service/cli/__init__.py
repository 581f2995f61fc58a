"""The ``cbam-nas`` command line: the root typer app, with the commands of the modules here.

Bad input exits with code 2 and a message that names the field and the allowed values.
Commands import torch-heavy modules when they run, so that --help stays instant.
"""

from __future__ import annotations

import typer

from service.cli import inspection, local, predict, remote, tokens

app = typer.Typer(
    name="cbam-nas",
    help="Search where and how to put CBAM attention into a CNN.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def main() -> None:
    """Search where and how to put CBAM attention into a CNN."""


# Without a name a module's commands join the root's; --help lists them in this order.
app.add_typer(inspection.commands)
app.add_typer(local.commands)
app.add_typer(remote.commands)
app.add_typer(predict.commands)
app.add_typer(tokens.token_app, name="token")

__all__ = ["app"]
