"""Shared CLI plumbing: the ``--config`` option, one-line errors, exit codes.

Exit codes: 0 success, 1 the operation found a problem, 2 usage/config error.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click
import platformdirs
from rich.console import Console

from exlab_wizard.config import Config, ConfigError, load_config

__all__ = ["EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "config_option", "console", "err_console", "fail", "default_config_path", "one_line_errors"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

console = Console()
err_console = Console(stderr=True)


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("exlab-wizard")) / "config.yaml"


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line to stderr and exit."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _load(path: Path | None) -> Config:
    path = path or default_config_path()
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def config_option(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--config FILE`` and pass the loaded :class:`Config` as ``config``."""

    @click.option(
        "--config",
        "config_path",
        type=click.Path(path_type=Path, dir_okay=False),
        default=None,
        help="Config file (default: the platform config folder, exlab-wizard/config.yaml).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, config_path: Path | None, **kwargs: Any) -> Any:
        return func(*args, config=_load(config_path), **kwargs)

    return wrapper


def one_line_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn any unexpected exception into one line on stderr and exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (SystemExit, click.exceptions.Exit, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as exc:  # the CLI never shows a traceback
            fail(f"{type(exc).__name__}: {exc}", EXIT_USAGE)

    return wrapper
