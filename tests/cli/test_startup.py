"""The command line loads the web stack only for the commands that serve."""

from __future__ import annotations

import subprocess
import sys


def test_cli_import_leaves_fastapi_and_uvicorn_unloaded() -> None:
    code = (
        "import sys, exlab_wizard.cli\n"
        "loaded = sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'sse_starlette') if m in sys.modules)\n"
        "print(','.join(loaded))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import exlab_wizard.cli` loaded {out.stdout.strip()}"
