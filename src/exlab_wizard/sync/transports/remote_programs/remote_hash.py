# Remote hashing with python3 (rsync_ssh sends this file as `python3 -c`; the
# host needs nothing installed). Arguments: <run folder> <remote root>.
# Makes the run's filesystem durable (syncfs, on a thread beside the hashing:
# the hashes are of the same pages, and the program ends only once the flush
# has returned), prints "<hex>  <path relative to the run>\0" per regular file,
# never follows a symlink, exits 0 with no output when the run folder is
# missing but the root exists, and 3 when the root itself is missing. Exits 6
# when the flush fails (syncfs EIO or ENOSPC: a thin volume whose pool is full
# keeps serving the bytes from memory that never reached its disks): whatever
# it printed is then no hash of the NAS copy, and the client reads none of it.
# A run of many files is shared among forked processes, one a core (up to 4),
# each share's records taken from its process only when it wrote them all and
# ended well, else hashed again here.
# Written for any python3 a NAS may carry (3.5 has no f-strings): %-formatting stays.
# ruff: noqa: UP031

import errno
import hashlib
import os
import signal
import stat
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

run, root = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
if not os.path.isdir(run):
    sys.exit(0 if os.path.isdir(root) else 3)


def flush(folder):
    # The run's bytes onto the NAS's disks before they are hashed: a hash of pages a power
    # cut would lose verifies nothing. syncfs of the run's filesystem; a whole os.sync() only
    # where there is no syncfs (no ctypes, a libc or kernel without it), as os.sync() reports
    # no error. -> None when flushed, else why not.
    try:
        import ctypes

        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (ImportError, OSError, AttributeError):
        os.sync()
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            code = 0 if syncfs(fd) == 0 else ctypes.get_errno() or errno.EIO
        finally:
            os.close(fd)
    except OSError as e:
        code = e.errno or errno.EIO
    if code in (errno.ENOSYS, errno.EINVAL):
        os.sync()
    elif code:
        return "syncfs of the run's filesystem failed: %s" % os.strerror(code)
    return None


def flushing(folder, result):
    # any failure of the flush, even one not foreseen, is exit 6: never an exit 0 with no flush
    try:
        result.append(flush(folder))
    except BaseException as e:
        result.append("syncfs of the run's filesystem failed: %r" % e)


# stdin: hashes taken while the push ran, "<hex>  <identity>  <path>\0" (see remote_watch.py);
# one is reused only when the file's inode is unchanged since it was read.
known = {}
for rec in sys.stdin.buffer.read().split(b"\0"):
    if len(rec) > 68 and rec[64:66] == b"  ":
        ident, _, rel = rec[66:].partition(b"  ")
        known[rel] = (ident, rec[:64].decode())


def identity(st):
    return b"%d:%d:%d:%d:%d" % (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: a run of at least this many files is hashed by one process a core
FORK_MIN_FILES = 2000
FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
SMALL = 1 << 20


def hash_fd(fd, size):
    h = hashlib.sha256()
    if size <= SMALL:
        while True:
            chunk = os.read(fd, SMALL + 1)
            if not chunk:
                return h.hexdigest()
            h.update(chunk)
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            return h.hexdigest()
        h.update(view[:n])


def digest(path, rel):
    # -> (hex, "ERR<errno>" or None when not a regular file; None) or (None, path of a large file)
    try:
        fd = os.open(path, FLAGS)
    except OSError as e:
        return "ERR%d" % (e.errno or 0), None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None, None
        seen = known.get(rel)
        if seen is not None and seen[0] == identity(st):
            return seen[1], None
        if st.st_size > SMALL:
            return None, path
        return hash_fd(fd, st.st_size), None
    except OSError as e:
        return "ERR%d" % (e.errno or 0), None
    finally:
        os.close(fd)


def hash_large(path):
    try:
        fd = os.open(path, FLAGS)
    except OSError as e:
        return "ERR%d" % (e.errno or 0)
    try:
        return hash_fd(fd, SMALL + 1)
    except OSError as e:
        return "ERR%d" % (e.errno or 0)
    finally:
        os.close(fd)


def scan(top):
    # -> [(path, path relative to the run)] of the run's regular files (and the entries that may be)
    cut = len(top.rstrip(b"/")) + 1
    found = []
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    found.append((entry.path, entry.path[cut:]))
            except OSError:
                continue
    return found


def records(share):
    # -> the records of the files of share, each hashed here, one after the other
    done = bytearray()
    for path, rel in share:
        hexdigest, pending = digest(path, rel)
        if pending is not None:
            hexdigest = hash_large(pending)
        if hexdigest is not None:
            done += hexdigest.encode() + b"  " + rel + b"\0"
    return bytes(done)


def forked(share):
    # -> (pid, read end of a pipe), the child writing the records of share into it; None: no child
    try:
        r, w = os.pipe()
    except OSError:
        return None
    try:
        pid = os.fork()
    except OSError:
        os.close(r)
        os.close(w)
        return None
    if pid == 0:  # the child: never the parent's exit handlers nor its buffered output
        code = 1
        try:
            os.close(r)
            view = memoryview(records(share))
            while view:
                view = view[os.write(w, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def collected(child, share):
    # -> the records of share: the child's when it wrote them all and ended well, else hashed here
    if child is None:
        return records(share)
    pid, r = child
    got = bytearray()
    try:
        while True:
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            got += chunk
    finally:
        os.close(r)
    try:
        status = os.waitpid(pid, 0)[1]
    except OSError:  # not ours to wait for (reaped by someone else): its word is not taken
        status = -1
    return bytes(got) if status == 0 else records(share)


out = sys.stdout.buffer
files = scan(run)
# Many files: shared among processes, one a core (up to 4); forked before any thread starts.
parts = min(os.cpu_count() or 1, 4) if len(files) >= FORK_MIN_FILES and hasattr(os, "fork") else 1
if parts > 1 and hasattr(signal, "SIGCHLD"):
    # Children waited for here: a SIGCHLD ignored by whoever started this (a wrapper's `trap ''
    # CHLD`) would have the kernel reap them first, and no child's records would count.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
shares = [files[i::parts] for i in range(parts)]
children = [forked(share) for share in shares[1:]]
flushed = []
syncing = threading.Thread(target=flushing, args=(run, flushed))
syncing.start()
try:
    large = []
    with ThreadPoolExecutor(4) as pool:
        for path, rel in shares[0]:
            hexdigest, pending = digest(path, rel)
            if pending is not None:
                large.append((rel, pool.submit(hash_large, pending)))
            elif hexdigest is not None:
                out.write(hexdigest.encode() + b"  " + rel + b"\0")
        for rel, future in large:
            out.write(future.result().encode() + b"  " + rel + b"\0")
    for number, child in enumerate(children, 1):
        out.write(collected(child, shares[number]))
    out.flush()
finally:
    # The program never ends, so no hash is trusted, before the run is on the NAS's disks; and a
    # flush that failed is exit 6 whatever else went wrong (any other failure: a non-zero exit, and
    # the client reads none of the output).
    syncing.join()
    if flushed != [None]:
        sys.stderr.write("%s\n" % (flushed[0] if flushed else "syncfs did not return"))
        sys.stderr.flush()
        os._exit(6)
