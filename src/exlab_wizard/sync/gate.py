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
- a run folder inside another run folder, or holding one (a ``.exlab-wizard/``
  folder below its top, or above it), blocks as ``nested_run``, and no
  override lets it through: the NAS copy of the one would lie inside the
  NAS copy of the other, each sending its files over the other's verified
  copy (docs/engine.md).

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
import json
import logging
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from exlab_wizard.cache import CacheError, CreationJson, CreationWriter
from exlab_wizard.fileio import METADATA_DIR
from exlab_wizard.validator.findings import Finding, sort_findings
from exlab_wizard.validator.overrides import active_override_for

__all__ = ["BLOCKED_STATUS", "NESTED_RUN", "GateResult", "check_run", "evaluate_run", "nested_runs"]

#: The rule of a run folder inside another, or holding one; never overridable.
NESTED_RUN = "nested_run"

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
    out.extend(nested_runs(run))
    out = sort_findings(out)
    blocking = [finding for finding in out if finding.blocks]
    return GateResult(
        eligible=not blocking,
        findings=out,
        blocking=blocking,
        overrides_relied_on=sorted(relied),
    )


def nested_runs(run: str) -> list[Finding]:
    """``nested_run`` findings: every run folder above ``run``, and every folder inside it holding ``.exlab-wizard/``.

    Above the run, equipment and project folders may hold ``.exlab-wizard/``
    too: a folder there is a run when its creation.json says ``level: run``
    or it holds a verified manifest. Inside a run, any is one too many.
    """
    found = []
    above = os.path.dirname(run)
    while above and above != os.path.dirname(above):
        if _is_run_folder(above) and _is_a_run(above):
            found.append(_nested(run, above, f"the run folder lies inside the run folder {above}"))
        above = os.path.dirname(above)
    stack = [run]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                subfolders = [e.path for e in entries if e.is_dir(follow_symlinks=False) and e.name != METADATA_DIR]
        except OSError:
            continue  # gone or unreadable: the validator and the push report it
        for path in subfolders:
            if _is_run_folder(path):
                found.append(_nested(run, path, f"the run folder holds another run folder, {path}"))
            stack.append(path)
    return found


def _is_a_run(path: str) -> bool:
    meta = os.path.join(path, METADATA_DIR)
    if os.path.lexists(os.path.join(meta, "checksums.sha256")):
        return True
    try:
        with open(os.path.join(meta, "creation.json"), "rb") as handle:
            return json.loads(handle.read(1 << 20)).get("level") == "run"
    except (OSError, ValueError, AttributeError):
        return False


def _is_run_folder(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(os.path.join(path, METADATA_DIR)).st_mode)
    except OSError:
        return False


def _nested(run: str, other: str, why: str) -> Finding:
    return Finding(
        rule=NESTED_RUN,
        tier="hard",
        run_path=run,
        offending_path=other,
        offending_kind="directory_segment",
        matched_token=METADATA_DIR,
        rule_detail=f"{why}: their NAS copies would lie one inside the other; move one of them out",
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
