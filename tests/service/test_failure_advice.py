"""The dashboard's failed-job sentences ask only for what the page or a named command can do.

A job FAILED ``local_damage`` said "Restore them from the verified NAS copy
(exlab-sync restore), or retry accepting the local files." The page's only
control, Retry, posts ``{}``, which the API answers 409 ``local_damage``;
nothing on the page sends ``{"accept_local": true}``. The sentence now names
both commands, in the form the CLI's own ``local_damage`` message gives.
"""

from __future__ import annotations

from pathlib import Path

import exlab_wizard.service as service_pkg
from exlab_wizard.service.dashboard import FAILURE_SENTENCES
from exlab_wizard.sync.failures import FailureKind
from exlab_wizard.sync.recovery import damage_ways_out

ROOT = Path(service_pkg.__file__).parent


def _page_can_accept_local() -> bool:
    script = (ROOT / "static" / "dashboard.js").read_text()
    failed = (ROOT / "templates" / "_failed.html").read_text()
    return "accept_local" in script or "accept_local" in failed or "accept-local" in failed


def test_local_damage_advice_matches_the_page_controls() -> None:
    sentence = FAILURE_SENTENCES[FailureKind.LOCAL_DAMAGE]
    assert _page_can_accept_local() or "retry --accept-local" in sentence, (
        f"the page says {sentence!r} but its Retry button posts {{}} (409 local_damage) and cannot accept local files"
    )


def test_local_damage_advice_names_the_commands_the_cli_names() -> None:
    sentence = FAILURE_SENTENCES[FailureKind.LOCAL_DAMAGE]
    cli = damage_ways_out("0123abcd", "/lab/CONFOCAL_01/P/Runs/Run_1")
    for command in ("`exlab-sync restore ", "`exlab-sync retry --accept-local "):
        assert command in cli, cli  # the CLI's message, which Details shows with this run's names
        assert command in sentence, f"{sentence!r} does not name {command.strip('`')!r}"
    assert "exlab-sync restore RUN`" in sentence and "--accept-local JOB_ID`" in sentence, sentence
