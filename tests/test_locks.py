"""One writer per upload (RELIABILITY §6.4, INV7). Threads stand in for workers: on PostgreSQL each
has its own connection (so its own advisory-lock session); on SQLite each opens its own lock file
descriptor, which is what `flock` excludes."""
from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest
from django.db import connection

from uploads import locks, storage
from uploads.exceptions import UploadBusy

pytestmark = pytest.mark.django_db(transaction=True)


class Holder(threading.Thread):
    """Takes the upload's lock in its own thread (own DB connection) and keeps it until told."""

    def __init__(self, upload_id: uuid.UUID, *, fail_inside: bool = False) -> None:
        super().__init__(daemon=True)
        self.upload_id = upload_id
        self.fail_inside = fail_inside
        self.acquired = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with locks.upload_lock(self.upload_id, timeout=5):
                self.acquired.set()
                self.release.wait(10)
                if self.fail_inside:
                    raise RuntimeError("the request failed while holding the lock")
        except RuntimeError:
            pass
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self.error = exc
        finally:
            connection.close()

    def __enter__(self) -> Holder:
        self.start()
        assert self.acquired.wait(5), f"holder never got the lock: {self.error!r}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.join(10)
        assert not self.is_alive()
        assert self.error is None, self.error


def test_a_free_lock_is_taken_without_waiting():
    started = time.monotonic()
    with locks.upload_lock(uuid.uuid4(), timeout=0):
        pass
    assert time.monotonic() - started < 0.5


def test_two_threads_cannot_hold_the_same_upload():
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        started = time.monotonic()
        with pytest.raises(UploadBusy) as excinfo:
            with locks.upload_lock(upload_id, timeout=0.3):
                pytest.fail("two holders of one upload lock")
        waited = time.monotonic() - started
    assert excinfo.value.status_code == 423
    assert 0.3 <= waited < 2.0


def test_timeout_zero_fails_at_once_when_held():
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        started = time.monotonic()
        with pytest.raises(UploadBusy):
            with locks.upload_lock(upload_id, timeout=0):
                pass
        assert time.monotonic() - started < 0.5


def test_default_timeout_comes_from_settings(settings):
    settings.UPLOADS_LOCK_TIMEOUT = 0.2
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        started = time.monotonic()
        with pytest.raises(UploadBusy):
            with locks.upload_lock(upload_id):
                pass
        assert 0.2 <= time.monotonic() - started < 1.5


def test_a_waiter_gets_the_lock_when_it_is_released():
    upload_id = uuid.uuid4()
    holder = Holder(upload_id)
    with holder:
        threading.Timer(0.3, holder.release.set).start()
        started = time.monotonic()
        with locks.upload_lock(upload_id, timeout=5):
            waited = time.monotonic() - started
            assert holder.release.is_set()
    assert 0.25 <= waited < 5


def test_different_uploads_do_not_block_each_other():
    with Holder(uuid.uuid4()):
        with locks.upload_lock(uuid.uuid4(), timeout=0):
            pass


def test_lock_is_released_after_the_context():
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        pass
    with locks.upload_lock(upload_id, timeout=0):
        pass


def test_lock_is_released_when_the_holder_raises():
    upload_id = uuid.uuid4()
    with Holder(upload_id, fail_inside=True):
        pass
    with locks.upload_lock(upload_id, timeout=0):
        pass


def test_lock_is_released_when_the_waiter_gives_up():
    # A waiter that timed out must not leave a half-taken lock behind (PG: no lock; flock: fd closed).
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        with pytest.raises(UploadBusy):
            with locks.upload_lock(upload_id, timeout=0):
                pass
    with locks.upload_lock(upload_id, timeout=0):
        pass


def test_writers_never_overlap():
    # INV7: a write log shows no overlapping intervals for one upload.
    upload_id = uuid.uuid4()
    intervals: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker() -> None:
        try:
            barrier.wait(5)
            for _ in range(5):
                with locks.upload_lock(upload_id, timeout=10):
                    start = time.monotonic()
                    time.sleep(0.005)
                    intervals.append((start, time.monotonic()))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(intervals) == 20
    intervals.sort()
    for (_, end), (next_start, _) in zip(intervals, intervals[1:]):
        assert end <= next_start, "two writers held one upload at the same time"


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="advisory locks are PostgreSQL's")
def test_postgresql_lock_is_per_connection_and_dies_with_it():
    # A SIGKILLed worker's connection ends; the server drops its advisory locks (no stale lock, A4).
    upload_id = uuid.uuid4()
    acquired = threading.Event()
    backend_pid: list[int] = []

    def crashing_holder() -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(locks.upload_lock(upload_id, timeout=5))
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            backend_pid.append(cursor.fetchone()[0])
        acquired.set()
        connection.close()  # the "process" dies without leaving the context

    thread = threading.Thread(target=crashing_holder)
    thread.start()
    assert acquired.wait(5)
    thread.join(5)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        assert cursor.fetchone()[0] != backend_pid[0]  # the test thread has its own connection
    with locks.upload_lock(upload_id, timeout=2):
        pass


@pytest.mark.skipif("connection.vendor != 'postgresql'", reason="advisory locks are PostgreSQL's")
def test_postgresql_lock_is_a_session_advisory_lock():
    upload_id = uuid.uuid4()
    with locks.upload_lock(upload_id, timeout=0):
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            assert cursor.fetchone()[0] == 1
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()")
        assert cursor.fetchone()[0] == 0


@pytest.mark.skipif("connection.vendor == 'postgresql'", reason="flock is the non-PostgreSQL lock")
def test_file_lock_dies_with_a_killed_process():
    # Another process holds the flock and is SIGKILLed: the kernel releases it (tusd#437 has PID files).
    upload_id = uuid.uuid4()
    path = storage.lock_path(upload_id)
    storage.partial_dir().mkdir(parents=True, exist_ok=True)
    script = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(path)!r}, os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(UploadBusy):
            with locks.upload_lock(upload_id, timeout=0.1):
                pass
        child.kill()
        child.wait(5)
        with locks.upload_lock(upload_id, timeout=1):
            pass
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)
        child.stdout.close()


@pytest.mark.skipif("connection.vendor == 'postgresql'", reason="flock is the non-PostgreSQL lock")
def test_file_lock_uses_flock_on_the_lock_file():
    upload_id = uuid.uuid4()
    with locks.upload_lock(upload_id, timeout=0):
        fd = storage.open_lock_file(upload_id)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
