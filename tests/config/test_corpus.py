"""The malformed-config corpus: every file must be refused, naming the key.

Each ``malformed/*.yaml`` starts with ``# expect: <key path>``; loading it must
raise :class:`ConfigError` with at least one problem that begins with exactly
``<key path>: ``. Every ``valid/*.yaml`` must load.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from exlab_wizard.config import Config, ConfigError, load_config

HERE = Path(__file__).parent
MALFORMED = sorted((HERE / "malformed").glob("*.yaml"))
VALID = sorted((HERE / "valid").glob("*.yaml"))
EXPECT_RE = re.compile(r"^# expect: (\S.*?)\s*$")


def _expected_key(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    match = EXPECT_RE.match(first)
    assert match, f"{path.name}: first line must be '# expect: <key path>', got {first!r}"
    return match.group(1)


def test_corpus_is_big_enough_and_well_formed():
    assert len(MALFORMED) >= 25
    bodies = set()
    for path in MALFORMED:
        _expected_key(path)
        body = path.read_text(encoding="utf-8").split("\n", 1)[1]
        assert body not in bodies, f"{path.name} duplicates another corpus file"
        bodies.add(body)


@pytest.mark.parametrize("path", MALFORMED, ids=[p.stem for p in MALFORMED])
def test_malformed_config_is_refused_naming_the_key(path: Path):
    expected = _expected_key(path)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    error = caught.value
    assert error.problems, "ConfigError without problems"
    assert any(problem.startswith(expected + ": ") for problem in error.problems), (
        f"no problem starts with {expected + ': '!r}; got {error.problems!r}"
    )
    # Every problem has the "<key path>: <reason>" shape with a non-empty reason.
    for problem in error.problems:
        key, sep, reason = problem.partition(": ")
        assert key and sep and reason.strip(), problem
    # The message names the file and carries every problem.
    message = str(error)
    assert str(path) in message
    for problem in error.problems:
        assert problem in message


@pytest.mark.parametrize("path", VALID, ids=[p.stem for p in VALID])
def test_valid_config_loads(path: Path):
    assert isinstance(load_config(path), Config)
