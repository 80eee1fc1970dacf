"""Fixtures for client tests: ``lab`` (two equipments on mounted "NAS" folders) and
``site`` (one equipment on the mount transport, then on rsync_ssh to the loopback sshd).
The labs themselves are built by tests/lab.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lab import Lab, Site, client_lab


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    return client_lab(tmp_path)


@pytest.fixture(params=["mount", "rsync_ssh"])
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Site:
    return Site.on(request, tmp_path, request.param)
