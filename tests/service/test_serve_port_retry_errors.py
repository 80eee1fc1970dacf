"""A passing system error while ``serve`` waits for its taken port ends nothing.

With its port taken, serve syncs and binds again every 30 s. The retry loop
(``_Http.run``) went on only for ``CannotListen``; any other ``OSError`` of
``_bind`` (``socket()`` failing with EMFILE/ENFILE/ENOBUFS for a moment, which
tests/service/test_serve_out_of_fds.py shows serve meets) ended
``run_service``, and since ``on_ready`` never ran ``serve_cmd`` called it
"serve cannot start" and exited 2: the code the shipped unit never restarts,
although the workers had been syncing for hours. Now any such error is logged
(once per reason) and tried again, and a failure once the workers run is
"serve stopped", exit 1, which the unit restarts.

The moment without descriptors is injected into ``_bind`` (its second call,
the first retry) of a real ``serve`` process; the port is freed a second later.
"""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import time

from tests.lab import Lab
from tests.service.test_serve_process import write_config

SCRIPT = r"""
import errno, sys
from exlab_wizard.service import server
real_bind, calls = server._bind, [0]
def flaky_bind(host, port):
    calls[0] += 1
    if calls[0] == 2:  # the first retry: no descriptor for socket() this once
        raise OSError(errno.EMFILE, "Too many open files")
    return real_bind(host, port)
server._bind = flaky_bind
server.run_service.__kwdefaults__["listen_retry_s"] = 0.3
sys.argv[0] = "exlab-sync"
from exlab_wizard.cli import main
main()
"""


def test_one_failed_retry_does_not_end_serve_with_exit_2(tmp_path) -> None:
    lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
    config = write_config(lab)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port = squatter.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "serve", "--config", str(config), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.5)
        squatter.close()  # the port is free again
        deadline = time.monotonic() + 15
        line = ""
        while time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
            if "listening on" in line:
                break
        alive = proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(15)
    assert alive and "listening on" in line, (
        f"serve ended (exit {proc.returncode}) on one EMFILE while waiting for its port: {proc.stderr.read().strip()!r}"
    )


#: A serve whose HTTP side fails for a system reason after the workers started (before it listens).
BROKEN_HTTP = r"""
import errno, sys
from exlab_wizard.service import server
async def broken(self, sockets=None):
    raise OSError(errno.ENOMEM, "Cannot allocate memory")
server._Server.serve = broken
sys.argv[0] = "exlab-sync"
from exlab_wizard.cli import main
main()
"""


def test_a_failure_once_the_workers_run_is_exit_1_not_2(tmp_path) -> None:
    lab = Lab.build(tmp_path, equipment=("CONFOCAL_01",))
    config = write_config(lab)
    done = subprocess.run(
        [sys.executable, "-c", BROKEN_HTTP, "serve", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, (
        f"a failure after the workers started must be restartable (exit 1), not exit {done.returncode}: "
        f"{done.stderr.strip()!r}"
    )
    assert done.stderr.strip().splitlines()[-1] == "error: serve stopped: Cannot allocate memory"


def test_bind_says_cannot_listen_for_a_socket_it_cannot_make(monkeypatch) -> None:
    from exlab_wizard.service import server

    def no_socket(*_args, **_kw):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket, "socket", no_socket)
    try:
        server._bind("127.0.0.1", 0)
    except server.CannotListen as exc:
        assert exc.errno == errno.EMFILE
    else:
        raise AssertionError("bound without a socket")
