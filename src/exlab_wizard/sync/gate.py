"""The Pre-Sync Gate: may this run be transferred to the NAS now?

:func:`evaluate_run` decides without writing anything; :func:`check_run`
decides and records a block in the run's creation.json.

The decision, for the findings of ``validator.audit_run(run_path)``:

- a hard finding covered by an override active at ``now`` passes
  (``override_active=True``); the override's id is in ``overrides_relied_on``;
- a hard finding on something already on the NAS passes
  (``synced_under_prior_policy=True``, set by ``validator.audit_run``: the
  judgement lives in :mod:`exlab_wizard.validator.prior_sync`). An override
  the prior sync made unnecessary is not counted as relied on;
- every other hard finding blocks. Soft findings never block.

When the run is blocked :func:`check_run` sets ``sync_status:
blocked_by_validation`` (also on a run that was ``synced``: what is on the
NAS no longer matches the run, and what is new may not go there). It does
not write when the run has no creation.json (the sync client creates one)
or when creation.json is unusable (that is itself a blocking finding). A run
that is eligible keeps its ``sync_status`` (the sync client sets
``pending``/``synced``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from exlab_wizard.cache import CacheError, CreationJson, CreationWriter
from exlab_wizard.validator.findings import Finding, sort_findings
from exlab_wizard.validator.overrides import active_override_for

__all__ = ["BLOCKED_STATUS", "GateResult", "check_run", "evaluate_run"]

BLOCKED_STATUS = "blocked_by_validation"
_log = logging.getLogger(__name__)


class _Auditor(Protocol):
    def audit_run(self, run_path: Path) -> list[Finding]: ...


@dataclass
class GateResult:
    """The gate's answer for one run.

    ``eligible`` is True when nothing blocks. ``findings`` holds every
    finding (hard and soft, flags set, sorted); ``blocking`` the hard findings
    with neither an active override nor a prior sync covering them;
    ``overrides_relied_on`` the ids of the active overrides that let a hard
    finding through (sorted). ``status_error`` says why a block could not be
    recorded in creation.json (None when it was, or nothing had to be).
    """

    eligible: bool
    findings: list[Finding]
    blocking: list[Finding]
    overrides_relied_on: list[str]
    status_error: str | None = field(default=None, compare=False)


def _read_creation(writer: CreationWriter, run: str) -> CreationJson | None:
    try:
        return writer.read(Path(run))
    except CacheError:
        return None  # the validator reports it as unreadable_creation_json


def evaluate_run(
    run_path: Path | str,
    *,
    validator: _Auditor,
    writer: CreationWriter,
    now: dt.datetime | None = None,
) -> GateResult:
    """Decide whether ``run_path`` may sync now; read-only.

    ``now`` (aware; default the current UTC time) decides which overrides are
    active. Raises what ``validator.audit_run`` raises for a run folder that
    does not exist (``FileNotFoundError`` / ``NotADirectoryError``).
    """
    now = now if now is not None else dt.datetime.now(dt.UTC)
    run = os.path.abspath(os.fspath(run_path))
    findings = list(validator.audit_run(Path(run)))
    creation = _read_creation(writer, run)
    entries = creation.validation_overrides if creation is not None else []

    out: list[Finding] = []
    relied: set[str] = set()
    for finding in findings:
        if finding.tier != "hard":
            out.append(replace(finding, override_active=False, synced_under_prior_policy=False))
            continue
        override = active_override_for(finding.rule, entries, now) if entries else None
        prior = finding.synced_under_prior_policy  # judged by the validator (validator.prior_sync)
        if override is not None and not prior:
            relied.add(str(override["id"]))
        out.append(replace(finding, override_active=override is not None, synced_under_prior_policy=prior))
    out = sort_findings(out)
    blocking = [finding for finding in out if finding.blocks]
    return GateResult(
        eligible=not blocking,
        findings=out,
        blocking=blocking,
        overrides_relied_on=sorted(relied),
    )


def check_run(
    run_path: Path | str,
    *,
    validator: _Auditor,
    writer: CreationWriter,
    now: dt.datetime | None = None,
) -> GateResult:
    """:func:`evaluate_run`, then record a block as ``sync_status: blocked_by_validation``.

    Writing is best effort: a creation.json that cannot be written (lock
    timeout, I/O error) leaves the decision unchanged and is reported in
    ``status_error`` (and logged), never raised.
    """
    result = evaluate_run(run_path, validator=validator, writer=writer, now=now)
    if result.eligible:
        return result
    run = Path(os.path.abspath(os.fspath(run_path)))
    creation = _read_creation(writer, str(run))
    if creation is None or creation.sync_status == BLOCKED_STATUS:
        return result
    try:
        writer.set_sync_status(run, BLOCKED_STATUS)
    except CacheError as exc:
        _log.warning("%s: cannot record %s: %s", run, BLOCKED_STATUS, exc)
        result.status_error = str(exc)
    return result
