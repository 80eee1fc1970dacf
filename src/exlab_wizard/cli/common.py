"""Shared CLI plumbing: the ``--config`` option, one-line errors, exit codes.

Exit codes: 0 success, 1 the operation found a problem, 2 usage/config error.

:data:`console` and :data:`err_console` never break a printed line: a path, a
job id or a command to paste stays on its line however narrow the terminal,
and piped (where rich would otherwise wrap at 80 columns). Tables are drawn
to the terminal's width as before: they are printed with ``soft_wrap=False``.
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
from rich.text import Text

from exlab_wizard.config import Config, ConfigError, load_config
from exlab_wizard.sync.queue_damage import QueueDamaged
from exlab_wizard.sync.state_dir import ForeignStateDirError, check_writer, make_state_dir

__all__ = [
    "EXIT_OK",
    "EXIT_PROBLEM",
    "EXIT_USAGE",
    "config_option",
    "console",
    "err_console",
    "fail",
    "default_config_path",
    "ensure_state_dir",
    "one_line_errors",
    "printable",
]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2

# soft_wrap: a line longer than the terminal is left for the terminal to fold, never cut with a line break.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)


def default_config_path() -> Path:
    return Path(platformdirs.user_config_dir("exlab-wizard")) / "config.yaml"


def printable(text: str) -> str:
    """A name for a terminal: control characters and undecodable bytes escaped.

    Print the result as plain text (``rich.text.Text`` or ``markup=False``) so
    that ``[...]`` in a name is not read as rich markup either.
    """
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])
    return "".join(out)


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear line to stderr and exit (the message is plain text, escaped)."""
    err_console.print(Text.assemble(("error:", "bold red"), " ", printable(message)), highlight=False, soft_wrap=True)
    sys.exit(code)


def _load(path: Path | None) -> Config:
    path = path or default_config_path()
    try:
        return load_config(path)
    except ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


def ensure_state_dir(config: Config) -> None:
    """Create ``state_dir`` (0700) when missing, or exit 2 with one line naming the key.

    Every command that writes in ``state_dir`` (the queue commands, ``cleanup``,
    ``serve``) calls this first. Run as root on a ``state_dir`` another user
    owns (``sudo exlab-sync jobs`` beside the systemd service) it exits 2
    before touching the folder: the files root would make there (a central
    log rolled over, the lease, a new queue database) would be root's, and the
    service could no longer open them.
    """
    try:
        check_writer(config.state_dir)
        make_state_dir(config.state_dir)
    except ForeignStateDirError as exc:
        fail(str(exc), EXIT_USAGE)
    except FileExistsError:
        fail(f"state_dir: {config.state_dir} exists and is not a folder", EXIT_USAGE)
    except OSError as exc:
        fail(f"state_dir: cannot create {config.state_dir}: {exc.strerror or exc}", EXIT_USAGE)


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
        except QueueDamaged as exc:  # its line names the file and the way out
            fail(str(exc), EXIT_USAGE)
        except Exception as exc:  # the CLI never shows a traceback
            fail(f"{type(exc).__name__}: {exc}", EXIT_USAGE)

    return wrapper
