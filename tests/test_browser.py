"""The upload page in a real browser (Debian's Chromium driven by Playwright) against gunicorn."""
from __future__ import annotations

import hashlib
import os

import pytest

from uploads.models import UploadSession

from .conftest import requires_chromium

pytestmark = [pytest.mark.live, requires_chromium]
MiB = 1024 * 1024


def _login(browser, server):
    page = browser.new_page()
    page.goto(f"{server.url}/")
    page.fill("input[name=username]", "alice")
    page.fill("input[name=password]", "alice-password-1")
    page.click("[type=submit]")
    page.wait_for_selector("[data-testid=file-input]", state="attached")
    return page


def _file(tmp_path, name: str, size: int) -> tuple[str, str]:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return str(path), hashlib.sha256(path.read_bytes()).hexdigest()


def _row(name: str, state: str) -> str:
    return f"[data-testid=upload-row][data-filename='{name}'][data-state='{state}']"


def test_page_uploads_several_files(browser, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = _login(browser, server)
    files = [_file(tmp_path, "a.bin", 3 * MiB + 17), _file(tmp_path, "b.bin", 1), _file(tmp_path, "empty.bin", 0)]
    page.set_input_files("[data-testid=file-input]", [path for path, _ in files])
    for path, _ in files:
        page.wait_for_selector(_row(os.path.basename(path), "complete"), timeout=30_000)
    for path, digest in files:
        upload = UploadSession.objects.get(filename=os.path.basename(path))
        assert upload.status == "complete" and upload.sha256 == digest
    page.wait_for_selector("[data-testid=recent-uploads] >> text=a.bin")


def test_page_retries_after_a_network_error(browser, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = _login(browser, server)
    failed = []

    def drop_second_chunk(route):
        if route.request.method == "PUT" and "bytes 1048576-" in (route.request.headers.get("content-range") or "") and not failed:
            failed.append(route.request.headers["content-range"])
            return route.abort("connectionreset")
        return route.continue_()

    page.route("**/api/uploads/**", drop_second_chunk)
    path, digest = _file(tmp_path, "flaky.bin", 3 * MiB)
    page.set_input_files("[data-testid=file-input]", path)
    page.wait_for_selector(_row("flaky.bin", "complete"), timeout=30_000)
    assert failed, "the second chunk was dropped once"
    assert UploadSession.objects.get(filename="flaky.bin").sha256 == digest


def test_page_resumes_after_reload_from_the_server_offset(browser, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = _login(browser, server)
    path, digest = _file(tmp_path, "resume.bin", 6 * MiB)

    # Hold every chunk after the second, so the first page stops part-way, then leave the page.
    page.route("**/api/uploads/**", lambda route: route.abort("timedout")
               if route.request.method == "PUT" and not (route.request.headers.get("content-range") or "").startswith(("bytes 0-", "bytes 1048576-"))
               else route.continue_())
    page.set_input_files("[data-testid=file-input]", path)
    page.wait_for_function("() => document.querySelector('[data-testid=upload-row]')?.dataset.state === 'retrying'", timeout=30_000)
    upload = UploadSession.objects.get(filename="resume.bin")
    assert upload.offset == 2 * MiB
    page.close()

    # A fresh page knows nothing; choosing the same file asks the server and continues from 2 MiB.
    page = _login(browser, server)
    ranges = []
    page.on("request", lambda request: request.method == "PUT" and ranges.append(request.headers.get("content-range")))
    page.set_input_files("[data-testid=file-input]", path)
    page.wait_for_selector(_row("resume.bin", "complete"), timeout=30_000)
    assert ranges[0].startswith(f"bytes {2 * MiB}-"), ranges
    upload.refresh_from_db()
    assert upload.status == "complete" and upload.sha256 == digest
    assert UploadSession.objects.filter(filename="resume.bin").count() == 1


def test_page_pause_and_resume(browser, start_gunicorn, user, tmp_path):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = _login(browser, server)
    gate = {"open": False}
    page.route("**/api/uploads/**", lambda route: route.continue_() if gate["open"] or route.request.method != "PUT"
               or (route.request.headers.get("content-range") or "").startswith("bytes 0-") else None)
    path, digest = _file(tmp_path, "pause.bin", 4 * MiB)
    page.set_input_files("[data-testid=file-input]", path)
    page.wait_for_function("() => document.querySelector('[data-testid=upload-row]')?.querySelector('[data-testid=upload-bytes]')?.textContent.startsWith('1.0 MiB')", timeout=30_000)
    page.click("[data-testid=pause-button]")
    page.wait_for_selector(_row("pause.bin", "paused"))
    gate["open"] = True
    page.click("[data-testid=resume-button]")
    page.wait_for_selector(_row("pause.bin", "complete"), timeout=30_000)
    assert UploadSession.objects.get(filename="pause.bin").sha256 == digest


def test_page_accepts_dropped_files(browser, start_gunicorn, user):
    server = start_gunicorn(UPLOADS_CHUNK_SIZE=str(1 * MiB))
    page = _login(browser, server)
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
    page.wait_for_selector(_row("dropped.bin", "complete"), timeout=30_000)
    expected = bytes(i % 251 for i in range(2 * MiB + 5))
    assert UploadSession.objects.get(filename="dropped.bin").sha256 == hashlib.sha256(expected).hexdigest()
