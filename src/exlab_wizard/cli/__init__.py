"""``exlab-sync``: the command line. Thin: every command calls the library.

Each command group lives in its own module and registers itself on :data:`main`.
"""

from __future__ import annotations

import importlib

import click

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="exlab-wizard")
def main() -> None:
    """Move lab instrument runs to the NAS, verified byte for byte."""


for _module in ("problems", "sync_cmds", "demo", "cleanup", "serve", "overrides", "doctor"):
    try:
        importlib.import_module(f"exlab_wizard.cli.{_module}")
    except ModuleNotFoundError as exc:  # a command group not built yet
        if exc.name != f"exlab_wizard.cli.{_module}":
            raise
