"""tus-js-client 4.3.1 in a real browser page on another origin, uploading to /files/ through CORS.

gunicorn listens on http://127.0.0.1:<port>; the page (index.html + tus-js-client's browser bundle)
is served by a throwaway `http.server` and opened as http://localhost:<other port>/, a different
origin, so every tus request is cross-origin. Its custom headers (Authorization, Tus-Resumable,
Upload-*) make Chromium send preflights, and tus-js-client can only read `Location` and
`Upload-Offset` if the server exposes them (TUS.md M1-M4). The page records, from inside the page,
what tus-js-client's own XHRs could read (`onAfterResponse`: `res.getHeader(...)`), and the test
records the network traffic Chromium saw (Playwright events, including the preflights) and the
access log of gunicorn.

Covered: a whole upload in 1 MiB chunks, `parallelUploads: 3` (concatenation), an upload aborted
after one chunk and resumed from the URL tus-js-client kept in the origin's localStorage, and an
origin the server does not allow, which the browser must block.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.db import connections

from uploads.models import Status, UploadSession

from .conftest import requires_chromium
from .invariants import assert_invariants

pytestmark = [pytest.mark.live, requires_chromium]
MiB = 1024 * 1024
WAIT_MS = 30_000  # the longest any single wait on the page may take

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>tus CORS test page</title><link rel="icon" href="data:,"></head>
<body>
<input type="file" id="file">
<script src="tus.min.js"></script>
<script>
// startUpload(key, config): run one tus.Upload of the chosen file; window.results[key] records
// its state ("running", "success", "aborted", "error"), its URL, its error and a trace of every
// request tus-js-client sent and what it could read from each response.
window.results = {};
window.startUpload = function (key, config) {
  const file = document.getElementById("file").files[0];
  const {abortAfterChunks, resume, ...options} = config;
  const result = window.results[key] = {state: "running", url: null, error: null, chunks: [], trace: [], previous: null};
  let upload = null;
  upload = new tus.Upload(file, {
    ...options,
    onBeforeRequest(req) {
      result.trace.push({phase: "request", method: req.getMethod(), url: req.getURL(),
                         offset: req.getHeader("Upload-Offset") ?? null, concat: req.getHeader("Upload-Concat") ?? null});
    },
    onAfterResponse(req, res) {
      result.trace.push({phase: "response", method: req.getMethod(), url: req.getURL(), status: res.getStatus(),
                         location: res.getHeader("Location"), offset: res.getHeader("Upload-Offset"),
                         length: res.getHeader("Upload-Length")});
    },
    onChunkComplete(chunkSize, bytesAccepted, bytesTotal) {
      result.chunks.push(bytesAccepted);
      if (abortAfterChunks && result.chunks.length === abortAfterChunks) {
        upload.abort().then(() => { result.url = upload.url; result.state = "aborted"; },
                            (error) => { result.error = String(error); result.state = "error"; });
      }
    },
    onSuccess() { result.url = upload.url; result.state = "success"; },
    onError(error) { result.url = upload.url; result.error = String(error); result.state = "error"; },
  });
  if (resume) {
    upload.findPreviousUploads().then((previous) => {
      result.previous = previous.map((p) => p.uploadUrl);
      if (previous.length) upload.resumeFromPreviousUpload(previous[0]);
      upload.start();
    }, (error) => { result.error = String(error); result.state = "error"; });
  } else {
    upload.start();
  }
};
</script>
</body></html>
"""


# --- The other origin -----------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def other_origin(tus_js_dir, tmp_path):  # noqa: F811 - the imported fixture
    """http://localhost:<port>: the test page and tus.min.js, served from a temp folder on 127.0.0.1."""
    bundle = tus_js_dir / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"
    assert bundle.exists(), f"no browser bundle at {bundle}"
    site = tmp_path / "other-origin"
    site.mkdir()
    shutil.copyfile(bundle, site / "tus.min.js")
    (site / "index.html").write_text(PAGE)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(site)))
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


class TusPage:
    """The test page in Chromium, with the network traffic and console messages it produced."""

    def __init__(self, chromium, origin: str, server, token_key: str):
        self.server, self.token, self.origin = server, token_key, origin
        self.page = chromium.new_page()
        self.page.set_default_timeout(WAIT_MS)
        self.requests: list[dict] = []  # Playwright's view of the traffic: no preflights
        self.responses: list[dict] = []
        self.failed: list[dict] = []
        self.console: list[str] = []
        self.page.on("request", lambda r: self.requests.append({"method": r.method, "url": r.url, "headers": r.headers}))
        self.page.on("response", self._on_response)
        self.page.on("requestfailed", lambda r: self.failed.append({"method": r.method, "url": r.url, "failure": r.failure}))
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        # Playwright's request events leave out CORS preflights; Chromium's DevTools protocol has them.
        self.preflights: dict[str, dict] = {}  # by DevTools request id
        self.cors_errors: list[str] = []  # Chromium's verdicts, e.g. "PreflightMissingAllowOriginHeader"
        cdp = self.page.context.new_cdp_session(self.page)
        cdp.on("Network.requestWillBeSent", self._on_cdp_request)
        cdp.on("Network.responseReceived", self._on_cdp_response)
        cdp.on("Network.loadingFailed", self._on_cdp_failure)
        cdp.send("Network.enable")
        self.page.goto(f"{origin}/")
        self.page.wait_for_function("() => typeof window.tus === 'object' && window.tus.isSupported")

    def _on_response(self, response) -> None:
        self.responses.append({
            "method": response.request.method, "url": response.url, "status": response.status,
            "headers": response.headers,
        })

    def _on_cdp_request(self, event: dict) -> None:
        request = event["request"]
        if request["method"] == "OPTIONS":
            self.preflights[event["requestId"]] = {
                "url": request["url"], "headers": {k.lower(): v for k, v in request["headers"].items()},
                "status": None, "response_headers": {},
            }

    def _on_cdp_response(self, event: dict) -> None:
        if event["requestId"] in self.preflights:
            response = event["response"]
            self.preflights[event["requestId"]].update(
                status=response["status"], response_headers={k.lower(): v for k, v in response["headers"].items()}
            )

    def _on_cdp_failure(self, event: dict) -> None:
        if event.get("corsErrorStatus"):  # reported on the actual request that CORS stopped
            self.cors_errors.append(event["corsErrorStatus"]["corsError"])
        self.failed.append({"cdp": event})

    def choose(self, path: Path) -> None:
        self.page.set_input_files("#file", str(path))

    def start(self, key: str, **config) -> None:
        config = {
            "endpoint": f"{self.server.url}/files/",
            "headers": {"Authorization": f"Token {self.token}"},
            "chunkSize": MiB,
            "metadata": {"filename": "cors.bin"},
            **config,
        }
        self.page.evaluate("([key, config]) => window.startUpload(key, config)", [key, config])

    def result(self, key: str) -> dict:
        return self.page.evaluate("key => window.results[key]", key)

    def wait(self, key: str) -> dict:
        try:
            self.page.wait_for_function("key => window.results[key].state !== 'running'", arg=key, timeout=WAIT_MS)
        except Exception as exc:  # a Playwright timeout: say what the page and the server saw
            pytest.fail(f"the upload {key!r} did not finish in {WAIT_MS / 1000} s ({exc}):\n{self.explain(key)}")
        return self.result(key)

    def network_responses(self, method: str) -> list[dict]:
        prefix = f"{self.server.url}/files/"
        return [r for r in self.responses if r["method"] == method and r["url"].startswith(prefix)]

    def explain(self, key: str | None = None) -> str:
        lines = []
        if key is not None:
            lines.append("page result: " + json.dumps(self.result(key), indent=1))
        lines += ["network:", *(f"  {r['method']} {r['url']}" for r in self.requests)]
        lines += ["responses:", *(f"  {r['status']} {r['method']} {r['url']} {r['headers']}" for r in self.responses)]
        lines += ["preflights:", *(f"  {p}" for p in self.preflights.values())]
        lines += ["failed:", *(f"  {r}" for r in self.failed)]
        lines += ["console:", *(f"  {c}" for c in self.console)]
        lines += ["server log (tail):", self.server.output()[-3000:]]
        return "\n".join(lines)


@pytest.fixture
def open_page(browser, other_origin, token):  # noqa: F811 - the imported fixtures
    """`open_page(server)`: the test page on the other origin, talking to `server`.

    Tests request it after `start_gunicorn`, so the browser closes (and drops its keep-alive
    connections) before gunicorn stops, which then stops at once. But then the database fixtures
    were set up before Playwright started: while Playwright's sync API runs, an event loop is
    running in this thread, so Django gives the test body a second, context-local database
    connection. It is closed here, while Playwright still runs; left open, PostgreSQL refuses to
    drop the test database at the end of the run ("is being accessed by other users")."""
    yield lambda server: TusPage(browser, other_origin, server, token)
    connections.close_all()


# --- Helpers --------------------------------------------------------------------------------------


def _source(tmp_path: Path, size: int, name: str = "source.bin") -> tuple[Path, bytes]:
    folder = tmp_path / "client-files"
    folder.mkdir(exist_ok=True)
    path = folder / name
    data = os.urandom(size)
    path.write_bytes(data)
    return path, data


def _upload_id(server, url: str) -> uuid.UUID:
    match = re.fullmatch(re.escape(f"{server.url}/files/") + r"([0-9a-f-]{36})", url or "")
    assert match, f"{url!r} is not {server.url}/files/<uuid>"
    return uuid.UUID(match.group(1))


def _trace(result: dict, phase: str, method: str) -> list[dict]:
    return [t for t in result["trace"] if t["phase"] == phase and t["method"] == method]


def _assert_complete(row_id, source: bytes, filename: str = "cors.bin") -> UploadSession:
    row = assert_invariants(UploadSession.objects.get(pk=row_id), source, acked=len(source))
    assert row.status == Status.COMPLETE, (row.status, row.error)
    assert row.size == row.offset == len(source)
    assert row.sha256 == hashlib.sha256(source).hexdigest()
    assert row.filename == filename
    assert row.owner.username == "alice"
    return row


def _assert_cors_response(tus_page: TusPage, response: dict) -> None:
    """What Chromium received on an actual (non-preflight) response: the origin echoed, credentials
    allowed and the tus headers exposed."""
    headers = response["headers"]
    assert headers.get("access-control-allow-origin") == tus_page.origin, response
    assert headers.get("access-control-allow-credentials") == "true", response
    exposed = {h.strip().lower() for h in headers.get("access-control-expose-headers", "").split(",")}
    assert {"location", "upload-offset", "upload-length"} <= exposed, response


def _assert_preflight_passed(tus_page: TusPage, url: str, method: str, headers: set[str]) -> None:
    """Chromium sent a preflight for `method` to `url`, asking for (at least) `headers`, and the
    answer allowed our origin, that method and those headers."""
    preflights = [p for p in tus_page.preflights.values() if p["url"] == url
                  and p["headers"].get("access-control-request-method") == method]
    assert preflights, f"no preflight for {method} {url}:\n{tus_page.explain()}"
    preflight = preflights[0]
    asked = {h.strip() for h in preflight["headers"].get("access-control-request-headers", "").split(",")}
    assert headers <= asked, preflight
    assert preflight["headers"].get("origin") == tus_page.origin, preflight
    answer = preflight["response_headers"]
    assert preflight["status"] == 200, preflight
    assert answer.get("access-control-allow-origin") == tus_page.origin, preflight
    assert answer.get("access-control-allow-credentials") == "true", preflight
    assert method in {m.strip() for m in answer.get("access-control-allow-methods", "").split(",")}, preflight
    assert asked <= {h.strip().lower() for h in answer.get("access-control-allow-headers", "").split(",")}, preflight
    assert answer.get("access-control-max-age") == "86400", preflight


def _access_log(server, method: str, *, expect: int = 0) -> list[str]:
    """The access-log lines of `method` requests to /files/. gunicorn writes a line after the
    response is sent, so the browser may be done before the line is: wait (5 s at most) for
    `expect` of them."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.output().splitlines() if f'"{method} /files/' in line]
        if len(lines) >= expect or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# --- Tests ----------------------------------------------------------------------------------------


def test_browser_upload_from_an_allowed_origin(start_gunicorn, open_page, tmp_path, other_origin):
    """3 MiB + 5 bytes in 1 MiB PATCHes from http://localhost:<port>: preflights pass, tus-js-client
    reads `Location` on the POST and `Upload-Offset` on every PATCH, and the row is complete."""
    server = start_gunicorn(UPLOADS_CORS_ORIGINS=other_origin)
    tus_page = open_page(server)
    path, source = _source(tmp_path, 3 * MiB + 5)
    tus_page.choose(path)
    tus_page.start("plain")
    result = tus_page.wait("plain")
    assert result["state"] == "success", tus_page.explain("plain")
    row_id = _upload_id(server, result["url"])

    # What tus-js-client itself could read through CORS.
    posts = _trace(result, "response", "POST")
    assert [(p["status"], p["location"]) for p in posts] == [(201, result["url"])], tus_page.explain("plain")
    patches = _trace(result, "response", "PATCH")
    assert [(p["status"], p["offset"]) for p in patches] == [
        (204, str(offset)) for offset in (MiB, 2 * MiB, 3 * MiB, 3 * MiB + 5)
    ], tus_page.explain("plain")
    assert result["chunks"] == [MiB, 2 * MiB, 3 * MiB, 3 * MiB + 5]

    # What Chromium sent and received: a preflight before the POST and before the first PATCH
    # to the upload URL (later PATCHes to the same URL reuse the cached preflight).
    _assert_preflight_passed(tus_page, f"{server.url}/files/", "POST",
                             {"authorization", "tus-resumable", "upload-length", "upload-metadata"})
    _assert_preflight_passed(tus_page, result["url"], "PATCH",
                             {"authorization", "tus-resumable", "upload-offset", "content-type"})
    assert len(_access_log(server, "OPTIONS", expect=2)) == len(tus_page.preflights) == 2, tus_page.explain("plain")
    assert tus_page.cors_errors == [], tus_page.explain("plain")
    network_patches = tus_page.network_responses("PATCH")
    assert [r["status"] for r in network_patches] == [204] * 4, tus_page.explain("plain")
    for response in network_patches + tus_page.network_responses("POST"):
        _assert_cors_response(tus_page, response)

    _assert_complete(row_id, source)


def test_browser_parallel_uploads_from_an_allowed_origin(start_gunicorn, open_page, tmp_path, other_origin):
    """`parallelUploads: 3`: three `Upload-Concat: partial` uploads and a final POST, all cross-origin."""
    server = start_gunicorn(UPLOADS_CORS_ORIGINS=other_origin)
    tus_page = open_page(server)
    path, source = _source(tmp_path, 6 * MiB + 7)
    tus_page.choose(path)
    tus_page.start("parallel", parallelUploads=3)
    result = tus_page.wait("parallel")
    assert result["state"] == "success", tus_page.explain("parallel")
    row_id = _upload_id(server, result["url"])

    posts = _trace(result, "request", "POST")
    assert [p["concat"] for p in posts[:3]] == ["partial"] * 3, tus_page.explain("parallel")
    assert len(posts) == 4 and posts[3]["concat"].startswith("final;"), tus_page.explain("parallel")
    created = _trace(result, "response", "POST")
    assert all(p["status"] == 201 and p["location"] for p in created), tus_page.explain("parallel")
    assert created[-1]["location"] == result["url"]
    partial_patches = _trace(result, "response", "PATCH")
    assert partial_patches and all(p["status"] == 204 and p["offset"] is not None for p in partial_patches)
    assert all(r["status"] == 204 for r in tus_page.network_responses("PATCH")), tus_page.explain("parallel")
    for response in tus_page.network_responses("POST") + tus_page.network_responses("PATCH"):
        _assert_cors_response(tus_page, response)
    _assert_preflight_passed(tus_page, f"{server.url}/files/", "POST", {"authorization", "upload-concat"})
    for part_url in {p["location"] for p in created[:3]}:
        _assert_preflight_passed(tus_page, part_url, "PATCH", {"authorization", "upload-offset", "upload-concat"})
    assert tus_page.cors_errors == [], tus_page.explain("parallel")

    final = _assert_complete(row_id, source)
    assert final.tus_concat.startswith("final;")
    part_urls = final.tus_concat.removeprefix("final;").split()
    assert part_urls == posts[3]["concat"].removeprefix("final;").split()
    parts = [UploadSession.objects.get(pk=_upload_id(server, url)) for url in part_urls]
    assert [(p.tus_concat, p.status) for p in parts] == [("partial", Status.COMPLETE)] * 3
    assert sum(p.size for p in parts) == len(source)


def test_browser_resumes_from_the_url_in_local_storage(start_gunicorn, open_page, tmp_path, other_origin):
    """Abort after the first 1 MiB chunk; a new tus.Upload of the same File finds the URL that
    tus-js-client stored in the origin's localStorage, asks the server with HEAD (its
    `Upload-Offset` must be readable) and PATCHes only the rest."""
    server = start_gunicorn(UPLOADS_CORS_ORIGINS=other_origin)
    tus_page = open_page(server)
    path, source = _source(tmp_path, 4 * MiB + 3)
    tus_page.choose(path)

    tus_page.start("first", abortAfterChunks=1)
    first = tus_page.wait("first")
    assert first["state"] == "aborted", tus_page.explain("first")
    row_id = _upload_id(server, first["url"])
    assert first["chunks"] == [MiB]
    stored = tus_page.page.evaluate(
        "() => Object.keys(localStorage).filter(k => k.startsWith('tus::')).map(k => JSON.parse(localStorage[k]))"
    )
    assert [s.get("uploadUrl") for s in stored] == [first["url"]], stored
    row = assert_invariants(UploadSession.objects.get(pk=row_id), source, acked=MiB)
    assert (row.status, row.offset, row.size) == (Status.PARTIAL, MiB, len(source))

    sent_before = len(tus_page.requests)
    tus_page.start("second", resume=True)
    second = tus_page.wait("second")
    assert second["state"] == "success", tus_page.explain("second")
    assert second["previous"] == [first["url"]]
    assert second["url"] == first["url"]
    assert _trace(second, "request", "POST") == [], "the resumed upload created a new one:\n" + tus_page.explain("second")
    assert (second["trace"][0]["phase"], second["trace"][0]["method"]) == ("request", "HEAD"), tus_page.explain("second")
    head = _trace(second, "response", "HEAD")[0]
    assert (head["status"], head["offset"], head["length"]) == (200, str(MiB), str(len(source))), head
    patch_offsets = [int(t["offset"]) for t in _trace(second, "request", "PATCH")]
    assert patch_offsets == [MiB, 2 * MiB, 3 * MiB, 4 * MiB], tus_page.explain("second")
    resumed = [r for r in tus_page.requests[sent_before:] if r["method"] == "PATCH"]
    assert resumed and int(resumed[0]["headers"]["upload-offset"]) == MiB > 0, resumed
    # The HEAD needs no preflight of its own: the one before the first PATCH (cached by Chromium
    # for Access-Control-Max-Age) already allowed HEAD and these headers for this URL.
    _assert_preflight_passed(tus_page, first["url"], "PATCH", {"authorization", "tus-resumable", "upload-offset"})
    assert tus_page.cors_errors == [], tus_page.explain("second")
    for response in tus_page.network_responses("HEAD") + tus_page.network_responses("PATCH"):
        _assert_cors_response(tus_page, response)

    _assert_complete(row_id, source)
    assert UploadSession.objects.count() == 1


def test_browser_upload_from_a_disallowed_origin_is_blocked(start_gunicorn, open_page, tmp_path, other_origin):
    """The server allows another origin only: the preflight answer carries no
    Access-Control-Allow-Origin for ours, Chromium never sends the POST, and tus-js-client fails."""
    server = start_gunicorn(UPLOADS_CORS_ORIGINS="http://localhost:1")
    tus_page = open_page(server)
    path, _ = _source(tmp_path, 2 * MiB)
    tus_page.choose(path)
    tus_page.start("blocked", retryDelays=[0])  # one retry: it is blocked the same way
    result = tus_page.wait("blocked")
    assert result["state"] == "error", tus_page.explain("blocked")
    assert "failed to create upload" in result["error"], result
    assert result["url"] is None

    preflights = list(tus_page.preflights.values())
    assert preflights, "Chromium sent no preflight:\n" + tus_page.explain("blocked")
    for preflight in preflights:
        assert preflight["url"] == f"{server.url}/files/", preflight
        assert "access-control-allow-origin" not in preflight["response_headers"], preflight
    # Chromium's own verdict on both attempts (the first and its one retry), and what it logged.
    assert tus_page.cors_errors == ["PreflightMissingAllowOriginHeader"] * 2, tus_page.explain("blocked")
    assert len(_access_log(server, "OPTIONS", expect=2)) == 2, server.output()
    assert _access_log(server, "POST") == [], "the browser sent the POST despite the preflight:\n" + server.output()
    assert any("blocked by CORS policy" in c and "No 'Access-Control-Allow-Origin' header" in c
               for c in tus_page.console), tus_page.explain("blocked")
    assert UploadSession.objects.count() == 0
