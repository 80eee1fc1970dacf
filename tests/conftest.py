"""Shared fixtures. Fixture modules under tests/fixtures/ are plugins listed here."""

from __future__ import annotations

pytest_plugins: list[str] = ["tests.fixtures.sshd", "tests.fixtures.rclone_serve", "tests.fixtures.samba_server"]
