"""Redis and PostgreSQL faults (RELIABILITY.md §5 B2-B4, B6, B7, C1-C3), against servers of our own.

Every test that kills, flushes, slows or crashes a service starts a dedicated one (see
tests/faults_services_support.py), so the Redis and PostgreSQL the rest of the suite shares are
never touched. The gunicorn under test gets `REDIS_URL`/`UPLOADS_REDIS_URL` (and for C1/C2 a
`DATABASE_URL`) pointing at them; the test reads Redis with its own client on that port.

Covered elsewhere, not repeated: B1 (Redis down: test_live.py, test_services.py, test_admin.py),
B4 at the engine level (test_services.py; here over HTTP for REST and tus), B5 (crash points).
"""
from __future__ import annotations

import hashlib
import io
import os
import pwd
import re
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings
from django.core.cache import caches
from django.db import connection
from rest_framework.authtoken.models import Token

from uploads import progress, services
from uploads.models import Status, UploadSession

from .faults_services_support import (
    ROOT,
    LatencyProxy,
    PgCluster,
    RedisServer,
    Sampler,
    assert_raw_invariants,
    pg_row,
    postgres_bin,
    wait_until,
)
from .invariants import OffsetLog, assert_invariants, assert_single_writer
from .server import start_server

KiB = 1024
MiB = 1024 * KiB
OCTET = "application/octet-stream"
TUS_OCTETS = "application/offset+octet-stream"
TUS_VERSION = "1.0.0"


# --- Fixtures and clients --------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path):
    try:
        server = RedisServer(tmp_path / "redis")
    except FileNotFoundError as exc:
        pytest.skip(f"the Redis fault tests start their own redis-server: {exc}")
    server.start()
    yield server
    server.stop()


def redis_env(redis_server: RedisServer) -> dict[str, str]:
    return {"REDIS_URL": redis_server.url(0), "UPLOADS_REDIS_URL": redis_server.url(1)}


class Api:
    """REST and tus over real HTTP, for one token."""

    def __init__(self, base: str, token: str) -> None:
        self.base = base
        self.auth = {"Authorization": f"Token {token}"}

    # REST
    def create(self, name: str, size: int) -> requests.Response:
        return requests.post(f"{self.base}/api/uploads/", json={"filename": name, "size": size}, headers=self.auth, timeout=20)

    def put(self, upload_id: str, source: bytes, start: int, end: int) -> requests.Response:
        return requests.put(
            f"{self.base}/api/uploads/{upload_id}/", data=source[start:end], timeout=30,
            headers={**self.auth, "Content-Type": OCTET, "Content-Range": f"bytes {start}-{end - 1}/{len(source)}"},
        )

    def get(self, upload_id: str) -> requests.Response:
        return requests.get(f"{self.base}/api/uploads/{upload_id}/", headers=self.auth, timeout=20)

    # tus
    def tus_create(self, size: int) -> str:
        response = requests.post(
            f"{self.base}/files/", timeout=20,
            headers={**self.auth, "Tus-Resumable": TUS_VERSION, "Upload-Length": str(size)},
        )
        assert response.status_code == 201, response.text
        return str(uuid.UUID(urlsplit(response.headers["Location"]).path.rstrip("/").rsplit("/", 1)[-1]))

    def patch(self, upload_id: str, source: bytes, start: int, end: int) -> requests.Response:
        return requests.patch(
            f"{self.base}/files/{upload_id}", data=source[start:end], timeout=30,
            headers={**self.auth, "Tus-Resumable": TUS_VERSION, "Content-Type": TUS_OCTETS, "Upload-Offset": str(start)},
        )

    def head(self, upload_id: str) -> requests.Response:
        return requests.head(f"{self.base}/files/{upload_id}", headers={**self.auth, "Tus-Resumable": TUS_VERSION}, timeout=20)


def server_key(upload: UploadSession) -> str:
    """The key the server process writes, as django-redis builds it: "<KEY_PREFIX>:<VERSION>:<key>"
    (the server shares this process's prefix: tests/server.py)."""
    return f"{settings.CACHES['uploads']['KEY_PREFIX']}:1:{progress.key_for(upload)}"


def redis_total(client, upload: UploadSession) -> int | None:
    raw = client.get(server_key(upload))
    return None if raw is None else int(raw)


def sampler_for(redis_server: RedisServer, upload: UploadSession) -> Sampler:
    """INV3, continuously: our Redis (first), then the test database (the server's database too)."""
    cache = redis_server.client(1, timeout=0.2)

    def read_db() -> int:
        return UploadSession.objects.filter(pk=upload.pk).values_list("offset", flat=True).get()

    # `connection` resolves per thread: close the sampler's own connection, from its thread.
    return Sampler(lambda: redis_total(cache, upload), read_db, close=lambda: connection.close())


def warm_up(api: Api) -> None:
    """A few parallel requests that touch no Redis, so every worker has booted Django before a
    test times anything (a fresh worker's first request takes a second or two on its own)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: api.get(str(uuid.uuid4())).status_code, range(16)))
    assert set(statuses) == {404}, statuses


def finish_rest(api: Api, upload_id: str, source: bytes, start: int, chunk: int, shown: OffsetLog) -> dict:
    offset = start
    body = None
    while offset < len(source):
        response = api.put(upload_id, source, offset, min(offset + chunk, len(source)))
        assert response.status_code == 200, response.text
        body = response.json()
        offset = shown.saw(body["offset"])
    return body


# --- B2: Redis killed and restarted empty ---------------------------------------------------------


@pytest.mark.live
def test_b2_redis_killed_and_restarted_empty_mid_upload(redis_server, start_gunicorn, token, user):
    """kill -9 of Redis mid-upload: the chunk sent while it is down succeeds at once (Redis is a
    cache), the offset comes from the database (never 0), Redis restarted empty refills lazily,
    the upload finishes with the right SHA, and the cache never leads the database (INV3)."""
    server = start_gunicorn(**redis_env(redis_server))
    api, cache, shown = Api(server.url, token), redis_server.client(1), OffsetLog()
    source = os.urandom(6 * MiB)
    created = api.create("b2.bin", len(source))
    assert created.status_code == 201, created.text
    upload_id = created.json()["id"]
    upload = UploadSession.objects.get(pk=upload_id)
    sampler = sampler_for(redis_server, upload)
    try:
        for start in (0, MiB):
            response = api.put(upload_id, source, start, start + MiB)
            assert response.status_code == 200, response.text
            shown.saw(response.json()["offset"])
        assert redis_total(cache, upload) == 2 * MiB

        redis_server.kill()
        started = time.monotonic()
        response = api.put(upload_id, source, 2 * MiB, 3 * MiB)
        assert response.status_code == 200, response.text
        assert time.monotonic() - started < 2.5, "a dead Redis must cost at most its 0.5 s timeout"
        shown.saw(response.json()["offset"])

        redis_server.start()  # same port, nothing in it
        assert redis_total(cache, upload) is None
        assert shown.saw(api.get(upload_id).json()["offset"]) == 3 * MiB  # from the database, not 0
        head = api.head(upload_id)
        assert head.status_code == 200 and int(head.headers["Upload-Offset"]) == 3 * MiB

        # Redis refills lazily: resuming by name records the committed total (once the workers'
        # 5 s back-off after the failure has passed).
        def refilled() -> bool:
            resumed = api.create("b2.bin", len(source))
            assert resumed.status_code == 200 and resumed.json()["offset"] == 3 * MiB, resumed.text
            return redis_total(cache, upload) == 3 * MiB

        wait_until(refilled, 12, "Redis to refill from the database", interval=0.5)
        body = finish_rest(api, upload_id, source, 3 * MiB, MiB, shown)
        assert body["status"] == "complete" and body["sha256"] == hashlib.sha256(source).hexdigest()
    finally:
        sampler.stop()
    assert sampler.samples > 10 and not sampler.errors, sampler.errors[:3]
    assert sampler.violations == [], f"Redis ahead of the database: {sampler.violations[:5]}"
    assert_invariants(upload, source, acked=shown.acked)


# --- B3: FLUSHALL, and cache.clear() on the default alias -------------------------------------------


@pytest.mark.live
def test_b3_flushall_mid_tus_upload(redis_server, start_gunicorn, token, user):
    server = start_gunicorn(**redis_env(redis_server))
    api, cache, shown = Api(server.url, token), redis_server.client(1), OffsetLog()
    source = os.urandom(4 * MiB)
    upload_id = api.tus_create(len(source))
    upload = UploadSession.objects.get(pk=upload_id)
    sampler = sampler_for(redis_server, upload)
    try:
        for start in (0, MiB):
            response = api.patch(upload_id, source, start, start + MiB)
            assert response.status_code == 204, response.text
            shown.saw(response.headers["Upload-Offset"])
            sampler.sample_more()
        assert redis_total(cache, upload) == 2 * MiB

        redis_server.client(0).flushall()
        assert redis_total(cache, upload) is None
        sampler.sample_more()
        head = api.head(upload_id)
        assert head.status_code == 200 and shown.saw(head.headers["Upload-Offset"]) == 2 * MiB

        for start in (2 * MiB, 3 * MiB):
            response = api.patch(upload_id, source, start, start + MiB)
            assert response.status_code == 204, response.text
            shown.saw(response.headers["Upload-Offset"])
            assert redis_total(cache, upload) == start + MiB  # refilled by the next commit
            sampler.sample_more()
    finally:
        sampler.stop()
    assert sampler.samples > 10 and not sampler.errors, sampler.errors[:3]
    assert sampler.violations == [], f"Redis ahead of the database: {sampler.violations[:5]}"
    assert assert_invariants(upload, source, acked=shown.acked).status == Status.COMPLETE


@pytest.fixture
def caches_on(settings, redis_server):
    """Point this process's `default` and `uploads` cache aliases at our own Redis (databases 14
    and 15, as in the suite), so a real FLUSHDB cannot wipe another test run's keys."""
    configured = {alias: dict(config) for alias, config in settings.CACHES.items()}
    configured["default"]["LOCATION"] = redis_server.url(14)
    configured["uploads"]["LOCATION"] = redis_server.url(15)
    settings.CACHES = configured
    progress.reset_backoff()
    return redis_server


@pytest.mark.django_db(transaction=True)
def test_b3_clearing_the_default_cache_keeps_the_upload_totals(caches_on, user):
    """X9: django-redis `cache.clear()` is FLUSHDB. The totals live in their own alias and
    database, so clearing the default cache (as any app code might) leaves them alone."""
    data = os.urandom(3000)
    upload, _ = services.upload_create(owner=user, filename="b3.bin", size=len(data))
    upload = services.upload_append(upload=upload, offset=0, stream=io.BytesIO(data[:1000]), length=1000)
    caches["default"].set("page-fragment", "cached")
    assert progress.read(upload) == 1000

    caches["default"].clear()
    assert caches["default"].get("page-fragment") is None  # the FLUSHDB really happened
    assert progress.read(upload) == 1000  # ... and did not reach the totals' database
    assert caches_on.client(15).dbsize() >= 1
    assert_invariants(upload, data, acked=1000)


# --- B4: Redis ahead of the database ----------------------------------------------------------------


@pytest.mark.live
def test_b4_redis_ahead_of_the_database_is_corrected_rest_and_tus(redis_server, start_gunicorn, token, user):
    """A bad or restored Redis value says 1 MiB more than the database committed. A client that
    believes it and sends from there gets 409 with the committed offset, nothing is written, the
    cache is put back at the database's value, and resuming from the 409's offset completes."""
    server = start_gunicorn(**redis_env(redis_server))
    api, cache = Api(server.url, token), redis_server.client(1)
    source = os.urandom(3 * MiB)

    rest = api.create("b4.bin", len(source)).json()["id"]
    tus = api.tus_create(len(source))
    for kind, upload_id, send, ok in (("rest", rest, api.put, 200), ("tus", tus, api.patch, 204)):
        upload = UploadSession.objects.get(pk=upload_id)
        assert send(upload_id, source, 0, MiB).status_code == ok
        cache.set(server_key(upload), 2 * MiB)  # DB_OFF + 1 MiB

        response = send(upload_id, source, 2 * MiB, 3 * MiB)
        assert response.status_code == 409, response.text
        offset = int(response.headers["Upload-Offset"]) if kind == "tus" else response.json()["offset"]
        assert offset == MiB
        assert redis_total(cache, upload) == MiB  # corrected: the cache trails the truth again
        assert_invariants(upload, source, acked=MiB)

        assert send(upload_id, source, MiB, 3 * MiB).status_code == ok
        assert redis_total(cache, upload) == len(source)
        assert assert_invariants(upload, source, acked=len(source)).status == Status.COMPLETE


# --- B6: Redis slow ---------------------------------------------------------------------------------


@pytest.mark.live
def test_b6_slow_redis_does_not_hold_up_uploads(redis_server, start_gunicorn, token, user):
    """Every Redis command takes 2 s (a latency proxy). The 0.5 s socket timeout and the back-off
    bound what each request pays: a 4-chunk upload (plus its create) takes far less than the
    4 x 2 s it would if chunks waited on Redis, and no single request waits for a Redis reply."""
    proxy = LatencyProxy(redis_server.port, delay=2.0)
    try:
        server = start_gunicorn(REDIS_URL=proxy.url(0), UPLOADS_REDIS_URL=proxy.url(1))
        api, shown = Api(server.url, token), OffsetLog()
        warm_up(api)
        source = os.urandom(4 * MiB)
        durations = []
        started = time.monotonic()
        created = api.create("b6.bin", len(source))
        durations.append(time.monotonic() - started)
        assert created.status_code == 201, created.text
        upload_id = created.json()["id"]
        for start in range(0, len(source), MiB):
            began = time.monotonic()
            response = api.put(upload_id, source, start, start + MiB)
            durations.append(time.monotonic() - began)
            assert response.status_code == 200, response.text
            shown.saw(response.json()["offset"])
        total = time.monotonic() - started
        assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()
        # A request that waited for a Redis reply took at least the proxy's 2 s; the 0.5 s timeout
        # (plus the back-off after it) must have cut every wait short.
        assert max(durations) < 2.0, f"a request waited on Redis: {[round(d, 2) for d in durations]}"
        assert total < 5.0, f"a 4-chunk upload took {total:.1f} s with a slow Redis (durations {durations})"
        upload = UploadSession.objects.get(pk=upload_id)
        assert_invariants(upload, source, acked=shown.acked)
        # Whatever the slow Redis eventually stored, it does not lead the database (INV3).
        time.sleep(2.5)
        stored = redis_total(redis_server.client(1), upload)
        assert stored is None or stored <= upload.size
    finally:
        proxy.close()


# --- B7: a cache answering None ---------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("answer", ["missing", "none-values", "ignored-exceptions"])
def test_b7_none_from_the_cache_is_never_read_as_offset_0(answer, settings, monkeypatch, api, user, admin_client):
    """django-redis with IGNORE_EXCEPTIONS answers None (get) or {} (get_many) when Redis fails;
    a key may also hold nothing. Every offset a client or the admin sees still comes from the
    database: GET, the list, resume by name, tus HEAD; the admin shows "no value", never 0."""
    data = os.urandom(5000)
    rest, _ = services.upload_create(owner=user, filename="b7.bin", size=len(data))
    services.upload_append(upload=rest, offset=0, stream=io.BytesIO(data[:1200]), length=1200)
    tus = services.upload_create_tus(owner=user, filename="b7-tus.bin", size=len(data))
    services.upload_append(upload=tus, offset=0, stream=io.BytesIO(data[:3400]), length=3400)

    if answer == "ignored-exceptions":
        configured = {alias: dict(config) for alias, config in settings.CACHES.items()}
        configured["uploads"]["LOCATION"] = "redis://127.0.0.1:1/15"  # nothing listens there
        configured["uploads"]["OPTIONS"] = {
            **configured["uploads"]["OPTIONS"], "IGNORE_EXCEPTIONS": True, "SOCKET_CONNECT_TIMEOUT": 0.2,
        }
        settings.CACHES = configured
    else:
        cache = caches["uploads"]
        monkeypatch.setattr(cache, "get", lambda *args, **kwargs: None)
        monkeypatch.setattr(
            cache, "get_many",
            (lambda keys, **kwargs: {}) if answer == "missing" else (lambda keys, **kwargs: dict.fromkeys(keys)),
        )
    progress.reset_backoff()
    assert progress.read(rest) is None and progress.read(tus) is None  # None, not 0

    assert api.get(f"/api/uploads/{rest.pk}/").json()["offset"] == 1200
    listed = {item["id"]: item["offset"] for item in api.get("/api/uploads/").json()["results"]}
    assert listed == {str(rest.pk): 1200, str(tus.pk): 3400}
    resumed = api.post("/api/uploads/", {"filename": "b7.bin", "size": len(data)}, format="json")
    assert resumed.status_code == 200 and resumed.json()["offset"] == 1200
    head = api.head(f"/files/{tus.pk}", HTTP_TUS_RESUMABLE=TUS_VERSION)
    assert head.status_code == 200 and head["Upload-Offset"] == "3400"

    page = admin_client.get("/admin/uploads/uploadsession/")
    assert page.status_code == 200
    totals = re.findall(r'<t[dh] class="field-redis_total[^"]*">(.*?)</t[dh]>', page.content.decode(), re.S)
    assert totals == ["—", "—"], totals

    # And the next chunk goes where the database says, completing the upload.
    response = api.put(
        f"/api/uploads/{rest.pk}/", data=data[1200:], content_type=OCTET,
        HTTP_CONTENT_RANGE=f"bytes 1200-{len(data) - 1}/{len(data)}",
    )
    assert response.status_code == 200 and response.json()["status"] == "complete"


# --- C1, C2: PostgreSQL crashed, on a throwaway cluster ----------------------------------------------


def _suite_on_postgresql() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


@pytest.fixture(scope="module")
def pg_cluster():
    """One throwaway cluster for C1 and C2 (initdb and migrate cost ~8 s, so once per module).

    It is independent of the suite's database, but costs ~30 s in all, so it runs in the
    PostgreSQL pass of CI only."""
    if not _suite_on_postgresql():
        pytest.skip("C1/C2 crash a throwaway PostgreSQL cluster (~30 s); they run in the PostgreSQL pass "
                    "(DATABASE_URL=postgres://...), not the SQLite one")
    if postgres_bin("initdb") is None or postgres_bin("pg_ctl") is None:
        pytest.skip("C1/C2 need PostgreSQL's initdb and pg_ctl (/usr/lib/postgresql/*/bin)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("C1/C2 run initdb as the `postgres` user (it refuses root), and there is none")
    cluster = PgCluster()
    try:
        cluster.start()
        cluster.create_database()
        cluster.token = cluster.bootstrap({})
        yield cluster
    finally:
        cluster.destroy()


def _pg_server(pg_cluster, redis_server, media_root, tmp_path, **env):
    return start_server(
        media_root, tmp_path,
        DATABASE_URL=pg_cluster.url(), CONN_MAX_AGE="60", UPLOADS_COMMIT_BYTES=str(MiB),
        **redis_env(redis_server), **env,
    )


def _throttled_put(url: str, token: str, source: bytes, start: int, end: int, rate: int) -> dict:
    """PUT source[start:end] at about `rate` bytes/s over a raw socket; returns what came back."""
    parts = urlsplit(url)
    outcome: dict = {"status": None, "error": None, "sent": 0}
    sock = socket.create_connection((parts.hostname, parts.port), timeout=30)
    try:
        sock.sendall(
            f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Token {token}\r\n"
            f"Content-Type: {OCTET}\r\nContent-Range: bytes {start}-{end - 1}/{len(source)}\r\n"
            f"Content-Length: {end - start}\r\nConnection: close\r\n\r\n".encode()
        )
        piece = 64 * KiB
        for offset in range(start, end, piece):
            sock.sendall(source[offset : min(offset + piece, end)])
            outcome["sent"] += min(piece, end - offset)
            time.sleep(piece / rate)
    except OSError as exc:
        outcome["error"] = repr(exc)  # the server answered and closed while we were still sending
    try:
        sock.settimeout(15)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        if reply:
            outcome["status"] = int(reply.split(b" ", 2)[1])
            outcome["reply"] = reply[:400]
    except OSError as exc:
        outcome["error"] = outcome["error"] or repr(exc)
    finally:
        sock.close()
    return outcome


@pytest.mark.live
def test_c1_postgresql_crash_mid_chunk(pg_cluster, redis_server, media_root, tmp_path):
    """PostgreSQL crashes (`-m immediate`) 1 s into a throttled chunk and stays down ~3 s. The
    in-flight chunk is not acknowledged, every request during the outage gets a 503 with
    Retry-After (never a 2xx, never a 500), the invariants hold, and once PostgreSQL is back the
    first request succeeds (CONN_MAX_AGE=60 with CONN_HEALTH_CHECKS) and the upload finishes."""
    server = _pg_server(pg_cluster, redis_server, media_root, tmp_path)
    try:
        api, shown = Api(server.url, pg_cluster.token), OffsetLog()
        source = os.urandom(6 * MiB)
        created = api.create(f"c1-{uuid.uuid4().hex}.bin", len(source))
        assert created.status_code == 201, created.text
        upload_id = created.json()["id"]
        response = api.put(upload_id, source, 0, MiB)
        assert response.status_code == 200, response.text
        shown.saw(response.json()["offset"])

        with ThreadPoolExecutor(max_workers=1) as pool:
            inflight = pool.submit(
                _throttled_put, f"{server.url}/api/uploads/{upload_id}/", pg_cluster.token, source, MiB, 5 * MiB, MiB
            )
            time.sleep(1.0)
            pg_cluster.crash()
            down_at = time.monotonic()
            during = []
            while time.monotonic() - down_at < 3.0:
                probe = api.get(upload_id)
                during.append((probe.status_code, probe.headers.get("Retry-After")))
                time.sleep(0.3)
            outcome = inflight.result(timeout=60)
        assert outcome["status"] is None or not 200 <= outcome["status"] < 300, f"a chunk was acked during the outage: {outcome}"
        assert outcome["status"] in (None, 503), outcome
        assert during and all(status == 503 and retry for status, retry in during), during

        pg_cluster.start()
        first = api.get(upload_id)
        assert first.status_code == 200, f"the first request after the restart failed: {first.status_code} {first.text[:300]}"
        row = pg_row(pg_cluster.url(), upload_id)
        assert_raw_invariants(row, source, media_root, acked=shown.acked, reconciled=False)
        offset = shown.saw(first.json()["offset"])
        assert offset == row["offset"]
        while offset < len(source):
            response = api.put(upload_id, source, offset, min(offset + 2 * MiB, len(source)))
            assert response.status_code == 200, response.text
            offset = shown.saw(response.json()["offset"])
        assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()
        assert_raw_invariants(pg_row(pg_cluster.url(), upload_id), source, media_root, acked=len(source))
        assert "Traceback" not in server.output()
    finally:
        server.stop()
    assert_single_writer(server.write_log)


def _without_health_checks(directory) -> dict[str, str]:
    """Server settings identical to project.settings but with CONN_HEALTH_CHECKS off (C2's control)."""
    (directory / "faults_no_health_checks.py").write_text(
        "from project.settings import *  # noqa: F403\n"
        "DATABASES['default']['CONN_HEALTH_CHECKS'] = False  # noqa: F405\n"
    )
    return {"DJANGO_SETTINGS_MODULE": "faults_no_health_checks", "PYTHONPATH": os.pathsep.join([str(directory), str(ROOT)])}


@pytest.mark.live
@pytest.mark.parametrize("health_checks", [True, False], ids=["health-checks", "control-without"])
def test_c2_postgresql_restart_between_chunks(health_checks, pg_cluster, redis_server, media_root, tmp_path):
    """Persistent connections (CONN_MAX_AGE=60) open in every worker thread, then PostgreSQL
    restarts between chunks. With CONN_HEALTH_CHECKS (settings.py turns it on for every
    DATABASE_URL) the requests after the restart reconnect instead of failing: 8 sequential
    requests, zero 5xx. The control run without health checks records why the setting matters:
    a thread's first request on its dead connection fails (a clean 503, never a 500)."""
    from django.conf import settings

    if health_checks:
        # The server reads the same settings.py, so its PostgreSQL connection has them too.
        assert settings.DATABASES["default"]["CONN_HEALTH_CHECKS"] is True, "CONN_HEALTH_CHECKS is off"
    extra = {} if health_checks else _without_health_checks(tmp_path)
    server = _pg_server(pg_cluster, redis_server, media_root, tmp_path, WEB_CONCURRENCY="2", GUNICORN_THREADS="4", **extra)
    try:
        api, shown = Api(server.url, pg_cluster.token), OffsetLog()
        source = os.urandom(8 * MiB)
        created = api.create(f"c2-{uuid.uuid4().hex}.bin", len(source))
        assert created.status_code == 201, created.text
        upload_id = created.json()["id"]
        # Open a persistent connection in as many worker threads as possible.
        with ThreadPoolExecutor(max_workers=8) as pool:
            warm = list(pool.map(lambda _: api.get(upload_id).status_code, range(24)))
        assert set(warm) == {200}
        response = api.put(upload_id, source, 0, MiB)
        assert response.status_code == 200, response.text
        shown.saw(response.json()["offset"])

        pg_cluster.crash()
        time.sleep(0.5)
        pg_cluster.start()

        statuses = []
        offset = MiB
        for index in range(8):
            if index % 2:
                response = api.put(upload_id, source, offset, offset + MiB)
                if response.status_code == 200:
                    offset = shown.saw(response.json()["offset"])
            else:
                response = api.get(upload_id)
                if response.status_code == 200:
                    shown.saw(response.json()["offset"])
            statuses.append(response.status_code)
        if health_checks:
            assert statuses == [200] * 8, f"requests after the restart: {statuses}"
        else:
            assert 503 in statuses and set(statuses) <= {200, 503}, f"requests after the restart: {statuses}"
        while offset < len(source):
            response = api.put(upload_id, source, offset, len(source))
            assert response.status_code in (200, 503), response.text
            if response.status_code == 200:
                offset = shown.saw(response.json()["offset"])
        assert response.json()["sha256"] == hashlib.sha256(source).hexdigest()
        assert_raw_invariants(pg_row(pg_cluster.url(), upload_id), source, media_root, acked=len(source))
    finally:
        server.stop()
    assert_single_writer(server.write_log)


# --- C3: SQLite under concurrent uploads -----------------------------------------------------------


@pytest.mark.live
def test_c3_sqlite_concurrent_uploads_never_fail(redis_server, start_gunicorn, user):
    """SQLite, 2 workers x 4 threads, 8 uploads at once (REST and tus), 16 chunks each: no
    "database is locked" (it would show as a 503 or a 500), every upload completes correctly."""
    if connection.vendor != "sqlite":
        pytest.skip("C3 is about SQLite's single writer; the suite is running on PostgreSQL")
    server = start_gunicorn(WEB_CONCURRENCY="2", GUNICORN_THREADS="4", **redis_env(redis_server))
    api = Api(server.url, Token.objects.create(user=user).key)
    chunk, size = 128 * KiB, 2 * MiB
    statuses: list[int] = []
    lock = threading.Lock()

    def one(index: int) -> tuple[str, bytes]:
        source = os.urandom(size)
        if index % 2:
            upload_id = api.tus_create(size)
            send, ok = api.patch, 204
        else:
            created = api.create(f"c3-{index}.bin", size)
            with lock:
                statuses.append(created.status_code)
            upload_id = created.json()["id"]
            send, ok = api.put, 200
        for start in range(0, size, chunk):
            response = send(upload_id, source, start, start + chunk)
            with lock:
                statuses.append(response.status_code)
            assert response.status_code == ok, response.text
        return upload_id, source

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(8), timeout=60))
    elapsed = time.monotonic() - started
    assert [s for s in statuses if s >= 500] == [], statuses
    assert elapsed < 60
    for upload_id, source in results:
        assert assert_invariants(UploadSession.objects.get(pk=upload_id), source, acked=size).status == Status.COMPLETE
    assert "database is locked" not in server.output()
