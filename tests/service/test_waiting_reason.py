"""``run_signals.waiting_reason`` (what ``exlab-sync status RUN`` prints) says what the watcher says.

For every run the watcher holds back, the reason computed without a service is
the one ``watcher.incomplete()`` (``GET /api/watcher``) gives; none for a run
the watcher would enqueue, nor for a folder it never looks at.
"""

from __future__ import annotations

import json

from exlab_wizard.service.run_signals import waiting_reason
from tests.service.conftest import Running, WatchLab, start, stop


async def test_the_reason_is_the_watchers_for_every_run_it_holds_back(wlab: WatchLab, watching: Running) -> None:
    equipment = wlab.config().equipment[0]
    no_sentinel = wlab.run_dir("Run_1")
    folder_sentinel = wlab.run_dir("Run_2")
    (folder_sentinel / "acquisition_complete.flag").mkdir()
    test_run = wlab.run_dir("TestRun_3", project="PROJ-2")
    finished = wlab.finished_run("Run_4", files={"{{sample}}.csv": b"x"})  # complete, blocked by the gate

    await watching.watcher.scan_once()
    held = {item.run_path: item.reason for item in watching.watcher.incomplete()}
    assert set(held) == {str(no_sentinel), str(folder_sentinel), str(test_run)}
    for run, reason in held.items():
        assert waiting_reason(equipment, run) == reason
    assert waiting_reason(equipment, finished) is None
    assert waiting_reason(equipment, no_sentinel.parent.parent) is None  # a project folder: never a run


async def test_the_manifest_reasons_are_the_watchers(wlab: WatchLab) -> None:
    wlab.signal = "manifest"
    running = await start(wlab.config())
    try:
        equipment = wlab.config().equipment[0]
        absent = wlab.run_dir("Run_1")
        short = wlab.run_dir("Run_2")
        (short / "a.bin").write_bytes(b"x" * 5)
        (short / "run_manifest.json").write_text(json.dumps({"files": [{"path": "a.bin", "size": 10}]}))
        malformed = wlab.run_dir("Run_3")
        (malformed / "run_manifest.json").write_text("{")
        await running.watcher.scan_once()
        held = {item.run_path: item.reason for item in running.watcher.incomplete()}
        assert set(held) == {str(absent), str(short), str(malformed)}
        for run, reason in held.items():
            assert waiting_reason(equipment, run) == reason
    finally:
        await stop(running)
