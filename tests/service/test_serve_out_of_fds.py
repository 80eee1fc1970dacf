"""``exlab-sync serve`` survives a moment without file descriptors, and says what failed when it cannot go on.

Dashboard tabs and event streams up to ``RLIMIT_NOFILE`` leave the process
without descriptors for a moment; asyncio survives that (it logs "socket.accept()
out of system resource" and pauses accepting for a second). ``serve`` used to
exit 2 with "cannot listen on 127.0.0.1:0: Too many open files": uvicorn's
default ``log_config`` closed the central log's handler, the next record
reopened the file under EMFILE, and that error left asyncio's exception handler
and ended ``asyncio.run``; every ``OSError`` was then reported as the bind's.
Now uvicorn leaves logging alone, the central log's handler never lets a
failure reach the caller, and only the bind step says "cannot listen".
"""

from __future__ import annotations

import errno
import logging
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from exlab_wizard.cli import main
from exlab_wizard.config import load_config
from tests.fixtures.sshd import free_port
from tests.soak.test_serve_soak import EXE, counts, start_serve, write_config, write_run

LIMIT = 64


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_survives_running_out_of_file_descriptors(tmp_path: Path) -> None:
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

    proc = subprocess.Popen(
        [EXE, "serve", "--config", str(write_config(tmp_path)), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=low_limit,
    )
    socks: list[socket.socket] = []
    try:
        line = proc.stdout.readline()
        while "listening on" not in line:
            assert line, proc.stderr.read()
            line = proc.stdout.readline()
        url = line.split("listening on ", 1)[1].split()[0]
        host, port = url.split("//")[1].rstrip("/").split(":")
        time.sleep(1)
        for _ in range(LIMIT):  # dashboard tabs / event streams: more than the descriptors left
            s = socket.create_connection((host, int(port)), timeout=2)
            s.sendall(f"GET /api/events HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            socks.append(s)
        time.sleep(3)
        for s in socks:
            s.close()
        socks.clear()
        time.sleep(2)
        assert proc.poll() is None, f"serve stopped (rc {proc.returncode}): {proc.stderr.read()[-400:]}"
        for index in range(3):
            write_run(tmp_path / "lab", index)
        verified, deadline = 0, time.monotonic() + 40
        while verified < 3 and time.monotonic() < deadline:
            assert proc.poll() is None, f"serve stopped (rc {proc.returncode}): {proc.stderr.read()[-400:]}"
            try:
                with httpx.Client(base_url=url, timeout=3) as http:
                    verified, _failed = counts(http)
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        assert verified == 3
    finally:
        for s in socks:
            s.close()
        _stop(proc)
    # The shortage did happen, and its record reached the central log (the file stayed open).
    assert "out of system resource" in (tmp_path / "state" / "exlab-sync.log").read_text()


def test_uvicorns_warnings_go_to_the_central_log(tmp_path: Path) -> None:
    proc, url = start_serve(write_config(tmp_path))
    try:
        host, port = url.split("//")[1].rstrip("/").split(":")
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")  # a TLS hello at a plain HTTP port, say
            s.recv(1024)
        central = tmp_path / "state" / "exlab-sync.log"
        deadline = time.monotonic() + 10
        while "Invalid HTTP request" not in central.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "Invalid HTTP request" in central.read_text()
    finally:
        _stop(proc)
    assert proc.returncode == 0
    assert "Invalid HTTP request" not in proc.stderr.read()  # the terminal (the journal) gets one-line errors only


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Leave the process's logging as it was (configure_logging adds a handler)."""
    root, package = logging.getLogger(), logging.getLogger("exlab_wizard")
    handlers, level = list(root.handlers), package.level
    yield
    for handler in root.handlers[:]:
        if handler not in handlers:
            root.removeHandler(handler)
            handler.close()
    package.setLevel(level)


def test_a_central_log_that_cannot_be_reopened_costs_the_record_never_the_caller(
    tmp_path: Path, root_logging: None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from exlab_wizard.cli.sync_cmds import configure_logging

    config = load_config(write_config(tmp_path))
    path = configure_logging(config)
    assert path is not None
    (handler,) = [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", None) == str(path.absolute())]
    handler.close()  # as a logging reconfiguration does; the next record reopens the file

    def out_of_descriptors() -> None:
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(handler, "_open", out_of_descriptors)
    log = logging.getLogger("exlab_wizard.sync.test")
    log.error("first lost")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("second lost")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write the central log" in err and "Too many open files" in err, err
    assert "Traceback" not in err

    monkeypatch.undo()  # descriptors back: the next record reaches the file
    log.error("written again")
    handler.flush()
    text = path.read_text()
    assert "written again" in text and "lost" not in text
    assert capsys.readouterr().err == ""


def test_only_the_bind_says_cannot_listen(tmp_path: Path) -> None:
    # An address not on this machine: a usage error, exit 2. (A port in use is not: serve syncs without the
    # API and binds again later, tests/service/test_serve_port_taken.py.)
    port = free_port()
    done = subprocess.run(
        [EXE, "serve", "--config", str(write_config(tmp_path)), "--host", "192.0.2.1", "--port", str(port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last == f"error: cannot listen on 192.0.2.1:{port}: Cannot assign requested address", done.stderr


@pytest.mark.parametrize(("started", "code", "says"), [(True, 1, "serve stopped"), (False, 2, "serve cannot start")])
def test_another_os_error_names_what_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, started: bool, code: int, says: str
) -> None:
    from exlab_wizard.cli import serve
    from exlab_wizard.service import server

    async def failing(config, *, host, port, on_ready, **_more):
        if started:
            on_ready(server.ServiceInfo("http://127.0.0.1:1", "http://127.0.0.1:1/login?code=x", None))
        raise OSError(errno.EMFILE, "Too many open files", str(tmp_path / "state" / "queue.db"))

    monkeypatch.setattr(server, "run_service", failing)
    monkeypatch.setattr(server, "cap_malloc_arenas", lambda: None)
    monkeypatch.setattr(serve, "configure_logging", lambda config, **_: None)
    result = CliRunner().invoke(main, ["serve", "--config", str(write_config(tmp_path)), "--port", "0"])
    assert result.exit_code == code, result.output
    last = result.output.strip().splitlines()[-1]
    assert last == f"error: {says}: Too many open files ({tmp_path / 'state' / 'queue.db'})", result.output
    assert "cannot listen" not in result.output
