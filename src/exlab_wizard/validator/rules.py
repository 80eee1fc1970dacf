"""The Pre-Sync Gate rules: one pure function per rule, no I/O.

Each rule function returns a list of :class:`Hit` (empty when the input is
clean). A hit carries the matched token, a sentence saying what is wrong, and,
for text rules, the offset of the match in the text (the engine turns it into
a line number). Name rules take one path segment (a single file or folder
name, never a path with separators); text rules take decoded text; the
remaining rules take the facts they judge.

Hard rules (gate sync unless an operator override covers them):

- ``unresolved_placeholder_token`` -- ``<[A-Za-z_][A-Za-z0-9_]*>`` (``<name>``
  is a placeholder, ``<2 mM>`` is not);
- ``leftover_jinja_marker`` -- ``{{ ... }}`` or ``{% ... %}``;
- ``illegal_filesystem_character`` -- NUL and control characters 0-31,
  ``< > : " / \\ | ? *``, a trailing dot or a trailing space;
- ``reserved_filesystem_name`` -- CON, PRN, AUX, NUL, COM1-9, LPT1-9 in any
  case, with or without an extension (Windows reads the name up to the first
  dot, trailing spaces dropped: ``con.txt``, ``Lpt9.tar.gz``, ``aux .csv``);
- ``mode_prefix_mismatch`` -- ``run_kind``, the parent folder
  (``Runs``/``TestRuns``) and the run folder prefix (``Run_``/``TestRun_``)
  disagree;
- ``unreadable_creation_json`` -- creation.json exists but the engine cannot
  use it (not JSON, nested too deeply, not an object, a known field of the
  wrong type, ``schema_version`` missing, not "MAJOR.MINOR" or of a major
  other than 1, not a regular file -- a symbolic link, FIFO, folder or
  device is never read --, larger than 16 MiB, or unreadable). Overrides live in that file, so this one cannot be
  overridden: fix the file (or move it away, which makes the run an orphan).

Soft rules (reported, never gate):

- ``orphan`` -- the run has no creation.json;
- ``malformed_yaml_front_matter`` -- a Markdown file opens front matter with
  ``---`` and never closes it (the YAML itself is not parsed);
- ``missing_required_field`` -- creation.json lacks (or holds a wrong value
  for) ``level`` (must be ``run``), ``run_kind`` (``experimental``|``test``),
  ``paths`` (an object with a non-empty ``local``), ``sync_status`` (one of
  the four statuses) or ``schema_version`` (in a run, a creation.json with
  no usable ``schema_version`` is ``unreadable_creation_json``: the cache
  refuses to read or write it);
- ``symlink_skipped`` -- a symbolic link inside the run: never followed, never
  synced;
- ``unreadable_path`` -- a folder or file the validator cannot list or read
  (its content is unchecked; the transfer would fail on it anyway).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from exlab_wizard.cache.creation import SYNC_STATUSES

__all__ = [
    "CONTENT_RULES",
    "HARD_RULES",
    "JINJA_RE",
    "NAME_RULES",
    "PLACEHOLDER_RE",
    "REQUIRED_FIELDS",
    "RESERVED_NAMES",
    "RULE_TIERS",
    "RUN_KINDS",
    "SOFT_RULES",
    "FrontMatter",
    "Hit",
    "illegal_filesystem_character",
    "leftover_jinja_marker",
    "malformed_yaml_front_matter",
    "missing_required_field",
    "mode_prefix_mismatch",
    "name_may_offend",
    "joined_names_may_offend",
    "names_may_offend",
    "orphan",
    "reserved_filesystem_name",
    "symlink_skipped",
    "unreadable_creation_json",
    "unreadable_path",
    "unresolved_placeholder_token",
    "yaml_front_matter",
]

HARD_RULES: tuple[str, ...] = (
    "unresolved_placeholder_token",
    "leftover_jinja_marker",
    "illegal_filesystem_character",
    "reserved_filesystem_name",
    "mode_prefix_mismatch",
    "unreadable_creation_json",
)
SOFT_RULES: tuple[str, ...] = (
    "orphan",
    "malformed_yaml_front_matter",
    "missing_required_field",
    "symlink_skipped",
    "unreadable_path",
)
RULE_TIERS: dict[str, str] = {**{r: "hard" for r in HARD_RULES}, **{r: "soft" for r in SOFT_RULES}}

PLACEHOLDER_RE = re.compile(r"<[A-Za-z_][A-Za-z0-9_]*>")
_JINJA_VAR_RE = re.compile(r"\{\{[^}]*\}\}")
_JINJA_BLOCK_RE = re.compile(r"\{%[^%]*%\}")
JINJA_RE = re.compile(r"\{\{[^}]*\}\}|\{%[^%]*%\}")
_ILLEGAL_RE = re.compile(r'[\x00-\x1f<>:"/\\|?*]')
RESERVED_NAMES: frozenset[str] = frozenset(
    {"CON", "PRN", "AUX", "NUL"} | {f"COM{i}" for i in range(1, 10)} | {f"LPT{i}" for i in range(1, 10)}
)
RUN_KINDS: tuple[str, ...] = ("experimental", "test")
REQUIRED_FIELDS: tuple[str, ...] = ("schema_version", "level", "run_kind", "paths", "sync_status")
_MODE_LAYOUT = {"experimental": ("Runs", "Run_"), "test": ("TestRuns", "TestRun_")}

# Superset of every name rule, so the engine can skip clean names with one
# regex search: any illegal or control character (covers "<" of a
# placeholder), "{{" / "{%", a trailing dot or space, a reserved stem.
_SUSPECT_NAME_RE = re.compile(
    r'[\x00-\x1f<>:"/\\|?*]|\{[{%]|[. ]\Z|\A(?i:con|prn|aux|nul|com[1-9]|lpt[1-9])(?:[ .]|\Z)'
)
# For a whole folder listing joined as "/a/b/c/" (no listed name holds "/"):
# a few fast substring tests, and a reserved-stem regex only when a name may
# start with one.
_ILLEGAL_NO_SLASH_RE = re.compile(r'[\x00-\x1f<>:"\\|?*]')
_RESERVED_JOINED_RE = re.compile(r"/(?i:con|prn|aux|nul|com[1-9]|lpt[1-9])[ ./]")
_RESERVED_LOWER_RE = re.compile(r"/(?:con|prn|aux|nul|com[1-9]|lpt[1-9])[ ./]")
_FRONT_MATTER_CLOSE_RE = re.compile(r"^---[ \t]*\r?$", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Hit:
    """One match of a rule: ``token`` matched, ``detail`` says why it is wrong,
    ``offset`` is where in the text it starts (0 for non-text rules)."""

    token: str
    detail: str
    offset: int = 0


@dataclass(frozen=True, slots=True)
class FrontMatter:
    """Markdown YAML front matter: ``body`` starts at ``offset`` in the text;
    ``terminated`` is False when no closing ``---`` line follows the opening one."""

    body: str
    offset: int
    terminated: bool


def name_may_offend(name: str) -> bool:
    """Cheap pre-check: False guarantees every name rule passes for ``name``."""
    return _SUSPECT_NAME_RE.search(name) is not None


def names_may_offend(names: list[str]) -> bool:
    """:func:`name_may_offend` for a whole folder listing at once.

    ``names`` are names as the OS lists them (never holding ``/``). False
    guarantees every name rule passes for every name.
    """
    return joined_names_may_offend("/" + "/".join(names) + "/")


def joined_names_may_offend(joined: str) -> bool:
    """:func:`names_may_offend` for names already joined as ``"/a/b/c/"``."""
    if _ILLEGAL_NO_SLASH_RE.search(joined) is not None:
        return True
    if "{{" in joined or "{%" in joined or "./" in joined or " /" in joined:
        return True
    if joined.isascii():  # the common case: lower() keeps the length, a plain regex is faster
        return _RESERVED_LOWER_RE.search(joined.lower()) is not None
    return _RESERVED_JOINED_RE.search(joined) is not None


# -- hard rules ---------------------------------------------------------------


def unresolved_placeholder_token(text: str) -> list[Hit]:
    """Every ``<identifier>`` in ``text`` (a name or scanned content), in order."""
    if "<" not in text:
        return []
    return [
        Hit(m.group(), f"unresolved template placeholder {m.group()}", m.start()) for m in PLACEHOLDER_RE.finditer(text)
    ]


def leftover_jinja_marker(text: str) -> list[Hit]:
    """Every ``{{ ... }}`` and ``{% ... %}`` in ``text``, ordered by offset."""
    hits: list[Hit] = []
    # The guards keep a text full of "{{" with no "}}" from costing a scan per brace.
    if "{{" in text and "}}" in text:
        hits.extend(
            Hit(m.group(), f"leftover Jinja expression {m.group()}", m.start()) for m in _JINJA_VAR_RE.finditer(text)
        )
    if "{%" in text and "%}" in text:
        hits.extend(
            Hit(m.group(), f"leftover Jinja statement {m.group()}", m.start()) for m in _JINJA_BLOCK_RE.finditer(text)
        )
    hits.sort(key=lambda hit: hit.offset)
    return hits


def _describe_char(char: str) -> str:
    if char == "\x00":
        return "NUL character (U+0000)"
    if ord(char) < 32:
        return f"control character U+{ord(char):04X}"
    return f"character {char!r}"


def illegal_filesystem_character(segment: str) -> list[Hit]:
    """Characters of ``segment`` a Windows/SMB share cannot store, once each
    in order of first appearance, then a trailing dot or space."""
    hits: list[Hit] = []
    seen: set[str] = set()
    for m in _ILLEGAL_RE.finditer(segment):
        char = m.group()
        if char not in seen:
            seen.add(char)
            hits.append(Hit(char, f"{_describe_char(char)} is not allowed in a file or folder name", m.start()))
    if segment.endswith("."):
        hits.append(Hit(".", "name ends with a dot (dropped by Windows/SMB)", len(segment) - 1))
    elif segment.endswith(" "):
        hits.append(Hit(" ", "name ends with a space (dropped by Windows/SMB)", len(segment) - 1))
    return hits


def reserved_filesystem_name(segment: str) -> list[Hit]:
    """``segment`` is a Windows device name (CON, PRN, AUX, NUL, COM1-9,
    LPT1-9; any case, any extension, spaces before the dot ignored)."""
    stem = segment.split(".", 1)[0].rstrip(" ")
    if stem.isascii() and stem.upper() in RESERVED_NAMES:
        return [Hit(stem, f"{segment!r} is the reserved device name {stem.upper()} on Windows")]
    return []


def _parent_mode(parent: str) -> str | None:
    return {"Runs": "experimental", "TestRuns": "test"}.get(parent)


def _leaf_mode(leaf: str) -> str | None:
    if leaf.startswith("TestRun_"):
        return "test"
    if leaf.startswith("Run_"):
        return "experimental"
    return None


def mode_prefix_mismatch(run_kind: str | None, parent: str, leaf: str) -> list[Hit]:
    """The run's three mode signals disagree.

    ``experimental`` needs parent ``Runs`` and leaf prefix ``Run_``; ``test``
    needs ``TestRuns`` and ``TestRun_``. When ``run_kind`` is absent (or not
    one of the two kinds) parent and leaf must still name the same mode; a
    parent or leaf that names no mode at all never agrees. Names are
    case-sensitive.
    """
    parent_mode, leaf_mode = _parent_mode(parent), _leaf_mode(leaf)
    token = f"{parent}/{leaf}"
    if run_kind in _MODE_LAYOUT:
        want_parent, want_prefix = _MODE_LAYOUT[run_kind]
        if parent_mode == run_kind and leaf_mode == run_kind:
            return []
        return [
            Hit(
                token,
                f"run_kind {run_kind!r} needs parent folder {want_parent!r} and a run folder "
                f"starting with {want_prefix!r}; found parent {parent!r} and run folder {leaf!r}",
            )
        ]
    if parent_mode is not None and parent_mode == leaf_mode:
        return []
    return [
        Hit(
            token,
            f"parent folder {parent!r} and run folder {leaf!r} do not name the same mode "
            "(Runs/Run_... for experimental, TestRuns/TestRun_... for test)",
        )
    ]


def unreadable_creation_json(message: str) -> list[Hit]:
    """creation.json exists but cannot be used; ``message`` says why."""
    return [Hit("creation.json", f"{message}; fix or remove the file (an override cannot cover this)")]


# -- soft rules ---------------------------------------------------------------


def orphan(has_creation_json: bool) -> list[Hit]:
    """The run has no ``.exlab-wizard/creation.json``."""
    if has_creation_json:
        return []
    return [Hit("creation.json", "run has no .exlab-wizard/creation.json (not created by the wizard)")]


def yaml_front_matter(text: str) -> FrontMatter | None:
    """The YAML front matter of Markdown ``text``, or None when it has none.

    Front matter opens with a ``---`` line as the very first line (a UTF-8 BOM
    and trailing blanks tolerated) and closes at the next ``---`` line.
    """
    start = 1 if text.startswith("\ufeff") else 0
    if not text.startswith("---", start):
        return None
    newline = text.find("\n", start)
    first_line = text[start:] if newline < 0 else text[start:newline]
    if first_line.rstrip() != "---":
        return None
    if newline < 0:
        return FrontMatter("", len(text), False)
    body_start = newline + 1
    close = _FRONT_MATTER_CLOSE_RE.search(text, body_start)
    if close is None:
        return FrontMatter(text[body_start:], body_start, False)
    return FrontMatter(text[body_start : close.start()], body_start, True)


def malformed_yaml_front_matter(text: str) -> list[Hit]:
    """Markdown ``text`` opens YAML front matter with ``---`` and never closes it.

    The YAML between the markers is not parsed: the hard rules scan it for
    leftovers, and a full YAML parse of every Markdown file would cost more
    than the rest of an audit.
    """
    front = yaml_front_matter(text)
    if front is None or front.terminated:
        return []
    return [Hit("---", "YAML front matter opened by '---' on line 1 is never closed by a second '---' line")]


def missing_required_field(raw: Mapping[str, Any]) -> list[Hit]:
    """Fields of a decoded creation.json that are absent or hold a wrong value.

    Required: ``schema_version`` (a string), ``level`` (``"run"``),
    ``run_kind`` (``experimental``|``test``), ``paths`` (an object with a
    non-empty string ``local``), ``sync_status`` (``pending``, ``synced``,
    ``failed`` or ``blocked_by_validation``). One hit per field, token = the
    field name (``paths.local`` for the nested one).
    """
    hits: list[Hit] = []

    def absent(key: str) -> bool:
        if raw.get(key) is None:
            hits.append(Hit(key, f"creation.json has no {key}"))
            return True
        return False

    if not absent("schema_version") and not isinstance(raw["schema_version"], str):
        hits.append(Hit("schema_version", "creation.json schema_version is not a string"))
    if not absent("level") and raw["level"] != "run":
        hits.append(Hit("level", f"creation.json level is {raw['level']!r}, a run folder needs 'run'"))
    if not absent("run_kind") and raw["run_kind"] not in RUN_KINDS:
        hits.append(Hit("run_kind", f"creation.json run_kind {raw['run_kind']!r} is not one of {', '.join(RUN_KINDS)}"))
    if not absent("paths"):
        paths = raw["paths"]
        if not isinstance(paths, Mapping):
            hits.append(Hit("paths", "creation.json paths is not an object"))
        elif not isinstance(paths.get("local"), str) or not paths["local"].strip():
            hits.append(Hit("paths.local", "creation.json has no paths.local"))
    if not absent("sync_status") and raw["sync_status"] not in SYNC_STATUSES:
        hits.append(
            Hit(
                "sync_status",
                f"creation.json sync_status {raw['sync_status']!r} is not one of {', '.join(SYNC_STATUSES)}",
            )
        )
    return hits


def symlink_skipped(name: str, target: str | None) -> list[Hit]:
    """A symbolic link ``name`` (pointing at ``target``, when readable) inside a run."""
    where = f" to {target!r}" if target is not None else ""
    return [Hit(name, f"symbolic link{where} is not followed and not synced")]


def unreadable_path(message: str) -> list[Hit]:
    """A folder or file the validator could not list or read."""
    return [Hit("", f"{message}; its names or content are unchecked")]


NAME_RULES = (
    ("unresolved_placeholder_token", unresolved_placeholder_token),
    ("leftover_jinja_marker", leftover_jinja_marker),
    ("illegal_filesystem_character", illegal_filesystem_character),
    ("reserved_filesystem_name", reserved_filesystem_name),
)
"""The rules every path segment is checked against, as ``(rule, function)``."""

CONTENT_RULES = (
    ("unresolved_placeholder_token", unresolved_placeholder_token),
    ("leftover_jinja_marker", leftover_jinja_marker),
)
"""The rules scanned text content is checked against, as ``(rule, function)``."""
