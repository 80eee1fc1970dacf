"""``exlab-sync override add|revoke|list`` through the console script, and a blocked run syncing after one."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.cache import CreationWriter
from exlab_wizard.config import load_config
from exlab_wizard.service import CompletionWatcher
from exlab_wizard.sync.nas_client import client_from_config
from exlab_wizard.sync.states import SyncJobState
from exlab_wizard.validator.override_ops import add_override
from tests.helpers import cli, wait_until
from tests.lab import EQ, Lab

RULE = "reserved_filesystem_name"


def _lab(tmp_path: Path, **sync: object) -> tuple[Lab, Path, Path]:
    """One equipment on a mounted "NAS" folder; a run blocked by ``aux.csv``; the config file."""
    lab = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False, creation_extra={"lab_note": "kept"})
    run = lab.make_run("Run_1", {"aux.csv": "a", "data.bin": "x"})
    config = lab.write_config(lab.config_data(sync={"backoff_s": [0.01], **sync}))
    return lab, run, config


def _creation(run: Path) -> dict:
    return json.loads((run / ".exlab-wizard" / "creation.json").read_text())


def _one_line_error(done: subprocess.CompletedProcess[str], *words: str) -> None:
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    for word in words:
        assert word in done.stderr, done.stderr


def test_add_then_list(tmp_path: Path) -> None:
    lab, run, config = _lab(tmp_path)  # aux.csv blocks it (the revoke test sees it blocked again)
    added = cli(
        "override",
        "add",
        str(run),
        "--rule",
        RULE,
        "--reason",
        "the vendor names it AUX",
        "--path",
        "aux.csv",
        "--expires",
        "30d",
        "--operator",
        "asmith",
        "--config",
        str(config),
    )
    assert added.returncode == 0, added.stderr
    [entry] = _creation(run)["validation_overrides"]
    assert entry["id"] in added.stdout and "CONFOCAL_01/PROJ-1/Runs/Run_1" in added.stdout
    assert (entry["problem_class"], entry["operator"], entry["path"], entry["revoked"]) == (
        RULE,
        "asmith",
        "aux.csv",
        False,
    )
    assert entry["expires_at"] is not None
    assert _creation(run)["lab_note"] == "kept"  # unknown keys survive
    assert cli("problems", str(run), "--config", str(config)).returncode == 0

    listed = cli("override", "list", "--config", str(config), "--json")  # every run with overrides
    assert listed.returncode == 0, listed.stderr
    [one] = json.loads(listed.stdout)["runs"]
    assert one["run_path"] == str(run) and [o["status"] for o in one["overrides"]] == ["active"]
    table = cli("override", "list", str(run), "--config", str(config))
    assert f"CONFOCAL_01/PROJ-1/Runs/Run_1\t{entry['id']}\t{RULE}\tactive" in table.stdout


def test_revoke_by_id_prefix_appends_a_tombstone(tmp_path: Path) -> None:
    _lab_, run, config = _lab(tmp_path)
    entry = add_override(CreationWriter(), run, rule=RULE, reason="vendor", operator="asmith")
    revoked = cli("override", "revoke", entry["id"][:8], "--reason", "renamed", "--config", str(config))
    assert revoked.returncode == 0, revoked.stderr
    first, tombstone = _creation(run)["validation_overrides"]
    assert first == entry  # never deleted, never edited
    assert (tombstone["revokes"], tombstone["revoked"], tombstone["reason"]) == (entry["id"], True, "renamed")
    statuses = json.loads(cli("override", "list", str(run), "--json", "--config", str(config)).stdout)
    assert [o["status"] for o in statuses["runs"][0]["overrides"]] == ["revoked", "tombstone"]
    assert cli("problems", str(run), "--config", str(config)).returncode == 1
    again = cli("override", "revoke", entry["id"], "--run", str(run), "--reason", "x", "--config", str(config))
    _one_line_error(again, "already revoked")


def test_expires_on_a_date_holds_through_that_day(tmp_path: Path) -> None:
    _lab_, run, config = _lab(tmp_path)
    done = cli(
        "override", "add", str(run), "--rule", RULE, "--reason", "r", "--expires", "2099-01-31", "--config", str(config)
    )
    assert done.returncode == 0, done.stderr
    assert _creation(run)["validation_overrides"][0]["expires_at"].startswith(("2099-01-31", "2099-02-01"))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--rule", "no_such_rule"], ["unknown rule 'no_such_rule'"]),
        (["--rule", "orphan"], ["orphan is a soft rule"]),
        (["--rule", RULE, "--expires", "2020-01-31"], ["not in the future"]),
        (["--rule", RULE, "--expires", "2020-01-31T00:00:00Z"], ["not in the future"]),
        (["--rule", RULE, "--path", "../../../etc/passwd"], ["not inside the run"]),
        (["--rule", RULE, "--path", "/etc/passwd"], ["not inside the run"]),
        (["--rule", RULE, "--reason", " "], ["reason is required"]),
    ],
    ids=["unknown-rule", "soft-rule", "past-date", "past-time", "path-climbs-out", "path-absolute", "empty-reason"],
)
def test_add_refuses_bad_input_with_one_line(tmp_path: Path, args: list[str], words: list[str]) -> None:
    _lab_, run, config = _lab(tmp_path)
    before = (run / ".exlab-wizard" / "creation.json").read_bytes()
    if "--reason" not in args:
        args = [*args, "--reason", "r"]
    _one_line_error(cli("override", "add", str(run), *args, "--config", str(config)), *words)
    assert (run / ".exlab-wizard" / "creation.json").read_bytes() == before


def test_missing_run_refused(tmp_path: Path) -> None:
    _lab_, run, config = _lab(tmp_path)
    c = ["--config", str(config)]
    _one_line_error(
        cli("override", "add", str(run.parent / "Run_nope"), "--rule", RULE, "--reason", "r", *c), "no such run"
    )
    _one_line_error(cli("override", "list", str(run.parent / "Run_nope"), *c), "no such run")


def test_unknown_or_short_id_refused(tmp_path: Path) -> None:
    _lab_, run, config = _lab(tmp_path)
    c = ["--config", str(config)]
    _one_line_error(cli("override", "revoke", "0123456789abcdef", "--reason", "r", *c), "no run", "0123456789abcdef")
    _one_line_error(cli("override", "revoke", "0123", "--reason", "r", *c), "at least 8 characters")
    assert cli("override", "list", *c).stdout.strip() == "no overrides"


async def test_held_job_syncs_on_the_next_pass_after_an_override(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path, equipment=(EQ,), nas_per_equipment=False)
    run = lab.make_run("Run_1", {"data.bin": "x"})
    config_file = lab.write_config(lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 0.2}))
    queued = cli("enqueue", str(run), "--config", str(config_file))  # no serve running: the job waits QUEUED
    assert queued.returncode == 0, queued.stderr
    (run / "aux.csv").write_text("appeared after the enqueue")
    client = client_from_config(load_config(config_file))
    await client.init()
    try:
        await wait_until(lambda: any(e.kind == "gate_hold" for e in lab.job(run).events), what="the gate's hold")
        added = await asyncio.to_thread(
            cli, "override", "add", str(run), "--rule", RULE, "--reason", "vendor name", "--config", str(config_file)
        )
        assert added.returncode == 0, added.stderr
        await wait_until(lambda: lab.job(run).state == SyncJobState.VERIFIED, timeout=30, what="the sync")
        assert (lab.nas_copy(run) / "aux.csv").read_text() == "appeared after the enqueue"
        assert lab.job(run).overrides_relied_on == (_creation(run)["validation_overrides"][0]["id"],)
    finally:
        await client.close()


async def test_watcher_gates_a_blocked_run_again_after_an_override(tmp_path: Path) -> None:
    lab, run, config_file = _lab(tmp_path, scan_interval_s=0.2)
    (run / "acquisition_complete.flag").write_text("")
    config = load_config(config_file)
    client = client_from_config(config)
    await client.init()
    watcher = CompletionWatcher(config, client)
    try:
        first = await watcher.scan_once()
        assert first.blocked == [str(run)], first
        added = await asyncio.to_thread(
            cli, "override", "add", str(run), "--rule", RULE, "--reason", "vendor name", "--config", str(config_file)
        )
        assert added.returncode == 0, added.stderr
        second = await watcher.scan_once()
        assert second.enqueued == [str(run)], second
        await client.wait_idle(timeout=30)
        assert (await client.job(run)).state == SyncJobState.VERIFIED
    finally:
        watcher.close()
        await client.close()
