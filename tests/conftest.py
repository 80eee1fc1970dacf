"""Shared fixtures. Fixture modules under tests/fixtures/ are plugins listed here."""

from __future__ import annotations

pytest_plugins: list[str] = []
