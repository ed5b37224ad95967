"""Typer wiring for each command group; each module registers its commands on fdngx.cli.app."""
