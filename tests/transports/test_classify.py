"""The failure classifier against what the real tools print.

``samples.json`` holds ssh, rsync and rclone failures captured on this machine
by ``tests/fixtures/stderr_samples/capture.py`` (a dead port, a refused key, a
changed host key, an sftp-only account, rrsync, a root-owned folder, a full
and a read-only tmpfs, a missing source file). Every sample must classify to
the kind recorded with it; the rules no sample reaches (cloud answers,
rclone's own exit codes, a local file that vanished mid-copy) have a line
each below. Together they exercise every rule in ``RULES``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exlab_wizard.sync.transports.classify import RULES, classify, transport_error

SAMPLES = json.loads((Path(__file__).parents[1] / "fixtures" / "stderr_samples" / "samples.json").read_text())

#: (tool, exit code, stderr, kind) for the rules no captured sample reaches.
WRITTEN = [
    ("rclone", 5, "ERROR : Attempt 3/3 failed with 1 errors and: temporary failure", "network"),
    (
        "rclone",
        1,
        "ERROR : a.dat: Failed to copy: failed to open source object: open /run/a.dat: no such file or directory",
        "local_file_vanished",
    ),
    (
        "rclone",
        1,
        "ERROR : a.dat: Failed to copy: failed to open source object: open /run/a.dat: permission denied",
        "unknown",
    ),
    ("ssh", 255, "", "network"),
    ("rsync", 255, "", "network"),
    ("rsync", 30, "rsync error: timeout in data send/receive (code 30) at io.c(201) [sender=3.2.7]", "network"),
    ("rclone", 6, "ERROR : Attempt 1/3 failed with 1 errors", "remote_write_refused"),
    ("rclone", 7, "ERROR : fatal error encountered", "auth"),
    (
        "rclone",
        1,
        "ERROR : a.dat: Failed to copy: AccessDenied: Access Denied\n\tstatus code: 403",
        "remote_write_refused",
    ),
    ("rclone", 1, "ERROR : Failed to copy: SignatureDoesNotMatch: the signature we calculated does not match", "auth"),
]


@pytest.mark.parametrize("sample", SAMPLES, ids=[s["name"] for s in SAMPLES])
def test_every_captured_failure_classifies_to_its_kind(sample: dict) -> None:
    found = classify(sample["tool"], sample["returncode"], sample["stderr"])
    assert found.kind.value == sample["kind"], found.reason
    assert found.reason.startswith(f"{sample['tool']} exited with {sample['returncode']}")


@pytest.mark.parametrize(("tool", "code", "stderr", "kind"), WRITTEN)
def test_rules_no_sample_reaches(tool: str, code: int, stderr: str, kind: str) -> None:
    assert classify(tool, code, stderr).kind.value == kind


def test_every_rule_is_exercised_by_a_sample_or_a_written_line() -> None:
    cases = [(s["tool"], s["returncode"], s["stderr"]) for s in SAMPLES] + [c[:3] for c in WRITTEN]
    used = {id(classify(*case).rule) for case in cases}
    unused = [rule.why for rule in RULES if id(rule) not in used]
    assert not unused, f"rules with no test case: {unused}"


def test_the_samples_are_real_failures_of_each_tool() -> None:
    assert {s["tool"] for s in SAMPLES} == {"ssh", "rsync", "rclone"}
    assert all(s["returncode"] != 0 and s["stderr"].strip() for s in SAMPLES)


def test_an_unmatched_failure_is_unknown_and_quotes_the_last_line() -> None:
    found = classify("rsync", 1, "rsync: something new\nrsync error: syntax or usage error (code 1)")
    assert found.kind.value == "unknown" and found.rule is None
    assert found.reason == "rsync exited with 1: rsync error: syntax or usage error (code 1)"


def test_transport_error_says_what_was_being_done() -> None:
    error = transport_error("ssh", 255, "exlabt_rw@127.0.0.1: Permission denied (publickey).", "listing /nas/run")
    assert error.kind.value == "auth"
    assert error.message == "listing /nas/run: ssh exited with 255: exlabt_rw@127.0.0.1: Permission denied (publickey)."
