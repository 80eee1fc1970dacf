"""A config error says what to do: tabs in YAML, and a misspelled key's likely meaning.

A tab in the indentation got the generic "fix the key it names" (there is no
key, and the fix is to indent with spaces); a misspelled key such as
``completness_signal`` was refused with no suggestion. The message stays one
line, problems joined by ``"; "``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exlab_wizard.config import ConfigError, load_config
from exlab_wizard.sync.doctor import check_config_file

MOUNT = {"type": "mount", "mount_path": "/mnt/nas/lab/CONFOCAL_01"}


def _equipment(**extra: object) -> dict[str, object]:
    return {"id": "CONFOCAL_01", "local_root": "/data/lab", "transport": dict(MOUNT), **extra}


def _refused(tmp_path: Path, data: dict[str, object]) -> ConfigError:
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "\n" not in str(caught.value), str(caught.value)
    return caught.value


def test_a_tab_in_the_indentation_says_indent_with_spaces(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("equipment:\n  - id: CONFOCAL_01\n\tlocal_root: /data/lab\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "line 3: invalid YAML" in message and message.endswith("indent with spaces, not tabs"), message
    assert "\n" not in message
    config, check = check_config_file(path)  # what `exlab-sync doctor` prints as the fix
    assert config is None and not check.ok
    assert check.hint == "indent with spaces, not tabs", check


def test_other_yaml_errors_are_not_sent_to_a_key(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("equipment: [\n")
    _, check = check_config_file(path)
    assert "invalid YAML" in check.detail and "tab" not in check.detail and "key" not in (check.hint or ""), check


@pytest.mark.parametrize(
    ("data", "key", "meant"),
    [
        (
            {"equipment": [_equipment(completness_signal="none")]},
            "equipment[0].completness_signal",
            "completeness_signal",
        ),
        ({"equipment": [_equipment()], "sync": {"max_paralel_jobs": 4}}, "sync.max_paralel_jobs", "max_parallel_jobs"),
        ({"equipment": [_equipment()], "stat_dir": "/var/lib/x"}, "stat_dir", "state_dir"),
        (
            {"equipment": [{**_equipment(), "transport": {"type": "mount", "mount_path": "/m", "mount_markr": "m"}}]},
            "equipment[0].transport.mount_markr",
            "mount_marker",
        ),
    ],
    ids=["equipment", "sync", "top_level", "transport"],
)
def test_a_misspelled_key_gets_a_suggestion(tmp_path: Path, data: dict[str, object], key: str, meant: str) -> None:
    error = _refused(tmp_path, data)
    expected = f"{key}: Extra inputs are not permitted (did you mean {meant!r}?)"
    assert expected in error.problems, error.problems
    assert error.hint == "fix the key it names (see docs/config.md)"


def test_a_key_like_no_other_gets_no_guess(tmp_path: Path) -> None:
    error = _refused(tmp_path, {"equipment": [_equipment()], "sync": {"xyzzy": 1}})
    assert error.problems == ["sync.xyzzy: Extra inputs are not permitted"], error.problems
