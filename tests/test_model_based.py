"""The upload engine against an in-memory reference model (RELIABILITY.md §5 M4, the ShardStore idea).

A Hypothesis `RuleBasedStateMachine` drives random sequences of client and operator actions through
the REST API and tus (the in-process `APIClient`), and through `services` where HTTP cannot express
the action (a body that ends early, a crash between write and commit, expiry and cleanup). The model
is a dict `upload id -> Upload(declared size, source bytes, committed offset, status, ...)`; every
response is predicted by the model before it is checked, and after every step every upload must
agree with it and pass `assert_invariants` (INV1, INV2, INV3, INV5) plus a containment check of the
partial and final directories (INV6).

Real database (SQLite or PostgreSQL, committed transactions so `on_commit` reaches Redis), real files
under the per-test MEDIA_ROOT, real Redis. Each example starts from no uploads, no files and no keys.

Runs: `HYPOTHESIS_PROFILE=ci` (the default, ~30-60 s) or `HYPOTHESIS_PROFILE=thorough`
(RELIABILITY's Tier 0 target: 200 examples x 50 steps).
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import random
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from django.conf import settings as django_settings
from django.core.cache import caches
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

from uploads import progress, selectors, services, storage
from uploads.exceptions import IncompleteBody
from uploads.models import Protocol, Status, UploadSession
from uploads.validation import ChunkDigest

from .invariants import assert_invariants, final_files

KiB = 1024
MAX_SIZE = 64 * KiB
NAMES = ("a.bin", "b.txt", "report.pdf")
# Few uploads at once, so each example does many things to each of them.
MAX_LIVE = 4
EDGE_SIZES = (0, 1, 2, 4 * KiB - 1, 4 * KiB, 4 * KiB + 1, MAX_SIZE)
OCTET = "application/octet-stream"
TUS_OCTET = "application/offset+octet-stream"
TUS = {"HTTP_TUS_RESUMABLE": "1.0.0"}
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
WRONG_CHECKSUM = "sha256:" + hashlib.sha256(b"some other file").hexdigest()

# Statuses as the model (and a client) sees them; "deleted" means the row is gone.
PARTIAL, COMPLETE, FAILED, EXPIRED, DELETED = "partial", "complete", "failed", "expired", "deleted"

_BASE = dict(
    deadline=None,
    database=None,  # no .hypothesis/ directory in the tree; failures print their steps instead
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
# `ci` draws the same examples on every run, so a red CI run is a change's fault, not the dice's;
# `thorough` (make fuzz) draws new ones each time, to find what the fixed set misses.
settings.register_profile("ci", max_examples=60, stateful_step_count=30, derandomize=True, **_BASE)
settings.register_profile("thorough", max_examples=200, stateful_step_count=50, **_BASE)
PROFILE_NAME = os.environ.get("HYPOTHESIS_PROFILE") or "ci"


# --- The reference model -----------------------------------------------------------------------


@dataclass
class Upload:
    id: str
    name: str
    size: int
    source: bytes
    protocol: str  # Protocol.REST or Protocol.TUS
    checksum: str = ""  # the whole-file checksum declared at creation ("" for none)
    offset: int = 0  # the committed offset the model predicts
    status: str = PARTIAL  # what a client sees (a partial upload past its expiry is EXPIRED)
    acked: int = 0  # ACK_MAX: the highest offset a response told the client is stored
    seen: int = 0  # the highest offset any response showed (INV4: never decreases)
    lazy: bool = False  # past its expiry but not yet marked expired in the database
    dirty: bool = False  # an unacknowledged tail sits on disk past the offset (a simulated crash)
    pending: bool = False  # every byte committed, finalize never ran (a simulated crash)
    created_at: int = 0  # creation order, for the shared REST progress key
    last_start: int | None = None  # where the last accepted chunk started (a retry resends it)

    @property
    def remaining(self) -> int:
        return self.size - self.offset

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source).hexdigest()

    @property
    def checksum_matches(self) -> bool:
        return not self.checksum or self.checksum == f"sha256:{self.sha256}"

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(self.id)

    def db_status(self) -> str:
        return Status.PARTIAL if self.lazy else self.status


def make_source(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def garbage(data: bytes) -> bytes:
    """Bytes guaranteed to differ from `data` at every position: what a crashed writer left."""
    return bytes(b ^ 0xFF for b in data)


def content_digest(data: bytes) -> str:
    return f"sha-256=:{base64.b64encode(hashlib.sha256(data).digest()).decode()}:"


def tus_checksum(data: bytes) -> str:
    return f"sha1 {base64.b64encode(hashlib.sha1(data).digest()).decode()}"


class ShortStream:
    """A client body that delivers `data`, then ends early (EOF) or breaks (the read raises)."""

    def __init__(self, data: bytes, *, breaks: bool) -> None:
        self._data = io.BytesIO(data)
        self._breaks = breaks

    def read(self, size: int) -> bytes:
        block = self._data.read(size)
        if not block and self._breaks:
            raise ConnectionResetError("client went away")
        return block


# --- The machine ---------------------------------------------------------------------------------


class UploadMachine(RuleBasedStateMachine):
    """Set up by `configure()` from the test's fixtures; one instance per example."""

    api = None
    other_api = None
    rule_counts: Counter = Counter()
    examples = 0
    steps = 0

    @classmethod
    def configure(cls, *, api, other_api) -> None:
        cls.api, cls.other_api = api, other_api
        cls.rule_counts = Counter()
        cls.examples = 0
        cls.steps = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).examples += 1
        self.uploads: dict[str, Upload] = {}
        self.created = 0
        self._reset_world()

    def teardown(self) -> None:
        self._reset_world()

    @staticmethod
    def _reset_world() -> None:
        UploadSession.objects.all().delete()
        root = Path(django_settings.MEDIA_ROOT)
        for child in root.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
        for alias in ("default", "uploads"):
            caches[alias].delete_pattern("*")

    # --- helpers ---

    def _count(self, name: str) -> None:
        type(self).rule_counts[name] += 1
        type(self).steps += 1

    def _live(self, predicate=lambda m: True) -> list[Upload]:
        return [m for m in self.uploads.values() if m.status != DELETED and predicate(m)]

    def _writable(self) -> list[Upload]:
        return self._live(lambda m: m.status == PARTIAL and not m.pending and m.remaining > 0)

    def _saw(self, m: Upload, offset: int, *, ack: bool) -> None:
        """A response showed `offset` for `m`: it must be the model's, and never go backwards (INV4)."""
        assert offset == m.offset, f"{m.id}: the server says offset {offset}, the model {m.offset}"
        assert offset >= m.seen, f"{m.id}: the offset went back from {m.seen} to {offset}"
        m.seen = offset
        if ack:
            m.acked = max(m.acked, offset)

    def _rest_resumable(self, name: str, size: int) -> Upload | None:
        found = [
            m for m in self._live()
            if m.protocol == Protocol.REST and m.name == name and m.size == size and m.db_status() == Status.PARTIAL
        ]
        assert len(found) <= 1, "the model holds two unfinished REST uploads of one name and size"
        return found[0] if found else None

    def _expire_in_db(self, m: Upload) -> None:
        """The database marked `m` expired (its partial file went with it)."""
        m.status, m.lazy, m.dirty, m.pending = EXPIRED, False, False, False

    def _finished(self, m: Upload) -> None:
        """The last byte of `m` was committed and finalize ran."""
        # A GET or HEAD finishes a crashed finalize even past the expiry: every byte is committed.
        m.offset, m.pending, m.dirty, m.lazy = m.size, False, False, False
        m.status = COMPLETE if m.checksum_matches else FAILED

    def _check_body(self, m: Upload, body: dict) -> None:
        assert body["id"] == m.id
        assert body["size"] == m.size and body["filename"] == m.name and body["protocol"] == m.protocol
        assert body["status"] == m.status, (body["status"], m)
        assert body["checksum"] == (m.checksum or None)
        if m.status == COMPLETE:
            assert body["sha256"] == m.sha256
            assert body["content_url"], body
        else:
            assert body["sha256"] is None and body["content_url"] is None

    def _put(self, client, m: Upload, start: int, chunk: bytes, **extra):
        end = start + len(chunk) - 1
        return client.put(
            f"/api/uploads/{m.id}/", data=chunk, content_type=OCTET,
            HTTP_CONTENT_RANGE=f"bytes {start}-{end}/{m.size}", **extra,
        )

    def _patch(self, client, m: Upload, offset: int, chunk: bytes, **extra):
        return client.generic(
            "PATCH", f"/files/{m.id}", chunk, content_type=TUS_OCTET,
            CONTENT_LENGTH=str(len(chunk)), HTTP_UPLOAD_OFFSET=str(offset), **TUS, **extra,
        )

    def _new(self, *, upload_id: str, name: str, size: int, source: bytes, protocol: str, checksum: str) -> Upload:
        self.created += 1
        m = Upload(
            id=upload_id, name=name, size=size, source=source, protocol=protocol, checksum=checksum,
            created_at=self.created,
        )
        if size == 0:
            m.status = COMPLETE
        self.uploads[m.id] = m
        return m

    # --- creating ---

    @precondition(lambda self: len(self._live()) < MAX_LIVE)
    @rule(data=st.data())
    def create_rest(self, data) -> None:
        """POST /api/uploads/: a new upload (201), or the unfinished one of this name and size (200)."""
        self._count("create_rest")
        name = data.draw(st.sampled_from(NAMES), label="name")
        known_sizes = sorted({m.size for m in self._live() if m.name == name})
        sizes = st.one_of(st.integers(0, MAX_SIZE), st.sampled_from(EDGE_SIZES))
        if known_sizes:
            sizes = st.one_of(st.sampled_from(known_sizes), sizes)
        size = data.draw(sizes, label="size")
        kind = data.draw(st.sampled_from(["none", "right", "wrong"]), label="checksum")
        seed = data.draw(st.integers(0, 2**32), label="seed")

        # A partial upload of this name past its expiry is expired on the way, freeing the name.
        for stale in self._live(lambda m: m.lazy and m.protocol == Protocol.REST and m.name == name and m.size == size):
            self._expire_in_db(stale)
        existing = self._rest_resumable(name, size)
        source = existing.source if existing else make_source(size, seed)
        declared = {"none": "", "right": f"sha256:{hashlib.sha256(source).hexdigest()}", "wrong": WRONG_CHECKSUM}[kind]
        payload = {"filename": name, "size": size, **({"checksum": declared} if declared else {})}
        rows_before = UploadSession.objects.count()

        response = self.api.post("/api/uploads/", payload, format="json")
        body = response.json()

        if existing is not None and declared and existing.checksum and existing.checksum != declared:
            assert response.status_code == 409, body
            assert body["code"] == "conflict" and body["id"] == existing.id
            self._saw(existing, body["offset"], ack=False)
            assert UploadSession.objects.count() == rows_before
            return
        if existing is not None:
            assert response.status_code == 200, body
            if declared and not existing.checksum:
                existing.checksum = declared
            self._check_body(existing, body)
            self._saw(existing, body["offset"], ack=True)
            return
        if size == 0 and declared and declared != f"sha256:{EMPTY_SHA256}":
            assert response.status_code == 422, body
            assert body["code"] == "checksum_mismatch"
            assert UploadSession.objects.count() == rows_before
            return
        assert response.status_code == 201, body
        m = self._new(upload_id=body["id"], name=name, size=size, source=source, protocol=Protocol.REST, checksum=declared)
        self._check_body(m, body)
        self._saw(m, body["offset"], ack=True)

    @precondition(lambda self: len(self._live()) < MAX_LIVE)
    @rule(data=st.data())
    def create_tus(self, data) -> None:
        """POST /files/: always a new upload (tus clients resume by URL, never by name)."""
        self._count("create_tus")
        name = data.draw(st.sampled_from(NAMES), label="name")
        size = data.draw(st.one_of(st.integers(0, MAX_SIZE), st.sampled_from(EDGE_SIZES)), label="size")
        source = make_source(size, data.draw(st.integers(0, 2**32), label="seed"))
        metadata = f"filename {base64.b64encode(name.encode()).decode()}"
        response = self.api.generic(
            "POST", "/files/", b"", CONTENT_LENGTH="0", HTTP_UPLOAD_LENGTH=str(size),
            HTTP_UPLOAD_METADATA=metadata, **TUS,
        )
        assert response.status_code == 201, response.content
        upload_id = urlsplit(response["Location"]).path.rstrip("/").rsplit("/", 1)[-1]
        m = self._new(upload_id=str(uuid.UUID(upload_id)), name=name, size=size, source=source, protocol=Protocol.TUS, checksum="")
        self._saw(m, int(response["Upload-Offset"]), ack=True)

    # --- appending ---

    @precondition(lambda self: self._writable())
    @rule(data=st.data())
    def append(self, data) -> None:
        """A chunk at the right offset (REST PUT or tus PATCH, with or without a correct digest);
        the last one finalizes the upload."""
        self._count("append")
        m = data.draw(st.sampled_from(self._writable()), label="upload")
        via = data.draw(st.sampled_from(["rest", "tus"]), label="via")
        low = 0 if via == "tus" else 1  # tus allows an empty PATCH; Content-Range cannot name 0 bytes
        length = data.draw(st.one_of(st.integers(low, m.remaining), st.just(m.remaining)), label="length")
        with_digest = data.draw(st.booleans(), label="digest")
        chunk = m.source[m.offset : m.offset + length]
        start = m.offset
        if via == "rest":
            extra = {"HTTP_CONTENT_DIGEST": content_digest(chunk)} if with_digest else {}
            response = self._put(self.api, m, start, chunk, **extra)
        else:
            extra = {"HTTP_UPLOAD_CHECKSUM": tus_checksum(chunk)} if with_digest else {}
            response = self._patch(self.api, m, start, chunk, **extra)

        if length > 0:
            m.dirty = False  # the writer cut the unacknowledged tail before writing
            m.last_start = start
        m.offset = start + length
        if m.offset == m.size:
            self._finished(m)
        if m.status == FAILED:
            # Every byte arrived, but not the declared file: failed, nothing published (G4).
            assert response.status_code == (422 if via == "rest" else 460), response.content
            if via == "rest":
                assert response.json()["status"] == FAILED
            return
        if via == "rest":
            assert response.status_code == 200, response.content
            self._check_body(m, response.json())
            self._saw(m, response.json()["offset"], ack=True)
        else:
            assert response.status_code == 204, response.content
            self._saw(m, int(response["Upload-Offset"]), ack=True)

    @precondition(lambda self: self._writable())
    @rule(data=st.data())
    def finish(self, data) -> None:
        """Every remaining byte in one REST chunk: the upload completes (or fails its declared checksum)."""
        self._count("finish")
        m = data.draw(st.sampled_from(self._writable()), label="upload")
        response = self._put(self.api, m, m.offset, m.source[m.offset :])
        self._finished(m)
        if m.status == FAILED:
            assert response.status_code == 422, response.content
            assert response.json()["status"] == FAILED
            return
        assert response.status_code == 200, response.content
        self._check_body(m, response.json())
        self._saw(m, response.json()["offset"], ack=True)

    def _misplaceable(self) -> list[Upload]:
        return self._live(lambda m: m.status == PARTIAL and (m.size >= 2 or m.offset >= 1))

    @precondition(lambda self: self._misplaceable())
    @rule(data=st.data())
    def append_at_wrong_offset(self, data) -> None:
        """A chunk that does not start at the committed offset (a retry, a lost response, a bug):
        409 with the offset to resume from, nothing stored."""
        self._count("append_at_wrong_offset")
        m = data.draw(st.sampled_from(self._misplaceable()), label="upload")
        # Any start in [0, size) but the committed offset (Content-Range cannot start at `size`),
        # often the last chunk again: a client retrying after its response was lost (F1).
        inside = m.offset < m.size
        start = data.draw(st.integers(0, m.size - 1 - inside), label="start")
        start += inside and start >= m.offset
        if m.last_start is not None and data.draw(st.booleans(), label="retry"):
            start = m.last_start
        length = data.draw(st.integers(1, m.size - start), label="length")
        chunk = m.source[start : start + length]
        if data.draw(st.sampled_from(["rest", "tus"]), label="via") == "rest":
            response = self._put(self.api, m, start, chunk)
            assert response.status_code == 409, response.content
            assert response.json()["code"] == "offset_mismatch"
            self._saw(m, response.json()["offset"], ack=False)
        else:
            response = self._patch(self.api, m, start, chunk)
            assert response.status_code == 409, response.content
            self._saw(m, int(response["Upload-Offset"]), ack=False)

    @precondition(lambda self: self._writable())
    @rule(data=st.data())
    def append_with_wrong_digest(self, data) -> None:
        """A chunk whose per-request digest does not match (a flipped bit): 422 / tus 460, the
        chunk discarded, the offset unchanged (G1)."""
        self._count("append_with_wrong_digest")
        m = data.draw(st.sampled_from(self._writable()), label="upload")
        length = data.draw(st.integers(1, m.remaining), label="length")
        chunk = m.source[m.offset : m.offset + length]
        if data.draw(st.sampled_from(["rest", "tus"]), label="via") == "rest":
            response = self._put(self.api, m, m.offset, chunk, HTTP_CONTENT_DIGEST=content_digest(chunk + b"!"))
            assert response.status_code == 422, response.content
            assert response.json()["code"] == "checksum_mismatch"
            self._saw(m, response.json()["offset"], ack=False)
        else:
            response = self._patch(self.api, m, m.offset, chunk, HTTP_UPLOAD_CHECKSUM=tus_checksum(chunk + b"!"))
            assert response.status_code == 460, response.content
        m.dirty = False  # the writer cut the old tail, then dropped the rejected chunk

    @precondition(lambda self: self._writable())
    @rule(data=st.data())
    def append_short_body(self, data) -> None:
        """A body that ends (or breaks) before Content-Length bytes arrived (X3), straight into the
        engine: IncompleteBody, keeping the received prefix (without a digest) or nothing (with one)."""
        self._count("append_short_body")
        m = data.draw(st.sampled_from(self._writable()), label="upload")
        length = data.draw(st.integers(1, m.remaining), label="length")
        sent = data.draw(st.integers(0, length - 1), label="sent")
        breaks = data.draw(st.booleans(), label="breaks")
        with_digest = data.draw(st.booleans(), label="digest")
        start = m.offset
        chunk = m.source[start : start + length]
        digest = ChunkDigest("sha256", hashlib.sha256(chunk).digest()) if with_digest else None
        row = UploadSession.objects.get(pk=m.id)
        with pytest.raises(IncompleteBody) as caught:
            services.upload_append(
                upload=row, offset=start, stream=ShortStream(chunk[:sent], breaks=breaks), length=length, digest=digest
            )
        reported = caught.value.extra()["offset"]
        assert caught.value.status_code == 400
        # All or nothing with a digest; otherwise every byte received is kept.
        m.offset = start if with_digest else start + sent
        m.dirty = False
        self._saw(m, reported, ack=True)

    # --- crashes and lost caches ---

    @precondition(lambda self: self._writable())
    @rule(data=st.data())
    def crash_between_write_and_commit(self, data) -> None:
        """A worker died after writing past the committed offset, before committing (A2
        after_write): a tail of wrong bytes on disk that the next writer must cut."""
        self._count("crash_between_write_and_commit")
        m = data.draw(st.sampled_from(self._writable()), label="upload")
        length = data.draw(st.integers(1, m.remaining), label="tail")
        with storage.PartialWriter(m.uuid, m.offset) as writer:
            writer.write(garbage(m.source[m.offset : m.offset + length]))
        m.dirty = True

    @precondition(lambda self: self._writable())
    @rule(data=st.data())
    def crash_before_finalize(self, data) -> None:
        """A worker died after committing the last byte, before finalize (A3): the next GET or
        HEAD must finish the job exactly once."""
        self._count("crash_before_finalize")
        m = data.draw(st.sampled_from(self._writable()), label="upload")
        with storage.PartialWriter(m.uuid, m.offset) as writer:
            writer.write(m.source[m.offset :])
            writer.sync()
        assert UploadSession.objects.filter(pk=m.id, offset=m.offset, status=Status.PARTIAL).update(offset=m.size) == 1
        m.offset, m.pending, m.dirty = m.size, True, False
        # Often the client recovers at once, as documented: it asks the server where it stands.
        recovery = data.draw(st.sampled_from([None, "get", "head"]), label="recovery")
        if recovery == "get":
            self._get(m)
        elif recovery == "head":
            self._head(m)

    @precondition(lambda self: self._live())
    @rule(aliases=st.sampled_from([("uploads",), ("default",), ("default", "uploads")]))
    def flush_redis(self, aliases) -> None:
        """Redis loses every progress total, or the default cache is cleared (B3): progress falls
        back to the database. Only this process's keys are deleted: `clear()` would FLUSHDB and wipe
        other test runs sharing the test databases (X9)."""
        self._count("flush_redis")
        for alias in aliases:
            caches[alias].delete_pattern("*")

    @precondition(lambda self: self._live(lambda m: m.status == PARTIAL and not m.pending and m.remaining >= 2))
    @rule(data=st.data())
    def cache_ahead_of_the_database(self, data) -> None:
        """Redis claims more than is committed (a bad value, an old snapshot restored: B4) and a
        client believes it: 409 with the committed offset, and Redis is put back behind the truth."""
        self._count("cache_ahead_of_the_database")
        m = data.draw(
            st.sampled_from(self._live(lambda m: m.status == PARTIAL and not m.pending and m.remaining >= 2)),
            label="upload",
        )
        claimed = m.offset + data.draw(st.integers(1, m.remaining - 1), label="ahead")
        row = UploadSession.objects.get(pk=m.id)
        progress.record(row, claimed)
        assert progress.read(row) == claimed
        chunk = m.source[claimed : claimed + 1]
        if data.draw(st.sampled_from(["rest", "tus"]), label="via") == "rest":
            response = self._put(self.api, m, claimed, chunk)
            assert response.status_code == 409, response.content
            self._saw(m, response.json()["offset"], ack=False)
        else:
            response = self._patch(self.api, m, claimed, chunk)
            assert response.status_code == 409, response.content
            self._saw(m, int(response["Upload-Offset"]), ack=False)
        assert progress.read(row) == m.offset, "the 409 left Redis ahead of the database"

    # --- reading ---

    @precondition(lambda self: self.uploads)
    @rule(data=st.data())
    def get(self, data) -> None:
        """GET /api/uploads/<id>/ (and the download when complete): the model's offset and status."""
        self._count("get")
        self._get(data.draw(st.sampled_from(list(self.uploads.values())), label="upload"))

    @precondition(lambda self: self.uploads)
    @rule(data=st.data())
    def tus_head(self, data) -> None:
        """HEAD /files/<id>: Upload-Offset is the model's; gone uploads are 410, deleted 404."""
        self._count("tus_head")
        self._head(data.draw(st.sampled_from(list(self.uploads.values())), label="upload"))

    def _get(self, m: Upload) -> None:
        response = self.api.get(f"/api/uploads/{m.id}/")
        if m.status == DELETED:
            assert response.status_code == 404, response.content
            return
        if m.pending:
            self._finished(m)  # a GET finishes an upload whose every byte is committed
        # Even when finishing it fails the upload (wrong declared checksum), a GET describes it.
        assert response.status_code == 200, response.content
        body = response.json()
        self._check_body(m, body)
        self._saw(m, body["offset"], ack=True)
        download = self.api.get(f"/api/uploads/{m.id}/content/")
        if m.status == COMPLETE:
            assert download.status_code == 200
            assert b"".join(download.streaming_content) == m.source
        else:
            assert download.status_code == 409, download.content

    def _head(self, m: Upload) -> None:
        response = self.api.head(f"/files/{m.id}", **TUS)
        if m.status == DELETED:
            assert response.status_code == 404
            return
        if m.pending:
            self._finished(m)
        if m.status in (FAILED, EXPIRED):
            assert response.status_code == 410, (response.status_code, m)
            return
        assert response.status_code == 200, (response.status_code, m)
        assert int(response["Upload-Length"]) == m.size
        self._saw(m, int(response["Upload-Offset"]), ack=True)

    @precondition(lambda self: self.uploads)
    @rule(status=st.sampled_from([None, PARTIAL, COMPLETE, FAILED, EXPIRED]))
    def list_uploads(self, status) -> None:
        """GET /api/uploads/?status=: the same uploads, with the statuses the model expects."""
        self._count("list_uploads")
        response = self.api.get("/api/uploads/", {"status": status} if status else {})
        assert response.status_code == 200, response.content
        expected = {m.id: m for m in self._live(lambda m: status is None or m.status == status)}
        body = response.json()
        assert body["count"] == len(expected), (body["count"], sorted(expected))
        for item in body["results"]:
            assert item["id"] in expected, item
            m = expected[item["id"]]
            assert item["status"] == m.status and item["offset"] == m.offset

    # --- ending ---

    def _finished_uploads(self) -> list[Upload]:
        return [m for m in self.uploads.values() if m.status != PARTIAL and m.size >= 1]

    @precondition(lambda self: self._finished_uploads())
    @rule(data=st.data())
    def append_to_finished_upload(self, data) -> None:
        """A chunk for an upload that is complete (409, or tus 204 when it is a retried last PATCH), failed
        or expired (410), or deleted (404). Nothing changes, except that an upload past its
        expiry is now marked expired."""
        self._count("append_to_finished_upload")
        m = data.draw(st.sampled_from(self._finished_uploads()), label="upload")
        via = data.draw(st.sampled_from(["rest", "tus"]), label="via")
        chunk = m.source[:1]
        response = self._put(self.api, m, 0, chunk) if via == "rest" else self._patch(self.api, m, 0, chunk)
        if m.status == DELETED:
            assert response.status_code == 404, response.content
        elif m.status == COMPLETE and via == "rest":
            assert response.status_code == 409, response.content
            assert response.json()["code"] == "complete"
            self._saw(m, response.json()["offset"], ack=False)
        elif m.status == COMPLETE and m.size == 1:
            # The chunk is the upload's last bytes: a retried last PATCH gets its 204 (D8).
            assert response.status_code == 204, response.content
            self._saw(m, int(response["Upload-Offset"]), ack=True)
        elif m.status == COMPLETE:
            # Not the end of what it holds: the upload is complete, nothing was stored (D8).
            assert response.status_code == 409, response.content
            self._saw(m, int(response["Upload-Offset"]), ack=False)
        else:
            assert response.status_code == 410, response.content
            if m.lazy:
                self._expire_in_db(m)

    @precondition(lambda self: self.uploads)
    @rule(data=st.data())
    def delete(self, data) -> None:
        """DELETE (REST or tus): 204 and gone everywhere (404 after); 404 if already deleted."""
        self._count("delete")
        m = data.draw(st.sampled_from(list(self.uploads.values())), label="upload")
        via = data.draw(st.sampled_from(["rest", "tus"]), label="via")
        if via == "rest":
            response = self.api.delete(f"/api/uploads/{m.id}/")
        else:
            response = self.api.delete(f"/files/{m.id}", **TUS)
        assert response.status_code == (404 if m.status == DELETED else 204), response.content
        m.status, m.lazy, m.dirty, m.pending = DELETED, False, False, False
        assert self.api.get(f"/api/uploads/{m.id}/").status_code == 404
        assert self.api.head(f"/files/{m.id}", **TUS).status_code == 404

    @precondition(lambda self: self._live())
    @rule(data=st.data(), cleanup=st.booleans())
    def expire(self, data, cleanup) -> None:
        """The upload's expiry passes (a queryset update); then maybe the cleanup command runs.

        Only unfinished uploads expire (410 after); completed and failed ones are untouched.
        """
        self._count("expire" if cleanup else "expire_lazily")
        m = data.draw(st.sampled_from(self._live()), label="upload")
        UploadSession.objects.filter(pk=m.id).update(expires_at=timezone.now() - timedelta(seconds=1))
        if m.status == PARTIAL:
            m.status, m.lazy = EXPIRED, True
        if not cleanup:
            return
        expected = {u.id for u in self._live(lambda u: u.lazy)}
        report = services.uploads_cleanup()
        assert {str(u.pk) for u in report.expired} == expected
        assert report.skipped_busy == [] and report.orphaned_files == []
        for u in self._live(lambda u: u.lazy):
            self._expire_in_db(u)
            assert self.api.head(f"/files/{u.id}", **TUS).status_code == 410

    @precondition(lambda self: self.uploads)
    @rule(data=st.data())
    def other_user_is_refused(self, data) -> None:
        """bob reads, writes or deletes alice's upload: 404 everywhere, nothing changes (K1)."""
        self._count("other_user_is_refused")
        m = data.draw(st.sampled_from(list(self.uploads.values())), label="upload")
        action = data.draw(st.sampled_from(["get", "put", "patch", "head", "delete", "tus-delete"]), label="action")
        client = self.other_api
        chunk = m.source[m.offset : m.offset + 1] or b"x"
        response = {
            "get": lambda: client.get(f"/api/uploads/{m.id}/"),
            "put": lambda: client.put(
                f"/api/uploads/{m.id}/", data=chunk, content_type=OCTET,
                HTTP_CONTENT_RANGE=f"bytes {m.offset}-{m.offset}/{max(m.size, m.offset + 1)}",
            ),
            "patch": lambda: self._patch(client, m, m.offset, chunk),
            "head": lambda: client.head(f"/files/{m.id}", **TUS),
            "delete": lambda: client.delete(f"/api/uploads/{m.id}/"),
            "tus-delete": lambda: client.delete(f"/files/{m.id}", **TUS),
        }[action]()
        assert response.status_code == 404, (action, response.status_code)

    # --- invariants ---

    def _key_owner(self, m: Upload) -> bool:
        """Whether `m`'s Redis progress key is its own. REST totals are keyed by owner, size and
        file name (the seed's scheme), so a later upload of the same file reuses the key."""
        if m.protocol != Protocol.REST:
            return True
        later = [
            u for u in self.uploads.values()
            if u.protocol == Protocol.REST and u.name == m.name and u.size == m.size and u.created_at > m.created_at
        ]
        return not later

    @invariant()
    def database_files_and_redis_agree_with_the_model(self) -> None:
        for m in self.uploads.values():
            if m.status == DELETED:
                assert not UploadSession.objects.filter(pk=m.id).exists(), f"{m.id} was deleted"
                assert not storage.partial_path(m.uuid).exists()
                assert final_files(UploadSession(pk=m.uuid, filename=m.name)) == []
                continue
            row = UploadSession.objects.get(pk=m.id)
            if self._key_owner(m) or m.status != EXPIRED:
                # (An expired upload's offset may be below a newer upload's total under the shared key.)
                row = assert_invariants(row, m.source, acked=m.acked, reconciled=not (m.dirty or m.pending))
            else:
                assert row.status == Status.EXPIRED and storage.partial_size(m.uuid) is None
                assert final_files(row) == [] and not row.file and m.acked <= row.offset
            assert row.offset == m.offset, (row.offset, m)
            assert row.status == m.db_status(), (row.status, m)
            assert selectors.upload_effective_status(row) == m.status, (row.status, row.expires_at, m)
            assert row.checksum == m.checksum and row.size == m.size and row.protocol == m.protocol

    @invariant()
    def nothing_stray_on_disk(self) -> None:
        """INV6: partial files only for unfinished uploads, final files only for complete ones."""
        live = {m.uuid.hex: m for m in self._live()}
        partial = storage.partial_dir()
        for entry in (partial.iterdir() if partial.exists() else []):
            stem, suffix = entry.name.split(".", 1)
            assert stem in live, f"{entry.name} belongs to no upload"
            if suffix == "part":
                assert live[stem].db_status() == Status.PARTIAL, f"{entry.name}: {live[stem]}"
        root = Path(django_settings.MEDIA_ROOT)
        finals = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and partial not in p.parents}
        expected = {storage.final_name(m.uuid, m.name) for m in self._live(lambda m: m.status == COMPLETE)}
        assert finals == expected


@pytest.fixture
def engine_settings(settings):
    """Small blocks and commits every 16 KiB (never on a timer): a 64 KiB chunk commits several
    times, so interrupted bodies and crashes land between commits."""
    settings.UPLOADS_BLOCK_SIZE = 4 * KiB
    settings.UPLOADS_COMMIT_BYTES = 16 * KiB
    settings.UPLOADS_COMMIT_INTERVAL = 3600


@pytest.mark.django_db(transaction=True)
def test_uploads_agree_with_the_reference_model(api, other_api, engine_settings, capsys):
    UploadMachine.configure(api=api, other_api=other_api)
    profile = settings.get_profile(PROFILE_NAME)
    started = time.monotonic()
    run_state_machine_as_test(UploadMachine, settings=profile)
    elapsed = time.monotonic() - started
    counts = UploadMachine.rule_counts
    with capsys.disabled():
        print(
            f"\n[model] profile={PROFILE_NAME} examples={UploadMachine.examples} steps={UploadMachine.steps} "
            f"in {elapsed:.1f}s; rules: {dict(sorted(counts.items()))}"
        )
    # Not vacuous: every kind of action happened.
    for name in ("create_rest", "create_tus", "append", "finish", "append_at_wrong_offset",
                 "append_with_wrong_digest", "append_short_body", "append_to_finished_upload",
                 "crash_between_write_and_commit", "crash_before_finalize", "flush_redis",
                 "cache_ahead_of_the_database", "get", "tus_head", "list_uploads", "delete", "expire",
                 "expire_lazily", "other_user_is_refused"):
        assert counts[name] > 0, f"rule {name} never ran"
