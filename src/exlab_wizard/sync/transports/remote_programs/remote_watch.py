# Hashing while sending: arguments <run folder> [<flush every s>]; stdin "<path>\0<size>\0<mtime s>\0"
# per file the push is about to send, then "\0" (the list may be empty: "\0\0"), then nothing
# until the push ends (EOF). Until then, each of those files is hashed as soon as it is complete
# under its final name (rsync renames a file into place only once it is whole, with its size and
# mtime set) and printed as "<hex>  <dev:ino:size:mtime_ns:ctime_ns>  <path>\0" -- the inode's
# identity before and after the read, which must agree. At EOF it stops.
# With <flush every s> above 0 it also starts a plain `sync` that often until EOF (see flushing).
# Written for any python3 a NAS may carry (3.5 has no f-strings): %-formatting stays.
# ruff: noqa: UP031

import fcntl
import hashlib
import os
import stat
import subprocess
import sys
import threading

run = os.fsencode(sys.argv[1])
flush_every = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
data = b""
while b"\0\0" not in data:
    chunk = os.read(0, 1 << 16)
    if not chunk:
        break
    data += chunk
f = data.partition(b"\0\0")[0].split(b"\0")
pending = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f) - 2, 3)}
done = threading.Event()


def wait_eof():
    while os.read(0, 1 << 16):
        pass
    done.set()


threading.Thread(target=wait_eof, daemon=True).start()


def flushing():
    # The kernel writes a push's bytes to the NAS's disks only some 30 s after they land, so the
    # verify pass's flush would wait for all of them; a `sync` started every flush_every seconds
    # writes them while the push still runs. A plain sync(2): it reports no writeback error and
    # marks none as seen, so an error stays for the verify pass's syncfs to report (syncfs here
    # would mark it seen, and a syncfs opened later would miss it). A child with its output
    # elsewhere: nothing here waits for it, and it never holds the session open. One at a time
    # for this login on this host, whichever push started it: the child holds a lock file's
    # lock until it ends, so a sync that hangs (a dead mount elsewhere on the NAS) is never
    # joined by one more for every push.
    lock = os.path.join(os.environ.get("TMPDIR") or "/tmp", "exlab-flush-%d.lock" % os.getuid())
    while not done.wait(flush_every):
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        except OSError:
            return  # no lock of ours to hold: no flush here, the verify pass flushes it all
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a sync started earlier (by this push or another) still runs
            try:
                subprocess.Popen(
                    ["sync"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    pass_fds=(fd,),  # the child holds the lock (the same open file) until it ends
                )
            except OSError:
                return  # no sync here: the verify pass flushes it all
        finally:
            os.close(fd)


if flush_every > 0:
    threading.Thread(target=flushing, daemon=True).start()


def identity(st):
    return b"%d:%d:%d:%d:%d" % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


out = sys.stdout.buffer
buf = bytearray(1 << 20)
view = memoryview(buf)
while pending and not done.is_set():
    ready = []
    for rel, (size, mtime) in pending.items():
        try:
            st = os.lstat(os.path.join(run, rel))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_size == size and st.st_mtime_ns // 1000000000 == mtime:
            ready.append((rel, st))
    if not ready:
        done.wait(0.05)
    for rel, st in ready:
        if done.is_set():
            break
        del pending[rel]
        try:
            fd = os.open(os.path.join(run, rel), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if identity(os.fstat(fd)) != identity(st):
                continue
            h = hashlib.sha256()
            while True:
                n = os.readv(fd, [buf])
                if not n:
                    break
                h.update(view[:n])
            if identity(os.fstat(fd)) != identity(st):
                continue
        except OSError:
            continue
        finally:
            os.close(fd)
        out.write(h.hexdigest().encode() + b"  " + identity(st) + b"  " + rel + b"\0")
        out.flush()
if flush_every > 0:
    done.wait()  # flushing until the push ends (EOF)
