"""Remote access: push, hash, stat, list and fetch one equipment's NAS copy.

The client may be given callables in place of parts of a transport (tests
use them to force a failure): ``push_callable_factory``,
``hashsum_callable_factory`` and ``remote_stat_callable``. :class:`Remotes`
owns that choice, so no other part of the client asks which one is in use:

- :meth:`RemoteAccess.push_run` and :meth:`RemoteAccess.push_metadata`: the
  injected push when there is one (given only the keyword arguments it
  accepts, see :func:`optional_kwargs`), else the transport's;
- :meth:`RemoteAccess.manifest`: the injected hashsum, else the transport's
  ``remote_manifest``; whatever it returns is checked to be a manifest, and
  a hashsum that raises is an error, never a match;
- :meth:`Remotes.reachable`: the injected stat, else the transport's; any
  exception means "not reachable";
- :meth:`Remotes.listing` (the reaper's interlock 4), :meth:`RemoteAccess.stats`
  (the local check of a run its queue lost), :meth:`RemoteAccess.fetch`
  (``restore``) and :meth:`RemoteAccess.keep_previous` (``retry
  --accept-local``): always the equipment's own transport, never an injected callable, so an injection cannot make a
  deletion easier than the real NAS allows.

Usage::

    remotes = Remotes(lambda: config, log_for=log_for)
    remote = remotes.access(equipment)
    result = await remote.push_run(run, bwlimit_kibps=None, rewrite=frozenset(), progress=None)
    manifest = await remote.manifest(run)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from exlab_wizard.config.models import Config, EquipmentConfig
from exlab_wizard.fileio import remove_stale_temps
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.manifest_format import manifest_path
from exlab_wizard.sync.policy import bandwidth as bw_policy
from exlab_wizard.sync.queue import SyncJobRow
from exlab_wizard.sync.transports import (
    Clock,
    NasNotAnswering,
    RemoteFile,
    RemoteManifest,
    Transport,
    TransportError,
    TransportErrorKind,
    TransportResult,
    local_now,
    make_transport,
)

__all__ = [
    "NAS_LOOK_TIMEOUT_S",
    "HashsumFactory",
    "NasLooks",
    "PushFactory",
    "RemoteAccess",
    "RemoteStat",
    "Remotes",
    "optional_kwargs",
]

logger = logging.getLogger(__name__)

PushFactory = Callable[[EquipmentConfig], Callable[..., Any]]
HashsumFactory = Callable[[EquipmentConfig], Callable[[Path], Awaitable[Any]]]
RemoteStat = Callable[[SyncJobRow], Any]

#: How long one look at an equipment's NAS by the reaper or the audit (is it reachable, the run's
#: listing) may take before that NAS counts as not answering. Read at each look (tests lower it).
NAS_LOOK_TIMEOUT_S = 180.0


class NasLooks:
    """Looks at each equipment's NAS, each bounded by :data:`NAS_LOOK_TIMEOUT_S` (the reaper's, the audit's).

    A look that gives no answer in time raises :class:`NasNotAnswering`; it is
    left to end on its own and its late answer is thrown away, never used. Until
    it ends, and for the rest of the pass (:meth:`new_pass`), every other look at
    that equipment's NAS raises at once: one silent NAS holds up one look, not
    the cleanup or audit of every equipment, and blocked threads do not pile up.
    """

    def __init__(self) -> None:
        self._stuck: dict[str, tuple[asyncio.Future[Any], float]] = {}
        self._silent: dict[str, str] = {}

    def new_pass(self) -> None:
        """A new pass: an equipment is looked at again unless its earlier look is still blocked."""
        self._silent.clear()

    async def look(self, equipment_id: str, what: str, work: Callable[[], Awaitable[Any]]) -> Any:
        """``await work()`` within the limit; raises :class:`NasNotAnswering` (``NETWORK``) past it."""
        said = self._silent.get(equipment_id)
        if said is not None:
            raise NasNotAnswering(said)
        stuck = self._stuck.get(equipment_id)
        if stuck is not None and not stuck[0].done():
            since = asyncio.get_running_loop().time() - stuck[1]
            raise NasNotAnswering(
                f"NAS not answering: a look at equipment {equipment_id}'s NAS started {since:.0f} s ago has "
                f"not returned; nothing more is asked of it until it does"
            )
        self._stuck.pop(equipment_id, None)
        limit = NAS_LOOK_TIMEOUT_S
        task = asyncio.ensure_future(work())
        try:
            done, _ = await asyncio.wait({task}, timeout=limit)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if task in done:
            if not task.cancelled() and isinstance(task.exception(), NasNotAnswering):
                # The transport's own stall limit: as silent as a time-out here, for the rest of the pass.
                self._silent[equipment_id] = task.exception().message  # type: ignore[union-attr]
            return task.result()
        task.add_done_callback(_thrown_away)
        self._stuck[equipment_id] = (task, asyncio.get_running_loop().time())
        reason = f"NAS not answering: {what} for equipment {equipment_id} gave no answer within {limit:g} s"
        self._silent[equipment_id] = reason
        logger.warning("%s", reason)
        raise NasNotAnswering(reason)


def _thrown_away(task: asyncio.Future[Any]) -> None:
    """A look's late answer: never used (its exception retrieved, so asyncio does not log it)."""
    if not task.cancelled():
        task.exception()


def optional_kwargs(func: Callable[..., Any], **candidates: Any) -> dict[str, Any]:
    """The keyword arguments beyond ``bwlimit_kibps`` that an injected push accepts."""
    try:
        params = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return candidates
    return {k: v for k, v in candidates.items() if k in params}


async def _call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call an injected callable that may answer directly or with an awaitable."""
    outcome = func(*args, **kwargs)
    if inspect.isawaitable(outcome):
        outcome = await outcome
    return outcome


class RemoteAccess:
    """The NAS copy of one equipment's runs, through its transport or the injected callables."""

    def __init__(self, remotes: Remotes, equipment: EquipmentConfig):
        self.equipment = equipment
        self._remotes = remotes

    @property
    def transport(self) -> Transport:
        """The equipment's own transport (built on first use)."""
        return self._remotes.transport(self.equipment)

    @property
    def _push(self) -> Callable[..., Any] | None:
        return self._remotes.injected_push(self.equipment)

    @property
    def hashes_while_sending(self) -> bool:
        """True when a push reports the local hashes itself (never for an injected push)."""
        return self._push is None and self.transport.capabilities.hashes_while_sending

    @property
    def can_fetch(self) -> bool:
        """True when the transport reads NAS files back (:meth:`fetch`; not the base class's refusal)."""
        return type(self.transport).fetch is not Transport.fetch

    @property
    def reports_total(self) -> bool:
        """True when a push tells its progress callback the bytes to send (never for an injected push)."""
        return self._push is None and self.transport.capabilities.reports_total

    async def push_run(
        self,
        run: Path,
        *,
        bwlimit_kibps: int | None,
        rewrite: frozenset[str],
        progress: Callable[[int], None] | None,
        own_manifests: Collection[str] = (),
        previous_stamp: str | None = None,
        fresh: bool = False,
        claim: Callable[[], None] | None = None,
        owner: str | None = None,
    ) -> TransportResult:
        """Send the run; its :class:`TransportResult` when it succeeded.

        ``own_manifests``: the manifests the job was verified with; ``previous_stamp``: where the
        push keeps the NAS files it replaces; ``fresh``: no push of the job wrote to the NAS yet;
        ``claim``: records that this one is about to; ``owner``: the job's id, named on the NAS
        (see ``Transport.push``).
        Raises ``TransportError``: the push's own kind when it reported a
        failure, ``UNKNOWN`` when it returned something other than a result.
        """
        await _drop_killed_manifest_writes(run)
        push = self._push
        # Newer keywords, given only to a push or transport written to take them.
        newer = {
            "own_manifests": own_manifests,
            "previous_stamp": previous_stamp,
            "fresh": fresh,
            "claim": claim,
            "owner": owner,
        }
        if push is not None:
            extra = optional_kwargs(push, rewrite=rewrite, progress=progress, **newer)
            outcome = await _call(push, run, bwlimit_kibps=bwlimit_kibps, **extra)
        else:
            # A transport written before ``own_manifests`` existed makes its own conflict check.
            own = optional_kwargs(self.transport.push, **newer)
            outcome = await self.transport.push(
                run, bwlimit_kibps=bwlimit_kibps, rewrite=rewrite, progress=progress, **own
            )
        if not isinstance(outcome, TransportResult):
            raise TransportError(
                TransportErrorKind.UNKNOWN, f"push returned {type(outcome).__name__}, not a TransportResult"
            )
        if not outcome.ok:
            raise TransportError(outcome.error_kind or TransportErrorKind.UNKNOWN, outcome.message or "push failed")
        return outcome

    async def push_metadata(self, run: Path, *, cleaned: frozenset[str] = frozenset()) -> Any:
        """Send the refreshed ``.exlab-wizard/`` alone; what the push returned when it succeeded.

        ``cleaned``: verified data files whose local copies the reaper deleted
        (the final push after a cleanup): given to an injected push callable,
        and to a transport without a metadata-only push, which sends the whole
        run and must not take their remote copies for someone else's files.
        An injected push gets no bandwidth limit. Raises ``TransportError``
        (``UNKNOWN`` when the push reported a failure) or whatever the push raised.
        """
        await _drop_killed_manifest_writes(run)
        push = self._push
        if push is not None:
            extra = optional_kwargs(push, cleaned=cleaned) if cleaned else {}
            outcome = await _call(push, run, bwlimit_kibps=None, **extra)
        else:
            limit = bw_policy.limit_kibps(self.equipment.transport.bandwidth, self._remotes.now())
            transport = self.transport
            if cleaned and not transport.capabilities.metadata_push:
                skip = optional_kwargs(transport.push, own_manifests=None)  # the run was just verified there
                outcome = await transport.push(run, bwlimit_kibps=limit, cleaned=cleaned, **skip)
            else:
                outcome = await transport.push_metadata(run, bwlimit_kibps=limit)
        if not getattr(outcome, "ok", False):
            message = getattr(outcome, "message", "") or "metadata push failed"
            raise TransportError(TransportErrorKind.UNKNOWN, message)
        return outcome

    async def manifest(self, run: Path) -> RemoteManifest:
        """The remote run's hashes. Raises ``TransportError`` (``UNKNOWN`` for an answer that is not a mapping)."""
        answer = await self._remotes.hashsum(self.equipment)(run)
        if isinstance(answer, RemoteManifest):
            return answer
        if not isinstance(answer, Mapping):
            raise TransportError(TransportErrorKind.UNKNOWN, f"hashsum returned {type(answer).__name__}, not a mapping")
        return RemoteManifest(hashes={str(k): str(v).lower() for k, v in answer.items()})

    async def stats(self, run: Path) -> dict[str, RemoteFile]:
        """The transport's ``remote_stats``: the NAS run folder's files with their sizes and mtimes."""
        return await self.transport.remote_stats(run)

    async def fetch(self, run: Path, paths: Collection[str], into: Path) -> dict[str, Path]:
        """The transport's ``fetch``: copy the NAS copies of ``paths`` into ``into`` (for ``restore``)."""
        return await self.transport.fetch(run, paths, into)

    async def keep_previous(self, run: Path, paths: Collection[str], stamp: str, *, new: bool = False) -> list[str]:
        """The transport's ``keep_previous``: move the verified NAS copies of ``paths`` under ``previous/<stamp>/``.

        ``new``: the round's first keep there (a transport written before it makes its own checks).
        """
        return await self.transport.keep_previous(
            run, paths, stamp, **optional_kwargs(self.transport.keep_previous, new=new)
        )


class Remotes:
    """The :class:`RemoteAccess` of every configured equipment, and the two job-level questions.

    ``config``: returns the current ``Config`` (read at each use, so a
    reloaded config is seen). ``log_for``: the equipment's log, given to its
    transport. ``now``: the clock (aware, local time) the bandwidth schedule
    is read by, here and in every transport built. The factories are called
    once per equipment id.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        *,
        log_for: Callable[[EquipmentConfig], EquipmentLog],
        push_factory: PushFactory | None = None,
        hashsum_factory: HashsumFactory | None = None,
        remote_stat: RemoteStat | None = None,
        now: Clock = local_now,
    ):
        self._config = config
        self.now = now
        self._log_for = log_for
        self._push_factory = push_factory
        self._hashsum_factory = hashsum_factory
        self._remote_stat = remote_stat
        #: Transports by equipment id (tests may put one in before first use).
        self.transports: dict[str, Transport] = {}
        #: The equipment settings each built transport was made from: a reload that changes them
        #: gets a new one (one built from the old settings would read and write the old place,
        #: or name runs by the old local_root).
        self._built_for: dict[str, Any] = {}
        self._pushes: dict[str, Callable[..., Any]] = {}
        self._hashsums: dict[str, Callable[[Path], Awaitable[Any]]] = {}

    def transport(self, equipment: EquipmentConfig) -> Transport:
        """The equipment's own transport, built once for its settings (again when they change)."""
        transport = self.transports.get(equipment.id)
        if transport is None or self._built_for.get(equipment.id, equipment) != equipment:
            transport = self.transports[equipment.id] = make_transport(
                equipment,
                log=self._log_for(equipment),
                now=self.now,
                verify_max_stream_bytes=self._config().sync.verify_max_stream_bytes,
            )
            self._built_for[equipment.id] = equipment
        return transport

    def access(self, equipment: EquipmentConfig) -> RemoteAccess:
        """The remote of ``equipment`` as it is configured now."""
        return RemoteAccess(self, equipment)

    def injected_push(self, equipment: EquipmentConfig) -> Callable[..., Any] | None:
        """The injected push for ``equipment`` (its factory called once), or None."""
        if self._push_factory is None:
            return None
        if equipment.id not in self._pushes:
            self._pushes[equipment.id] = self._push_factory(equipment)
        return self._pushes[equipment.id]

    def hashsum(self, equipment: EquipmentConfig) -> Callable[[Path], Awaitable[Any]]:
        """The injected hashsum for ``equipment`` (its factory called once), else the transport's ``remote_manifest``."""
        if equipment.id not in self._hashsums:
            if self._hashsum_factory is None:
                return self.transport(equipment).remote_manifest  # the transport for the settings in force
            self._hashsums[equipment.id] = self._hashsum_factory(equipment)
        return self._hashsums[equipment.id]

    def _equipment(self, job: SyncJobRow) -> EquipmentConfig | None:
        try:
            return self._config().equipment_by_id(job.equipment_id)
        except KeyError:
            return None

    async def reachable(self, job: SyncJobRow) -> bool:
        """Is the job's remote run root reachable now? A probe that fails, or an unknown equipment, is False."""
        try:
            if self._remote_stat is not None:
                return bool(await _call(self._remote_stat, job))
            equipment = self._equipment(job)
            if equipment is None:
                return False
            return bool(await self.transport(equipment).reachable(Path(job.run_path)))
        except Exception as exc:  # a probe that fails means "not reachable"
            logger.warning("remote stat failed for %s: %s", job.run_path, exc)
            return False

    async def listing(self, job: SyncJobRow) -> dict[str, RemoteFile]:
        """The listing interlock 4 checks (each file's size and mtime): always the equipment's own transport.

        Never an injected callable: ``remote_stat_callable`` answers only
        whether the remote is reachable, and an injected hashsum is not asked,
        so neither can make a deletion easier than the real NAS allows.
        Raises ``TransportError`` (``UNKNOWN`` for an equipment no longer configured).
        """
        equipment = self._equipment(job)
        if equipment is None:
            raise TransportError(TransportErrorKind.UNKNOWN, f"equipment {job.equipment_id} is no longer configured")
        return await self.transport(equipment).remote_stats(Path(job.run_path))


async def _drop_killed_manifest_writes(run: Path) -> None:
    """Remove the temp file a killed write of the run's ``checksums.sha256`` left, before a push could send it.

    A SIGKILL between the temp's creation and its rename leaves
    ``.checksums.sha256.<hex>.tmp`` in ``.exlab-wizard/``; the next push (of
    the run, or of its metadata) would carry it to the NAS, where nothing
    removes it. The job's runner, which pushes, is the one writer of that
    file (``creation.json``'s writer removes its own leftovers under the
    file's lock).
    """
    await asyncio.to_thread(remove_stale_temps, manifest_path(Path(run)))
