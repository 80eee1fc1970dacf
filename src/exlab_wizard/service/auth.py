"""Who may change things through the HTTP API.

Two proofs, checked by :meth:`Auth.check_mutation`:

- ``Authorization: Bearer <token>``, the token kept in ``<state_dir>/api-token``
  (mode 0600, made at the first start). Scripts and the CLI use it.
- A browser session: ``serve`` prints a one-time login address
  (``/login?code=...``, single use, valid :data:`LOGIN_CODE_TTL_S`); opening it
  sets an HttpOnly, SameSite=Strict cookie holding a random session id (never
  the token). A mutation carried by that cookie must also carry an ``Origin``
  header naming this server, so another site cannot make the browser act.

The answer is an :class:`AuthOutcome`: ``ok``, ``missing`` (401: no
credential, or a session that expired) or ``denied`` (403: a wrong token, or a
session cookie without this server's ``Origin``). Secrets are compared in constant time. Sessions and login codes live
in memory: a restart means logging in again from the address it prints.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = [
    "COOKIE_NAME",
    "LOGIN_CODE_TTL_S",
    "SESSION_TTL_S",
    "TOKEN_NAME",
    "Auth",
    "AuthOutcome",
    "load_or_create_token",
]

logger = logging.getLogger(__name__)

TOKEN_NAME = "api-token"
COOKIE_NAME = "exlab_session"
#: A login address works once, within this many seconds.
LOGIN_CODE_TTL_S = 600.0
#: A browser session lasts this long (a working day and a half).
SESSION_TTL_S = 36 * 3600.0


class AuthOutcome(StrEnum):
    OK = "ok"
    MISSING = "missing"  # no credential at all: 401
    DENIED = "denied"  # a wrong or stale credential, or a foreign Origin: 403


def load_or_create_token(state_dir: Path) -> str:
    """The API token from ``<state_dir>/api-token``; made (0600, ``secrets.token_urlsafe``) when missing.

    A token file readable by others is narrowed to 0600 (and logged). A file
    that holds no token is an error (``ValueError``), never silently replaced.
    """
    path = Path(state_dir) / TOKEN_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    info = os.stat(path, follow_symlinks=False)
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_mode & 0o077:
        logger.warning("%s was readable by others (mode %o): set to 0600", path, info.st_mode & 0o777)
        os.chmod(path, 0o600)
    token = path.read_text(encoding="utf-8").strip()
    if len(token) < 16:
        raise ValueError(f"{path} holds no usable token (delete it and restart to make a new one)")
    return token


@dataclass
class _Expiring:
    items: dict[str, float]
    ttl: float


class Auth:
    """Token, one-time login codes and browser sessions; thread-safe.

    ``origins`` are the ``scheme://host:port`` values a cookie-carried
    mutation may come from. ``clock`` is monotonic seconds (tests may replace it).
    """

    def __init__(self, token: str, origins: Iterable[str], *, clock: Callable[[], float] = time.monotonic):
        self._token = token.encode()
        self.origins = frozenset(origins)
        self._clock = clock
        self._lock = threading.Lock()
        self._codes = _Expiring({}, LOGIN_CODE_TTL_S)
        self._sessions = _Expiring({}, SESSION_TTL_S)

    # ------------------------------------------------------------------ codes and sessions

    def _put(self, store: _Expiring) -> str:
        value = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            for key, until in list(store.items.items()):
                if until <= now:
                    del store.items[key]
            store.items[value] = now + store.ttl
        return value

    def _valid(self, store: _Expiring, value: str, *, consume: bool) -> bool:
        now = self._clock()
        with self._lock:
            found = None
            for key in store.items:  # constant-time compare against each live value
                if hmac.compare_digest(key.encode(), value.encode()):
                    found = key
            if found is None:
                return False
            until = store.items.pop(found) if consume else store.items[found]
            if until <= now:
                store.items.pop(found, None)
                return False
            return True

    def new_login_code(self) -> str:
        """A code for ``/login?code=``: works once, for :data:`LOGIN_CODE_TTL_S` seconds."""
        return self._put(self._codes)

    def redeem_login_code(self, code: str) -> str | None:
        """A new session id when ``code`` is live (it is used up either way), else None."""
        if not code or not self._valid(self._codes, code, consume=True):
            return None
        return self._put(self._sessions)

    def session_valid(self, session: str | None) -> bool:
        return bool(session) and self._valid(self._sessions, session, consume=False)

    def end_session(self, session: str | None) -> None:
        if session:
            self._valid(self._sessions, session, consume=True)

    # ------------------------------------------------------------------ checks

    def token_matches(self, presented: str) -> bool:
        return hmac.compare_digest(presented.encode(), self._token)

    def check_mutation(self, authorization: str | None, session: str | None, origin: str | None) -> AuthOutcome:
        """May this request change something? See the module docstring for the rules."""
        if authorization is not None:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                return AuthOutcome.MISSING
            return AuthOutcome.OK if self.token_matches(value.strip()) else AuthOutcome.DENIED
        if not session:
            return AuthOutcome.MISSING
        if not self.session_valid(session):
            return AuthOutcome.MISSING  # expired, or made before a restart: log in again
        if origin is None or origin not in self.origins:
            return AuthOutcome.DENIED
        return AuthOutcome.OK
