"""Real power cuts, the suite's short share: the cut points that matter most, and a short random round.

Each case builds the rig (three 200 MiB sparse ext4 images on loop devices),
cuts, checks what the disks promise right after the cut, then lets a fresh
engine recover, audit and clean, and checks the three rules again (see
:mod:`tests.powercut.harness`). About 1 s a mount case, 2-3 s an rsync_ssh case.
The long run, every hooked point and many random cuts on both transports, is
``python -m tests.powercut --labs 20 --seed 1`` (docs/reliability.md, "Power cuts").
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.powercut.harness import (
    Outcome,
    cut_after_recovery_step,
    cut_at_point,
    cut_at_random,
    mount_scenario,
    rsync_scenario,
    scenario,
)
from tests.powercut.rig import rig


def _assert_kept(outcome: Outcome) -> None:
    assert outcome.losses == [], outcome.describe()
    assert outcome.stuck is None, outcome.describe()


def test_a_cut_loses_what_was_not_fsynced(tmp_path: Path) -> None:
    """The rig itself: a file fsynced survives a cut, one never fsynced does not (else no cut is real)."""
    with rig(tmp_path) as r:
        assert r.self_check() is None, r.self_check.__doc__


@pytest.mark.parametrize(
    "point,retain_cache",
    [
        ("transition:verified", False),  # the NAS copy a VERIFIED job promises
        ("deleted_batch_1", True),  # half the local files unlinked
        ("final_push", False),  # the last metadata push, right before the run folder goes
    ],
)
def test_a_cut_on_mount_keeps_every_file_and_the_job_ends_cleaned(
    tmp_path: Path, point: str, retain_cache: bool
) -> None:
    with mount_scenario(tmp_path, retain_cache=retain_cache) as scn:
        _assert_kept(cut_at_point(scn, point))


def test_a_cut_after_accept_local_verified_keeps_the_accepted_and_the_verified_bytes(tmp_path: Path) -> None:
    with mount_scenario(tmp_path, retain_cache=True) as scn:
        _assert_kept(cut_after_recovery_step(scn, "accept_local", "transition:verified"))


@pytest.mark.network
@pytest.mark.parametrize("point", ["transition:verified", "deleted_batch_1"])
def test_a_cut_on_rsync_ssh_keeps_every_file_and_the_job_ends_cleaned(
    tmp_path: Path, request: pytest.FixtureRequest, point: str
) -> None:
    with rsync_scenario(tmp_path, request.getfixturevalue("sshd")) as scn:
        _assert_kept(cut_at_point(scn, point))


@pytest.mark.network
def test_random_cuts_keep_every_file_and_every_job_ends_cleaned(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Three labs (mount, rsync_ssh, mount), three engines in a row each cut at a random instant.

    ``POWERCUT_SEED`` replays a seed (printed); lab ``i``'s instants come from ``(seed, i)`` as in the long run.
    """
    seed = int(os.environ.get("POWERCUT_SEED", "7"))
    server = request.getfixturevalue("sshd")
    for i, transport in enumerate(("mount", "rsync_ssh", "mount")):
        root = tmp_path / f"lab{i}"
        root.mkdir()
        with scenario(root, transport, server) as scn:
            outcome = cut_at_random(scn, random.Random(f"{seed}-{i}"))
        print(f"seed {seed}, lab {i}:", outcome.describe())
        _assert_kept(outcome)
