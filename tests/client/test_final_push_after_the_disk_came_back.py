"""A run on a USB disk re-plugged between its data deletion and its final push still gets it.

``retain_cache: false``. The reaper deletes the verified data of Run_A (on an
external disk mounted at the equipment folder) and its final metadata push
fails once (the NAS away for the night). The lab unplugs the disk and plugs
it back: the kernel gives it another block device (``/dev/loop0`` ->
``/dev/loop1`` here, ``sdb`` -> ``sdc`` for a USB disk), so every folder on it
has another ``st_dev`` and the *same* inode. Nothing else changed.

Found in review: the reaper took any difference of the ``"<dev>:<ino>"``
remembered with the plan (queue migration 12) for proof of another run's
folder, before it looked at what the folder holds: the final push was
skipped, the job CLEANED with ``.exlab-wizard/`` and the run folder left
behind for ever, and the NAS never got the ``local_cleaned`` record (DESIGN
section 9). A new device number alone now proves nothing; what the folder
holds decides (the same for LVM after a reboot, btrfs, NFS, overlay).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.sync.states import SyncJobState
from tests.client.test_new_run_during_final_push import _config, _data_deleted_final_push_waiting
from tests.helpers import Clock
from tests.lab import FILES, Site, acts, events, running

S = SyncJobState
CREATION = ".exlab-wizard/creation.json"
EQ = "CONFOCAL_01"


def _sh(*args: str) -> str:
    return subprocess.run(list(args), check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def disk(tmp_path: Path):
    """An ext4 image: ``plug(at)`` attaches it to the first free loop device and mounts it; ``unplug()`` undoes."""
    assert subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip() == "0", "mounts need root"
    image = tmp_path / "usb.img"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)
    subprocess.run(["mkfs.ext4", "-q", str(image)], check=True)
    held: list[str] = []
    state: dict[str, str] = {}

    class Disk:
        def plug(self, at: Path) -> None:
            """Attached to a free loop device other than the one it had (another stick took that
            number, as one would take sdb); never the same, whatever other tests' loop devices do."""
            while (dev := _sh("losetup", "-f", "--show", str(image))) == state.get("was"):
                held.append(dev)  # the old number stays taken
            state["dev"] = dev
            subprocess.run(["mount", state["dev"], str(at)], check=True)
            state["at"] = str(at)

        def unplug(self) -> None:
            subprocess.run(["umount", state.pop("at")], check=True)
            state["was"] = state.pop("dev")
            subprocess.run(["losetup", "-d", state["was"]], check=True)

    d = Disk()
    yield d
    if "at" in state:
        subprocess.run(["umount", state["at"]], check=False)
    if "dev" in state:
        subprocess.run(["losetup", "-d", state["dev"]], check=False)
    for dev in held:
        subprocess.run(["losetup", "-d", dev], check=False)


@pytest.mark.parametrize("site", ["mount"], indirect=True)
async def test_a_replugged_disk_still_gets_its_final_push(site: Site, disk) -> None:
    clock = Clock()
    site.creation_extra = {"sample": "first acquisition"}
    equipment_folder = site.local_root / EQ
    equipment_folder.mkdir(parents=True, exist_ok=True)
    disk.plug(equipment_folder)
    run = site.make_run("Run_A", files=FILES)
    nas = site.nas_copy(run)
    before = run.stat()
    async with running(_config(site), clock) as client:
        await _data_deleted_final_push_waiting(client, clock, run)
        assert json.loads((run / CREATION).read_text())["local_cleaned"]
        # The disk unplugged and plugged back: the same folder, another device number.
        disk.unplug()
        disk.plug(equipment_folder)
        after = run.stat()
        assert after.st_ino == before.st_ino and after.st_dev != before.st_dev
        outcomes = acts(await client.cleanup_once())
        outcomes += acts(await client.cleanup_once())
        job = await client.job(run)
    skipped = events(job, "final_push_skipped")
    nas_record = json.loads((nas / CREATION).read_text())
    problems = []
    if skipped:
        problems.append(f"final push skipped: {skipped[0].detail[:140]}")
    if run.exists():
        problems.append(f"run folder left behind: {sorted(str(p.relative_to(run)) for p in run.rglob('*'))}")
    if "local_cleaned" not in nas_record:
        problems.append("the NAS creation.json never got local_cleaned")
    assert not problems, f"{job.state}: {problems}; {[(o.action, o.reason) for o in outcomes]}"
    assert job.state == S.CLEANED
