"""The wheel a lab installs: it builds, installs with pipx into a fresh venv, and runs.

Copies the project (pyproject.toml, README.md, src/) to a temporary folder,
builds the wheel there with ``python -m build`` (so the checkout gets no
``build/`` or ``*.egg-info``), installs it with ``pipx install <wheel>`` as the
README tells a lab to do (pipx makes a fresh venv without system site packages
and pip-installs the wheel and its dependencies through pip's normal
configuration), then runs the installed commands. ``exlab-sync demo`` proves
the package data ship (it syncs a sample lab end to end); the templates,
static files, remote programs and ``py.typed`` are also looked up through
``importlib.resources`` in the installed package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]

RESOURCES = """
import importlib.resources as r, pathlib, exlab_wizard
assert pathlib.Path(exlab_wizard.__file__).parent.name == "exlab_wizard"
assert "site-packages" in exlab_wizard.__file__, exlab_wizard.__file__
pkg = r.files("exlab_wizard")
assert (pkg / "py.typed").is_file()
assert (pkg / "service" / "templates" / "dashboard.html").is_file()
assert (pkg / "service" / "static" / "dashboard.js").is_file()
remote = pkg / "sync" / "transports" / "remote_programs"
assert (remote / "keep_previous.sh").is_file() and (remote / "remote_hash.py").is_file()
print("resources ok")
"""


def _run(*args: str | Path, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{args} exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    shutil.copy2(ROOT / "pyproject.toml", source)
    shutil.copy2(ROOT / "README.md", source)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "build", "--wheel", "--outdir", dist, source)
    wheels = list(dist.glob("exlab_wizard-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_pipx_installs_the_wheel_and_it_runs(wheel: Path, tmp_path: Path) -> None:
    # As the README tells a lab: pipx puts the app in its own fresh venv (pip installing the wheel
    # and its dependencies there) and the command on PATH. One install serves every check below:
    # a second, plain `pip install` into another venv cost the suite 30 to 60 s and proved nothing
    # pipx's own venv does not.
    env = {
        **os.environ,
        "PIPX_HOME": str(tmp_path / "pipx"),
        "PIPX_BIN_DIR": str(tmp_path / "bin"),
        "PIPX_MAN_DIR": str(tmp_path / "man"),
        "HOME": str(tmp_path),
    }
    env.pop("PYTHONPATH", None)
    _run(sys.executable, "-m", "pipx", "install", wheel, env=env, timeout=600)
    venv = tmp_path / "pipx" / "venvs" / "exlab-wizard"
    assert "include-system-site-packages = false" in (venv / "pyvenv.cfg").read_text()
    python, exe = venv / "bin" / "python", tmp_path / "bin" / "exlab-sync"

    plain = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    assert "exlab-sync, version" in _run(exe, "--version", env=plain).stdout
    assert "Usage: exlab-sync" in _run(exe, "--help", env=plain).stdout
    assert "Usage: exlab-sync" in _run(python, "-m", "exlab_wizard", "--help", env=plain).stdout
    assert _run(python, "-c", RESOURCES, env=plain, cwd=tmp_path).stdout.strip() == "resources ok"
    demo = _run(exe, "demo", "--dir", tmp_path / "demo", env={**plain, "COLUMNS": "200"}, cwd=tmp_path)
    assert "sha256sum -c" in demo.stdout, demo.stdout
    manifests = list((tmp_path / "demo" / "nas").rglob("checksums.sha256"))
    assert manifests, "the demo left no verified manifest on its NAS folder"
    for manifest in manifests:
        _run("sha256sum", "--quiet", "-c", ".exlab-wizard/checksums.sha256", cwd=manifest.parent.parent)
