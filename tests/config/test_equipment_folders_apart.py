"""The loader keeps every equipment's folder apart from the others' and from every NAS place.

Two mistakes a lab makes by copying an entry and editing it wrongly, both
loaded without a word before:

- one equipment's ``<local_root>/<id>`` at or inside another's: a run there
  went to whichever entry came first, with that one's transport and NAS;
- a ``mount_path`` at, inside or above an equipment's ``<local_root>/<id>``
  (the share mounted where the data are): every run's "NAS copy" was the run
  itself, verified against itself, then deleted by the cleanup.

Each is refused in one line that names the key and both entries. Several
equipment under one ``local_root`` (distinct ``<root>/<id>``) stays a
legitimate layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exlab_wizard.config import ConfigError, load_config, parse_config


def entry(eq_id: str, local_root: Path, mount_path: Path) -> dict[str, Any]:
    return {"id": eq_id, "local_root": str(local_root), "transport": {"type": "mount", "mount_path": str(mount_path)}}


def refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert len(caught.value.problems) == 1, caught.value.problems
    return caught.value.problems[0]


def test_several_equipment_under_one_local_root_load(tmp_path: Path) -> None:
    lab, nas = tmp_path / "lab", tmp_path / "nas"
    config = parse_config(
        {
            "equipment": [
                entry("SCOPE", lab, nas / "SCOPE"),
                entry("SCOPE_2", lab, nas / "SCOPE_2"),  # a name that starts with another's is not inside it
                entry("READER", tmp_path / "other", nas),
            ]
        }
    )
    assert [eq.equipment_root for eq in config.equipment] == [
        lab / "SCOPE",
        lab / "SCOPE_2",
        tmp_path / "other" / "READER",
    ]


def test_an_equipment_folder_inside_another_is_refused_naming_both(tmp_path: Path) -> None:
    lab, nas = tmp_path / "lab", tmp_path / "nas"
    problem = refusal(
        {"equipment": [entry("CONFOCAL_01", lab, nas / "C"), entry("FACS_02", lab / "CONFOCAL_01", nas / "F")]}
    )
    assert problem.startswith("equipment[1].local_root: "), problem
    assert f"{lab}/CONFOCAL_01/FACS_02 is inside equipment[0]'s folder {lab}/CONFOCAL_01" in problem, problem


def test_an_equipment_folder_holding_an_earlier_one_is_refused_too(tmp_path: Path) -> None:
    lab, nas = tmp_path / "lab", tmp_path / "nas"
    problem = refusal(
        {"equipment": [entry("FACS_02", lab / "CONFOCAL_01", nas / "F"), entry("CONFOCAL_01", lab, nas / "C")]}
    )
    assert problem.startswith("equipment[1].local_root: ") and "holds equipment[0]'s folder" in problem, problem


def test_an_equipment_folder_that_resolves_into_another_is_refused(tmp_path: Path) -> None:
    lab, nas = tmp_path / "lab", tmp_path / "nas"
    (lab / "CONFOCAL_01").mkdir(parents=True)
    alias = tmp_path / "alias"
    alias.symlink_to(lab / "CONFOCAL_01")
    problem = refusal({"equipment": [entry("CONFOCAL_01", lab, nas / "C"), entry("FACS_02", alias, nas / "F")]})
    assert problem.startswith("equipment[1].local_root: ") and "equipment[0]" in problem, problem


@pytest.mark.parametrize(
    ("where", "relation"),
    [
        (lambda lab, nas: lab / "CONFOCAL_01", "is equipment[0]'s local folder"),
        (lambda lab, nas: lab / "CONFOCAL_01" / "share", "is inside equipment[0]'s local folder"),
        (lambda lab, nas: lab, "holds equipment[0]'s local folder"),
        (lambda lab, nas: lab / "FACS_02", "is equipment[1]'s local folder"),  # another equipment's folder
    ],
    ids=["the folder itself", "inside it", "above it", "another equipment's"],
)
def test_a_mount_path_at_inside_or_above_an_equipment_folder_is_refused(tmp_path: Path, where, relation) -> None:
    lab, nas = tmp_path / "lab", tmp_path / "nas"
    data = {"equipment": [entry("CONFOCAL_01", lab, where(lab, nas)), entry("FACS_02", lab, nas / "F")]}
    problem = refusal(data)
    assert problem.startswith("equipment[0].transport.mount_path: "), problem
    assert relation in problem and "cleanup would delete the only copy" in problem, problem


def test_a_mount_path_that_resolves_to_the_local_folder_is_refused(tmp_path: Path) -> None:
    lab = tmp_path / "lab"
    (lab / "CONFOCAL_01").mkdir(parents=True)
    share = tmp_path / "mnt-nas"
    share.symlink_to(lab / "CONFOCAL_01")
    problem = refusal({"equipment": [entry("CONFOCAL_01", lab, share)]})
    assert problem.startswith("equipment[0].transport.mount_path: "), problem


def test_the_refusal_from_a_file_is_one_line_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"equipment:\n  - id: CONFOCAL_01\n    local_root: {tmp_path}/lab\n"
        f"    transport: {{type: mount, mount_path: {tmp_path}/lab/CONFOCAL_01}}\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [
        f"equipment[0].transport.mount_path: {tmp_path}/lab/CONFOCAL_01 is equipment[0]'s local folder"
        f" {tmp_path}/lab/CONFOCAL_01: the NAS copy would be the local data itself, and cleanup would delete"
        " the only copy; mount the share apart from the local data"
    ]
