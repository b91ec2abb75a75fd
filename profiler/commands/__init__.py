"""The commands layer: the Typer app and one module per verb; terminal output lives here."""
