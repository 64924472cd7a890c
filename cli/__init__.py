"""adaptsoup's command line (installed as the import package ``adaptsoup_cli``): a thin Typer app."""
