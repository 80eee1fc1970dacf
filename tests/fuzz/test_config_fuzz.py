"""Fuzzing ``load_config``: generated YAML text, generated structures, raw bytes.

Every case loads (a :class:`Config`) or raises :class:`ConfigError` whose
every problem reads ``<key path>: <reason>``; nothing else, no hang, and the
file and its folder are left as they were.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from ruamel.yaml import YAML

from exlab_wizard.config import Config, ConfigError, load_config
from tests.fuzz.conftest import CASES, FUZZ, case_dir, guarded, snapshot

#: Every key path a config can hold (lists by index 0).
KEY_PATHS: list[tuple[Any, ...]] = [
    (),
    ("equipment",),
    ("equipment", 0),
    *[
        ("equipment", 0, key)
        for key in (
            "id",
            "label",
            "local_root",
            "nas_root",
            "completeness_signal",
            "sentinel_filename",
            "manifest_filename",
            "transport",
        )
    ],
    *[
        ("equipment", 0, "transport", key)
        for key in (
            "type",
            "mount_path",
            "mount_marker",
            "ssh_target",
            "ssh_port",
            "bandwidth",
            "rclone_remote",
            "password",
        )
    ],
    ("equipment", 0, "transport", "bandwidth", "upload_mbps"),
    ("equipment", 0, "transport", "bandwidth", "schedule"),
    ("nas_cleanup",),
    *[("nas_cleanup", key) for key in ("enabled", "min_verify_passes", "min_age_hours", "retain_cache")],
    ("sync",),
    *[
        ("sync", key)
        for key in (
            "enabled",
            "max_parallel_jobs",
            "backoff_s",
            "audit_interval_s",
            "scan_interval_s",
            "verify_max_stream_bytes",
        )
    ],
    ("validator",),
    ("validator", "content_scan_max_mib"),
    ("validator", "content_scan_extensions"),
    ("state_dir",),
]

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([10**30, -(10**30), 2**63, 2**64 + 1, 10**4000 // 10**3990]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            "~",
            "/",
            "..",
            "mount",
            "rsync_ssh",
            "22:00",
            "mon",
            "1e400",
            ".inf",
            "-.nan",
            "0x10",
            "\x00",
            "\ud800",
            "a" * 5000,
            "password",
            "0o777",
        ]
    ),
)
ODD_KEYS = st.one_of(
    st.text(max_size=12),
    st.integers(),
    st.sampled_from(["password", "PASSWORD", "from", "to", "<<", "", " ", "id", "\u200b"]),
)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(ODD_KEYS, inner, max_size=4)),
    max_leaves=20,
)


def _deep(depth: int, leaf: Any) -> Any:
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


VALUES = st.one_of(JUNK, st.builds(_deep, st.integers(1, 200), SCALARS))


def _base(folder: Path) -> dict[str, Any]:
    return {
        "equipment": [
            {
                "id": "CONFOCAL_01",
                "local_root": str(folder / "lab"),
                "transport": {
                    "type": "mount",
                    "mount_path": str(folder / "nas"),
                    "bandwidth": {"upload_mbps": 10, "schedule": [{"days": ["mon"], "from": "08:00", "to": "18:00"}]},
                },
            }
        ],
        "sync": {"backoff_s": [1, 2]},
        "state_dir": str(folder / "state"),
    }


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``data`` with the value at ``path`` replaced (missing parents are created as mappings)."""
    if not path:
        return value
    here = data
    for part in path[:-1]:
        if isinstance(here, list) and isinstance(part, int) and part < len(here):
            here = here[part]
        elif isinstance(here, dict):
            here = here.setdefault(part, {})
        else:
            return data
    if isinstance(here, list) and isinstance(path[-1], int) and path[-1] < len(here) or isinstance(here, dict):
        here[path[-1]] = value
    return data


def _dump(data: Any) -> str:
    yaml = YAML(typ="safe", pure=True)
    stream = io.StringIO()
    yaml.dump(data, stream)
    return stream.getvalue()


def _check_load(folder: Path, body: bytes, target: str) -> None:
    path = folder / "config.yaml"
    path.write_bytes(body)
    before = snapshot(folder)
    kind, value = guarded(lambda: load_config(path))
    CASES[target] += 1
    assert snapshot(folder) == before, "loading the config changed a file"
    if kind == "ok":
        assert isinstance(value, Config)
        return
    assert isinstance(value, ConfigError), f"{type(value).__name__}: {value}"
    assert value.problems
    for problem in value.problems:
        key, sep, reason = problem.partition(": ")
        assert key and sep and reason.strip(), f"a problem that names no key: {problem!r}"


@given(mutations=st.lists(st.tuples(st.sampled_from(KEY_PATHS), VALUES), min_size=1, max_size=4))
@FUZZ
def test_generated_structures_load_or_name_a_key(mutations: list[tuple[tuple[Any, ...], Any]]) -> None:
    with case_dir() as folder:
        data = _base(folder)
        try:
            for path, value in mutations:
                data = _set(data, path, copy.deepcopy(value))
            text = _dump(data)
        except (RecursionError, ValueError, TypeError):
            return  # the dumper cannot write it either, so no file can hold it
        _check_load(folder, text.encode("utf-8", "surrogatepass"), "config: generated structures")


_FRAGMENTS = st.sampled_from(
    [
        "equipment:\n",
        "  - id: CONF_1\n",
        "    local_root: /tmp/x\n",
        "    transport: {type: mount, mount_path: /n}\n",
        "sync:\n  backoff_s: [1, .inf]\n",
        "&a [*a]\n",
        "*a\n",
        "!!python/object:os.system\n",
        "!!binary |\n  AAAA\n",
        "? [a]\n: b\n",
        "key: !!float nan\n",
        "<<: {a: 1}\n",
        "---\n",
        "...\n",
        "%YAML 1.1\n",
        "\t- x\n",
        "equipment: [" * 50,
        "]" * 50,
        "{" * 1000,
        "a: 1\na: 2\n",
        "state_dir: ~\n",
        "password: hunter2\n",
        "nas_cleanup: {min_age_hours: 1e400}\n",
        "sync: {max_parallel_jobs: 99999999999999999999999}\n",
    ]
)


@given(parts=st.lists(st.one_of(_FRAGMENTS, st.text(max_size=30)), max_size=12))
@FUZZ
def test_generated_yaml_text_loads_or_names_a_key(parts: list[str]) -> None:
    with case_dir() as folder:
        _check_load(folder, "".join(parts).encode("utf-8", "surrogatepass"), "config: generated YAML text")


@given(
    body=st.one_of(
        st.binary(max_size=400),
        st.builds(
            lambda head, junk: head + junk,
            st.sampled_from([b"equipment:\n  - id: ", b"\xef\xbb\xbf", b"state_dir: "]),
            st.binary(max_size=60),
        ),
    )
)
@FUZZ
def test_generated_bytes_load_or_name_a_key(body: bytes) -> None:
    with case_dir() as folder:
        _check_load(folder, body, "config: generated bytes (non-UTF-8)")
