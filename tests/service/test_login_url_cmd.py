"""``exlab-sync login-url``: a new one-time browser login address from the running ``serve``.

The address ``serve`` prints works once, within 10 minutes; before this command a
lab had to build a ``curl`` with the API token by hand to get another one.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from exlab_wizard.service.server import ServiceAddress, service_url_path
from tests.lab import Lab
from tests.service.test_serve_process import EXE, Serve, write_config


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


def test_login_url_gives_a_working_address_from_the_running_service(lab: Lab) -> None:
    config = write_config(lab)
    serve = Serve(config)
    try:
        assert ServiceAddress.read(lab.state) == ServiceAddress(serve.url, serve.proc.pid)
        assert service_url_path(lab.state).read_text() == f"{serve.url} {serve.proc.pid}\n"  # docs/cli.md
        done = _login_url(config)
        assert done.returncode == 0, done.stderr
        url = done.stdout.strip().rsplit(" ", 1)[-1]
        assert url.startswith(f"{serve.url}/login?code=")
        with httpx.Client(follow_redirects=False) as browser:
            first = browser.get(url)
            assert first.status_code in (302, 303, 307) and browser.cookies, first.text[:300]
            used = browser.get(url)
            assert used.status_code == 403 and "exlab-sync login-url" in used.text  # once only, and what to do
        again = _login_url(config)
        assert again.returncode == 0 and again.stdout.strip().rsplit(" ", 1)[-1] != url  # a new one each time
        code, _took = serve.stop()
        assert code == 0
    finally:
        serve.kill()
    assert not service_url_path(lab.state).exists()  # a stopped service leaves no address behind


def test_login_url_without_a_service_says_so_in_one_line(lab: Lab) -> None:
    config = write_config(lab)
    done = _login_url(config)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and "no exlab-sync serve is running" in done.stderr
    # left by a killed service: its pid holds no runner lease, nothing is sent to the address
    lab.state.mkdir(parents=True, exist_ok=True)
    (lab.state / "api-token").write_text("x" * 43 + "\n")
    service_url_path(lab.state).write_text("http://127.0.0.1:9 999999\n")
    stale = _login_url(config)
    assert stale.returncode == 1 and stale.stderr.strip().count("\n") == 0 and "Traceback" not in stale.stderr
    assert stale.stderr.strip() == (
        f"error: no exlab-sync serve is running for {lab.state}: {service_url_path(lab.state)} is stale "
        "(pid 999999, which wrote it, does not hold the runner lease); the token was not sent"
    )
