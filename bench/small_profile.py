"""Iteration benchmark for the mount transport: ours against the durable, verified rclone anchor.

Each measurement writes to a FRESH loop-mounted ext4 (made for it, unmounted
and removed after), so no method pays for inodes another one freed a moment
before (a no-journal ext4 does not reuse them for minutes). The source run is
generated once, kept warm in the page cache, and the methods are interleaved
(the order rotates every repeat). Needs root (``mount -o loop``).

Methods:

* ``ours`` (or ``ours:LABEL=SRC`` to time another checkout's ``src``, e.g.
  ``ours:main=/work/main/src``): ``NASSyncClient`` on the mount transport,
  ``enqueue()`` to VERIFIED (``bench/_engine_run.py`` in a child);
* ``anchor``: ``rclone copy --checksum``, ``rclone check`` (SHA-256 on both
  sides, ``RCLONE_LOCAL_HASHES=sha256``) and ``sync -f`` of the copy (its
  filesystem's syncfs; a global ``sync`` on a shared machine also waits for
  everyone else's writes);
* ``loop``: a plain one-thread Python loop doing the same durable copy (temp
  file, one syncfs, renames, folders fsynced), the read-back past the page
  cache (``POSIX_FADV_DONTNEED``) and the manifest.

    flock /tmp/exlab-bench.lock .venv/bin/python bench/small_profile.py --datasets small --repeat 3
    flock /tmp/exlab-bench.lock .venv/bin/python bench/small_profile.py --methods ours:main=/work/main/src,ours,anchor

Prints every time, the medians and each method's ratio to the anchor.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import dataset, median, new_run, sh, work_dir, write_dataset

EQUIPMENT = "BENCH_01"
MARKER = ".exlab-nas"
HERE = Path(__file__).resolve().parent
REPO_SRC = HERE.parent / "src"


def make_run(local_root: Path, name: str, scale: float) -> Path:
    run = new_run(local_root, EQUIPMENT, name, "bench/small_profile.py")
    write_dataset(run, dataset(name, scale))
    return run


class FreshFs:
    """A new ext4 on a loop device, mounted at ``<base>/mnt-<n>``; removed on exit."""

    def __init__(self, base: Path, n: int, size: str):
        self.image = base / f"fs-{n}.img"
        self.mnt = base / f"mnt-{n}"
        self.size = size

    def __enter__(self) -> Path:
        sh(["truncate", "-s", self.size, self.image])
        sh(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.image])
        self.mnt.mkdir()
        sh(["mount", "-o", "loop", self.image, self.mnt])
        sh(["sync", "-f", self.mnt])
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        subprocess.run(["umount", self.mnt], check=False)
        self.mnt.rmdir()
        self.image.unlink()


def run_ours(src: Path, run: Path, local_root: Path, mnt: Path, state: Path) -> float:
    share = mnt / "nas"
    share.mkdir()
    (share / MARKER).write_text("bench share\n")
    env = {**os.environ, "PYTHONPATH": str(src)}
    done = subprocess.run(
        [
            sys.executable,
            HERE / "_engine_run.py",
            "--run",
            run,
            "--local-root",
            local_root,
            "--mount",
            share,
            "--state",
            state,
            "--equipment",
            EQUIPMENT,
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"engine failed: {done.stdout[-2000:]} {done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result["verified_s"]


def run_anchor(run: Path, mnt: Path) -> float:
    target = mnt / "dest" / run.name
    env = {**os.environ, "RCLONE_LOCAL_HASHES": "sha256", "RCLONE_CONFIG": os.devnull}
    rclone = shutil.which("rclone") or str(Path(sys.executable).parent / "rclone")
    start = time.perf_counter()
    subprocess.run([rclone, "--config", os.devnull, "copy", "--checksum", run, target], env=env, check=True)
    subprocess.run([rclone, "--config", os.devnull, "check", run, target], env=env, check=True, capture_output=True)
    # syncfs of the copy's filesystem: what makes rclone's copy durable, as our engine's
    # syncfs does for its own (a global `sync` also waits for every other writer on the machine).
    subprocess.run(["sync", "-f", target], check=True)
    return time.perf_counter() - start


def run_loop(run: Path, mnt: Path) -> float:
    target = mnt / "dest" / run.name
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--plain-loop", run, target], check=True)
    return time.perf_counter() - start


def plain_loop(src: str, dst: str) -> None:
    """The plain loop: durable copy, read-back past the cache, manifest. One thread."""
    libc = ctypes.CDLL(None, use_errno=True)
    files: list[str] = []
    dirs: list[str] = [""]
    for folder, subdirs, names in os.walk(src):
        rel = os.path.relpath(folder, src)
        rel = "" if rel == "." else rel
        dirs.extend(os.path.join(rel, d) for d in subdirs)
        files.extend(os.path.join(rel, n) for n in names)
    for rel in dirs:
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
    hashes: dict[str, str] = {}
    temps = []
    for rel in files:
        source = os.path.join(src, rel)
        with open(source, "rb") as handle:
            data = handle.read()
            info = os.fstat(handle.fileno())
        hashes[rel] = hashlib.sha256(data).hexdigest()
        final = os.path.join(dst, rel)
        temp = os.path.join(os.path.dirname(final), "." + os.path.basename(final) + ".tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, data)
        os.utime(fd, ns=(info.st_atime_ns, info.st_mtime_ns))
        os.close(fd)
        temps.append((temp, final))
    fd = os.open(dst, os.O_RDONLY)
    libc.syncfs(fd)
    os.close(fd)
    for temp, final in temps:
        os.rename(temp, final)
    for rel in dirs:
        fd = os.open(os.path.join(dst, rel), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    for rel in files:
        fd = os.open(os.path.join(dst, rel), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        os.close(fd)
        if digest.hexdigest() != hashes[rel]:
            raise SystemExit(f"mismatch {rel}")
    body = "".join(f"{hashes[rel]}  {rel}\n" for rel in sorted(hashes))
    with open(os.path.join(src, ".exlab-wizard", "loop.sha256"), "w") as handle:
        handle.write(body)
        handle.flush()
        os.fsync(handle.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="small")
    parser.add_argument("--methods", default="ours,anchor")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--fs-size", default="3G")
    parser.add_argument("--dir", type=work_dir, default=None)
    parser.add_argument("--plain-loop", nargs=2, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_loop:
        plain_loop(*args.plain_loop)
        return 0
    methods: dict[str, tuple[str, Path | None]] = {}
    for spec in args.methods.split(","):
        if spec == "ours":
            methods["ours"] = ("ours", REPO_SRC)
        elif spec.startswith("ours:"):
            label, _sep, src = spec[5:].partition("=")
            methods[f"ours:{label}"] = ("ours", Path(src))
        elif spec in ("anchor", "loop"):
            methods[spec] = (spec, None)
        else:
            parser.error(f"unknown method {spec!r}")
    base = Path(tempfile.mkdtemp(prefix="exlab-smallprof-", dir=args.dir))
    n = 0
    try:
        local_root = base / "lab"
        runs = {name: make_run(local_root, name, args.scale) for name in args.datasets.split(",")}
        sh(["sync"])
        times: dict[str, dict[str, list[float]]] = {name: {m: [] for m in methods} for name in runs}
        order = list(methods)
        for rep in range(args.repeat):
            for name, run in runs.items():
                for method in order[rep % len(order) :] + order[: rep % len(order)]:
                    kind, src = methods[method]
                    for path in run.rglob("*"):  # warm source: read every file once
                        if path.is_file():
                            path.read_bytes()
                    n += 1
                    with FreshFs(base, n, args.fs_size) as mnt:
                        if kind == "ours":
                            took = run_ours(src, run, local_root, mnt, base / f"state-{n}")
                            shutil.rmtree(base / f"state-{n}", ignore_errors=True)
                        elif kind == "anchor":
                            took = run_anchor(run, mnt)
                        else:
                            took = run_loop(run, mnt)
                    times[name][method].append(took)
                    print(f"{name:6s} rep {rep} {method:14s} {took:6.2f} s", flush=True)
        print()
        for name in runs:
            anchor = median(times[name]["anchor"]) if "anchor" in times[name] else None
            for method in methods:
                med = median(times[name][method])
                rel = f"  {med / anchor:5.2f}x anchor" if anchor else ""
                print(
                    f"{name:6s} {method:14s} median {med:6.2f} s{rel}  ({', '.join(f'{t:.2f}' for t in times[name][method])})"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
