"""A run folder inside another run folder, or holding one, is held by the gate (``nested_run``).

The NAS path of a run mirrors its local path, so the NAS copy of a run nested
in another lies inside the other's NAS copy: the push of the one then sent its
files over the other's verified copy (a file of the inner run damaged locally,
say, went over the inner run's verified NAS copy with the outer run's first
push, nothing kept). Neither may be sent; no operator override lets it through.
"""

from __future__ import annotations

from pathlib import Path

from exlab_wizard.sync.gate import NESTED_RUN
from exlab_wizard.sync.nas_client import SyncHandleState
from tests.helpers import Clock, tree
from tests.lab import FILES, Lab, cleanup_config, running, synced, write_creation, write_files


def _nested(outer: Path) -> Path:
    inner = outer / "PROJ-2" / "Runs" / "Run_2026-01-02"
    inner.mkdir(parents=True)
    write_creation(inner)
    write_files(inner, FILES)
    return inner


async def test_neither_of_two_nested_runs_is_sent(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)
    outer = lab.make_run("Run_2026-01-01", files={"outer.bin": b"o" * 100})
    inner = _nested(outer)
    async with running(cleanup_config(lab), Clock()) as client:
        for run, other in ((inner, outer), (outer, inner)):
            handle = await client.enqueue(run)
            assert handle.state == SyncHandleState.BLOCKED and not handle.job_id
            assert [(f.rule, f.offending_path) for f in handle.blocking_findings] == [(NESTED_RUN, str(other))]
    assert not lab.nas_copy(outer).exists()


async def test_a_run_nested_later_in_a_verified_run_never_touches_its_copy(tmp_path: Path) -> None:
    lab = Lab.build(tmp_path)
    outer = lab.make_run("Run_2026-01-01", files={"outer.bin": b"o" * 100})
    async with running(cleanup_config(lab), Clock()) as client:
        await synced(client, outer)
        before = tree(lab.nas_copy(outer))
        inner = _nested(outer)
        handle = await client.enqueue(inner)
        assert handle.state == SyncHandleState.BLOCKED
        assert {f.rule for f in handle.blocking_findings} == {NESTED_RUN}
        await client.wait_idle(timeout=60)
    assert tree(lab.nas_copy(outer)) == before
