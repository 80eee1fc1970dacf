"""The "NAS" behind the property tests: where its bytes really are, and how it goes away.

A :class:`Nas` is one example's remote side for one transport. The test reads
and damages the NAS copy through ``storage`` (the folder that really holds the
equipment's remote root, whether or not the engine can reach it now), and
takes the NAS away and back with ``unplug``/``plug``:

- mount: the share is unmounted the way a real one is: the real folder moves
  aside and an empty folder without the marker is left at the mount point.
  ``plug`` returns whatever the engine wrote into that bare folder (it must
  be nothing), then puts the share back.
- rsync_ssh: either the sshd that serves the remote root is stopped and
  started again (a NAS switched off or off the network: ``how="down"``), or
  the NAS is up but its volume is not mounted (``how="volume"``): the remote
  root is gone from the server until ``plug``, which returns whatever the
  engine created in its place (it must be nothing).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tests.fixtures.sshd import RW_USER, SshServer

__all__ = ["EQ", "MountNas", "Nas", "RsyncNas", "local_tree"]

EQ = "CONFOCAL_01"
MARKER = ".exlab-nas"


def local_tree(root: Path) -> list[str]:
    """Every entry under ``root`` (relative paths), not following symlinks."""
    out: list[str] = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


class Nas:
    """One example's remote root."""

    name = "nas"
    #: the folder that holds the remote root now (reachable or not)
    storage: Path

    def transport(self) -> dict[str, Any]:
        raise NotImplementedError

    def unplug(self, how: str = "down") -> None:
        raise NotImplementedError

    def plug(self) -> list[str]:
        """Make the NAS reachable again; returns what was written where the NAS was not."""
        raise NotImplementedError

    def stray(self) -> list[str]:
        """While away: what the engine wrote where the NAS should be (must be nothing)."""
        return []

    def cleanup(self) -> None:
        pass


class MountNas(Nas):
    """A mounted share: ``<example>/nas/CONFOCAL_01`` holding the mount marker."""

    name = "mount"

    def __init__(self, example: Path):
        self.mount_point = example / "nas" / EQ
        self.mount_point.mkdir(parents=True)
        (self.mount_point / MARKER).write_text("mounted\n")
        self.storage = self.mount_point
        self._away = example / "nas" / "share-while-unmounted"
        self.unplugged = False

    def transport(self) -> dict[str, Any]:
        return {"type": "mount", "mount_path": str(self.mount_point), "mount_marker": MARKER}

    def unplug(self, how: str = "down") -> None:  # an unmounted share looks the same either way
        self.mount_point.rename(self._away)
        self.mount_point.mkdir()  # what an unmounted share leaves: a bare local folder
        self.storage = self._away
        self.unplugged = True

    def stray(self) -> list[str]:
        return local_tree(self.mount_point) if self.unplugged else []

    def plug(self) -> list[str]:
        stray = self.stray()
        shutil.rmtree(self.mount_point)
        self._away.rename(self.mount_point)
        self.storage = self.mount_point
        self.unplugged = False
        return stray


class RsyncNas(Nas):
    """A remote root on the loopback sshd, owned by the unprivileged login user."""

    name = "rsync_ssh"

    def __init__(self, server: SshServer, remote_base: Path):
        self.server = server
        root = Path(tempfile.mkdtemp(prefix="nas-", dir=remote_base))
        root.chmod(0o755)
        shutil.chown(root, RW_USER, RW_USER)
        self.root = self.storage = root
        self._away = root.with_name(root.name + "-volume-unmounted")
        self.unplugged = False
        self.how = "down"

    def transport(self) -> dict[str, Any]:
        return {
            "type": "rsync_ssh",
            "ssh_target": f"{RW_USER}@127.0.0.1",
            "ssh_key_path": str(self.server.env.client_key),
            "ssh_port": self.server.port,
            "remote_path": str(self.root),
            "ssh_known_hosts": str(self.server.known_hosts),
        }

    def unplug(self, how: str = "down") -> None:
        self.how = how
        if how == "down":
            self.server.stop()
        else:
            self.root.rename(self._away)
            self.storage = self._away
        self.unplugged = True

    def stray(self) -> list[str]:
        if not self.unplugged or self.how == "down" or not self.root.exists():
            return []
        return ["."] + local_tree(self.root)

    def plug(self) -> list[str]:
        stray = self.stray()
        if self.how == "down":
            self.server.start()
        else:
            if self.root.exists():
                shutil.rmtree(self.root)
            self._away.rename(self.root)
            self.storage = self.root
        self.unplugged = False
        return stray

    def cleanup(self) -> None:
        if self.unplugged:
            self.plug()
        shutil.rmtree(self.root, ignore_errors=True)
