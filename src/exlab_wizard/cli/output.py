"""How the CLI prints: rich tables on a terminal, tab-separated lines otherwise, JSON documents.

- :func:`show_table`: a :class:`rich.table.Table` as drawn on a terminal; when
  stdout is not a terminal (a pipe, a file, a cron mail) a header line of the
  column names and one line per row, cells separated by a tab, never wrapped,
  no title, no colours. A control character inside a cell (a tab, a line
  break) is escaped as :func:`~exlab_wizard.cli.common.printable` does, so a
  row stays one line.
- :func:`emit_json`: one JSON document on stdout (``--json``); the keys of
  each document are listed in ``docs/cli.md``.
- :func:`run_label`: a run as tables show it, relative to the local root of
  the equipment that holds it (``CONFOCAL_01/PROJ/Runs/Run_1``).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from rich.table import Table
from rich.text import Text

from exlab_wizard.cli.common import console, printable
from exlab_wizard.config import Config

__all__ = ["emit_json", "run_label", "show_table", "tsv_line"]


def _plain(cell: Any) -> str:
    if isinstance(cell, Text):
        text = cell.plain
    elif isinstance(cell, str):
        try:
            text = Text.from_markup(cell).plain
        except Exception:  # not markup after all: print it as written
            text = cell
    else:
        text = str(cell)
    return printable(text)  # control characters (a tab, a line break) escaped: one row, one line


def tsv_line(cells: list[Any]) -> str:
    return "\t".join(_plain(cell) for cell in cells)


def show_table(table: Table) -> None:
    """Print ``table``: drawn on a terminal, tab-separated lines otherwise."""
    if console.is_terminal:
        console.print(table, soft_wrap=False)  # drawn to the terminal's width (the console's lines are not)
        return
    columns = [list(column.cells) for column in table.columns]
    out = [tsv_line([column.header for column in table.columns])]
    for index in range(table.row_count):
        out.append(tsv_line([cells[index] if index < len(cells) else "" for cells in columns]))
    sys.stdout.write("\n".join(out) + "\n")
    sys.stdout.flush()


def emit_json(document: Any) -> None:
    """One JSON document on stdout (ASCII: a name that is not UTF-8 survives as ``\\udcXX``)."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")
    sys.stdout.flush()


def run_label(config: Config, run_path: str) -> str:
    """``run_path`` relative to the local root of the equipment holding it, else as given (escaped)."""
    path = os.path.abspath(run_path)
    for equipment in config.equipment:
        root = os.path.abspath(equipment.equipment_root)
        if path == root or path.startswith(root.rstrip(os.sep) + os.sep):
            return printable(os.path.relpath(path, os.path.dirname(root)))
    return printable(run_path)
