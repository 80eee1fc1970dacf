"""The interlock facts of one job, gathered as far as the cleanup policy asks for them.

Owns how the reaper answers the questions of
:func:`exlab_wizard.sync.policy.cleanup.decide`, cheapest first: is the
remote reachable, are the overrides the job relied on still active, is the
local run the verified bytes (:mod:`.local_check`), and does one fresh
listing of the remote run folder hold every planned file with its size and
the mtime the push gave it, in a folder no other job took over.
The decision itself stays in the policy (pure); nothing here writes.
A dry run is these facts decided without acting, so its answer for one job
(:meth:`InterlockFacts._dry_run_job`) is here too.

:class:`InterlockFacts` is a base of :class:`~.passes.Reaper`: it reads the
reaper's ``queue``, ``config``, ``writer``, ``remote_stat``,
``remote_listing`` and ``now`` at each call, so a config swapped on a live
reaper takes effect on the next decision.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from exlab_wizard.config.models import EquipmentConfig, RunOutsideRoots
from exlab_wizard.sync.manifest_format import ManifestFormatError, has_digest, read_manifest_and_digest
from exlab_wizard.sync.policy import cleanup as policy
from exlab_wizard.sync.policy.cleanup import CleanupCode, CleanupDecision, CleanupFacts, LocalCheck
from exlab_wizard.sync.queue import JobQueue, SyncJobRow
from exlab_wizard.sync.reaper.contract import ReaperOutcome, RemoteListing, RemoteStat
from exlab_wizard.sync.reaper.local_check import COPY_TIME_SLACK_NS, LocalScan, load_verified_stats, scan_run
from exlab_wizard.sync.reaper.store import PlannedFile, Progress
from exlab_wizard.sync.remote import NasLooks
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.sync.transports.base import (
    NasNotAnswering,
    RemoteFile,
    TransportError,
    TransportErrorKind,
    clamped_times,
    location_change,
    remote_run_path,
)
from exlab_wizard.sync.transports.conflict import claim_markers, claim_path
from exlab_wizard.sync.transports.share_lanes import in_share_of

__all__ = ["InterlockFacts", "narrow_times"]

logger = logging.getLogger(__name__)


class InterlockFacts:
    """Gathers the facts the cleanup policy asks for, one question at a time (see the module)."""

    queue: JobQueue
    config: Any
    writer: Any
    remote_stat: RemoteStat
    remote_listing: RemoteListing | None
    now: Callable[[], dt.datetime]
    looks: NasLooks

    async def _reachable(self, job: SyncJobRow) -> bool:
        """Is the job's NAS reachable? Raises :class:`NasNotAnswering` past the look's time limit."""

        async def probe() -> bool:
            answer = self.remote_stat(job)
            if inspect.isawaitable(answer):
                answer = await answer
            return bool(answer)

        try:
            return await self.looks.look(job.equipment_id, "the reachability check", probe)
        except (asyncio.CancelledError, NasNotAnswering):
            raise
        except Exception as exc:
            logger.debug(
                "remote probe for job %s failed: %s", job.id, exc
            )  # per job and pass: the queue's refusal says it once
            return False

    async def _remote_check(self, job: SyncJobRow, files: Sequence[PlannedFile]) -> policy.RemoteCheck:
        """One listing of the remote run folder, compared with the files it must hold (interlock 4).

        Each planned file must be there at its size, with an mtime the push
        gave it (:meth:`_sent_times`): every transport copies the local mtime
        to the NAS, so a file at its size with another mtime is not the copy
        sent and verified (a folder restored from an older snapshot, another's
        bytes). A NAS keeps mtimes to its own precision (FAT 2 s, whole
        seconds as rsync lists them): :data:`COPY_TIME_SLACK_NS` either way.
        """
        # What is at the place now (for mount: what is mounted there, read from the mount table right
        # before the listing) against where the passes were read.
        share = self._equipment_of(job)  # its looks into a mount share go on that share's own threads
        moved = await self.looks.look(
            job.equipment_id,
            "the look at what is mounted at the NAS place",
            lambda: in_share_of(share, f"where the NAS copy of {job.run_path} is", self._moved, job),
        )
        if moved is not None:
            if not await self._reachable(job):
                # A share unmounted since interlock 1: the bare mount point is not another NAS.
                return policy.RemoteCheck(refusal="remote unreachable", refusal_code=CleanupCode.REMOTE_UNREACHABLE)
            return policy.RemoteCheck(refusal=moved, refusal_code=CleanupCode.NAS_LOCATION_CHANGED)
        if self.remote_listing is None:
            return policy.RemoteCheck(
                refusal="remote run folder cannot be listed: nothing is deleted without a listing",
                refusal_code=CleanupCode.REMOTE_LISTING_FAILED,
            )
        try:
            listing = await self.looks.look(
                job.equipment_id, "the listing of the run's NAS folder", lambda: self.remote_listing(job)
            )
            if not isinstance(listing, Mapping):
                raise TypeError(f"remote listing returned {type(listing).__name__}, not a mapping")
            if not all(isinstance(entry, RemoteFile) for entry in listing.values()):
                raise TypeError("remote listing holds no modification times (expected RemoteFile entries)")
        except (asyncio.CancelledError, NasNotAnswering):  # a time-out is never an empty listing (rule 3)
            raise
        except TransportError as exc:
            logger.debug("remote listing for job %s failed: %s", job.id, exc)
            if exc.kind == TransportErrorKind.NETWORK:
                return policy.RemoteCheck(
                    refusal=f"remote unreachable: {exc.message}", refusal_code=CleanupCode.REMOTE_UNREACHABLE
                )
            return policy.RemoteCheck(refusal=f"remote listing failed: {exc.kind.value}: {exc.message}")
        except Exception as exc:
            logger.debug("remote listing for job %s failed: %s", job.id, exc)
            return policy.RemoteCheck(refusal=f"remote listing failed: {type(exc).__name__}: {exc}")
        claimed = self._claimed_by_another_run(job, listing)
        if claimed is not None:
            return policy.RemoteCheck(refusal=claimed, refusal_code=CleanupCode.NAS_FOLDER_CLAIMED)
        local = await self.looks.look(
            job.equipment_id,
            "the look at the NAS run folder",
            lambda: in_share_of(share, f"comparing the NAS copy of {job.run_path}", self._nas_is_local, job, files),
        )
        if local is not None:
            return policy.RemoteCheck(refusal=local, refusal_code=CleanupCode.NAS_IS_LOCAL)
        sent = await asyncio.to_thread(self._sent_times, job, files)
        return policy.check_remote(
            {f.path: f.size for f in files},
            {path: entry.size for path, entry in listing.items()},
            sent_times=sent,
            listed_times={path: entry.mtime_ns for path, entry in listing.items()},
            slack_ns=COPY_TIME_SLACK_NS,
        )

    def _equipment_of(self, job: SyncJobRow) -> EquipmentConfig | None:
        try:
            return self.config.equipment_by_id(job.equipment_id)
        except KeyError:
            return None

    def _sent_times(self, job: SyncJobRow, files: Sequence[PlannedFile]) -> dict[str, set[int]]:
        """The mtimes a push may have given each planned file on the NAS: the local one, and the verified one.

        The local mtime is the one the checked bytes have now (a push sends
        it); the one recorded at verification is the copy's when the local
        file was touched since without a change of content. A record of other
        bytes (another manifest's) vouches for nothing. Each also as a
        32-bit store keeps it (:func:`narrow_times`: SFTP version 3 under
        rclone sftp, an rsync older than protocol 30 on the NAS), so a file
        dated outside what 32 bits hold lands at another time; and as a NAS
        filesystem of a narrower range clamps it (:func:`clamped_times`: XFS
        without ``bigtime``, FAT/exFAT), a function of the time sent all the same.
        """
        verified = load_verified_stats(self.queue, job.id)
        times: dict[str, set[int]] = {}
        for f in files:
            sent = {f.mtime_ns}
            record = verified.get(f.path)
            if record is not None and record.mtime_ns is not None and record.sha256 == f.sha256:
                sent.add(record.mtime_ns)
            times[f.path] = {n for t in sent for n in (*narrow_times(t), *clamped_times(t))}
        return times

    def _claimed_by_another_run(self, job: SyncJobRow, listing: Mapping[str, RemoteFile]) -> str | None:
        """Why the listing shows another run's claim on the NAS folder; None when it shows none.

        Two first pushes into one folder at the same instant (two instruments
        of this PC on one share) both list it empty and both claim it; the
        later bytes win, at the sizes the listing checks. A run has one job
        for life, so a claim of another job this queue knows is another run's.

        A claim of a job it does not know (another PC, a state folder lost)
        is another's when the job's own claim is gone: every data push of the
        job names it there, so the folder was emptied or replaced since (and
        another PC's run of the same names and sizes pushed into it). Beside
        the job's own claim it is left to the pushes
        (:func:`~exlab_wizard.sync.transports.conflict.ownership_error`): the
        run's old job of a queue since lost. A job that wrote no claim (an
        engine before claims) is judged by the folder's other claims alone.
        """
        claims = claim_markers(listing)
        others = sorted(claims - {job.id})
        runs = [row.run_path for row in map(self.queue.get, others) if row is not None]
        if runs:
            return (
                f"the NAS folder is claimed by another run's job too ({', '.join(runs)}): its bytes may have"
                " replaced this copy's, which sizes cannot tell; nothing is deleted (docs/recovery.md)"
            )
        if others and job.id not in claims:
            return (
                f"the NAS folder is claimed by a job this queue does not know ({', '.join(others[:3])}) and no"
                " longer by this job: it was replaced since this copy was verified (another PC's run, or a"
                " lost queue's); nothing is deleted (docs/recovery.md)"
            )
        return None

    def _nas_is_local(self, job: SyncJobRow, files: Sequence[PlannedFile]) -> str | None:
        """Why the NAS copy is the local run itself; None when it is apart. Blocking I/O.

        The loader refuses a mount path at, inside or above an equipment's
        folder, but not a symlink or bind mount made later: then the listing
        shows the local files, and deleting them deletes the "copy". Mount:
        the NAS run folder must not be the local one, nor hold a planned file
        of the same device and inode. Any transport: the job's claim, which
        every push writes into the NAS run folder, must not turn up in the
        local run (a remote path on this very machine).
        """
        run = Path(job.run_path)
        stop = "; nothing is deleted: put the NAS copy apart from the local data (docs/config.md)"
        claim = claim_path(job.id)
        if os.path.lexists(run / claim):
            return (
                f"the job's NAS claim ({claim}) is in the local run folder: the NAS run folder is the local one{stop}"
            )
        try:
            equipment = self.config.equipment_by_id(job.equipment_id)
            if equipment.transport.type != "mount":
                return None
            nas = Path(remote_run_path(equipment, run))
        except (KeyError, ValueError):
            return None  # _moved has said why already
        try:
            try:
                if os.path.samefile(run, nas):
                    return f"the NAS run folder {nas} is the local run folder{stop}"
            except FileNotFoundError:
                return None  # no local run to delete from (its own check says so), or no NAS folder (the listing's)
            for f in files:
                try:
                    here, there = os.lstat(run / f.path), os.stat(nas / f.path)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # deleted here already (a resumed plan), or missing there (the listing tells)
                if (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino):
                    return f"{f.path} on the NAS ({nas}) is the local file itself{stop}"
        except OSError as exc:
            return f"cannot tell whether the NAS run folder {nas} is the local one: {exc.strerror or exc}; nothing is deleted"
        return None

    def _moved(self, job: SyncJobRow) -> str | None:
        """Why the NAS the configuration names now is not where the job's copy was verified; None when it is.

        Passes read at one place vouch for nothing at another: after the
        equipment's share, host or remote path changed in the config (or, for
        mount, another file system was mounted at the mount path), the
        listing would be of a copy nobody hashed. Blocking I/O (the mount table). The audit verifies the run
        at the new place (its pass there counts as the first), and only then
        may the reaper go on. A job verified before locations were recorded
        is judged by its remote path alone.
        """
        try:
            equipment = self.config.equipment_by_id(job.equipment_id)
        except KeyError:
            return f"equipment {job.equipment_id} is no longer configured: its NAS copy cannot be checked"
        try:
            moved = location_change(
                equipment, Path(job.run_path), verified_location=job.verified_location, remote_path=job.remote_path
            )
        except ValueError:
            return f"the run is no longer under equipment {job.equipment_id}'s local root"
        if moved is None:
            return None
        return (
            f"NAS location changed since the verification (verified at {moved[0]}, the configuration now names"
            f" {moved[1]}; for mount: what is mounted there): the audit verifies the run there before anything is"
            " deleted"
        )

    def _overrides(self, job: SyncJobRow, now: dt.datetime) -> tuple[tuple[str, ...], str | None]:
        """(ids no longer active, error reading them)."""
        ids = tuple(job.overrides_relied_on)
        if not ids:
            return (), None
        from exlab_wizard.validator.overrides import revoked_or_expired

        try:
            creation = self.writer.read(Path(job.run_path))
        except Exception as exc:
            return (), f"creation.json unreadable: {exc}"
        entries = list(creation.validation_overrides) if creation is not None else []
        return tuple(revoked_or_expired(ids, entries, now)), None

    def _scan(self, job: SyncJobRow) -> LocalScan:
        run = Path(job.run_path)
        if os.path.islink(run):
            return _refused("run folder is a symlink", CleanupCode.RUN_SYMLINK)
        try:
            self.config.equipment_holding(run)
        except RunOutsideRoots as exc:
            # A link on the way leads into another equipment's folder (or out of all): never delete through it.
            return _refused(str(exc), CleanupCode.RUN_LINKED_AWAY)
        try:
            recorded = read_manifest_and_digest(run)
        except ManifestFormatError as exc:
            return _refused(f"manifest unreadable: {exc}", CleanupCode.MANIFEST_UNREADABLE)
        except OSError as exc:
            if not run.exists():
                return _refused("run folder missing", CleanupCode.RUN_MISSING)
            return _refused(f"manifest unreadable: {exc.strerror or exc}", CleanupCode.MANIFEST_UNREADABLE)
        if recorded is None:
            if not run.exists():
                return _refused("run folder missing", CleanupCode.RUN_MISSING)
            return _refused("no recorded manifest", CleanupCode.MANIFEST_MISSING)
        if not job.manifest_digest:
            return _refused("no verified manifest digest on the job", CleanupCode.MANIFEST_MISSING)
        manifest, file_sha256 = recorded
        if not has_digest(manifest, job.manifest_digest, file_sha256=file_sha256):
            return _refused("manifest changed since verification", CleanupCode.MANIFEST_CHANGED)
        # An empty manifest of this digest is a run verified with no data files: it is checked like
        # any other (a data file found there now is "added": sent, not deleted), and cleaned with
        # nothing to delete (docs/cleanup.md).
        verified = load_verified_stats(self.queue, job.id)
        return scan_run(run, manifest, verified, verified_at=job.verified_at)

    def _base_facts(self, job: SyncJobRow, now: dt.datetime) -> CleanupFacts:
        cleanup = self.config.nas_cleanup
        return CleanupFacts(
            enabled=cleanup.enabled,
            verify_passes=job.verify_passes,
            min_verify_passes=cleanup.min_verify_passes,
            verified_at=job.verified_at,
            min_age_hours=cleanup.min_age_hours,
            now=now,
            metadata_push_pending=job.metadata_push_pending,
            pass_times=job.pass_times,
        )

    async def _decide(
        self, job: SyncJobRow, *, local: bool, planned: Sequence[PlannedFile] | None = None
    ) -> tuple[CleanupDecision, LocalScan | None]:
        """Gather facts as far as they matter and decide.

        ``local=False`` treats interlock 6 as holding; the remote listing is
        then compared with ``planned`` (a resumed plan). With neither a local
        scan nor ``planned`` there is nothing to compare the listing with, and
        interlock 4 does not hold (a plan whose data are deleted is finished
        by interlock 1 and the final push's proof, never through here).
        """
        now = self.now()
        facts = self._base_facts(job, now)
        scan: LocalScan | None = None
        while True:
            decision = policy.decide(facts)
            if decision.action != "check":
                return decision, scan
            if decision.needs == "remote_reachable":
                facts = dataclasses.replace(facts, remote_reachable=await self._reachable(job))
            elif decision.needs == "overrides":
                gone, error = await asyncio.to_thread(self._overrides, job, now)
                facts = dataclasses.replace(facts, overrides_no_longer_active=gone, override_check_error=error)
            elif decision.needs == "remote_listing":
                files = scan.files if scan is not None else planned
                if files is None:
                    facts = dataclasses.replace(
                        facts, remote=policy.RemoteCheck(refusal="no planned files to compare the NAS listing with")
                    )
                else:
                    facts = dataclasses.replace(facts, remote=await self._remote_check(job, files))
            elif local:
                scan = await asyncio.to_thread(self._scan, job)
                facts = dataclasses.replace(facts, local=scan.check)
            else:
                facts = dataclasses.replace(facts, local=LocalCheck())

    # ------------------------------------------------------------ dry run

    async def _dry_run_job(self, job: SyncJobRow, progress: Progress | None) -> ReaperOutcome:
        if progress is not None:
            return ReaperOutcome(
                job.id,
                job.run_path,
                "in_progress",
                f"deletion in progress: {progress.files} files, {progress.bytes} bytes planned",
                files=progress.files,
                bytes=progress.bytes,
                code=CleanupCode.DELETE,
            )
        if job.state == SyncJobState.VERIFIED:
            # What stands between the job and cleanup besides interlock 1 (decided below): a dry run
            # with cleanup off is how a lab sees what enabling it would do.
            opted_in = self.config.nas_cleanup.model_copy(update={"enabled": True})
            refusal = policy.promotion_refusal(job, opted_in, self.now())
            if refusal is not None:
                return ReaperOutcome(job.id, job.run_path, "waiting", refusal.reason, code=refusal.code)
        decision, scan = await self._decide(job, local=True)
        if decision.action == "wait":
            return ReaperOutcome(job.id, job.run_path, "waiting", decision.reason, code=decision.code)
        if decision.action == "requeue":
            return ReaperOutcome(
                job.id, job.run_path, "would_requeue", decision.reason, paths=decision.paths, code=decision.code
            )
        if decision.action == "fail":
            return ReaperOutcome(
                job.id, job.run_path, "would_fail", decision.reason, paths=decision.paths, code=decision.code
            )
        assert scan is not None
        return ReaperOutcome(
            job.id,
            job.run_path,
            "would_delete",
            f"would free {len(scan.files)} files, {scan.bytes} bytes",
            files=len(scan.files),
            bytes=scan.bytes,
            code=CleanupCode.DELETE,
        )


def narrow_times(mtime_ns: int) -> set[int]:
    """``mtime_ns``, and the times a NAS keeping 32-bit whole seconds gives a file sent with it.

    SFTP version 3 (OpenSSH's sftp-server, under rclone sftp) keeps unsigned
    seconds (wrapped outside 1970-2106); rsync before protocol 30 (2.6.9, as
    some NAS and macOS hosts still run) sends signed ones (wrapped outside
    1901-2038). Between those years both are the time itself, whole seconds.
    """
    seconds = mtime_ns // 1_000_000_000
    unsigned = seconds % 2**32
    signed = unsigned - 2**32 if unsigned >= 2**31 else unsigned
    return {mtime_ns, unsigned * 1_000_000_000, signed * 1_000_000_000}


def _refused(reason: str, code: CleanupCode) -> LocalScan:
    """A local run that could not be checked (interlock 6 refuses)."""
    return LocalScan(LocalCheck(refusal=reason, refusal_code=code))
