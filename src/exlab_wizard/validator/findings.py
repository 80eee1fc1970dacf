"""A :class:`Finding`: one thing the Pre-Sync Gate found wrong with a run.

A finding is a plain, frozen record; it never changes once made (the gate
derives flagged copies with :func:`dataclasses.replace`). ``to_dict`` /
``from_dict`` round-trip it through JSON (queue rows, the HTTP API, the CLI).

Order: :func:`sort_findings` puts hard findings first, then sorts by
``offending_path``, ``rule`` and ``matched_token`` (then the remaining fields,
so the order is total and two audits of the same tree list the same findings
in the same order).

Example::

    Finding(rule="reserved_filesystem_name", tier="hard", run_path="/data/lab/CONF/P/Runs/Run_1",
            offending_path="/data/lab/CONF/P/Runs/Run_1/con.txt", offending_kind="file_name",
            matched_token="con", rule_detail="'con.txt' is a reserved name on Windows")
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "OFFENDING_KINDS",
    "TIERS",
    "Finding",
    "OffendingKind",
    "Tier",
    "sort_findings",
]

Tier = Literal["hard", "soft"]
OffendingKind = Literal["directory_segment", "file_name", "file_content"]
TIERS: tuple[str, ...] = ("hard", "soft")
OFFENDING_KINDS: tuple[str, ...] = ("directory_segment", "file_name", "file_content")


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in a run.

    ``rule`` names the rule (a hard rule name is also the ``problem_class`` an
    operator override must carry); ``tier`` is ``"hard"`` (gates sync) or
    ``"soft"`` (reported only). ``run_path`` is the run folder and
    ``offending_path`` the folder or file at fault, both absolute. For a
    segment of the run's own path (equipment, project, ``Runs``/``TestRuns``,
    the run folder) ``offending_path`` is that ancestor folder.
    ``matched_token`` is the text that matched (a placeholder, a character,
    a reserved stem, a field name); ``rule_detail`` says what is wrong in
    words. ``synced_under_prior_policy`` marks a hard finding on something
    already verified on the NAS; ``override_active`` marks a hard finding an
    active operator override lets through.
    """

    rule: str
    tier: Tier
    run_path: str
    offending_path: str
    offending_kind: OffendingKind
    matched_token: str
    rule_detail: str
    synced_under_prior_policy: bool = False
    override_active: bool = False

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, not {self.tier!r}")
        if self.offending_kind not in OFFENDING_KINDS:
            raise ValueError(f"offending_kind must be one of {OFFENDING_KINDS}, not {self.offending_kind!r}")

    @property
    def is_hard(self) -> bool:
        return self.tier == "hard"

    @property
    def blocks(self) -> bool:
        """A hard finding that neither an override nor a prior sync lets through."""
        return self.tier == "hard" and not self.override_active and not self.synced_under_prior_policy

    def sort_key(self) -> tuple[Any, ...]:
        return (
            0 if self.tier == "hard" else 1,
            self.offending_path,
            self.rule,
            self.matched_token,
            self.run_path,
            self.offending_kind,
            self.rule_detail,
            self.synced_under_prior_policy,
            self.override_active,
        )

    def to_dict(self) -> dict[str, Any]:
        """All nine fields as a JSON-ready dict (field names as keys)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Finding:
        """Rebuild a finding from :meth:`to_dict` output; unknown keys are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in names})


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """The findings in the gate's order: hard first, then by path, rule, token."""
    return sorted(findings, key=Finding.sort_key)
