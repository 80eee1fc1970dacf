"""The package's layer order: a module imports only modules at or below its own layer.

Every module under ``src/exlab_wizard`` is parsed with :mod:`ast`; every import
counts, wherever it is written (module level, inside a function, under
``TYPE_CHECKING``, relative or absolute). The layers, lowest first:

 1. ``fileio``, ``sync.failures``, ``sync.state_dir``, ``sync.queue_damage`` (standard library only)
 2. ``config``   3. ``cache``   4. ``validator``   5. ``sync.policy`` (pure)
 6. ``sync.states``, ``sync.queue``, ``sync.equipment_log`` (``sync.manifest_format``, an on-disk format: 3)
 7. ``sync.transports``, ``sync.verifier``   8. ``sync.gate``
 9. ``sync.reaper``, ``sync.recovery`` and the client's parts
10. ``sync.nas_client`` (the facade)   11. ``cli``, ``demo``, ``service``
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "exlab_wizard"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Module name prefixes and their layer; the longest matching prefix wins.
# A name that is not a module yet places that module (or package) when it appears.
LAYERS: dict[str, int] = {
    "exlab_wizard.fileio": 1,
    "exlab_wizard.sync.failures": 1,
    # The state folder's modes and who holds a lock in it: the queue, the CLI and the service use it.
    "exlab_wizard.sync.state_dir": 1,
    # A damaged queue file told apart from a busy one, by SQLite's result code: the queue, the
    # service's own connections to its file and the CLI's one-line errors use it.
    "exlab_wizard.sync.queue_damage": 1,
    # A run's per-file records, spilled to a temporary file past a bound: the manifest format,
    # the transports, the verification and the reaper's stats hold runs of any size in it.
    "exlab_wizard.sync.spill": 1,
    "exlab_wizard.config": 2,
    "exlab_wizard.cache": 3,
    "exlab_wizard.validator": 4,
    "exlab_wizard.sync.policy": 5,
    "exlab_wizard.sync.states": 6,
    "exlab_wizard.sync.queue": 6,
    "exlab_wizard.sync.queue_stats": 6,
    # The checksums.sha256 on-disk format (cache.atomic and fileio only): the
    # validator reads it to judge what of a run is already on the NAS.
    "exlab_wizard.sync.manifest_format": 3,
    "exlab_wizard.sync.equipment_log": 6,
    # A token bucket on the standard library alone, used by the transports.
    "exlab_wizard.sync.throttle": 6,
    "exlab_wizard.sync.transports": 7,
    "exlab_wizard.sync.verifier": 7,
    "exlab_wizard.sync.gate": 8,
    "exlab_wizard.sync.reaper": 9,
    "exlab_wizard.sync.recovery": 9,
    # The client's parts: shared state, remote access, the life of one job,
    # the metadata push after it, and the audit loop.
    "exlab_wizard.sync.context": 9,
    "exlab_wizard.sync.remote": 9,
    "exlab_wizard.sync.job_runner": 9,
    "exlab_wizard.sync.metadata_push": 9,
    "exlab_wizard.sync.audit": 9,
    # Checks of the config and of the way to each NAS (transports, policy); plain data for the CLI and API.
    "exlab_wizard.sync.doctor": 9,
    "exlab_wizard.sync.nas_client": 10,
    "exlab_wizard.cli": 11,
    "exlab_wizard.__main__": 11,  # python -m exlab_wizard: the CLI
    "exlab_wizard.demo": 11,
    "exlab_wizard.service": 11,
}

# Package markers (exact names): importing ``exlab_wizard.sync.gate`` runs them
# too, so they must import nothing of the package.
PACKAGE_MARKERS = {"exlab_wizard": 0, "exlab_wizard.sync": 0}

# Layer 1 is the standard library's only.
STDLIB_ONLY_LAYER = 1

# Imports that break the order today, each to be removed by the issue 10 work
# that moves the code; the lead empties this list once that work has landed.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    if module in PACKAGE_MARKERS:
        return PACKAGE_MARKERS[module]
    matches = [prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def imported_modules(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """Every module ``module`` imports, with its line: ``from a import b`` is ``a.b`` when that is a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.append((candidate if candidate in known else source, node.lineno))
    return found


def test_every_module_has_a_layer() -> None:
    unplaced = sorted(name for name in all_modules() if layer_of(name) is None)
    assert not unplaced, f"modules with no layer; add them to LAYERS in {__file__}: {unplaced}"


def test_no_module_imports_a_higher_layer() -> None:
    modules = all_modules()
    known = set(modules)
    violations: list[str] = []
    seen: set[tuple[str, str]] = set()
    for module, path in modules.items():
        own = layer_of(module)
        if own is None:
            continue
        for target, line in imported_modules(module, path, known):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                if own == STDLIB_ONLY_LAYER and target.partition(".")[0] not in sys.stdlib_module_names:
                    violations.append(
                        f"{path.relative_to(SRC.parent)}:{line}: {module} (layer 1) imports {target}, "
                        "which is not in the standard library"
                    )
                continue
            theirs = layer_of(target)
            if theirs is None or theirs <= own:
                continue
            seen.add((module, target))
            if (module, target) not in KNOWN_VIOLATIONS:
                violations.append(
                    f"{path.relative_to(SRC.parent)}:{line}: {module} (layer {own}) imports {target} (layer {theirs})"
                )
    assert not violations, "lower layer imports a higher one:\n" + "\n".join(violations)
    stale = KNOWN_VIOLATIONS - seen
    assert not stale, f"no longer imported; remove from KNOWN_VIOLATIONS: {sorted(stale)}"
