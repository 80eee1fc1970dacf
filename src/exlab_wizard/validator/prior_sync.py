"""Which hard findings are about what is already on the NAS (``synced_under_prior_policy``).

A run is on the NAS when its creation.json says ``sync_status: synced`` or it
has a verified manifest (``.exlab-wizard/checksums.sha256``, written only
after a verified transfer). Then already on the NAS are: the run's own path
segments (equipment, project, parent, run folder), every file listed in the
manifest and every folder holding such a file, and -- for a content finding
-- a listed file whose current SHA-256 is still the one in the manifest.
Anything else (a file added or edited since) is judged like in a run never
synced.

:func:`mark_prior_sync` is the one place this is judged: ``Validator.audit_run``
applies it, and the Pre-Sync Gate reads the flag it set.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path

from exlab_wizard.cache import CreationJson
from exlab_wizard.fileio import hash_file
from exlab_wizard.sync.manifest_format import ManifestFormatError, read_manifest
from exlab_wizard.validator.findings import Finding

__all__ = ["NasCopy", "mark_prior_sync", "nas_copy"]

_log = logging.getLogger(__name__)


def _sha256_file(path: str) -> str | None:
    """The file's SHA-256, or None unless it is a regular file (never a
    symbolic link, FIFO or device: those could block or never end)."""
    try:
        return hash_file(path)
    except OSError:
        return None


class NasCopy:
    """What of the run is already on the NAS, from its verified manifest."""

    def __init__(self, run: str, manifest: dict[str, str]):
        self.run = run
        self.manifest = manifest
        self._folders: set[str] | None = None

    def _relative(self, path: str) -> str | None:
        rel = os.path.relpath(path, self.run)
        if rel == os.pardir or rel.startswith(os.pardir + os.sep) or rel == os.curdir:
            return None
        return rel.replace(os.sep, "/")

    def covers(self, finding: Finding) -> bool:
        path = os.path.abspath(finding.offending_path)
        if path == self.run or self.run.startswith(path.rstrip(os.sep) + os.sep):
            return True  # the run folder or one of its ancestors: the remote root is named after them
        rel = self._relative(path)
        if rel is None:
            return False
        if finding.offending_kind == "file_content":
            expected = self.manifest.get(rel)
            return expected is not None and _sha256_file(path) == expected.lower()
        if rel in self.manifest:
            return True
        if finding.offending_kind == "directory_segment":
            if self._folders is None:
                self._folders = {
                    key.rsplit("/", depth)[0] for key in self.manifest for depth in range(1, key.count("/") + 1)
                }
            return rel in self._folders
        return False


def nas_copy(run: str, creation: CreationJson | None) -> NasCopy | None:
    """What of ``run`` is on the NAS, or None when it was never synced."""
    try:
        manifest = read_manifest(Path(run))
    except (ManifestFormatError, OSError) as exc:
        _log.warning("%s: cannot read the verified manifest: %s", run, exc)
        manifest = None
    synced = creation is not None and creation.sync_status == "synced"
    if manifest is None and not synced:
        return None
    return NasCopy(run, manifest or {})


def mark_prior_sync(run: str, findings: list[Finding], creation: CreationJson | None) -> list[Finding]:
    """``findings`` with ``synced_under_prior_policy`` set on each hard one already on the NAS."""
    if not any(f.tier == "hard" for f in findings):
        return findings
    nas = nas_copy(run, creation)
    if nas is None:
        return findings
    return [replace(f, synced_under_prior_policy=True) if f.tier == "hard" and nas.covers(f) else f for f in findings]
