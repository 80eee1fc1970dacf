"""The Pre-Sync Gate's validator: rules, findings and the engine that applies them.

``Validator().audit_run(run_path) -> list[Finding]`` checks one run folder;
``Validator().audit_tree(root)`` every run under a folder. The rules are pure
functions in :mod:`exlab_wizard.validator.rules`; which operator overrides are
active is decided in :mod:`exlab_wizard.validator.overrides`.
"""

from __future__ import annotations

from exlab_wizard.validator.engine import Validator
from exlab_wizard.validator.findings import Finding, sort_findings
from exlab_wizard.validator.rules import HARD_RULES, RULE_TIERS, SOFT_RULES

__all__ = ["HARD_RULES", "RULE_TIERS", "SOFT_RULES", "Finding", "Validator", "sort_findings"]
