"""`glsd visualize ...`: pictures of what a checkpoint learned. Not implemented yet (issue 10)."""
from __future__ import annotations

import typer

app = typer.Typer(help="Pictures: attention maps, token matches, feature embeddings. Not implemented yet (issue 10).",
                  no_args_is_help=True)


@app.command("attention")
def attention() -> None:
    """Last-layer CLS attention maps. Not implemented yet (issue 10)."""
    from glsd_cli.errors import GlsdError

    raise GlsdError("`glsd visualize attention` is not implemented yet (tracked in issue 10)")
