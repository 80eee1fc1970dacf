"""``exlab-sync login-url`` sends the API token only to the serve that holds the runner lease now.

``serve`` writes ``<state_dir>/service-url`` and removes it when it stops; one
left by a killed service (SIGKILL, OOM, power loss) is stale. login-url read
it and POSTed ``Authorization: Bearer <api-token>`` to that address, so
another local user who bound the (fixed, default 8765) port after the service
died received the token, valid for the next serve: every mutating API call.
Now ``service-url`` names serve's pid with the address, and login-url sends
the token only while that pid holds the runner lease; a serve that takes the
lease removes a stale file at once.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from exlab_wizard.config import load_config
from exlab_wizard.service.auth import TOKEN_NAME
from exlab_wizard.service.server import run_service, service_url_path
from tests.lab import Lab
from tests.service.test_serve_process import EXE, write_config


@pytest.fixture
def lab(tmp_path: Path) -> Lab:
    (tmp_path / "nas" / "CONFOCAL_01").mkdir(parents=True)
    (tmp_path / "nas" / "CONFOCAL_01" / ".exlab-nas").write_text("mounted\n")
    (tmp_path / "lab").mkdir()
    return Lab(tmp_path, tmp_path / "lab", tmp_path / "nas", tmp_path / "state")


def _login_url(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, "login-url", "--config", str(config)], check=False, capture_output=True, text=True, timeout=60
    )


def _impostor(port_w: int, seen_w: int) -> None:  # pragma: no cover - child
    """As nobody: listen on a loopback port, answer one HTTP request, report its Authorization header."""
    code = 1
    try:
        nobody = pwd.getpwnam("nobody")
        os.setgroups([])
        os.setgid(nobody.pw_gid)
        os.setuid(nobody.pw_uid)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        os.write(port_w, f"{sock.getsockname()[1]}\n".encode())
        sock.settimeout(30)
        conn, _ = sock.accept()
        conn.settimeout(10)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        auth = [line for line in data.split(b"\r\n") if line.lower().startswith(b"authorization:")]
        os.write(seen_w, (auth[0] if auth else b"-") + b"\n")
        body = b'{"login_url": "http://127.0.0.1/login?code=fake"}'
        conn.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\nConnection: close\r\n\r\n"
            + body
        )
        conn.close()
        code = 0
    finally:
        os._exit(code)


@pytest.mark.parametrize("names", ["no pid", "the listener's pid"])
def test_login_url_never_sends_the_token_to_a_listener_that_is_not_the_service(lab: Lab, names: str) -> None:
    assert os.geteuid() == 0, "plays another local user"  # fails, never skips
    config = write_config(lab)
    lab.state.mkdir(parents=True)
    token = "t" * 43
    (lab.state / TOKEN_NAME).write_text(token + "\n")
    port_r, port_w = os.pipe()
    seen_r, seen_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        _impostor(port_w, seen_w)
    os.close(port_w)
    os.close(seen_w)
    try:
        port = int(os.fdopen(port_r).readline())
        # The service was killed: its service-url names a port another local user now listens on
        # (as an older serve wrote it, with no pid; or naming a live pid, the listener's own).
        line = f"http://127.0.0.1:{port}" + ("" if names == "no pid" else f" {pid}")
        service_url_path(lab.state).write_text(line + "\n")
        done = subprocess.run(
            [EXE, "login-url", "--config", str(config)], check=False, capture_output=True, text=True, timeout=60
        )
    finally:
        os.kill(pid, signal.SIGKILL)  # a request it got is already reported
        os.waitpid(pid, 0)
    seen = os.fdopen(seen_r).readline().strip()
    assert token not in seen, (
        f"login-url sent the API token to another user's listener ({seen!r}); it printed {done.stdout!r}"
    )
    assert seen == "", f"login-url connected to the stale address ({seen!r})"
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: no exlab-sync serve is running for {lab.state}: ")
    assert "is stale" in done.stderr and "the token was not sent" in done.stderr


def test_serve_removes_a_stale_address_as_soon_as_it_holds_the_lease(lab: Lab) -> None:
    """While serve waits for its port, login-url finds no address (never the dead serve's)."""
    config_path = write_config(lab)
    config = load_config(config_path)
    lab.state.mkdir(parents=True)
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    service_url_path(lab.state).write_text(f"http://127.0.0.1:{port} {os.getpid()}\n")  # pid: this process, below
    told: list[object] = []
    answers: list[subprocess.CompletedProcess[str]] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        service = asyncio.create_task(
            run_service(config, port=port, stop=stop, install_signals=False, on_port_taken=told.append)
        )
        try:
            for _ in range(200):
                if told and not service_url_path(lab.state).exists():
                    break
                assert not service.done(), service.exception()
                await asyncio.sleep(0.05)
            answers.append(await asyncio.to_thread(_login_url, config_path))
        finally:
            stop.set()
            await asyncio.wait_for(service, 15)

    try:
        asyncio.run(scenario())
    finally:
        taken.close()
    assert told and not service_url_path(lab.state).exists()
    done = answers[0]
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"error: no exlab-sync serve is running for {lab.state} (no service-url there): start it first"
    )
