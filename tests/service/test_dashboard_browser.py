"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by playwright) against the real service.

Each test serves the real app under uvicorn on 127.0.0.1 (the ``serving``
fixture), logs a browser in through the one-time login address ``serve``
prints, and watches the open page change without a reload while real jobs
run on a mount-transport lab. Chromium missing is a broken setup
(scripts/bootstrap.sh installs it), so these tests fail rather than skip.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from exlab_wizard.config import Config, parse_config
from tests.service.conftest import Service, serving

CHROMIUM = os.environ.get("EXLAB_CHROMIUM", "/usr/bin/chromium")
#: Generous: a slow CI machine; every wait ends as soon as the page shows the state.
WAIT_MS = 20_000


def lab_config(lab: Any, **sync: Any) -> Config:
    """The fixture's two mount equipment; CONFOCAL_01 limited to 8 Mbps so a 6 MiB run takes about 6 s."""
    data = {
        "equipment": [
            {
                "id": "CONFOCAL_01",
                "label": "Zeiss LSM 980",
                "local_root": str(lab.local_root),
                "transport": {
                    "type": "mount",
                    "mount_path": str(lab.nas / "CONFOCAL_01"),
                    "bandwidth": {"upload_mbps": 8},
                },
            },
            {
                "id": "FACS_02",
                "local_root": str(lab.local_root),
                "transport": {"type": "mount", "mount_path": str(lab.nas / "FACS_02")},
            },
        ],
        "sync": {"backoff_s": [0.01], "scan_interval_s": 0.2, "max_parallel_jobs": 1, **sync},
        "state_dir": str(lab.state),
    }
    return parse_config(data)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/bootstrap.sh (it installs Debian's chromium)")
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest.fixture
async def svc(lab: Any) -> AsyncIterator[Service]:
    async with serving(lab_config(lab), lab) as service:
        yield service


async def logged_in_page(browser: Browser, svc: Service) -> Page:
    """A page logged in through the one-time address, marked so that a reload would be noticed."""
    page = await (await browser.new_context()).new_page()
    await page.goto(svc.info.login_url)
    assert page.url == svc.url + "/"
    await expect(page.locator("#session")).to_contain_text("You are logged in")
    await expect(page.locator("#live-status")).to_have_text("Live", timeout=WAIT_MS)
    await page.evaluate("window.__sameDocument = true")
    return page


async def still_same_document(page: Page) -> None:
    assert await page.evaluate("window.__sameDocument === true"), "the page was reloaded"


def count(page: Page, equipment: str, state: str) -> Any:
    return page.locator(f'article[aria-label="{equipment}"] td[data-state="{state}"]')


async def test_a_run_moves_from_queued_to_verified_on_the_open_page(browser: Browser, svc: Service) -> None:
    page = await logged_in_page(browser, svc)
    assert svc.token not in await page.content()
    # 6 MiB: a progress message each MiB, so the rate (measured between two) shows for seconds, not one poll.
    big = svc.lab.make_run("Run_big", {"image.czi": os.urandom(6 * 1024 * 1024)})
    small = svc.lab.make_run("Run_small", {"data.bin": b"x" * 1000})
    for run in (big, small):
        assert (await svc.post("/api/enqueue", {"run_path": str(run)})).json()["state"] == "queued"

    # One job at a time and 8 Mbps: the small run waits queued while the big one is copied.
    await expect(count(page, "CONFOCAL_01", "queued")).to_have_text("1", timeout=WAIT_MS)
    row = page.locator("#part-running tr", has_text="Run_big")
    await expect(row).to_be_visible(timeout=WAIT_MS)
    await page.wait_for_function(
        "() => { const b = document.querySelector('#part-running progress'); return b && b.value > 0; }",
        timeout=WAIT_MS,
    )
    await expect(row.locator('[data-field="rate"]')).to_contain_text("/s", timeout=WAIT_MS)
    # The section drawn again by the server (after any transition) keeps the rate the feed measured.
    assert "/s</td>" in (await svc.http.get("/partials/running")).text
    await expect(count(page, "CONFOCAL_01", "verified")).to_have_text("2", timeout=WAIT_MS)
    await expect(count(page, "CONFOCAL_01", "queued")).to_have_text("0")
    await expect(page.locator("#part-running")).to_contain_text("Nothing is transferring")
    await still_same_document(page)
    # The chart was drawn again with the verified bytes (the server's SVG, not a script's).
    svg = (await svc.http.get("/charts/verified.svg")).text
    assert "6.0 MiB in all" in svg


async def test_a_failed_jobs_retry_button_re_arms_it(browser: Browser, svc: Service) -> None:
    run = svc.lab.make_run("Run_conflict", {"data.bin": b"y" * 1000}, equipment="FACS_02")
    # Foreign data in the run's NAS folder (its name written to be dangerous in a page): refused, FAILED.
    foreign = svc.lab.nas_copy(run, "FACS_02") / "<img src=x onerror=window.__pwned=1>"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("someone else's file")
    page = await logged_in_page(browser, svc)
    job_id = (await svc.post("/api/enqueue", {"run_path": str(run)})).json()["job_id"]

    failed = page.locator(f'#part-failed tr[data-job-id="{job_id}"]')
    await expect(failed).to_contain_text("already holds files that are not part of this run", timeout=WAIT_MS)
    await failed.get_by_text("Details").click()
    await expect(failed).to_contain_text("<img src=x onerror=window.__pwned=1>")  # shown as text
    assert await page.evaluate("window.__pwned === undefined")

    # A second browser without a session: read-only banner, a disabled button, no token anywhere.
    anonymous = await (await browser.new_context()).new_page()
    await anonymous.goto(svc.url + "/")
    await expect(anonymous.locator("#session")).to_contain_text("Read-only")
    await expect(anonymous.locator(f'button[data-retry="{job_id}"]')).to_be_disabled()
    assert svc.token not in await anonymous.content()

    foreign.unlink()  # the operator moved the foreign file away
    await failed.get_by_role("button", name="Retry").click()
    await expect(page.locator("#message")).to_contain_text("Re-armed", timeout=WAIT_MS)
    await expect(failed).to_have_count(0, timeout=WAIT_MS)
    await expect(count(page, "FACS_02", "verified")).to_have_text("1", timeout=WAIT_MS)
    await expect(count(page, "FACS_02", "failed")).to_have_text("0")
    assert (svc.lab.nas_copy(run, "FACS_02") / "data.bin").read_bytes() == b"y" * 1000
    await still_same_document(page)


async def test_a_blocked_run_shows_its_finding_and_an_override_from_the_page_lets_it_sync(
    browser: Browser, svc: Service
) -> None:
    assert svc.info.ctx.watcher is not None, "serve runs the completion watcher: it lists blocked runs"
    page = await logged_in_page(browser, svc)
    run = svc.lab.make_run("Run_{{sample}}", {"data.bin": b"z" * 500}, equipment="FACS_02")
    (run / "acquisition_complete.flag").write_text("")  # finished: the watcher gates it, and it is blocked

    blocked = page.locator(f'#part-blocked article[data-run-path="{run}"]')
    await expect(blocked).to_contain_text("leftover jinja marker", timeout=WAIT_MS)
    await expect(blocked).to_contain_text("Run_{{sample}}")
    await expect(blocked.locator("select[name=rule]")).to_have_value("leftover_jinja_marker")
    await blocked.locator("textarea[name=reason]").fill("the instrument writes {{sample}} literally")
    await blocked.get_by_role("button", name="Add override and sync").click()
    await expect(page.locator("#message")).to_contain_text("queued to sync", timeout=WAIT_MS)
    await expect(blocked).to_have_count(0, timeout=WAIT_MS)
    await expect(count(page, "FACS_02", "verified")).to_have_text("1", timeout=WAIT_MS)
    overrides = json.loads((run / ".exlab-wizard" / "creation.json").read_text())["validation_overrides"]
    assert [(o["problem_class"], o["reason"], o["expires_at"]) for o in overrides] == [
        ("leftover_jinja_marker", "the instrument writes {{sample}} literally", None)
    ]
    assert (svc.lab.nas_copy(run, "FACS_02") / "data.bin").exists()
    await still_same_document(page)


async def test_the_page_and_its_parts_render_without_a_browser(svc: Service) -> None:
    page = await svc.http.get("/")
    assert page.status_code == 200 and page.headers["cache-control"] == "no-store"
    assert "Read-only" in page.text and svc.token not in page.text
    for name in ("equipment", "totals", "running", "failed", "blocked"):
        part = await svc.http.get(f"/partials/{name}")
        assert part.status_code == 200 and f'id="part-{name}"' in part.text
    assert (await svc.http.get("/partials/nope")).status_code == 404
    chart = await svc.http.get("/charts/verified.svg")
    assert chart.headers["content-type"].startswith("image/svg+xml")
    assert "Nothing verified in the last 24 hours" in chart.text
    script = await svc.http.get("/static/dashboard.js")
    assert script.status_code == 200
    for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write"):
        assert sink not in script.text, sink
