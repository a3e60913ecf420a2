"""The upload page in a real browser (Debian's Chromium driven by Playwright) against gunicorn.

Every wait is bounded (at most 30 s). `test_page_uploads_40_mib_in_chunks` takes the screenshot
in the docs on every run; it replaces `docs/screenshots/upload-page.png` only with
`UPDATE_SCREENSHOTS=1` (`make screenshots`), so a test run does not leave the tree changed by a new
clock in the picture.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import time
from pathlib import Path

import pytest
import requests
from django.template.loader import render_to_string
from django.test import RequestFactory
from rest_framework.authtoken.models import Token

from uploads import storage
from uploads.models import UploadSession

from .conftest import requires_chromium

expect = pytest.importorskip("playwright.sync_api").expect

pytestmark = [pytest.mark.live, requires_chromium]
MiB = 1024 * 1024
KiB = 1024
API = "**/api/uploads/**"
INPUT = "[data-testid=file-input]"
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshots" / "upload-page.png"
LONG = 30_000  # ms: the bound for waits on a whole upload


@pytest.fixture
def pages(browser, start_gunicorn):
    """Logs in on fresh pages; closes them before the servers stop, so no keep-alive
    connection makes gunicorn wait out its graceful timeout."""
    opened = []

    class Pages:
        @staticmethod
        def login(server, **context_options):
            page = browser.new_page(**context_options)
            opened.append(page)
            page.goto(f"{server.url}/")
            page.fill("input[name=username]", "alice")
            page.fill("input[name=password]", "alice-password-1")
            page.click("[type=submit]")
            page.wait_for_selector(INPUT, state="attached")
            return page

    yield Pages
    for page in opened:
        page.context.close()


def _file(tmp_path, name: str, size: int) -> tuple[str, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def _row(name: str, state: str) -> str:
    return f"[data-testid=upload-row][data-filename='{name}'][data-state='{state}']"


def _upload_row(page, name: str):
    return page.locator(f"[data-testid=upload-row][data-filename='{name}']")


def _recent_row(page, name: str):
    return page.locator(f"[data-testid=recent-upload-row][data-filename='{name}']")


def _range(request) -> str:
    return request.headers.get("content-range") or ""


def _wait_until(page, condition, timeout: float = 10.0, message: str = "condition") -> None:
    """Poll a Python-side condition while Playwright keeps dispatching events (route handlers…)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {message}"
        page.wait_for_timeout(50)


class _Announcements:
    """Everything the page says in its live region, in order (a MutationObserver keeps it, so a
    message replaced a moment later is not missed)."""

    def __init__(self, page):
        self.page = page
        page.evaluate("""() => {
            window.__announced = [];
            const region = document.getElementById('upload-announcer');
            new MutationObserver(() => {
                if (region.textContent) window.__announced.push(region.textContent);
            }).observe(region, {childList: true, characterData: true, subtree: true});
        }""")

    def wait_for(self, text: str, timeout: float = 10_000) -> None:
        try:
            self.page.wait_for_function("text => window.__announced.some(said => said.includes(text))",
                                        arg=text, timeout=timeout)
        except Exception as exc:
            said = self.page.evaluate("window.__announced")
            raise AssertionError(f"never announced {text!r}; announced: {said!r}") from exc


def _partial_upload(server, user, name: str, data: bytes, sent: int) -> dict:
    """A partial upload made through the REST API, as another client (or an earlier visit) would."""
    headers = {"Authorization": f"Token {Token.objects.get_or_create(user=user)[0].key}"}
    created = requests.post(f"{server.url}/api/uploads/", json={"filename": name, "size": len(data)},
                            headers=headers, timeout=10)
    assert created.status_code == 201, created.text
    upload = created.json()
    stored = requests.put(upload["url"], data=data[:sent], timeout=10, headers={
        **headers, "Content-Type": "application/octet-stream",
        "Content-Range": f"bytes 0-{sent - 1}/{len(data)}",
    })
    assert stored.status_code == 200 and stored.json()["offset"] == sent, stored.text
    return stored.json()


# --- Uploading -------------------------------------------------------------------------------


def test_page_uploads_several_files(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    files = [_file(tmp_path, "a.bin", 3 * MiB + 17), _file(tmp_path, "b.bin", 1), _file(tmp_path, "empty.bin", 0)]
    page.set_input_files(INPUT, [path for path, _ in files])
    for path, _ in files:
        page.wait_for_selector(_row(os.path.basename(path), "complete"), timeout=LONG)
    for path, digest in files:
        upload = UploadSession.objects.get(filename=os.path.basename(path))
        assert upload.status == "complete" and upload.sha256 == digest
    # The table refreshes by itself once uploads complete.
    expect(_recent_row(page, "a.bin")).to_have_attribute("data-status", "complete")


def test_page_uploads_40_mib_in_chunks(pages, start_gunicorn, user, tmp_path):
    """Several 4 MiB chunks, the stored SHA-256 matches; half-way it shows speed and time left,
    and the documentation's screenshot is taken right there."""
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(4 * MiB))
    # For the screenshot: a partial upload from an earlier visit, with its resume hint.
    holiday = os.urandom(3 * MiB)
    _partial_upload(server, user, "holiday-video.mov", holiday, sent=len(holiday) * 37 // 100 + 1)
    page = pages.login(server, viewport={"width": 1100, "height": 800})

    held, ranges = [], []
    page.on("request", lambda request: request.method == "PUT" and ranges.append(_range(request)))

    def hold_the_middle(route):
        if route.request.method == "PUT" and _range(route.request).startswith(f"bytes {20 * MiB}-") and not held:
            held.append(route)  # answered below, after the screenshot
            return
        route.continue_()

    # Routing hands every body to Playwright, which costs seconds for 40 MiB: only the first
    # half is routed (unrouting earlier would release the held chunk).
    page.route(API, hold_the_middle)
    big, digest = _file(tmp_path, "dataset-2024.tar", 40 * MiB)
    notes, notes_digest = _file(tmp_path, "notes.txt", 300 * KiB)
    page.set_input_files(INPUT, [big, notes])

    row = _upload_row(page, "dataset-2024.tar")
    expect(row.get_by_test_id("upload-bytes")).to_have_text("20.0 MiB of 40.0 MiB (50%)", timeout=LONG)
    expect(row.get_by_role("progressbar")).to_have_attribute("aria-valuenow", "50")
    expect(row.get_by_test_id("upload-speed")).to_have_text(re.compile(r"^\d+(\.\d)? [KMG]iB/s$"))
    expect(row.get_by_test_id("upload-eta")).to_have_text(re.compile(r"^\d+ (s|min) left$"))
    expect(row.get_by_test_id("upload-state")).to_have_text("Uploading…")
    page.wait_for_selector(_row("notes.txt", "complete"), timeout=LONG)
    expect(_recent_row(page, "holiday-video.mov").get_by_test_id("resume-hint")).to_be_visible()
    _wait_until(page, lambda: held, message="the chunk at 20 MiB")
    page.get_by_role("button", name="Refresh recent uploads").click()
    expect(_recent_row(page, "dataset-2024.tar")).to_contain_text("50%")
    page.mouse.move(0, 0)  # no hover highlight in the picture
    screenshot = SCREENSHOT if os.environ.get("UPDATE_SCREENSHOTS") == "1" else tmp_path / SCREENSHOT.name
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(screenshot), full_page=True, animations="disabled", caret="hide")
    assert screenshot.stat().st_size > 10_000

    held[0].continue_()
    page.unroute(API)
    page.wait_for_selector(_row("dataset-2024.tar", "complete"), timeout=LONG)
    expect(row.get_by_test_id("upload-eta")).to_be_hidden()
    expect(row.get_by_test_id("upload-speed")).to_have_text("")
    chunks = [f"bytes {start}-{start + 4 * MiB - 1}/{40 * MiB}" for start in range(0, 40 * MiB, 4 * MiB)]
    assert [r for r in ranges if r.endswith(f"/{40 * MiB}")] == chunks  # ten chunks, in order, none twice
    upload = UploadSession.objects.get(filename="dataset-2024.tar")
    assert upload.status == "complete" and upload.size == 40 * MiB and upload.sha256 == digest
    assert UploadSession.objects.get(filename="notes.txt").sha256 == notes_digest
    assert SCREENSHOT.stat().st_size > 10_000


def test_page_retries_after_a_network_error(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    failed = []

    def drop_second_chunk(route):
        if route.request.method == "PUT" and "bytes 1048576-" in _range(route.request) and not failed:
            failed.append(_range(route.request))
            return route.abort("connectionreset")
        return route.continue_()

    page.route(API, drop_second_chunk)
    path, digest = _file(tmp_path, "flaky.bin", 3 * MiB)
    page.set_input_files(INPUT, path)
    page.wait_for_selector(_row("flaky.bin", "complete"), timeout=LONG)
    assert failed, "the second chunk was dropped once"
    assert UploadSession.objects.get(filename="flaky.bin").sha256 == digest


def test_page_waits_while_offline_and_completes_back_online(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    held = []

    def hold_fourth_chunk(route):
        if route.request.method == "PUT" and _range(route.request).startswith(f"bytes {3 * MiB}-") and not held:
            held.append(route)  # in flight when the network goes; never answered
            return
        route.continue_()

    page.route(API, hold_fourth_chunk)
    path, digest = _file(tmp_path, "offline.bin", 6 * MiB)
    page.set_input_files(INPUT, path)
    row = _upload_row(page, "offline.bin")
    _wait_until(page, lambda: held, message="the chunk at 3 MiB")

    puts = []
    page.on("request", lambda request: request.method == "PUT" and puts.append(_range(request)))
    page.context.set_offline(True)
    expect(row).to_have_attribute("data-state", "offline")
    expect(row.get_by_test_id("upload-state")).to_have_text("Offline – waiting for the network…")
    expect(page.get_by_test_id("upload-notice")).to_contain_text("You are offline")
    expect(row.get_by_test_id("upload-eta")).to_be_hidden()
    bytes_shown = row.get_by_test_id("upload-bytes").text_content()
    assert bytes_shown == "3.0 MiB of 6.0 MiB (50%)"
    page.wait_for_timeout(1000)  # progress stays put: nothing is sent while offline
    assert row.get_by_test_id("upload-bytes").text_content() == bytes_shown
    assert row.get_attribute("data-state") == "offline"
    assert puts == [], puts
    assert UploadSession.objects.get(filename="offline.bin").offset == 3 * MiB

    page.context.set_offline(False)
    page.wait_for_selector(_row("offline.bin", "complete"), timeout=LONG)
    assert puts[0].startswith(f"bytes {3 * MiB}-"), puts
    expect(page.get_by_test_id("upload-notice")).to_contain_text("Back online")
    upload = UploadSession.objects.get(filename="offline.bin")
    assert upload.status == "complete" and upload.sha256 == digest


def test_page_resumes_after_reload_from_the_server_offset(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    path, digest = _file(tmp_path, "resume.bin", 6 * MiB)

    # Hold every chunk after the second, so the first page stops part-way, then leave the page.
    page.route(API, lambda route: route.abort("timedout")
               if route.request.method == "PUT" and not _range(route.request).startswith(("bytes 0-", "bytes 1048576-"))
               else route.continue_())
    page.set_input_files(INPUT, path)
    page.wait_for_function("() => document.querySelector('[data-testid=upload-row]')?.dataset.state === 'retrying'", timeout=LONG)
    upload = UploadSession.objects.get(filename="resume.bin")
    assert upload.offset == 2 * MiB
    page.close()

    # A fresh page knows nothing; choosing the same file asks the server and continues from 2 MiB.
    page = pages.login(server)
    ranges = []
    page.on("request", lambda request: request.method == "PUT" and ranges.append(_range(request)))
    page.set_input_files(INPUT, path)
    page.wait_for_selector(_row("resume.bin", "complete"), timeout=LONG)
    assert ranges[0].startswith(f"bytes {2 * MiB}-"), ranges
    upload.refresh_from_db()
    assert upload.status == "complete" and upload.sha256 == digest
    assert UploadSession.objects.filter(filename="resume.bin").count() == 1


# --- Controls --------------------------------------------------------------------------------


def test_page_pause_resume_and_cancel(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    announced = _Announcements(page)
    # Only first chunks get through until the gate opens; the others hang, like a slow link.
    gate = {"open": False}
    page.route(API, lambda route: route.continue_() if gate["open"] or route.request.method != "PUT"
               or _range(route.request).startswith("bytes 0-") else None)
    paused, digest = _file(tmp_path, "pause.bin", 4 * MiB)
    cancelled, _ = _file(tmp_path, "cancel.bin", 3 * MiB)
    page.set_input_files(INPUT, [paused, cancelled])
    pause_row, cancel_row = _upload_row(page, "pause.bin"), _upload_row(page, "cancel.bin")
    expect(pause_row.get_by_test_id("upload-bytes")).to_have_text(re.compile(r"^1\.0 MiB of"), timeout=LONG)
    expect(cancel_row.get_by_test_id("upload-bytes")).to_have_text(re.compile(r"^1\.0 MiB of"), timeout=LONG)

    # Cancel: the row goes, and the page deletes the upload on the server (row and partial data).
    upload = UploadSession.objects.get(filename="cancel.bin")
    assert upload.offset == MiB and storage.partial_path(upload.pk).exists()
    cancel_row.get_by_role("button", name="Cancel cancel.bin").click()
    expect(cancel_row).to_have_count(0)
    announced.wait_for("cancel.bin cancelled.")
    _wait_until(page, lambda: not UploadSession.objects.filter(pk=upload.pk).exists(), message="the DELETE")
    assert not storage.partial_path(upload.pk).exists()
    expect(_recent_row(page, "cancel.bin")).to_have_count(0)

    # Pause: nothing moves, no speed or time left; Resume goes on from the server's offset.
    pause_row.get_by_role("button", name="Pause pause.bin").click()
    expect(pause_row).to_have_attribute("data-state", "paused")
    expect(pause_row.get_by_test_id("upload-state")).to_have_text("Paused")
    expect(pause_row.get_by_test_id("upload-eta")).to_be_hidden()
    expect(pause_row.get_by_test_id("upload-speed")).to_have_text("")
    announced.wait_for("pause.bin paused.")
    gate["open"] = True
    pause_row.get_by_role("button", name="Resume pause.bin").click()
    page.wait_for_selector(_row("pause.bin", "complete"), timeout=LONG)
    announced.wait_for("pause.bin uploaded.")
    assert UploadSession.objects.get(filename="pause.bin").sha256 == digest
    expect(page.get_by_test_id("upload-row")).to_have_count(1)


def test_page_runs_at_most_three_uploads_at_once(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(256 * KiB))
    page = pages.login(server)
    state = {"in_flight": 0, "peak": 0, "puts": 0}
    first_wave = []

    def forward(route):
        response = route.fetch()
        state["in_flight"] -= 1
        route.fulfill(response=response)

    def count_puts(route):
        if route.request.method != "PUT":
            return route.continue_()
        state["in_flight"] += 1
        state["puts"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        if len(first_wave) < 3:
            first_wave.append(route)  # held until the test has looked at the page
            return None
        return forward(route)

    page.route(API, count_puts)
    files = [_file(tmp_path, f"many-{n}.bin", 1 * MiB + n) for n in range(6)]
    page.set_input_files(INPUT, [path for path, _ in files])

    # Three PUTs wait at once; the other three files wait for a slot and send nothing.
    _wait_until(page, lambda: len(first_wave) == 3, message="three PUTs at once")
    expect(page.locator("[data-testid=upload-row][data-state=queued]")).to_have_count(3)
    expect(page.locator("[data-testid=upload-row][data-state=uploading]")).to_have_count(3)
    expect(page.locator("[data-testid=upload-row][data-state=queued] [data-testid=upload-state]").first).to_have_text("Waiting…")
    page.wait_for_timeout(400)
    assert state["in_flight"] == 3 and state["puts"] == 3, state

    for route in first_wave:
        forward(route)
    for path, _ in files:
        page.wait_for_selector(_row(os.path.basename(path), "complete"), timeout=LONG)
    assert state["peak"] == 3, state
    assert state["puts"] == sum(math.ceil((MiB + n) / (256 * KiB)) for n in range(6)), state
    for path, digest in files:
        assert UploadSession.objects.get(filename=os.path.basename(path)).sha256 == digest


# --- Limits and errors -----------------------------------------------------------------------


def test_page_refuses_too_large_files_and_shows_final_errors(pages, start_gunicorn, user, tmp_path):
    """Too large: refused before a byte is sent, naming the limit. Failed for good on the server
    (410): the server's own words, no retry. Other files go on."""
    server = start_gunicorn(UPLOADS_MAX_SIZE=str(1 * MiB), UPLOADS_CHUNK_SIZE=str(256 * KiB))
    page = pages.login(server)
    announced = _Announcements(page)
    sent = []
    page.on("request", lambda request: request.method in ("POST", "PUT") and "/api/uploads" in request.url
            and sent.append((request.method, _range(request), request.post_data_buffer or b"")))
    detail = "This upload expired on the server. Choose the file again to start over."

    def gone(route):  # every chunk of the 512 KiB file
        if route.request.method == "PUT" and _range(route.request).endswith(f"/{512 * KiB}"):
            return route.fulfill(status=410, json={"detail": detail, "code": "gone"})
        return route.continue_()

    page.route(API, gone)
    expect(page.get_by_test_id("drop-zone")).to_contain_text("Up to 1.0 MiB per file.")
    huge, _ = _file(tmp_path, "huge.bin", 2 * MiB)
    expired, _ = _file(tmp_path, "gone.bin", 512 * KiB)
    fits, digest = _file(tmp_path, "fits.bin", 1 * MiB)
    page.set_input_files(INPUT, [huge, expired, fits])

    huge_row = _upload_row(page, "huge.bin")
    expect(huge_row).to_have_attribute("data-state", "error")
    message = "The file is too large (2.0 MiB); the limit is 1.0 MiB."
    expect(huge_row.get_by_test_id("upload-error")).to_have_text(message)
    expect(huge_row.get_by_test_id("resume-button")).to_be_hidden()  # choosing it again cannot help
    announced.wait_for(f"huge.bin failed: {message}")

    gone_row = _upload_row(page, "gone.bin")
    expect(gone_row).to_have_attribute("data-state", "error")
    expect(gone_row.get_by_test_id("upload-state")).to_have_text("Failed")
    expect(gone_row.get_by_test_id("upload-error")).to_have_text(detail)
    expect(gone_row.get_by_test_id("resume-button")).to_be_hidden()
    announced.wait_for(f"gone.bin failed: {detail}")

    page.wait_for_selector(_row("fits.bin", "complete"), timeout=LONG)  # a file at the limit goes through
    assert UploadSession.objects.get(filename="fits.bin").sha256 == digest
    assert not UploadSession.objects.filter(filename="huge.bin").exists()
    assert all(b"huge.bin" not in body and not rng.endswith(f"/{2 * MiB}") for _, rng, body in sent), sent
    gone_puts = [rng for method, rng, _ in sent if method == "PUT" and rng.endswith(f"/{512 * KiB}")]
    assert gone_puts == [f"bytes 0-{256 * KiB - 1}/{512 * KiB}"], "a 410 is final: no retry"


# --- Keyboard and screen readers -------------------------------------------------------------


def test_page_works_with_the_keyboard_and_announces_changes(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    gate = {"open": False}
    page.route(API, lambda route: route.continue_() if gate["open"] or route.request.method != "PUT"
               or _range(route.request).startswith("bytes 0-") else None)

    # Tab from the top of the page to the file input: it is reachable, and named by its label.
    chooser = page.get_by_role("button", name="Drop files here or choose files", exact=True)
    for _ in range(10):
        page.keyboard.press("Tab")
        if chooser.evaluate("element => element === document.activeElement"):
            break
    expect(chooser).to_be_focused()
    expect(chooser).to_have_accessible_description(re.compile(r"Up to .+ per file\. Interrupted uploads continue"))
    expect(page.locator("input[type=file]")).to_have_count(1)  # the no-JavaScript form is not there
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Refresh recent uploads")).to_be_focused()

    path, digest = _file(tmp_path, "keys.bin", 3 * MiB)
    chooser.set_input_files(path)
    row = _upload_row(page, "keys.bin")
    expect(row.get_by_test_id("upload-bytes")).to_have_text(re.compile(r"^1\.0 MiB of"), timeout=LONG)
    progress = page.get_by_role("progressbar", name="keys.bin")
    expect(progress).to_have_attribute("aria-valuenow", "33")
    expect(progress).to_have_attribute("aria-valuetext", "33% (1.0 MiB of 3.0 MiB)")

    # The row's buttons come right after the file input, named after the file.
    chooser.focus()
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Pause keys.bin")).to_be_focused()
    page.keyboard.press("Enter")
    expect(row).to_have_attribute("data-state", "paused")
    expect(page.get_by_role("button", name="Resume keys.bin")).to_be_focused()  # focus stays in the row
    expect(page.get_by_test_id("upload-announcer")).to_have_text("keys.bin paused.")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Cancel keys.bin")).to_be_focused()
    page.keyboard.press("Shift+Tab")

    gate["open"] = True
    page.keyboard.press("Enter")
    page.wait_for_selector(_row("keys.bin", "complete"), timeout=LONG)
    expect(page.get_by_test_id("upload-announcer")).to_have_text("keys.bin uploaded.")
    expect(page.get_by_role("link", name="Download keys.bin").first).to_be_focused()
    assert UploadSession.objects.get(filename="keys.bin").sha256 == digest

    # Every control on the page has an accessible name.
    controls = page.locator("a[href], button, input:not([type=hidden]), progress, select, textarea")
    visible = [control for control in controls.all() if control.is_visible()]
    assert len(visible) >= 8
    for control in visible:
        expect(control).to_have_accessible_name(re.compile(r"\S"))


# --- Recent uploads --------------------------------------------------------------------------


def test_recent_uploads_offer_resume_hints_and_refresh(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    path, digest = _file(tmp_path, "report.pdf", 3 * MiB)
    data = Path(path).read_bytes()
    sent = len(data) * 37 // 100 + 1
    _partial_upload(server, user, "report.pdf", data, sent=sent)
    page = pages.login(server)

    row = _recent_row(page, "report.pdf")
    expect(row).to_have_attribute("data-status", "partial")
    expect(row).to_contain_text("37%")
    hint = page.get_by_role("button", name="Choose “report.pdf” again to resume from 37%")
    expect(hint).to_be_visible()

    # The hint opens the file picker; the same file continues from the server's offset.
    ranges = []
    page.on("request", lambda request: request.method == "PUT" and ranges.append(_range(request)))
    with page.expect_file_chooser(timeout=10_000) as chooser:
        hint.click()
    chooser.value.set_files(path)
    page.wait_for_selector(_row("report.pdf", "complete"), timeout=LONG)
    assert ranges[0].startswith(f"bytes {sent}-"), ranges
    assert UploadSession.objects.get(filename="report.pdf").sha256 == digest
    # Refreshed after the upload completed: complete, with a download link instead of the hint.
    expect(row).to_have_attribute("data-status", "complete")
    expect(row.get_by_role("link", name="Download report.pdf")).to_be_visible()
    expect(hint).to_have_count(0)

    # An upload made elsewhere shows up on Refresh.
    other = os.urandom(2 * MiB)
    _partial_upload(server, user, "from-the-cli.iso", other, sent=MiB // 2)
    page.wait_for_timeout(300)
    expect(_recent_row(page, "from-the-cli.iso")).to_have_count(0)
    page.get_by_role("button", name="Refresh recent uploads").click()
    expect(page.get_by_role("button", name="Choose “from-the-cli.iso” again to resume from 25%")).to_be_visible()


def test_page_accepts_dropped_files(pages, start_gunicorn, user):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = pages.login(server)
    transfer = page.evaluate_handle(
        """() => {
            const transfer = new DataTransfer();
            const bytes = new Uint8Array(2 * 1024 * 1024 + 5).map((_, i) => i % 251);
            transfer.items.add(new File([bytes], 'dropped.bin'));
            return transfer;
        }"""
    )
    page.dispatch_event("[data-testid=drop-zone]", "dragover", {"dataTransfer": transfer})
    page.dispatch_event("[data-testid=drop-zone]", "drop", {"dataTransfer": transfer})
    page.wait_for_selector(_row("dropped.bin", "complete"), timeout=LONG)
    expected = bytes(i % 251 for i in range(2 * MiB + 5))
    assert UploadSession.objects.get(filename="dropped.bin").sha256 == hashlib.sha256(expected).hexdigest()


# --- Without JavaScript ----------------------------------------------------------------------


def test_page_without_javascript_uploads_with_the_plain_form(pages, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_MAX_SIZE=str(1 * MiB))
    page = pages.login(server, java_script_enabled=False)
    # What needs scripts is hidden; a plain form with a labelled file input is shown instead.
    expect(page.get_by_test_id("drop-zone")).to_be_hidden()
    expect(page.get_by_test_id("recent-uploads")).to_be_hidden()
    field = page.get_by_label("Files to upload", exact=True)
    expect(field).to_be_visible()
    path, digest = _file(tmp_path, "plain.bin", 200 * KiB)
    field.set_input_files(path)
    page.get_by_role("button", name="Upload", exact=True).click()

    page.wait_for_url(f"{server.url}/", timeout=LONG)  # 303 back to the page
    # The view's wording is its own; it must be a success (status), not an error (alert).
    expect(page.get_by_test_id("messages").get_by_role("status")).to_be_visible()
    expect(page.get_by_test_id("messages").get_by_role("alert")).to_have_count(0)
    upload = UploadSession.objects.get(filename="plain.bin")
    assert upload.status == "complete" and upload.sha256 == digest

    # Too large: the page comes back with the reason as an alert, tied to the field.
    huge, _ = _file(tmp_path, "huge.bin", 2 * MiB)
    page.get_by_label("Files to upload", exact=True).set_input_files(huge)
    page.get_by_role("button", name="Upload", exact=True).click()
    error = page.get_by_test_id("form-error")
    expect(error).to_have_attribute("role", "alert")
    expect(error).to_contain_text("huge.bin")
    expect(page.get_by_label("Files to upload", exact=True)).to_have_accessible_description(re.compile("huge.bin"))
    assert not UploadSession.objects.filter(filename="huge.bin").exists()


def test_page_shows_messages_and_form_errors_accessibly(browser, db, user):
    """The template alone (the view that sets `form_error` re-renders it): messages by level in
    status/alert roles, the form's error as an alert tied to the file input."""
    from django.contrib.messages import constants
    from django.contrib.messages.storage.fallback import FallbackStorage

    request = RequestFactory().get("/")
    request.user = user
    request.session = {}
    request._messages = FallbackStorage(request)
    request._messages.add(constants.SUCCESS, "Uploaded plain.bin.")
    request._messages.add(constants.ERROR, "Could not store other.bin.")
    html = render_to_string("uploads/index.html", {
        "config": {}, "max_size": MiB, "form_error": "The file is larger than 1.0 MiB.",
    }, request=request)
    assert 'action="/upload/"' in html

    page = browser.new_page(java_script_enabled=False)
    try:
        page.set_content(html)
        expect(page.get_by_role("status").filter(has_text="Uploaded plain.bin.")).to_have_count(1)
        expect(page.get_by_role("alert").filter(has_text="Could not store other.bin.")).to_have_count(1)
        expect(page.get_by_role("alert").filter(has_text="The file is larger than 1.0 MiB.")).to_be_visible()
        field = page.get_by_label("Files to upload", exact=True)
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(field).to_have_accessible_description(re.compile(r"The file is larger than 1\.0 MiB\."))
        expect(page.locator("form[enctype='multipart/form-data'] input[name=csrfmiddlewaretoken]")).to_have_count(1)
        expect(page.locator("input[type=file][name=file][multiple]")).to_have_count(1)
    finally:
        page.context.close()
