"""Browser login: a one-time address sets an HttpOnly, SameSite=Strict session cookie; Origin is checked."""

from __future__ import annotations

import urllib.parse

import httpx

from exlab_wizard.service.auth import COOKIE_NAME
from tests.service.conftest import Service


def code_of(url: str) -> str:
    return urllib.parse.parse_qs(urllib.parse.urlparse(url).query)["code"][0]


async def test_login_address_works_once_and_sets_a_strict_httponly_cookie(service: Service) -> None:
    code = code_of(service.info.login_url)
    assert service.info.login_url.startswith(service.url + "/login?code=")
    bad = await service.http.get("/login", params={"code": "not-a-code"})
    assert bad.status_code == 403
    first = await service.http.get("/login", params={"code": code})
    assert first.status_code == 303 and first.headers["location"] == "/"
    cookie = first.headers["set-cookie"]
    attrs = [a.strip().lower() for a in cookie.split(";")]
    assert "httponly" in attrs and "samesite=strict" in attrs and "path=/" in attrs
    session = cookie.split(";")[0].split("=", 1)[1]
    assert session and service.token not in cookie  # the cookie holds a session, never the token
    second = await service.http.get("/login", params={"code": code})
    assert second.status_code == 403 and "set-cookie" not in second.headers


async def test_cookie_mutations_need_this_servers_origin(service: Service) -> None:
    login = await service.http.get("/login", params={"code": code_of(service.info.login_url)})
    session = login.headers["set-cookie"].split(";")[0].split("=", 1)[1]
    run = service.lab.make_run()
    body = {"run_path": str(run)}
    async with httpx.AsyncClient(base_url=service.url, cookies={COOKIE_NAME: session}) as browser:
        page = await browser.get("/")
        assert page.status_code == 200 and "logged in" in page.text
        assert service.token not in page.text
        assert (await browser.post("/api/enqueue", json=body)).status_code == 403  # no Origin
        evil = await browser.post("/api/enqueue", json=body, headers={"Origin": "http://evil.example"})
        assert evil.status_code == 403
        other_port = await browser.post("/api/enqueue", json=body, headers={"Origin": "http://127.0.0.1:1"})
        assert other_port.status_code == 403
        ok = await browser.post("/api/enqueue", json=body, headers={"Origin": service.url})
        assert ok.status_code == 200, ok.text
        port = service.url.rsplit(":", 1)[1]
        alias = await browser.post("/api/enqueue", json=body, headers={"Origin": f"http://localhost:{port}"})
        assert alias.status_code == 200
        out = await browser.post("/logout", headers={"Origin": service.url})
        assert out.status_code == 303
        assert (await browser.post("/api/enqueue", json=body, headers={"Origin": service.url})).status_code == 401
    async with httpx.AsyncClient(base_url=service.url, cookies={COOKIE_NAME: "forged"}) as forged:
        assert (await forged.post("/api/enqueue", json=body, headers={"Origin": service.url})).status_code == 401


async def test_the_token_makes_new_login_addresses(service: Service) -> None:
    assert (await service.http.post("/api/login-codes")).status_code == 401
    url = (await service.post("/api/login-codes")).json()["login_url"]
    assert url.startswith(service.url + "/login?code=") and service.token not in url
    assert (await service.http.get("/login", params={"code": code_of(url)})).status_code == 303
