"""The :class:`Validator`: walks a run (or a tree of runs) and applies the rules.

What is checked in a run folder ``.../<EQUIPMENT>/<PROJECT>/<Runs|TestRuns>/<leaf>``:

- names: the run's own last four path segments (equipment, project, parent,
  leaf; ``directory_segment``) and every file (``file_name``) and folder
  (``directory_segment``) below it, ``.exlab-wizard/`` included;
- ``mode_prefix_mismatch`` from creation.json ``run_kind``, the parent and the
  leaf;
- creation.json itself: absent (``orphan``), unusable
  (``unreadable_creation_json``: read only from a regular file of at most
  16 MiB, never through a symbolic link), incomplete
  (``missing_required_field``);
- symbolic links: reported (``symlink_skipped``), never followed, their names
  and targets not checked further (they are not synced);
- text content of the files listed in creation.json ``rendered_files`` when
  that key is present (paths relative to the run root; absolute paths inside
  the run are accepted), otherwise of every file of the run outside
  ``.exlab-wizard/``; of those only regular files whose name ends with one of
  ``content_scan_extensions`` (case-insensitive), at most
  ``content_scan_max_mib`` in size (larger files are skipped whole) and with
  no NUL byte in their first 8 KiB (binary: skipped). A ``.md`` file is
  scanned only in its YAML front matter. Content is decoded as UTF-8, bad
  bytes replaced. A file is never opened unless it is to be scanned.

Each distinct token is reported once per name or file (the first line it
occurs on and how often, in ``rule_detail``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import posixpath
import re
import stat
from dataclasses import replace
from pathlib import Path

from exlab_wizard.cache import CacheError, CreationJson, CreationWriter
from exlab_wizard.cache.atomic import read_regular_file
from exlab_wizard.cache.creation import CREATION_MAX_BYTES
from exlab_wizard.config.models import ValidatorConfig
from exlab_wizard.fileio import METADATA_DIR, read_bounded
from exlab_wizard.validator import rules
from exlab_wizard.validator.findings import Finding, sort_findings
from exlab_wizard.validator.overrides import active_override_for
from exlab_wizard.validator.prior_sync import mark_prior_sync

__all__ = ["METADATA_DIR", "Validator"]

_CREATION_NAME = "creation.json"
_MODE_FOLDERS = ("Runs", "TestRuns")
_BINARY_PROBE = 8192
_MAX_TOKEN = 200
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _clip(token: str) -> str:
    return token if len(token) <= _MAX_TOKEN else token[: _MAX_TOKEN - 1] + "\u2026"


class Validator:
    """The Pre-Sync Gate's rule engine. Stateless between calls; thread-safe.

    ``Validator()`` uses the default :class:`ValidatorConfig`. It only reads:
    it never writes creation.json nor follows a symbolic link.

    Example::

        for finding in Validator().audit_run(Path("/data/lab/CONF_01/P-1/Runs/Run_2024-05-01")):
            print(finding.tier, finding.rule, finding.offending_path)
    """

    def __init__(self, config: ValidatorConfig | None = None, *, reader: CreationWriter | None = None):
        self.config = config if config is not None else ValidatorConfig()
        self._extension_tuple = tuple(sorted({ext.lower() for ext in self.config.content_scan_extensions}))
        # Picking the files to scan out of a joined folder listing with one
        # regex beats a lower()+endswith() per name; it needs extensions
        # whose case folding is ASCII (the regex folds ASCII only).
        usable = self._extension_tuple and all(e.isascii() and "/" not in e for e in self._extension_tuple)
        pattern = "(?:" + "|".join(re.escape(e) for e in self._extension_tuple) + ")(?=/)"
        self._extension_re = re.compile(pattern, re.IGNORECASE | re.ASCII) if usable else None
        self._extension_lower_re = re.compile(pattern) if usable else None
        self._max_bytes = int(self.config.content_scan_max_mib * 1024 * 1024)
        self._reader = reader if reader is not None else CreationWriter()

    def _content_candidates(self, listing: str | list[str]) -> list[str]:
        """Names ending with a scanned extension, from a ``"/a/b/"`` joined listing
        of file names only, or from a list of file names."""
        if isinstance(listing, str) and self._extension_re is not None:
            # A match ends where a name ends (the "/" after it), so each name
            # yields at most one match and the name is what precedes it.
            if listing.isascii():  # lower() keeps the length: match case-sensitively on it
                matches = self._extension_lower_re.finditer(listing.lower())  # type: ignore[union-attr]
            else:
                matches = self._extension_re.finditer(listing)
            return [listing[listing.rfind("/", 0, match.start()) + 1 : match.end()] for match in matches]
        names = listing[1:-1].split("/") if isinstance(listing, str) else listing
        extensions = self._extension_tuple
        return [name for name in names if name.lower().endswith(extensions)]

    # -- public -------------------------------------------------------------

    def audit_run(self, run_path: Path | str, *, now: dt.datetime | None = None) -> list[Finding]:
        """Every finding for one run folder, sorted (hard first, then path, rule, token).

        Hard findings covered by an override active at ``now`` (default: the
        current UTC time) in the run's creation.json come back with
        ``override_active=True``; they are still hard. Hard findings on what is
        already on the NAS (the run is ``synced`` or has a verified manifest)
        come back with ``synced_under_prior_policy=True`` (see
        :mod:`exlab_wizard.validator.prior_sync`); the gate lets them through.

        Raises ``FileNotFoundError`` / ``NotADirectoryError`` when ``run_path``
        is not a folder. Everything else wrong with the run (unreadable
        creation.json, unlistable sub-folder, unreadable file) is a finding.
        """
        run = os.path.abspath(os.fspath(run_path))
        if not os.path.isdir(run):
            if os.path.exists(run):
                raise NotADirectoryError(f"{run}: not a folder")
            raise FileNotFoundError(f"{run}: no such run folder")
        return _RunAudit(self, run).run(now if now is not None else _utc_now())

    def audit_tree(self, root: Path | str, *, now: dt.datetime | None = None) -> list[Finding]:
        """Audit every run found under ``root`` (see :meth:`find_runs`); one sorted list.

        Raises ``FileNotFoundError`` / ``NotADirectoryError`` when ``root`` is
        not a folder.
        """
        now = now if now is not None else _utc_now()
        findings: list[Finding] = []
        for run in self.find_runs(root):
            findings.extend(_RunAudit(self, run).run(now))
        return sort_findings(findings)

    def find_runs(self, root: Path | str) -> list[str]:
        """The run folders at or under ``root``, as sorted absolute paths.

        A folder is a run when (a) it is a direct sub-folder of a folder named
        ``Runs`` or ``TestRuns`` and its name does not start with a dot -- so
        a misnamed run (``Runs/TestRun_x``, ``Runs/2024-05-01``) is found and
        reported rather than ignored -- or (b) it holds
        ``.exlab-wizard/creation.json`` whose ``level`` is ``"run"`` (read
        leniently: a file that is not JSON does not make a run). ``root``
        itself may be a run. The search does not descend into a run, into
        ``.exlab-wizard`` folders, nor through symbolic links; folders it
        cannot list are passed over.
        """
        top = os.path.abspath(os.fspath(root))
        if not os.path.isdir(top):
            if os.path.exists(top):
                raise NotADirectoryError(f"{top}: not a folder")
            raise FileNotFoundError(f"{top}: no such folder")
        parent_name = os.path.basename(os.path.dirname(top))
        runs: list[str] = []
        if parent_name in _MODE_FOLDERS and not os.path.basename(top).startswith("."):
            return [top]
        stack = [top]
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    children = [
                        (entry.name, entry.path)
                        for entry in it
                        if not entry.is_symlink() and entry.is_dir(follow_symlinks=False)
                    ]
            except OSError:
                continue
            if any(name == METADATA_DIR for name, _ in children) and _declares_run(folder):
                runs.append(folder)
                continue
            in_mode_folder = os.path.basename(folder) in _MODE_FOLDERS
            for name, path in children:
                if name == METADATA_DIR:
                    continue
                if in_mode_folder and not name.startswith("."):
                    runs.append(path)
                else:
                    stack.append(path)
        runs.sort()
        return runs


def _declares_run(folder: str) -> bool:
    # The same safe read as the gate's: a FIFO, a symbolic link or a huge
    # file here must not hang or exhaust a search for runs.
    try:
        data = read_regular_file(Path(folder, METADATA_DIR, _CREATION_NAME), CREATION_MAX_BYTES)
        raw = json.loads(data.removeprefix(b"\xef\xbb\xbf")) if data is not None else None
    except (CacheError, ValueError, RecursionError):
        return False
    return isinstance(raw, dict) and raw.get("level") == "run"


def _segment_paths(run: str) -> list[tuple[str, str]]:
    """``(segment name, folder path)`` for the run's last four path segments, outermost first."""
    out: list[tuple[str, str]] = []
    path = run
    for _ in range(4):
        head, name = os.path.split(path)
        if not name:
            break
        out.append((name, path))
        path = head
    out.reverse()
    return out


class _RunAudit:
    """One audit of one run; collects findings in ``self.findings``."""

    def __init__(self, validator: Validator, run: str):
        self.v = validator
        self.run_path = run
        self.findings: list[Finding] = []

    def add(self, rule: str, path: str, kind: str, hit: rules.Hit, detail: str | None = None) -> None:
        self.findings.append(
            Finding(
                rule=rule,
                tier=rules.RULE_TIERS[rule],  # type: ignore[arg-type]
                run_path=self.run_path,
                offending_path=path,
                offending_kind=kind,  # type: ignore[arg-type]
                matched_token=_clip(hit.token),
                rule_detail=detail if detail is not None else hit.detail,
            )
        )

    def check_name(self, name: str, path: str, kind: str) -> None:
        if not rules.name_may_offend(name):
            return
        for rule, check in rules.NAME_RULES:
            seen: set[str] = set()
            for hit in check(name):
                if hit.token not in seen:
                    seen.add(hit.token)
                    self.add(rule, path, kind, hit)

    def run(self, now: dt.datetime) -> list[Finding]:
        run = self.run_path
        segments = _segment_paths(run)
        for name, path in segments:
            self.check_name(name, path, "directory_segment")

        creation = self.read_creation()
        run_kind = creation.run_kind if creation is not None else None
        leaf = segments[-1][0] if segments else ""
        parent = segments[-2][0] if len(segments) > 1 else ""
        for hit in rules.mode_prefix_mismatch(run_kind, parent, leaf):
            self.add("mode_prefix_mismatch", run, "directory_segment", hit)

        rendered = self.rendered_set(creation)
        self.walk(rendered)

        if creation is not None and creation.validation_overrides:
            entries = creation.validation_overrides
            covered: dict[str, bool] = {}
            for index, finding in enumerate(self.findings):
                if finding.tier != "hard":
                    continue
                if finding.rule not in covered:
                    covered[finding.rule] = active_override_for(finding.rule, entries, now) is not None
                if covered[finding.rule]:
                    self.findings[index] = _with_override(finding)
        return sort_findings(mark_prior_sync(run, self.findings, creation))

    # -- creation.json ------------------------------------------------------

    def read_creation(self) -> CreationJson | None:
        path = os.path.join(self.run_path, METADATA_DIR, _CREATION_NAME)
        try:
            creation = self.v._reader.read(Path(self.run_path))
        except CacheError as exc:
            for hit in rules.unreadable_creation_json(exc.message):
                self.add("unreadable_creation_json", path, "file_content", hit)
            return None
        if creation is None:
            for hit in rules.orphan(False):
                self.add("orphan", path, "file_name", hit)
            return None
        for hit in rules.missing_required_field(creation.raw):
            self.add("missing_required_field", path, "file_content", hit)
        return creation

    def rendered_set(self, creation: CreationJson | None) -> frozenset[str] | None:
        if creation is None or creation.rendered_files is None:
            return None
        out: set[str] = set()
        run = self.run_path
        for item in creation.rendered_files:
            if not isinstance(item, str) or not item:
                continue
            text = item.replace(os.sep, "/")
            if os.path.isabs(item):
                rel = os.path.relpath(item, run)
                if rel == os.pardir or rel.startswith(os.pardir + os.sep):
                    continue
                text = rel.replace(os.sep, "/")
            text = posixpath.normpath(text)
            if text.startswith("../") or text in (".", ".."):
                continue
            out.add(text)
        return frozenset(out)

    # -- the walk -----------------------------------------------------------

    def walk(self, rendered: frozenset[str] | None) -> None:
        # The hot loop: one scandir per folder, no Path objects, no stat or
        # open for a file that will not be content-scanned, and one regex
        # search per folder listing for the name rules.
        max_bytes = self.v._max_bytes
        sep = os.sep
        # (folder path, path relative to the run with a trailing "/", inside .exlab-wizard/)
        stack: list[tuple[str, str, bool]] = [(self.run_path, "", False)]
        while stack:
            folder, rel, in_meta = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as exc:
                self.unreadable(folder, "directory_segment", f"cannot list folder: {exc.strerror or exc}")
                continue
            # Most folders hold only regular files: one comprehension, no per-entry branches.
            file_names = [entry.name for entry in entries if entry.is_file(follow_symlinks=False)]
            names = file_names
            dir_names: set[str] = set()
            if len(file_names) != len(entries):
                names = list(file_names)
                for entry in entries:
                    if entry.is_file(follow_symlinks=False):
                        continue
                    name = entry.name
                    if entry.is_dir(follow_symlinks=False):
                        names.append(name)
                        dir_names.add(name)
                        stack.append((entry.path, rel + name + "/", in_meta or (not rel and name == METADATA_DIR)))
                    elif entry.is_symlink():
                        self.symlink(entry.path, name)
                    else:
                        names.append(name)  # FIFO, socket, device: name checked, never opened
            if not names:
                continue
            joined = "/" + "/".join(names) + "/"
            if rules.joined_names_may_offend(joined):
                for name in names:
                    if rules.name_may_offend(name):
                        kind = "directory_segment" if name in dir_names else "file_name"
                        self.check_name(name, folder + sep + name, kind)
            if in_meta or not file_names:
                continue
            for name in self.v._content_candidates(joined if names is file_names else file_names):
                if rendered is not None and rel + name not in rendered:
                    continue
                self.scan_file(folder + sep + name, name.lower().endswith(".md"), max_bytes)

    def symlink(self, path: str, name: str) -> None:
        try:
            target: str | None = os.readlink(path)
        except OSError:
            target = None
        for hit in rules.symlink_skipped(name, target):
            self.add("symlink_skipped", path, "file_name", hit)

    def unreadable(self, path: str, kind: str, message: str) -> None:
        for hit in rules.unreadable_path(message):
            self.add("unreadable_path", path, kind, hit)

    def scan_file(self, path: str, markdown: bool, max_bytes: int) -> None:
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            self.unreadable(path, "file_content", f"cannot open file: {exc.strerror or exc}")
            return
        try:
            # fstat on the open file (cheaper than a stat by path, and about
            # the very file we read): the size, and that it is still a
            # regular file.
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
                return
            data = read_bounded(fd, max_bytes, info.st_size)
        except OSError as exc:
            self.unreadable(path, "file_content", f"cannot read file: {exc.strerror or exc}")
            return
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            return  # grew past the limit since it was listed: skipped whole, like any large file
        if data.find(b"\x00", 0, _BINARY_PROBE) >= 0:
            return  # binary
        # Fast exits on the bytes: no character a rule can match (every
        # rule needs "<", "{{" or "{%"), or Markdown without front matter.
        if markdown:
            if not data.startswith((b"---", b"\xef\xbb\xbf---")):
                return
        elif b"<" not in data and b"{{" not in data and b"{%" not in data:
            return
        text = data.decode("utf-8", errors="replace")
        offset = 0
        if markdown:
            front = rules.yaml_front_matter(text)
            if front is None:
                return
            if not front.terminated:
                for hit in rules.malformed_yaml_front_matter(text):
                    self.add("malformed_yaml_front_matter", path, "file_content", hit, _at_line(text, hit))
                return
            scanned, offset = front.body, front.offset
        else:
            scanned = text
        for rule, check in rules.CONTENT_RULES:
            first: dict[str, rules.Hit] = {}
            counts: dict[str, int] = {}
            for hit in check(scanned):
                if hit.token not in first:
                    first[hit.token] = hit
                    counts[hit.token] = 0
                counts[hit.token] += 1
            for token, hit in first.items():
                line = text.count("\n", 0, offset + hit.offset) + 1
                detail = f"{hit.detail} on line {line}"
                if counts[token] > 1:
                    detail += f" ({counts[token]} occurrences)"
                self.add(rule, path, "file_content", hit, detail)


def _at_line(text: str, hit: rules.Hit) -> str:
    if hit.offset == 0:
        return hit.detail
    line = text.count("\n", 0, hit.offset) + 1
    return f"{hit.detail} (line {line})"


def _with_override(finding: Finding) -> Finding:
    return replace(finding, override_active=True)
