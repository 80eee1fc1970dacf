"""Every ``--json`` document has exactly the keys docs/cli.md lists (the docs and the output cannot drift)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cli
from tests.lab import EQ, Lab

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"

_SHAPE = re.compile(r"^- shape `(\w+)`( \(at least\))?: (.*)$")
_PATH = re.compile(r"^- `([^`]+)`( \(at least\))?: (.*)$")
_HEADING = re.compile(r"^### `exlab-sync (.+) --json`$")


def _keys(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text.split(" (")[0] if text.startswith("`") else text)


def documented() -> dict[str, dict[str, tuple[list[str], bool]]]:
    """``{"jobs": {".": (keys, at_least), "jobs[]": ...}, ...}`` from docs/cli.md."""
    shapes: dict[str, tuple[list[str], bool]] = {}
    commands: dict[str, dict[str, tuple[list[str], bool]]] = {}
    current: str | None = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if (shape := _SHAPE.match(line)) is not None:
            shapes[shape.group(1)] = (_keys(shape.group(3)), bool(shape.group(2)))
        elif (heading := _HEADING.match(line)) is not None:
            current = heading.group(1)
            commands[current] = {}
        elif line.startswith("#"):
            current = None
        elif current is not None and (path := _PATH.match(line)) is not None:
            rest = path.group(3)
            named = re.match(r"^shape `(\w+)`$", rest)
            commands[current][path.group(1)] = shapes[named.group(1)] if named else (_keys(rest), bool(path.group(2)))
    return commands


def _objects(document: Any, path: str) -> list[Any]:
    """The objects at ``path`` (``.``, ``a``, ``a[]``, ``a[].b[]``), nulls left out."""
    found = [document]
    if path != ".":
        for part in path.split("."):
            many = part.endswith("[]")
            name = part.removesuffix("[]")
            found = [item.get(name) for item in found if isinstance(item, dict)]
            if many:
                found = [element for item in found if isinstance(item, list) for element in item]
    return [item for item in found if item is not None]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> tuple[Lab, Path, dict[str, Path]]:
    """One run synced, one synced with an override, one blocked, and the config file."""
    lab = Lab.build(tmp_path_factory.mktemp("json"), equipment=(EQ,), nas_per_equipment=False)
    runs = {"clean": lab.make_run("Run_1", {"a.txt": "fine"}), "overridden": lab.make_run("Run_2", {"aux.csv": "x"})}
    config = lab.write_config(lab.config_data(sync={"backoff_s": [0.01], "scan_interval_s": 3600}))
    c = ["--config", str(config)]
    assert (
        cli(
            "override", "add", str(runs["overridden"]), "--rule", "reserved_filesystem_name", "--reason", "r", *c
        ).returncode
        == 0
    )
    done = cli("enqueue", str(runs["clean"]), str(runs["overridden"]), "--wait", *c)
    assert done.returncode == 0, done.stdout + done.stderr
    runs["blocked"] = lab.make_run("Run_3", {"con.txt": "x"})
    return lab, config, runs


COMMANDS = {
    "jobs": (["jobs"], 0),
    "status": (["status"], 0),
    "status RUN": (["status", "{clean}"], 0),
    "problems": (["problems"], 1),
    "verify RUN": (["verify", "{clean}"], 0),
    "cleanup --dry-run": (["cleanup", "--dry-run"], 0),
    "doctor": (["doctor"], 0),
    "override list": (["override", "list"], 0),
}


def test_every_documented_document_is_tested() -> None:
    assert set(documented()) == set(COMMANDS)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_json_keys_match_the_docs(lab: tuple[Lab, Path, dict[str, Path]], command: str) -> None:
    _lab, config, runs = lab
    args, code = COMMANDS[command]
    done = cli(*[arg.format(**{k: str(v) for k, v in runs.items()}) for arg in args], "--json", "--config", str(config))
    assert done.returncode == code, done.stdout + done.stderr
    document = json.loads(done.stdout)
    for path, (keys, at_least) in documented()[command].items():
        objects = _objects(document, path)
        assert objects, f"{command}: nothing at {path} to check"
        for item in objects:
            if at_least:
                assert set(keys) <= set(item), f"{command} {path}: missing {set(keys) - set(item)}"
            else:
                assert list(item) == keys, f"{command} {path}: {list(item)} != documented {keys}"


def test_tables_off_a_terminal_are_tab_separated_lines(lab: tuple[Lab, Path, dict[str, Path]]) -> None:
    the_lab, config, runs = lab
    done = cli("jobs", "--config", str(config), columns=40)  # a narrow terminal width changes nothing
    assert done.returncode == 0, done.stderr
    header, *rows = done.stdout.splitlines()
    assert header.split("\t")[:4] == ["job", "equipment", "run", "state"]
    assert len(rows) == 2 and all(len(row.split("\t")) == len(header.split("\t")) for row in rows)
    assert "│" not in done.stdout and "─" not in done.stdout
    shown = {row.split("\t")[2] for row in rows}
    assert shown == {str(runs[k].relative_to(the_lab.local_root)) for k in ("clean", "overridden")}
    assert shown == {"CONFOCAL_01/PROJ-1/Runs/Run_1", "CONFOCAL_01/PROJ-1/Runs/Run_2"}
