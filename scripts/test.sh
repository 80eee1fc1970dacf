#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs what it needs, then runs pytest.
# Usage: scripts/test.sh [pytest args...]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
./scripts/bootstrap.sh
export PATH="$here/.venv/bin:$PATH"
# Keep compiled bytecode. Some images set PYTHONDONTWRITEBYTECODE=1 (this VM's does): then every
# process the suite starts (about 240 `exlab-sync` runs and services, the pytest workers, the
# benchmark and torture children) compiles every module of ours from source again, about 0.35 s
# of CPU each. The bytecode lands in __pycache__ folders, which git ignores.
unset PYTHONDONTWRITEBYTECODE
# Lint and format first: one clear failure before a long test run.
.venv/bin/ruff check src tests bench scripts
.venv/bin/ruff format --check src tests bench scripts
# Four workers, a test file per worker at a time (its fixtures, its servers): the tests wait on
# servers, disks and subprocesses as much as they compute, so on two cores a fourth worker still
# shortens the run (2026-12-07: three 757 s, four 696 and 710 s). EXLAB_TEST_WORKERS=0 runs
# everything in this process.
set +e
.venv/bin/python -m pytest -q -n "${EXLAB_TEST_WORKERS:-4}" --dist loadfile "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure" >&2
  exit 1
fi
exit "$rc"
