"""Small helpers shared by the tests."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

__all__ = ["require_tool"]


def require_tool(name: str) -> str:
    """Path of an external tool the test needs.

    A missing tool fails the test (never skips): ``scripts/bootstrap.sh``
    installs every tool the suite uses, so a missing one is a broken setup.
    """
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        for folder in ("/usr/sbin", "/sbin"):
            candidate = Path(folder) / name
            if candidate.exists():
                return str(candidate)
        pytest.fail(f"{name} is not installed; run scripts/bootstrap.sh", pytrace=False)
    return found
