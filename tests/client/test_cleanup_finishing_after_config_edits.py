"""Config edits and expiries met by a cleanup that is half done (``retain_cache: false``).

The data files are deleted, then the final metadata push is proved and
``.exlab-wizard/`` goes. Between the two the job waits in CLEANUP_ELIGIBLE with
``data_deleted_at`` set (the first final push failed: the NAS away a moment).
Nothing local is left then for interlocks 2, 3, 5 and 6 to protect, and the
audit skips the job ("the cleanup is finishing"): a resumed plan gated on them
waited for a pass or an override that could never come, CLEANUP_ELIGIBLE for
ever. Only interlock 1 and the final push's own proof gate the rest.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from exlab_wizard.sync.policy.cleanup import CleanupCode
from exlab_wizard.sync.states import SyncJobState
from tests.client.test_audit_and_cleanup import first_final_push_fails
from tests.helpers import Clock
from tests.lab import FILES, Lab, acts, ready, running
from tests.lab import cleanup_config as config

S = SyncJobState


async def test_raising_min_verify_passes_after_the_data_went_does_not_stall_the_cleanup(
    lab: Lab, tmp_path: Path
) -> None:
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    async with running(cfg, clock) as client:
        await ready(client, clock, run)  # 2 passes, 25 h old
        first_final_push_fails(client)  # the NAS away a moment at the final push
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "waiting", outcome
        assert not any((run / rel).exists() for rel in FILES)  # the data are gone already

    # The lab raises the bar (a NAS scare elsewhere): three passes before any deletion.
    stricter = cfg.model_copy(update={"nas_cleanup": cfg.nas_cleanup.model_copy(update={"min_verify_passes": 3})})
    reasons: list[str] = []
    async with running(stricter, clock) as client:
        for _ in range(6):  # a day and a half of audits and cleanup passes
            clock.advance(7)
            await client.audit_once()
            reasons += [o.reason for o in acts(await client.cleanup_once())]
        job = await client.job(run)
    assert job.state == S.CLEANED, (
        job.state.value,
        job.verify_passes,
        reasons[-1:],
        [e.detail for e in job.events if e.kind in ("audit_skipped", "cleanup_refused")][-3:],
    )


async def test_an_override_expiring_after_the_data_went_does_not_stall_the_cleanup(lab: Lab, tmp_path: Path) -> None:
    """The gate relied on an override with an expiry date; the data are deleted, the first final push
    fails, then the override expires: nothing is left for interlock 5 to protect."""
    clock = Clock()
    override = {
        "id": "0b6f9c1e-2c7a-4a64-9a57-6d0f2e6f1a01",
        "problem_class": "unresolved_placeholder_token",
        "operator": "asmith",
        "recorded_at": "2026-01-01T00:00:00Z",
        "expires_at": (clock() + dt.timedelta(hours=27)).astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reason": "the instrument writes <sample> in its notes",
        "revoked": False,
    }
    files = dict(FILES)
    files["notes.txt"] = b"sample: <sample>\n"
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=files, overrides=[override])
    async with running(cfg, clock) as client:
        job = await ready(client, clock, run)
        assert job.overrides_relied_on == (override["id"],)
        first_final_push_fails(client)
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "waiting", outcome
        assert not any((run / rel).exists() for rel in files)
        reasons: list[str] = []
        for _ in range(4):
            clock.advance(7)
            reasons += [o.reason for o in acts(await client.cleanup_once())]
        job = await client.job(run)
    assert job.state == S.CLEANED, (job.state.value, reasons[-1:])


async def test_an_unmounted_share_still_holds_the_finishing_cleanup_back(lab: Lab, tmp_path: Path) -> None:
    """Rule 3: with interlocks 2, 3 and 5 no longer asked, the final push's proof still is. The share
    unmounted is a wait (the .exlab-wizard/ kept), never taken for a NAS that has the copy."""
    clock = Clock()
    cfg = config(lab, retain_cache=False)
    run = lab.make_run(files=FILES)
    marker = lab.nas / "CONFOCAL_01" / ".exlab-nas"
    async with running(cfg, clock) as client:
        await ready(client, clock, run)
        first_final_push_fails(client)
        [outcome] = acts(await client.cleanup_once())
        assert outcome.action == "waiting", outcome
        marker.unlink()  # the share goes away
        for _ in range(3):
            clock.advance(7)
            [outcome] = acts(await client.cleanup_once())
            assert outcome.action == "waiting", outcome
            assert outcome.code == CleanupCode.FINAL_PUSH_PENDING, outcome
        job = await client.job(run)
        assert job.state == S.CLEANUP_ELIGIBLE
        assert (run / ".exlab-wizard" / "checksums.sha256").is_file()  # nothing of the record removed
        marker.write_text("mounted\n")
        await client.cleanup_once()
        job = await client.job(run)
    assert job.state == S.CLEANED, job.last_error
