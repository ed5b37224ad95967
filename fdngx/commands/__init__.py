"""One module per command: parse options, call one core function, print its result. `register(app)` puts
each on the typer app in fdngx.cli; none of them imports fdngx.cli."""
