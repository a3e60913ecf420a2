"""Command-line uploader for the REST API: resumable, retrying, with a progress bar.

    python -m uploads.client upload FILE... [--server URL] [--token T] [--chunk-size 8MiB]
    python -m uploads.client status ID|FILE...
    python -m uploads.client list [--status partial] [--filename NAME]

The token comes from `--token` or the environment variable `UPLOADS_TOKEN`, the server from
`--server` or `UPLOADS_SERVER` (default http://127.0.0.1:8000).

Standalone on purpose: it needs only `requests` and `tqdm`, never Django, and imports nothing else
from this package, so it can be copied to any machine with Python 3.11.

How an upload goes: `POST /api/uploads/` returns a new upload, or the caller's unfinished one of
the same file name and size with its `offset` (the server resumes by name), so running the same
command again after any interruption sends only the rest. The file's SHA-256 is computed first
(streaming) and declared, so the server verifies the whole file when the last byte lands. Chunks are
streamed from the file with `PUT` + `Content-Range`; after any failure the client asks the server
for its offset and goes on from there, backing off on transient errors.

Exit codes: 0 every file uploaded; 1 a permanent error for some file (or retries exhausted);
2 usage errors; 130 interrupted (Ctrl-C; running the same command again resumes).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, urlsplit

import requests
from tqdm import tqdm

PROG = "python -m uploads.client"
KiB = 1024
MiB = 1024 * KiB
DEFAULT_SERVER = "http://127.0.0.1:8000"
DEFAULT_CHUNK_SIZE = 8 * MiB
DEFAULT_RETRIES = 8
DEFAULT_TIMEOUT = 120.0  # seconds to connect, and between bytes of a response (the last chunk is hashed)
BACKOFF_BASE = 0.5  # seconds before the first retry; doubles per failed attempt…
BACKOFF_CAP = 30.0  # …up to this
RETRY_AFTER_CAP = 300.0  # a server's Retry-After is honoured up to this many seconds
HASH_BLOCK = MiB
STATUSES = ("partial", "complete", "failed", "expired")

# Statuses worth retrying: the server or something in front of it is busy, restarting or full.
TRANSIENT_STATUSES = frozenset({408, 423, 425, 429, 500, 502, 503, 504, 507})
# Recovery codes of a refused chunk that carry the server's `offset`: adopt it and go on.
OFFSET_CODES = frozenset({"offset_mismatch", "released", "incomplete_body"})

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


# --- Errors ---------------------------------------------------------------------------------------


class ApiError(Exception):
    """A response the client cannot recover from by retrying (or one the caller handles itself)."""

    def __init__(self, status: int, detail: str, code: str = "", body: dict | None = None) -> None:
        self.status, self.detail, self.code, self.body = status, detail, code, body or {}
        super().__init__(str(self))

    def __str__(self) -> str:
        code = f" ({self.code})" if self.code else ""
        return f"HTTP {self.status}{code}: {self.detail}"


class TransientError(Exception):
    """A failed attempt worth retrying: a network error, a timeout, a 5xx, 423, 429…"""

    def __init__(self, message: str, retry_after: float | None = None, status: int | None = None) -> None:
        super().__init__(message)
        self.retry_after, self.status = retry_after, status


class FileError(Exception):
    """A permanent error for one file that is not an HTTP response (file changed, retries exhausted, …)."""

    def __init__(self, message: str, status: int | None = None, code: str = "", upload_id: str | None = None):
        super().__init__(message)
        self.status, self.code, self.upload_id = status, code, upload_id


class Terminated(BaseException):
    """SIGTERM: stop like Ctrl-C (the server keeps what it has; the same command resumes)."""


class FileChanged(Exception):
    """The local file got shorter while it was being read (never send fewer bytes than declared)."""


# --- Small helpers --------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "k": KiB, "m": MiB, "g": 1024 * MiB, "t": 1024 * 1024 * MiB}


def parse_size(text: str) -> int:
    """`8MiB`, `8M`, `8mb`, `512K`, `1.5G` or plain bytes; the suffixes are powers of 1024."""
    match = _SIZE.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size {text!r} (examples: 8MiB, 512K, 1048576)")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "").lower() or None]
    if value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be a whole number of bytes, at least 1")
    return int(value)


def human(size: float | None) -> str:
    if size is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def percent(offset: int | None, size: int | None) -> str:
    if size is None or offset is None:
        return "?"
    return "100.0%" if size == 0 else f"{100 * offset / size:.1f}%"


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(
    attempt: int, retry_after: float | None = None, *, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP,
    rng: Callable[[], float] = random.random,
) -> float:
    """Exponential backoff with jitter for the `attempt`-th consecutive failure (1-based).

    Half the ceiling plus up to half again at random, so many clients that failed together do not
    come back together. A server's `Retry-After` is a floor (capped at RETRY_AFTER_CAP).
    """
    ceiling = min(cap, base * 2 ** (attempt - 1))
    delay = ceiling / 2 + rng() * ceiling / 2
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_AFTER_CAP))
    return delay


def describe_exception(exc: BaseException) -> str:
    """A one-line reason for a network error, without urllib3's nesting."""
    if isinstance(exc, requests.Timeout):
        return "the server did not answer in time"
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        name = type(current).__name__
        if name == "RemoteDisconnected":
            return "the server closed the connection"
        if isinstance(current, OSError) and current.strerror:
            return f"connection failed: {current.strerror}"
        todo += [arg for arg in current.args if isinstance(arg, BaseException)]
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError
        todo += [reason] if isinstance(reason, BaseException) else []
        todo += [e for e in (current.__cause__, current.__context__) if e is not None]
    return str(exc) or type(exc).__name__


def _error_from_response(response: requests.Response) -> tuple[str, str, dict]:
    """(detail, code, body) of an error response: the API's JSON, or a proxy's text page."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"]), str(body.get("code") or ""), body
    text = " ".join(response.text.split())[:200]
    return text or response.reason or "no details", "", body if isinstance(body, dict) else {}


# --- Streaming a file slice -----------------------------------------------------------------------


class RateLimiter:
    """At most `rate` bytes per second, over all the chunks of a run (`--limit-rate`)."""

    BURST = 0.25  # seconds of credit an idle period may build up

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.next_free = time.monotonic()

    def consume(self, count: int) -> None:
        now = time.monotonic()
        self.next_free = max(self.next_free, now - self.BURST) + count / self.rate
        if self.next_free > now:
            time.sleep(self.next_free - now)


class FileSlice:
    """`length` bytes of a file from `start`, read block by block as requests sends them.

    It has `__len__` (so requests sends `Content-Length`, never a chunked body) and `read`
    (so urllib3 streams it in its own block size): only one block of the file is in memory.
    """

    def __init__(
        self, fd: int, start: int, length: int, *, on_read: Callable[[int], None] | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.fd, self.position, self.remaining, self.length = fd, start, length, length
        self.on_read, self.limiter = on_read, limiter

    def __len__(self) -> int:
        return self.length

    def read(self, size: int = -1) -> bytes:
        if self.remaining <= 0:
            return b""
        size = self.remaining if size is None or size < 0 else min(size, self.remaining)
        if self.limiter is not None:
            self.limiter.consume(size)
        data = os.pread(self.fd, size, self.position)
        if not data:
            raise FileChanged(f"the file ended at byte {self.position}, before its declared size")
        self.position += len(data)
        self.remaining -= len(data)
        if self.on_read is not None:
            self.on_read(len(data))
        return data


# --- The API --------------------------------------------------------------------------------------


class Api:
    """The REST API: one attempt per call (`send`, `attempt`) or retried with backoff (`call`)."""

    NETWORK_ERRORS = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)

    def __init__(
        self, server: str, token: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
        note: Callable[[str], None] = lambda message: None, sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout, self.retries, self.note, self.sleep = timeout, retries, note, sleep
        self.session = requests.Session()
        self.session.headers.update({
            "Authorization": f"Token {token}", "Accept": "application/json", "User-Agent": "uploads-client/1",
        })
        self.retried = 0  # retries made, for the summary

    def url(self, upload_id: str | None = None, suffix: str = "") -> str:
        base = f"{self.server}/api/uploads/"
        return f"{base}{quote(upload_id)}/{suffix}" if upload_id else base

    # One attempt ----------------------------------------------------------------------------

    def send(self, method: str, url: str, **kwargs: Any) -> requests.Response:
        """One request; network errors become TransientError (TLS errors stay permanent)."""
        try:
            return self.session.request(method, url, timeout=(min(self.timeout, 30.0), self.timeout), **kwargs)
        except requests.exceptions.SSLError as exc:
            raise FileError(f"TLS error talking to {self.server}: {describe_exception(exc)}") from exc
        except self.NETWORK_ERRORS as exc:
            raise TransientError(describe_exception(exc)) from exc
        except requests.RequestException as exc:  # InvalidURL, MissingSchema, …: the user's input
            raise FileError(f"cannot reach {url}: {exc}") from exc

    def check(self, response: requests.Response) -> dict:
        """The JSON of a success; TransientError or ApiError otherwise."""
        if response.ok:
            try:
                return response.json() if response.content else {}
            except ValueError:
                raise TransientError(f"HTTP {response.status_code} with a body that is not JSON") from None
        detail, code, body = _error_from_response(response)
        error = ApiError(response.status_code, detail, code, body)
        racing_create = response.status_code == 409 and code == "conflict" and "id" not in body
        if (response.status_code in TRANSIENT_STATUSES and code != "too_many_uploads") or racing_create:
            # 429 `too_many_uploads` is the server's cap on unfinished uploads: waiting does not lift it.
            # A 409 `conflict` naming no upload is two creates racing for one name: the next one resumes.
            raise TransientError(str(error), parse_retry_after(response.headers.get("Retry-After")),
                                 status=response.status_code)
        raise error

    def attempt(self, method: str, url: str, **kwargs: Any) -> dict:
        return self.check(self.send(method, url, **kwargs))

    # Retried ----------------------------------------------------------------------------------

    def call(self, method: str, url: str, *, what: str, who: str = "", **kwargs: Any) -> dict:
        """`attempt`, retried on transient errors with backoff, up to `retries` times in a row.
        `what` is being done (for messages), `who` the file it is done for."""
        failures = 0
        while True:
            try:
                return self.attempt(method, url, **kwargs)
            except TransientError as exc:
                failures += 1
                if failures > self.retries:
                    raise FileError(f"gave up {what} after {self.retries} retries: {exc}", status=exc.status) from exc
                delay = backoff_delay(failures, exc.retry_after)
                self.note(f"{who + ': ' if who else ''}{what}: {exc}; retry {failures}/{self.retries} in {delay:.1f} s")
                self.retried += 1
                self.sleep(delay)

    def create(self, filename: str, size: int, checksum: str | None = None) -> dict:
        payload: dict[str, Any] = {"filename": filename, "size": size}
        if checksum:
            payload["checksum"] = checksum
        return self.call("POST", self.url(), json=payload, what="starting the upload", who=filename)

    def get(self, upload_id: str, *, what: str = "") -> dict:
        return self.call("GET", self.url(upload_id), what=what or f"reading upload {upload_id}")

    def delete(self, upload_id: str) -> None:
        try:
            self.call("DELETE", self.url(upload_id), what=f"deleting upload {upload_id}")
        except ApiError as exc:
            if exc.status != 404:  # gone already: a retried DELETE whose first answer was lost
                raise

    def settle(self, upload_id: str) -> dict:
        """Have the server finish an upload whose every byte is stored but that was never finalized
        (its last request died while hashing): reading it does that."""
        return self.get(upload_id, what="finishing the upload")

    def put_chunk(self, upload_id: str, body: FileSlice, start: int, size: int) -> requests.Response:
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Range": f"bytes {start}-{start + len(body) - 1}/{size}",
        }
        return self.send("PUT", self.url(upload_id), data=body, headers=headers)

    def pages(self, params: dict[str, str]) -> Iterator[dict]:
        """Every upload the filter selects, following `next` (its query on our own server URL,
        in case the server builds absolute URLs with another host name)."""
        url, query = self.url(), dict(params)
        while True:
            page = self.call("GET", url, params=query, what="listing uploads")
            yield from page.get("results", [])
            if not page.get("next"):
                return
            url, query = self.url() + "?" + urlsplit(page["next"]).query, {}


# --- Uploading one file ---------------------------------------------------------------------------


@dataclass
class Options:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    checksum: bool = True
    restart: bool = False
    quiet: bool = False
    progress: bool | None = None  # None: bars when stderr is a terminal
    limiter: RateLimiter | None = None


@dataclass
class Result:
    file: str
    filename: str
    size: int
    id: str | None = None
    status: str = "error"
    resumed_from: int = 0
    bytes_sent: int = 0
    sha256: str | None = None
    seconds: float = 0.0  # the whole file: hashing, requests, retries
    transfer_seconds: float = 0.0  # sending only
    retries: int = 0
    http_status: int | None = None
    code: str | None = None
    detail: str | None = None

    def as_json(self) -> dict:
        return {key: value for key, value in self.__dict__.items()}


@dataclass
class _Transfer:
    """The state of one file's chunk loop."""

    upload: dict
    offset: int
    known: bool = True  # False: ask the server for the offset before the next chunk
    failures: int = 0
    restarts: int = 0
    best: int = 0  # the highest offset the server has confirmed


def sha256_of(path: str, size: int, name: str, options: Options) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)
    view = memoryview(buffer)
    with open(path, "rb") as handle, _bar(name, size, 0, options, desc=f"{name} (sha256)") as bar:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
            bar.update(count)
    return digest.hexdigest()


def _bar(name: str, total: int, initial: int, options: Options, desc: str | None = None) -> tqdm:
    disable = True if options.quiet else (None if options.progress is None else not options.progress)
    return tqdm(
        total=total, initial=initial, desc=desc or name, unit="B", unit_scale=True, unit_divisor=1024,
        file=sys.stderr, disable=disable, dynamic_ncols=True, leave=True, miniters=1, mininterval=0.2,
    )


def upload_file(api: Api, path: str, options: Options) -> Result:
    """Upload (or resume) one file; raise ApiError/FileError on a permanent error."""
    started = time.monotonic()
    before = os.stat(path)
    size, name = before.st_size, os.path.basename(path)
    result = Result(file=path, filename=name, size=size)
    retried_before = api.retried

    upload = api.create(name, size)  # fails fast (401, 413, 429…) before spending time on the hash
    result.id = upload["id"]
    checksum = None
    if options.checksum and upload["status"] != "complete":
        checksum = sha256_of(path, size, name, options)
        upload = _create_with_checksum(api, name, size, f"sha256:{checksum}", options)
        result.id = upload["id"]
    result.resumed_from = upload["offset"]
    if upload["offset"]:
        api.note(f"{name}: resuming upload {upload['id']} at {human(upload['offset'])} of {human(size)}")

    sending = time.monotonic()
    upload = _transfer(api, path, upload, result, options, checksum)
    result.transfer_seconds = round(time.monotonic() - sending, 3)

    result.id, result.status, result.sha256 = upload["id"], upload["status"], upload.get("sha256")
    result.seconds = round(time.monotonic() - started, 3)
    result.retries = api.retried - retried_before
    if checksum and result.sha256 != checksum:
        raise FileError(f"the server stored SHA-256 {result.sha256}, not the file's {checksum}",
                        code="checksum_mismatch", upload_id=result.id)
    after = os.stat(path)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FileError("the file changed while it was being uploaded; the stored copy may mix old and new "
                        "content (upload it again with --restart)", upload_id=result.id)
    return result


def _create_with_checksum(api: Api, name: str, size: int, checksum: str, options: Options) -> dict:
    try:
        return api.create(name, size, checksum)
    except ApiError as exc:
        if exc.status != 409 or "id" not in exc.body:
            raise
        stale_id, stored = str(exc.body["id"]), exc.body.get("offset")
        if not options.restart:
            raise FileError(
                f"HTTP 409 ({exc.code}): an unfinished upload of this name and size ({stale_id}, "
                f"{human(stored)} stored) was made from different content (another checksum); re-run with "
                "--restart to delete it and upload this file from the start",
                status=409, code=exc.code, upload_id=stale_id,
            ) from exc
        api.note(f"{name}: deleting unfinished upload {stale_id} of different content (--restart)")
        api.delete(stale_id)
        return api.create(name, size, checksum)


def _transfer(api: Api, path: str, upload: dict, result: Result, options: Options, checksum: str | None) -> dict:
    """Send the rest of the file from the server's offset; return the completed upload."""
    name, size = result.filename, result.size
    state = _Transfer(upload=upload, offset=upload["offset"], best=upload["offset"])
    fd = os.open(path, os.O_RDONLY)
    try:
        with _bar(name, size, state.offset, options) as bar:
            def sync(offset: int) -> None:
                if offset > state.best:
                    state.best, state.failures = offset, 0  # progress: the retry budget starts over
                state.offset = offset
                bar.n = offset
                bar.refresh()

            def sent(count: int) -> None:
                result.bytes_sent += count
                bar.update(count)

            while True:
                try:
                    if not state.known:
                        state.upload = api.check(api.send("GET", api.url(upload["id"])))
                        state.known = True
                        sync(state.upload["offset"])
                    status = state.upload["status"]
                    if status == "complete":
                        return state.upload
                    if status in ("failed", "expired"):
                        upload = _start_again(api, name, size, checksum, state, f"the upload is {status}")
                        sync(upload["offset"])
                        continue
                    if state.offset >= size:
                        # Every byte is stored but the upload is not finished: its last request is
                        # still hashing, or died doing so. Have it finished, then look again.
                        state.upload = api.settle(upload["id"])
                        sync(state.upload["offset"])
                        if state.upload["status"] == "partial":
                            raise TransientError("the server has every byte but has not finished the upload yet")
                        continue
                    body = FileSlice(fd, state.offset, min(options.chunk_size, size - state.offset),
                                     on_read=sent, limiter=options.limiter)
                    response = api.put_chunk(upload["id"], body, state.offset, size)
                    if response.ok:
                        state.upload = api.check(response)
                        sync(state.upload["offset"])
                        continue
                    detail, code, body_json = _error_from_response(response)
                    offset = body_json.get("offset")
                    if response.status_code == 409 and code == "complete":
                        state.known = False  # our last chunk's answer was lost; read the result
                        continue
                    if code in OFFSET_CODES and isinstance(offset, int) and not isinstance(offset, bool):
                        # 409 (another offset, or a newer request took over) or 400 (the body was cut):
                        # the server says where to go on. Straight away if that is progress.
                        progressed = offset > state.best
                        sync(offset)
                        if progressed:
                            continue
                        raise TransientError(str(ApiError(response.status_code, detail, code)))
                    if response.status_code == 410:
                        upload = _start_again(api, name, size, checksum, state, f"HTTP 410 ({code}): {detail}")
                        sync(upload["offset"])
                        continue
                    api.check(response)  # raises: TransientError, or ApiError (permanent)
                except TransientError as exc:
                    state.failures += 1
                    state.known = False
                    if state.failures > api.retries:
                        raise FileError(
                            f"gave up after {api.retries} retries: {exc}; {human(state.best)} of {human(size)} "
                            "are stored, run the same command again to resume",
                            status=exc.status, upload_id=upload["id"],
                        ) from exc
                    delay = backoff_delay(state.failures, exc.retry_after)
                    api.note(f"{name}: {exc}; retry {state.failures}/{api.retries} in {delay:.1f} s")
                    api.retried += 1
                    api.sleep(delay)
                except FileChanged as exc:
                    raise FileError(f"the file changed while it was being uploaded: {exc}",
                                    upload_id=upload["id"]) from exc
    finally:
        os.close(fd)


def _start_again(api: Api, name: str, size: int, checksum: str | None, state: _Transfer, why: str) -> dict:
    """The server expired the upload or lost its data (410): start a new one, once."""
    if state.restarts >= 1:
        raise FileError(f"{why}, again; giving up", status=410, code="gone", upload_id=state.upload.get("id"))
    state.restarts += 1
    api.note(f"{name}: {why}; starting a new upload from byte 0")
    upload = api.create(name, size, f"sha256:{checksum}" if checksum else None)
    state.upload, state.known, state.best = upload, True, upload["offset"]
    return upload


# --- Commands -------------------------------------------------------------------------------------


class Output:
    def __init__(self, *, json_output: bool, quiet: bool) -> None:
        self.json, self.quiet = json_output, quiet

    def note(self, message: str) -> None:
        """Progress information (stderr), kept clear of the progress bars."""
        if not self.quiet:
            tqdm.write(message, file=sys.stderr)

    def error(self, message: str) -> None:
        tqdm.write(f"{PROG.split()[-1]}: error: {message}", file=sys.stderr)

    def line(self, text: str) -> None:
        print(text, flush=True)

    def record(self, data: dict) -> None:
        print(json.dumps(data, ensure_ascii=False), flush=True)


def cmd_upload(api: Api, args: argparse.Namespace, out: Output) -> int:
    options = Options(
        chunk_size=args.chunk_size, checksum=args.checksum, restart=args.restart, quiet=args.quiet,
        progress=args.progress, limiter=RateLimiter(args.limit_rate) if args.limit_rate else None,
    )
    exit_code = EXIT_OK
    for index, path in enumerate(args.files):
        name = os.path.basename(path)
        try:
            result = upload_file(api, path, options)
        except (ApiError, FileError) as exc:
            status = exc.status
            code = exc.code or None
            out.error(f"{path}: {exc}")
            if out.json:
                out.record(Result(file=path, filename=name, size=_size_or_none(path), http_status=status,
                                  code=code, detail=str(exc), id=getattr(exc, "upload_id", None)).as_json())
            exit_code = EXIT_ERROR
            if status in (401, 403):
                skipped = args.files[index + 1:]
                out.error("check --token / UPLOADS_TOKEN and --server"
                          + (f"; not trying the other {len(skipped)} file(s)" if skipped else ""))
                break
            continue
        if out.json:
            out.record(result.as_json())
        elif not args.quiet:
            resumed = f", resumed at {human(result.resumed_from)}" if result.resumed_from else ""
            rate = result.bytes_sent / result.transfer_seconds if result.transfer_seconds else 0
            out.line(f"{path}: {result.status}, {human(result.size)}{resumed}; sent {human(result.bytes_sent)} "
                     f"in {result.transfer_seconds:.1f} s ({human(rate)}/s); id {result.id}; sha256 {result.sha256}")
    return exit_code


def _size_or_none(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _status_line(upload: dict) -> str:
    size = "?" if upload["size"] is None else upload["size"]
    return (f"{upload['id']}  {upload['filename']}  {upload['offset']}/{size}"
            f"  {percent(upload['offset'], upload['size'])}  {upload['status']}")


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def cmd_status(api: Api, args: argparse.Namespace, out: Output) -> int:
    """One line per upload: by id, or by a local file (your newest upload of its name and size)."""
    exit_code = EXIT_OK
    for target in args.targets:
        try:
            if _is_uuid(target):
                uploads = [api.get(target)]
            elif os.path.isfile(target):
                name, size = os.path.basename(target), os.path.getsize(target)
                uploads = [u for u in api.pages({"filename": name}) if u["size"] == size][:1]
                if not uploads:
                    raise FileError(f"no upload of {name!r} ({size} bytes) on the server", status=404)
            else:
                raise FileError("neither an upload id nor a file")
        except (ApiError, FileError) as exc:
            out.error(f"{target}: {exc}")
            exit_code = EXIT_ERROR
            if exc.status in (401, 403):
                break
            continue
        for upload in uploads:
            if out.json:
                out.record(upload)
            else:
                out.line(_status_line(upload))
    return exit_code


def cmd_list(api: Api, args: argparse.Namespace, out: Output) -> int:
    params = {key: value for key, value in (("status", args.status), ("filename", args.filename)) if value}
    rows = []
    try:
        for upload in api.pages(params):
            if out.json:
                out.record(upload)
            else:
                rows.append(upload)
    except (ApiError, FileError) as exc:
        out.error(str(exc))
        return EXIT_ERROR
    if not out.json:
        header = ("ID", "STATUS", "DONE", "SIZE", "UPDATED", "FILENAME")
        table = [header] + [
            (u["id"], u["status"], percent(u["offset"], u["size"]), human(u["size"]), _local_time(u.get("updated_at")),
             u["filename"])
            for u in rows
        ]
        widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
        for row in table:
            out.line("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
        if not rows:
            out.note("no uploads")
    return EXIT_OK


def _local_time(value: str | None) -> str:
    if not value:
        return "-"
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return value


# --- Command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("UPLOADS_SERVER") or DEFAULT_SERVER,
                        help="server base URL (env UPLOADS_SERVER; default %(default)s)")
    common.add_argument("--token", default=None,
                        help="API token (default: env UPLOADS_TOKEN, which keeps it out of `ps`)")
    common.add_argument("--retries", type=int, default=DEFAULT_RETRIES, metavar="N",
                        help="retries in a row without progress before giving up (default %(default)s)")
    common.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="network timeout: connecting, and waiting for a response (default %(default)s)")
    common.add_argument("--json", action="store_true", help="print one JSON object per line on stdout")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes, only errors")

    parser = argparse.ArgumentParser(
        prog=PROG, description="Upload files to resumable-uploads over its REST API, resuming and retrying.",
        epilog="Exit status: 0 all done, 1 a permanent error (or retries exhausted), 2 usage, 130 interrupted.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    upload = commands.add_parser("upload", parents=[common], help="upload or resume files",
                                 description="Upload files; an interrupted upload of the same name and size resumes.")
    upload.add_argument("files", nargs="+", metavar="FILE")
    upload.add_argument("--chunk-size", type=parse_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                        help="bytes per request, e.g. 8MiB, 512K (default 8MiB)")
    upload.add_argument("--checksum", action=argparse.BooleanOptionalAction, default=True,
                        help="hash the file first and have the server verify it (default: on)")
    upload.add_argument("--restart", action="store_true",
                        help="delete an unfinished upload made from different content and start over")
    upload.add_argument("--limit-rate", type=parse_size, default=None, metavar="RATE",
                        help="at most RATE bytes per second, e.g. 2MiB")
    upload.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bars (default: when stderr is a terminal)")

    status = commands.add_parser("status", parents=[common], help="show uploads by id or by local file",
                                 description="One line per upload: id, file name, offset/size, percent, status.")
    status.add_argument("targets", nargs="+", metavar="ID|FILE")

    listing = commands.add_parser("list", parents=[common], help="list your uploads, newest first")
    listing.add_argument("--status", choices=STATUSES)
    listing.add_argument("--filename", metavar="NAME", help="only uploads of exactly this file name")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    token = args.token or os.environ.get("UPLOADS_TOKEN")
    if not token:
        parser.error("no API token: pass --token TOKEN or set UPLOADS_TOKEN")
    if urlsplit(args.server).scheme not in ("http", "https") or not urlsplit(args.server).netloc:
        parser.error(f"--server must be an http(s) URL, not {args.server!r}")
    if args.retries < 0 or args.timeout <= 0:
        parser.error("--retries must be >= 0 and --timeout > 0")
    if args.command == "upload":
        # Check every file first: a typo in the last name should not surface after hours of uploading.
        for path in args.files:
            if not os.path.exists(path):
                parser.error(f"{path}: no such file")
            if not os.path.isfile(path):
                parser.error(f"{path}: not a regular file")
            if not os.access(path, os.R_OK):
                parser.error(f"{path}: not readable")
    out = Output(json_output=args.json, quiet=args.quiet)
    api = Api(args.server, token, timeout=args.timeout, retries=args.retries, note=out.note)
    command = {"upload": cmd_upload, "status": cmd_status, "list": cmd_list}[args.command]
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return command(api, args, out)
    except (KeyboardInterrupt, Terminated) as exc:
        tqdm.write("", file=sys.stderr)
        out.error(("interrupted" if isinstance(exc, KeyboardInterrupt) else "terminated")
                  + "; the server keeps what it received: run the same command again to resume")
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else EXIT_TERMINATED
    except BrokenPipeError:
        # `… list | head`: the reader went away. Point stdout at /dev/null so the exit flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
