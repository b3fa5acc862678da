from rdro_cli.cli import app

app()
