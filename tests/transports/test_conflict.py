"""The remote-conflict rule (sync/transports/conflict.py), one table for every transport."""

from __future__ import annotations

import pytest

from exlab_wizard.sync.transports.base import TransportErrorKind
from exlab_wizard.sync.transports.conflict import (
    DIR,
    FILE,
    OTHER,
    conflict_error,
    sort_remote,
    unclaimed_files_error,
)

LOCAL_FILES = {"a.raw": 3, "sub/b.raw": 4, ".exlab-wizard/creation.json": 2}
LOCAL_DIRS = {"sub", ".exlab-wizard"}


def _temp(path: str, kind: str) -> str | None:
    return path if kind == FILE and path.endswith(".ours-tmp") else None


@pytest.mark.parametrize(
    ("remote", "leftovers", "foreign"),
    [
        ({"a.raw": FILE, "sub": DIR, "sub/b.raw": FILE}, [], []),
        ({"c.raw": FILE}, [], ["c.raw"]),
        ({"sub/c.raw": FILE}, [], ["sub/c.raw"]),
        ({"a.raw": DIR, "a.raw/x": FILE}, [], ["a.raw/", "a.raw/x"]),  # a folder where the run has a file
        ({"sub": FILE}, [], ["sub"]),  # a file where the run has a folder
        ({"a.raw": OTHER}, [], ["a.raw"]),  # a symlink where the run has a file
        ({"link": OTHER}, [], ["link"]),  # a symlink the run does not have
        ({"other": DIR}, [], []),  # an empty folder holds no one's data
        ({".exlab-wizard/old.log": FILE, ".exlab-wizard/previous/x/a.raw": FILE}, [], []),  # our metadata
        ({".exlab-wizard": FILE}, [], [".exlab-wizard"]),  # not inside the folder: not ours
        ({".Exlab-Wizard/old.log": FILE}, [], [".Exlab-Wizard/old.log"]),  # exact case
        ({"cleaned.raw": FILE}, [], []),
        ({"a.raw.ours-tmp": FILE, "sub/x.ours-tmp": FILE}, ["a.raw.ours-tmp", "sub/x.ours-tmp"], []),
        ({"z.raw": FILE, "b\xff.raw": FILE, "b.raw": FILE}, [], ["b.raw", "b\xff.raw", "z.raw"]),
    ],
)
def test_sort_remote(remote, leftovers, foreign) -> None:
    extras = sort_remote(LOCAL_FILES, LOCAL_DIRS, remote, frozenset({"cleaned.raw"}), leftover=_temp)
    assert extras == (leftovers, foreign, ())


def test_a_leftover_may_name_the_folder_to_remove() -> None:
    def partial_dir(path: str, kind: str) -> str | None:
        return "sub/.partial" if path.startswith("sub/.partial/") else None

    remote = {"sub/.partial/a": FILE, "sub/.partial/b": FILE, "sub/.partial": DIR}
    assert sort_remote(LOCAL_FILES, LOCAL_DIRS, remote, leftover=partial_dir) == (["sub/.partial"], [], ())


def test_a_fresh_push_lists_the_data_files_of_its_names_as_claimed() -> None:
    """``fresh``: files of the run's names are no conflict by themselves, but listed; metadata never is."""
    remote = {"a.raw": FILE, "sub": DIR, "sub/b.raw": FILE, ".exlab-wizard/creation.json": FILE, "c.raw": FILE}
    extras = sort_remote(LOCAL_FILES, LOCAL_DIRS, remote, fresh=True)
    assert extras == ([], ["c.raw"], ("a.raw", "sub/b.raw"))
    assert sort_remote(LOCAL_FILES, LOCAL_DIRS, remote).claimed == ()  # a job that claimed the folder

    error = unclaimed_files_error("nas:/runs/Run_1", extras.claimed)
    assert error is not None and error.kind is TransportErrorKind.REMOTE_CONFLICT
    assert "2 data files" in error.message and "'sub/b.raw'" in error.message
    assert error.message.endswith("nothing was written")
    assert unclaimed_files_error("nas:/runs/Run_1", ()) is None


def test_conflict_error_names_the_first_five() -> None:
    error = conflict_error("nas:/runs/Run_1", [f"f{n}" for n in range(7)])
    assert error.kind is TransportErrorKind.REMOTE_CONFLICT
    assert "7 entries" in error.message and "'f4'" in error.message and "'f5'" not in error.message
    assert error.message.endswith("nothing was written")
