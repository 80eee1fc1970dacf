"""The HTTP API driven from its own OpenAPI schema (schemathesis), and generated attacks on it.

The real service (``run_service``: uvicorn on 127.0.0.1, the real client and
watcher) runs in a thread for the module. For every operation in
``/openapi.json`` schemathesis generates requests that fit the schema and
requests that break it; each is sent with the bearer token (so it reaches the
route) and, for a ``POST``, once more without it. Every answer must be below
500 and carry no traceback. Generated attacks follow: run paths built from
``..``, ``.``, doubled slashes, segments over 255 bytes, absolute paths
outside the roots and a symbolic link out of the equipment root (400
``outside_roots`` or 422 unless the path really is a run inside a root);
wrong tokens (401 / 403); foreign ``Origin`` values on a posted session cookie
(403); bodies over 64 KiB, with and without ``Content-Length`` (413).
``/api/events`` (a stream that never ends) is left to tests/service.

``EXLAB_FUZZ_API_EXAMPLES`` sets the generated requests per operation and mode
(default 15); ``EXLAB_FUZZ_API_ATTACKS`` the examples per generated attack
(default 100, at most ``EXLAB_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from exlab_wizard.service.app import MAX_BODY_BYTES
from exlab_wizard.service.auth import COOKIE_NAME
from exlab_wizard.service.server import run_service
from tests.fuzz.conftest import CASES, FUZZ
from tests.helpers import client_tls
from tests.lab import Lab, client_lab

API_EXAMPLES = int(os.environ.get("EXLAB_FUZZ_API_EXAMPLES", "15"))
#: Examples per generated attack (the suite's default keeps the module's share under ~25 s).
ATTACKS = settings(FUZZ, max_examples=min(FUZZ.max_examples, int(os.environ.get("EXLAB_FUZZ_API_ATTACKS", "100"))))
RUN_PATH_ENDPOINTS = (
    ("POST", "/api/enqueue"),
    ("POST", "/api/verify"),
    ("GET", "/api/problems"),
    ("GET", "/api/overrides"),
    ("POST", "/api/overrides"),
    ("POST", "/api/overrides/abcdefgh/revoke"),
)
#: One path segment over NAME_MAX (255 bytes): realpath takes it, the first stat refuses it.
LONG_SEGMENT = "Run_" + "x" * 300
TRACEBACK_MARKERS = ("Traceback (most recent call last)", 'File "/', "Internal Server Error")


@dataclass
class Served:
    url: str
    token: str
    login_url: str
    lab: Lab
    runs: list[Path]
    outside: Path
    link: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextlib.contextmanager
def _serve_in_thread(lab: Lab) -> Iterator[Any]:
    config = lab.config()
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
        await run_service(
            config,
            host="127.0.0.1",
            port=0,
            stop=box["stop"],
            install_signals=False,
            on_ready=lambda info: (box.__setitem__("info", info), ready.set()),
            facts_interval_s=0.5,
        )

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported by the fixture
            box["error"] = exc
            ready.set()

    thread = threading.Thread(target=target, daemon=True, name="fuzz-serve")
    thread.start()
    assert ready.wait(30), "the service did not start"
    if "error" in box:
        raise box["error"]
    try:
        yield box["info"], config
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(30)
        assert not thread.is_alive(), "the service did not stop"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("api-fuzz")
    lab = client_lab(root / "lab")
    runs = [
        lab.make_run("Run_2026-01-01"),
        lab.make_run("TestRun_2026-01-02"),
        lab.make_run("Run_bad", files={"notes_{{ x }}.txt": b"{{ y }}"}),
        lab.make_run(
            "Run_odd_ids",
            overrides=[{"id": ["a"], "problem_class": "leftover_jinja_marker"}, {"id": {"b": 1}, "revokes": []}],
        ),
    ]
    outside = root / "elsewhere" / "CONFOCAL_01" / "P" / "Runs" / "Run_x"
    outside.mkdir(parents=True)
    (outside / "secret.bin").write_bytes(b"not the lab's")
    link = lab.local_root / "CONFOCAL_01" / "P" / "Runs" / "Run_link"
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    with _serve_in_thread(lab) as (info, config):
        token = (config.state_dir / "api-token").read_text().strip()
        yield Served(info.base_url, token, info.login_url, lab, runs, outside, link)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.bin"], "something was written through the link"


def _sendable(value: str) -> bool:
    """A header value HTTP/1.1 can carry: printable ASCII, no surrounding white space."""
    return value == value.strip() and all(32 <= ord(ch) < 127 for ch in value)


def _assert_sane(response: Any, what: str) -> None:
    status = response.status_code
    assert status < 500, f"{what}: {status} {response.text[:500]}"
    body = response.text
    assert not any(marker in body for marker in TRACEBACK_MARKERS), f"{what}: a traceback in the answer: {body[:500]}"


def _operations(served: Served) -> list[Any]:
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    return [result.ok() for result in schema.get_all_operations() if result.ok().path != "/api/events"]


def test_every_operation_from_the_schema_answers_below_500(served: Served) -> None:
    operations = _operations(served)
    assert {op.path for op in operations} >= {"/api/jobs", "/api/enqueue", "/api/overrides", "/api/verify"}
    long_run = str(served.runs[0].parent / LONG_SEGMENT)
    real_paths = st.sampled_from([str(run) for run in served.runs] + [str(served.link), long_run, "/etc", ".."])

    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            label = f"api schema: {operation.method.upper()} {operation.path} ({mode.value})"

            @given(case=operation.as_strategy(generation_mode=mode), real=real_paths, use_real=st.booleans())
            @settings(FUZZ, max_examples=API_EXAMPLES)
            def check(case: Any, real: str, use_real: bool) -> None:
                if use_real and isinstance(case.body, dict) and "run_path" in case.body:
                    case.body["run_path"] = real  # reach past the path check into the routes
                if use_real and isinstance(case.query, dict) and "run_path" in case.query:
                    case.query["run_path"] = real
                response = case.call(base_url=served.url, headers=served.auth, timeout=30)
                CASES[label] += 1  # noqa: B023 (check() runs right below, inside this iteration)
                _assert_sane(response, f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}")
                if case.method.upper() == "POST":
                    anonymous = case.call(base_url=served.url, timeout=30)
                    CASES["api schema: the same POST without a token"] += 1
                    _assert_sane(anonymous, "anonymous " + case.formatted_path)
                    assert anonymous.status_code in (401, 413), (case.formatted_path, anonymous.status_code)

            try:
                check()
            except Unsatisfiable:
                # the schema leaves nothing to break (a free-text path segment, no parameters)
                assert mode is GenerationMode.NEGATIVE, label


SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "",
        "CONFOCAL_01",
        "FACS_02",
        "PROJ-1",
        "P",
        "Runs",
        "TestRuns",
        "Run_link",
        "Run_2026-01-01",
        "Run_x",
        "etc",
        "%2e%2e",
        "...",
        "..\\..",
        "\x00",
        "~",
        LONG_SEGMENT,
        "x" * 256,
    ]
)


def _build_path(served: Served, start: str, segments: list[str]) -> str:
    base = {
        "root": str(served.lab.local_root),
        "eq": str(served.lab.local_root / "CONFOCAL_01"),
        "run": str(served.runs[0]),
        "link": str(served.link),
        "outside": str(served.outside),
        "slash": "/",
        "relative": "",
    }[start]
    return "/".join([base, *segments]) if base else "/".join(segments)


def _is_a_run_inside(served: Served, path: str) -> bool:
    """Oracle: an absolute path without '..' that is a run folder inside an equipment root, links resolved."""
    if "\x00" in path or not os.path.isabs(path) or ".." in Path(path).parts:
        return False
    real = os.path.realpath(path)
    roots = [os.path.realpath(served.lab.local_root / eq) for eq in ("CONFOCAL_01", "FACS_02")]
    return (
        any(real.startswith(root + os.sep) for root in roots)
        and os.path.realpath(os.path.normpath(path)) == real
        and any(
            os.path.normpath(path).startswith(str(served.lab.local_root / eq) + os.sep)
            for eq in ("CONFOCAL_01", "FACS_02")
        )
    )


@given(
    start=st.sampled_from(["root", "eq", "run", "link", "outside", "slash", "relative"]),
    segments=st.lists(SEGMENTS, max_size=7),
    endpoint=st.sampled_from(RUN_PATH_ENDPOINTS),
)
@example(start="eq", segments=[LONG_SEGMENT], endpoint=("POST", "/api/enqueue"))
@example(start="eq", segments=["x" * 256], endpoint=("POST", "/api/overrides/abcdefgh/revoke"))
@ATTACKS
def test_generated_traversals_and_link_escapes_are_refused(
    served: Served, start: str, segments: list[str], endpoint: tuple[str, str]
) -> None:
    path = _build_path(served, start, segments)
    method, route = endpoint
    with httpx.Client(base_url=served.url, headers=served.auth, timeout=30, verify=client_tls()) as http:
        if method == "GET":
            response = http.get(route, params={"run_path": path})
        else:
            body = {"run_path": path}
            if route == "/api/overrides":
                body |= {"rule": "leftover_jinja_marker", "reason": "fuzz"}
            elif route.endswith("/revoke"):
                body |= {"reason": "fuzz"}
            response = http.post(route, json=body)
    inside = _is_a_run_inside(served, path)
    CASES[f"api attack: path traversal / link escape ({method} {route}, {'a run' if inside else 'refused'})"] += 1
    _assert_sane(response, f"{method} {route} {path!r}")
    if not inside:
        assert response.status_code in (400, 422), (path, response.status_code, response.text)
        if response.status_code == 400:
            assert response.json()["kind"] == "outside_roots", response.text


HEADER_TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=80)


@given(
    token=st.one_of(HEADER_TEXT, st.sampled_from(["", "Bearer", "Bearer ", "bearer x", "Basic Zm9v"])),
    scheme=st.sampled_from(["Bearer ", "bearer ", "Basic ", "", "Token "]),
    route=st.sampled_from(
        [
            "/api/enqueue",
            "/api/verify",
            "/api/overrides",
            "/api/login-codes",
            "/logout",
            "/api/jobs/0123456789abcdef/retry",
            "/api/overrides/x/revoke",
        ]
    ),
)
@ATTACKS
def test_generated_wrong_tokens_are_refused(served: Served, token: str, scheme: str, route: str) -> None:
    value = scheme + token
    if token == served.token or not _sendable(value):
        return  # the right token, or a header value no client can send
    with httpx.Client(base_url=served.url, timeout=30, verify=client_tls()) as http:
        response = http.post(route, json={"run_path": str(served.runs[0])}, headers={"Authorization": value})
    CASES["api attack: wrong tokens"] += 1
    _assert_sane(response, f"POST {route} with {value!r}")
    assert response.status_code in (401, 403), (value, response.status_code)


@pytest.fixture(scope="module")
def session(served: Served) -> str:
    code = urllib.parse.parse_qs(urllib.parse.urlparse(served.login_url).query)["code"][0]
    with httpx.Client(base_url=served.url, timeout=30, verify=client_tls()) as http:
        login = http.get("/login", params={"code": code})
    assert login.status_code == 303, login.text
    return login.headers["set-cookie"].split(";")[0].split("=", 1)[1]


@given(
    origin=st.one_of(
        st.none(),
        st.sampled_from(["null", "http://evil.example", "http://127.0.0.1:1", "https://127.0.0.1", "file://", ""]),
        HEADER_TEXT,
    ),
    route=st.sampled_from(["/api/enqueue", "/api/verify", "/api/overrides", "/api/login-codes", "/logout"]),
)
@ATTACKS
def test_generated_cross_origin_posts_with_a_session_cookie_are_refused(
    served: Served, session: str, origin: str | None, route: str
) -> None:
    port = served.url.rsplit(":", 1)[1]
    if origin in (served.url, f"http://localhost:{port}") or (origin is not None and not _sendable(origin)):
        return  # this server's own origins, or a header value no client can send
    headers = {} if origin is None else {"Origin": origin}
    with httpx.Client(base_url=served.url, cookies={COOKIE_NAME: session}, timeout=30, verify=client_tls()) as browser:
        response = browser.post(route, json={"run_path": str(served.runs[1])}, headers=headers)
    CASES["api attack: cross-origin posts with a session cookie"] += 1
    _assert_sane(response, f"POST {route} from {origin!r}")
    assert response.status_code == 403, (origin, route, response.status_code, response.text)


@given(
    size=st.integers(MAX_BODY_BYTES + 1, 4 * MAX_BODY_BYTES),
    chunked=st.booleans(),
    with_token=st.booleans(),
    route=st.sampled_from(["/api/enqueue", "/api/overrides", "/api/jobs", "/healthz", "/api/jobs/x/retry"]),
)
@settings(ATTACKS, max_examples=min(ATTACKS.max_examples, 60))
def test_generated_oversized_bodies_are_413(
    served: Served, size: int, chunked: bool, with_token: bool, route: str
) -> None:
    body = b'{"run_path": "' + b"a" * size + b'"}'
    content: Any = body
    if chunked:
        content = iter([body[i : i + 16384] for i in range(0, len(body), 16384)])  # no Content-Length
    method = "GET" if route in ("/api/jobs", "/healthz") else "POST"
    with httpx.Client(base_url=served.url, timeout=30, verify=client_tls()) as http:
        response = http.request(method, route, content=content, headers=served.auth if with_token else {})
    CASES["api attack: bodies over 64 KiB"] += 1
    _assert_sane(response, f"{method} {route} {size} bytes")
    assert response.status_code == 413, (route, size, chunked, response.status_code)
    assert response.json()["kind"] == "body_too_large"


def test_revoking_in_a_run_whose_overrides_have_odd_ids_is_404_not_500(served: Served) -> None:
    # The fuzzer's find (tests/fuzz/test_regressions.py) seen from the API: an override entry
    # whose id is a JSON list made revoke_override raise TypeError, a 500 here.
    run = next(run for run in served.runs if run.name == "Run_odd_ids")
    with httpx.Client(base_url=served.url, headers=served.auth, timeout=30, verify=client_tls()) as http:
        response = http.post("/api/overrides/a/revoke", json={"run_path": str(run), "reason": "wrong run"})
    _assert_sane(response, "revoke beside odd ids")
    assert response.status_code == 404 and response.json()["kind"] == "not_found", response.text
