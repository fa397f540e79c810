"""The command tree; each module of this package adds its commands to it."""

import typer

app = typer.Typer(
    help="Compressed experts for Mixture-of-Experts LMs: run fewer full experts per token.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
toy_app = typer.Typer(help="The bundled small MoE: its pretraining recipe and the forms study.", no_args_is_help=True)
app.add_typer(toy_app, name="toy")
