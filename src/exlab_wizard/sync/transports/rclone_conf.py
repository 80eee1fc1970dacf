"""What an rclone remote is: a digest of its definition, for :func:`~exlab_wizard.sync.transports.base.run_location`.

A lab moves to a new NAS the rclone way by editing the remote in
``rclone.conf`` (a new host, bucket or share under the same name). The
config file's path alone would call that the same place, and the reaper
would delete on the strength of passes read at the old one. So the place
of an rclone run names the remote's settings too: its section of the config
file, every remote it refers to (``alias``, ``crypt``, ``union``,
``chunker``, ... name another remote in a value as ``name:path``), and the
``RCLONE_CONFIG_<NAME>_*`` environment variables that override them; not
an OAuth ``token``, which rclone refreshes in the file on its own. An
encrypted config file, or one that does not parse, counts as a whole.
The file is read on every call (a few KiB) and parsed once per content:
a stat key (inode, size, mtime) would miss an edit that keeps the size
within one tick of a coarse clock (FAT, SMB: 2 s).
"""

from __future__ import annotations

import configparser
import hashlib
import os
from pathlib import Path

__all__ = ["config_path", "remote_digest", "remote_section"]

#: Keys rclone itself rewrites while the remote stays where it is: an OAuth backend's access token
#: (OneDrive, Google Drive, Dropbox, Box: refreshed about hourly and written back to the file).
#: Counted, every refresh would look like a move, and the reaper would wait for ever.
_VOLATILE = frozenset({"token"})

_CACHE: dict[tuple[bytes, str], str] = {}
_CACHE_MAX = 64


def config_path(configured: Path | None) -> Path:
    """The config file rclone reads: the configured one, else ``$RCLONE_CONFIG``, else its default."""
    if configured is not None:
        return Path(configured)
    if os.environ.get("RCLONE_CONFIG"):
        return Path(os.environ["RCLONE_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "rclone" / "rclone.conf"


def remote_digest(configured: Path | None, remote: str) -> str:
    """16 hex digits naming the definition of ``remote`` (no trailing colon); ``none`` with no config file."""
    prefix = f"RCLONE_CONFIG_{remote.upper()}_"
    env = sorted(
        (key, value)
        for key, value in os.environ.items()
        if key.startswith(prefix) and key[len(prefix) :].lower() not in _VOLATILE
    )
    path = config_path(configured)
    try:
        raw = path.read_bytes()
        key = (hashlib.sha256(raw).digest(), remote)
        found = _CACHE.get(key)
        if found is None:
            found = _definition(raw, remote)
            if len(_CACHE) >= _CACHE_MAX:
                _CACHE.clear()
            _CACHE[key] = found
    except OSError:
        found = "none"
    if not env:
        return found
    return hashlib.sha256(repr((found, env)).encode()).hexdigest()[:16]


def remote_section(configured: Path | None, remote: str) -> dict[str, str] | None:
    """The keys and values of ``remote``'s section of the config file, as written there.

    None when that cannot be told: no file, one that cannot be read, an
    encrypted one, one that does not parse, or no such section (a remote
    defined by environment variables alone).
    """
    try:
        parser = _parsed(config_path(configured).read_bytes())
    except OSError:
        return None
    if parser is None or not parser.has_section(remote):
        return None
    return dict(parser.items(remote))


def _parsed(raw: bytes) -> configparser.RawConfigParser | None:
    """The config file's sections; None for an encrypted file or one that does not parse."""
    text = raw.decode("utf-8", "replace")
    if text.lstrip().startswith("# Encrypted rclone configuration"):
        return None
    parser = configparser.RawConfigParser(strict=False, interpolation=None, default_section="\0")
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys as written
    try:
        parser.read_string(text)
    except configparser.Error:
        return None
    return parser


def _definition(raw: bytes, remote: str) -> str:
    parser = _parsed(raw)
    if parser is None:
        return hashlib.sha256(raw).hexdigest()[:16]
    parts: list[tuple[str, list[tuple[str, str]]]] = []
    seen: set[str] = set()
    pending = [remote]
    while pending:
        name = pending.pop()
        if name in seen or not parser.has_section(name):
            continue
        seen.add(name)
        items = sorted((key, value) for key, value in parser.items(name) if key not in _VOLATILE)
        parts.append((name, items))
        for _key, value in items:
            for token in value.split():
                ref, colon, _rest = token.partition(":")
                if colon and ref and parser.has_section(ref):
                    pending.append(ref)
    if not parts:
        return "none"
    return hashlib.sha256(repr(sorted(parts)).encode()).hexdigest()[:16]
