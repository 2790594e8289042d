"""The Typer app: thin commands that check input, call one library function and print."""
