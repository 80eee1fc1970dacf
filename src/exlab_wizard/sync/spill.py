"""Per-file records of a run, in memory up to a bound and in a temporary file beyond it.

A run of 200,000 files holds several maps of a record a file while it is
pushed and verified (its listing, the local digests, the plan of what to
send). Held in memory they grow with the run; past :data:`SPILL_AT` entries
a :class:`SpillMap` moves them to a private SQLite database in a temporary
file, whose page cache is bounded, so the engine's memory stays flat in the
file count.

The file is SQLite's own temporary database (opened with the empty name): it
is unlinked as soon as it is made, in ``SQLITE_TMPDIR`` or ``TMPDIR`` (else
``/var/tmp``, ``/tmp``), so a crash or a power cut leaves nothing behind. When
that folder cannot take the records (full, read-only) as they are written,
the map takes them all back into memory and goes on there: no record lost,
no push failed for it. A read of the file that fails later (the disk gone)
raises ``sqlite3.Error``: the job's step fails and is retried.
"""

from __future__ import annotations

import itertools
import marshal
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from typing import Any, Literal, TypeVar

__all__ = ["SPILL_AT", "SPILL_AT_ENV", "SpillMap", "by_bytes", "items_by_bytes", "keys_by_bytes"]

V = TypeVar("V")

#: ``EXLAB_SPILL_AT``: another bound (a PC short of memory: lower; 0: every map on disk from its
#: first entry, as the torture and power-cut runs can ask). Anything but digits is ignored.
SPILL_AT_ENV = "EXLAB_SPILL_AT"


def _bound(text: str | None) -> int:
    return int(text) if text is not None and text.strip().isdigit() else 32_768


#: Entries a map holds in memory before it moves them to disk (~10 MB of records at most).
SPILL_AT = _bound(os.environ.get(SPILL_AT_ENV))

#: Writes held in memory between two flushes to the database once spilled.
_PENDING = 4096

#: Rows taken from the database at a time while iterating.
_FETCH = 1024

#: Rows read ahead by a lookup that missed them: at least, and at most.
_NEAR_MIN = 8
_NEAR_MAX = 4096

#: Lookups answered one row at a time after rows read ahead answered none, before trying again.
_POINTS = 32

_NEAR_SQL = "SELECT k, v FROM m WHERE k >= ? ORDER BY k LIMIT ?"

#: The database's page cache: the memory a spilled map keeps, whatever its size.
_CACHE_KIB = 2048


class SpillMap(MutableMapping[str, V]):
    """A ``dict`` of relative path -> record (a ``str``, an ``int`` or a tuple of them) that spills to disk.

    Up to ``spill_at`` entries (default :data:`SPILL_AT`, read when the map is made; None:
    never spill) it is a plain dict; beyond, its entries live in
    a temporary SQLite file and a few thousand writes wait in memory between
    flushes. Safe to use from several threads (one lock). Iteration is in
    insertion order while in memory and in the byte order of the keys once
    spilled; :func:`items_by_bytes` gives the byte order either way. The map
    must not change while it is iterated. Values are stored as they are when
    text, marshalled otherwise (never ``bytes``).
    """

    def __init__(self, spill_at: int | None | Literal["default"] = "default"):
        self._spill_at = SPILL_AT if spill_at == "default" else spill_at
        self._mem: dict[str, V] = {}
        self._db: sqlite3.Connection | None = None
        self._pending: dict[str, V] = {}  # spilled: writes not yet in the database
        self._lock = threading.RLock()
        # Spilled: the rows read ahead of the last lookup that missed them, by key order. The
        # lookups of a verification come folder by folder: most are answered from here.
        self._near: dict[bytes, bytes] = {}
        self._near_from: bytes | None = None  # every key from this one ...
        self._near_to: bytes | None = None  # ... to this one (None: to the end) is in _near, or absent
        self._near_hits = 0
        self._points = 0  # lookups answered one row at a time before rows are read ahead again

    # ------------------------------------------------------------------ the mapping

    @property
    def spilled(self) -> bool:
        """Are the entries on disk now?"""
        return self._db is not None

    def __getitem__(self, key: str) -> V:
        with self._lock:
            if self._db is None:
                return self._mem[key]
            if key in self._pending:
                return self._pending[key]
            stored = self._read_near(_key(key))
        if stored is None:
            raise KeyError(key)
        return _value(stored)

    def __setitem__(self, key: str, value: V) -> None:
        with self._lock:
            if self._db is None:
                self._mem[key] = value
                if self._spill_at is not None and len(self._mem) > self._spill_at:
                    self._spill()
                return
            self._pending[key] = value
            if len(self._pending) >= _PENDING:
                self._flush()

    def __delitem__(self, key: str) -> None:
        with self._lock:
            if self._db is None:
                del self._mem[key]
                return
            self._flush()
            if self._db is None:  # the flush failed: back in memory
                del self._mem[key]
                return
            self._near_from = None
            if self._db.execute("DELETE FROM m WHERE k = ?", (_key(key),)).rowcount == 0:
                raise KeyError(key)

    def __len__(self) -> int:
        with self._lock:
            self._flush()
            if self._db is None:
                return len(self._mem)
            return self._db.execute("SELECT count(*) FROM m").fetchone()[0]

    def __iter__(self) -> Iterator[str]:
        for key, _stored in self._rows(ordered=False):
            yield key

    def items(self) -> Iterator[tuple[str, V]]:  # type: ignore[override]
        """``(key, value)`` in the map's order, without a lookup a key."""
        return self._rows(ordered=False)

    def values(self) -> Iterator[V]:  # type: ignore[override]
        return (value for _key, value in self._rows(ordered=False))

    def ordered_items(self) -> Iterator[tuple[str, V]]:
        """``(key, value)`` by the bytes of the key (``os.fsencode``): a manifest's order."""
        return self._rows(ordered=True)

    def clear(self) -> None:
        self.close()

    def close(self) -> None:
        """Forget every entry, and the database (and its file) when spilled: the map is empty after."""
        with self._lock:
            self._mem = {}
            db, self._db = self._db, None
            self._pending.clear()
            self._near, self._near_from = {}, None
        if db is not None:
            db.close()

    def __repr__(self) -> str:
        return f"<SpillMap {len(self)} entries{' on disk' if self.spilled else ''}>"

    # ------------------------------------------------------------------ inside

    def _rows(self, *, ordered: bool) -> Iterator[tuple[str, Any]]:
        with self._lock:
            self._flush()
            if self._db is None:
                mem = self._mem  # iterated as a dict is: changed meanwhile, it raises
                cursor = None
            else:
                cursor = self._db.execute("SELECT k, v FROM m ORDER BY k")  # the table's own order
        if cursor is None:
            if ordered:
                yield from ((key, mem[key]) for key in by_bytes(mem))
            else:
                yield from mem.items()
            return
        while True:
            with self._lock:
                batch = cursor.fetchmany(_FETCH)
            if not batch:
                return
            for key, stored in batch:
                yield _path(key), _value(stored)

    def _read_near(self, key: str) -> Any:
        """The stored value of the stored ``key``, from the rows read ahead, or read with the rows after it.

        As many rows are read ahead as twice the lookups the last read answered (within
        :data:`_NEAR_MIN` and :data:`_NEAR_MAX`): lookups in key order (another map's, or a
        folder's names sorted) read thousands of rows a query, scattered ones a few.
        """
        start, end = self._near_from, self._near_to
        if start is not None and start <= key and (end is None or key <= end):
            self._near_hits += 1
            return self._near.get(key)
        assert self._db is not None
        if self._points:
            self._points -= 1  # at 0, rows are read ahead again below
        elif start is not None and not self._near_hits:
            self._points = _POINTS  # the last rows read ahead answered nothing: scattered lookups
        if self._points:
            row = self._db.execute("SELECT v FROM m WHERE k = ?", (key,)).fetchone()
            return None if row is None else row[0]
        size = max(_NEAR_MIN, min(_NEAR_MAX, 2 * self._near_hits))
        rows = self._db.execute(_NEAR_SQL, (key, size)).fetchall()
        self._near = dict(rows)
        self._near_from, self._near_to = key, (rows[-1][0] if len(rows) == size else None)
        self._near_hits = 0
        return self._near.get(key)

    def _spill(self) -> None:
        """Move every entry to a new temporary database; on any error stay in memory for good."""
        try:
            db = sqlite3.connect("", check_same_thread=False, isolation_level=None)
        except sqlite3.Error:
            self._spill_at = None
            return
        try:
            db.execute("PRAGMA journal_mode=MEMORY")  # a failed write rolls back: never a torn table
            db.execute("PRAGMA synchronous=OFF")
            db.execute(f"PRAGMA cache_size=-{_CACHE_KIB}")
            db.execute("CREATE TABLE m (k TEXT PRIMARY KEY, v NOT NULL) WITHOUT ROWID")
            _insert(db, self._mem.items())
        except (sqlite3.Error, ValueError):
            db.close()
            self._spill_at = None  # a temporary folder that cannot hold them: memory it is
            return
        self._db = db
        self._mem = {}

    def _flush(self) -> None:
        """The pending writes into the database; on an error every entry back into memory."""
        if self._db is None or not self._pending:
            return
        self._near_from = None  # rows added: what was read ahead is not all there is
        try:
            _insert(self._db, self._pending.items())
        except (sqlite3.Error, ValueError):
            self._unspill()
            return
        self._pending = {}

    def _unspill(self) -> None:
        db = self._db
        assert db is not None
        mem: dict[str, V] = {_path(k): _value(v) for k, v in db.execute("SELECT k, v FROM m")}
        mem.update(self._pending)
        self._mem, self._pending, self._db, self._spill_at = mem, {}, None, None
        self._near, self._near_from = {}, None
        db.close()


def _key(path: str) -> str:
    """A path as stored: itself when ASCII, else its bytes as Latin-1 code points.

    SQLite orders text by its UTF-8 bytes, which keep code point order: either way the table's
    order is the byte order of the paths (a name that is not UTF-8 included). Two strings with
    the same ``os.fsencode`` bytes are one key (``"\\udcc3\\udca9"`` and ``"é"``): only one of
    them is ever a decoded file name.
    """
    return path if path.isascii() else os.fsencode(path).decode("latin-1")


def _path(key: str) -> str:
    return key if key.isascii() else os.fsdecode(key.encode("latin-1"))


def _value(stored: str | bytes) -> Any:
    """A stored value: text as it is, anything else (ints, tuples) marshalled."""
    return stored if type(stored) is str else marshal.loads(stored)


def _insert(db: sqlite3.Connection, items: Iterable[tuple[str, Any]]) -> None:
    """Every item written, in one transaction; none on an error."""
    taken = iter(items)
    db.execute("BEGIN")
    try:
        while rows := [
            (_key(key), value if type(value) is str else marshal.dumps(value))
            for key, value in itertools.islice(taken, _PENDING)  # a few thousand rows built at a time
        ]:
            db.executemany("INSERT OR REPLACE INTO m (k, v) VALUES (?, ?)", rows)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


# --------------------------------------------------------------------------- byte order


def by_bytes(keys: Iterable[str]) -> list[str]:
    """``keys`` sorted by their bytes (os.fsencode), without making those bytes when not needed.

    UTF-8 keeps code point order, so a plain sort is the byte order unless a
    key holds a surrogate escape (a non-UTF-8 name): only then sorted by bytes.
    """
    ordered = sorted(keys)
    if not all(key.isascii() or _utf8(key) for key in ordered):
        ordered.sort(key=os.fsencode)
    return ordered


def _utf8(key: str) -> bool:
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def items_by_bytes(mapping: Mapping[str, V]) -> Iterator[tuple[str, V]]:
    """The entries of ``mapping`` by the bytes of their keys; a spilled map's straight from its file."""
    if isinstance(mapping, SpillMap):
        return mapping.ordered_items()
    return ((key, mapping[key]) for key in by_bytes(mapping))


def keys_by_bytes(keys: Iterable[str]) -> Iterator[str]:
    """The keys of a map (or any paths) by their bytes; a spilled map's without holding them all."""
    if isinstance(keys, SpillMap):
        return (key for key, _value in keys.ordered_items())
    return iter(by_bytes(keys))
