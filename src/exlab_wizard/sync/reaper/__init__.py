"""The cleanup reaper: frees the local disk of verified runs, and never loses data.

The reaper carries out the decisions of :mod:`exlab_wizard.sync.policy.cleanup`.
On each pass (:meth:`Reaper.run_pass`):

1. A deletion planned earlier and interrupted (crash, kill, power cut) is
   resumed first, after the interlocks are checked again (once its data are
   deleted, interlock 1 alone: the final push's proof gates the rest).
2. A VERIFIED job meeting interlocks 1, 2 and 3 moves to CLEANUP_ELIGIBLE
   (with cleanup disabled it stays VERIFIED).
3. For each CLEANUP_ELIGIBLE job all six interlocks are checked, the costly
   ones last (remote probe, overrides, the local check, then one listing of
   the remote run folder, which must hold every planned file with its size:
   a NAS copy that lost a file or holds one of another size sends the job
   back to QUEUED to send those files again, nothing deleted). A refusal is
   recorded as a ``cleanup_refused`` event, once per reason (not on every
   pass). A local change sends the job back to QUEUED (through the gate, then
   re-synced); local damage or a vanished file sends it to FAILED, nothing
   deleted.
4. Deletion is planned durably, then carried out idempotently:

   a. One transaction writes the plan (every file to delete with the size,
      mtime and inode seen by the check, and its SHA-256) with the manifest
      digest, and the event ``cleanup_planned``.
   b. Each planned file is ``lstat``-ed right before it is unlinked, through
      directory descriptors opened with ``O_NOFOLLOW`` from the run folder
      down: it must still be a regular file with the planned size, mtime and
      inode, else the deletion stops (nothing more is deleted). A file
      already gone is fine (an interrupted pass deleted it). Parent folders
      are fsync-ed. Before each batch the job is read again, and the check
      and the batch run under the job's lock (:class:`JobLocks`, shared with
      the audit): an audit finding the NAS copy bad stops the deletion
      between two batches, never inside one (:func:`plan_progress` tells it
      how far the plan got).
   c. Folders left empty by the deletion are removed (never a symlink, never
      outside the run, never ``.exlab-wizard/`` while ``retain_cache``).
   d. The equipment log gets ``cleanup_deleted files=N bytes=B
      verify_passes=K pass_times=... manifest_digest=...``; creation.json
      gets ``local_cleaned``. With ``retain_cache: false`` the
      ``.exlab-wizard/`` files and the run folder go only after
      ``push_metadata(job)`` proved the final push (:class:`FinalPush`);
      until then the job waits, the reason recorded once.
   e. One transaction moves the job to CLEANED and drops the plan.

A crash at any point leaves the plan in the queue database; the next pass
resumes at (b), after the interlocks and a new listing of the remote run
folder: files already gone are fine, anything not matching the plan is not
deleted. Only files listed in the verified manifest and matching it
are ever planned, so every local file either still exists or has a verified
copy on the NAS.

The local check needs the size and mtime each file had when it was hashed:
the client calls :func:`record_verified_stat` after every successful
verification, which stores them in the ``verified_files`` table.

The package, lowest module first (each reaches only those above it in
this list):

- :mod:`.mounts`: the mount points inside a run (``/proc/self/mountinfo``);
- :mod:`.nofollow`: directory descriptors opened with ``O_NOFOLLOW``;
- :mod:`.store`: the verified stats and the durable plan (the queue's
  migration 4), read without the write lock;
- :mod:`.local_check`: interlock 6, :func:`scan_run`;
- :mod:`.deletion`: step (b), (c) and the ``.exlab-wizard/`` removal;
- :mod:`.contract`: :class:`ReaperOutcome`, :class:`FinalPush`;
- :mod:`.interlocks`: the facts the policy asks for, and the dry run;
- :mod:`.passes`: :class:`Reaper`, the order of it all.

Callers import from this package only (tests may reach a module to inject a
failure where the code reads it, e.g. ``deletion.delete_batch``).
"""

from exlab_wizard.sync.reaper.contract import FinalPush, JobLocks, PlanProgress, ReaperOutcome
from exlab_wizard.sync.reaper.local_check import (
    LocalScan,
    check_against_copy,
    load_verified_stats,
    record_copy_stats,
    record_verified_stat,
    scan_run,
)
from exlab_wizard.sync.reaper.mounts import mount_refusal
from exlab_wizard.sync.reaper.passes import Reaper, plan_progress
from exlab_wizard.sync.reaper.store import (
    PlannedFile,
    VerifiedStat,
    cleanup_planned,
    drop_plan,
    ensure_cleanup_schema,
    fail_part_deleted,
    local_data_deleted_at,
    planned_paths,
)

__all__ = [
    "FinalPush",
    "JobLocks",
    "LocalScan",
    "PlanProgress",
    "PlannedFile",
    "Reaper",
    "ReaperOutcome",
    "VerifiedStat",
    "check_against_copy",
    "cleanup_planned",
    "drop_plan",
    "ensure_cleanup_schema",
    "fail_part_deleted",
    "load_verified_stats",
    "local_data_deleted_at",
    "mount_refusal",
    "plan_progress",
    "planned_paths",
    "record_copy_stats",
    "record_verified_stat",
    "scan_run",
]
