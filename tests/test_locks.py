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
from django.db import connection, transaction

from uploads import locks, storage
from uploads.exceptions import UploadBusy
from uploads.models import UploadSession

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


def test_is_held_tells_whether_another_request_holds_the_upload():
    """The reader's look (tus HEAD's fast path): held while another connection or thread holds
    the lock, free before and after; it never takes the lock, nor creates a lock file."""
    upload_id, other = uuid.uuid4(), uuid.uuid4()
    assert not locks.is_held(upload_id)
    if locks.uses_lock_files():
        assert not storage.lock_path(upload_id).exists()
    with Holder(upload_id):
        assert locks.is_held(upload_id)
        assert not locks.is_held(other)
        with locks.upload_lock(other, timeout=0):  # the look did not take the holder's lock away
            pass
    assert not locks.is_held(upload_id)
    with locks.upload_lock(upload_id, timeout=0):
        pass


def _upload(user, **fields) -> UploadSession:
    return UploadSession.objects.create(owner=user, filename="a.bin", size=10, **fields)


def test_look_and_read_tells_whether_the_lock_is_held_then_reads_the_row(user):
    """tus HEAD's fast path in one round trip on PostgreSQL: the look, then the row as committed
    after it (a row written before the look is seen); it never takes the lock."""
    upload = _upload(user)
    UploadSession.objects.filter(pk=upload.pk).update(offset=4)  # committed before the look
    held, row = locks.look_and_read(upload.pk)
    assert held is False and row.pk == upload.pk and row.offset == 4 and row.owner_id == user.pk
    with Holder(upload.pk):
        held, row = locks.look_and_read(upload.pk)
        assert held is True and row.offset == 4
    assert locks.look_and_read(uuid.uuid4()) == (False, None)
    with locks.upload_lock(upload.pk, timeout=0):  # the looks did not keep the lock
        pass


def test_a_look_gives_the_lock_back_at_once_even_inside_a_transaction(user):
    """The look tries the lock shared and gives it back within its statement (migration 0007 on
    PostgreSQL, a shared flock on a descriptor closed at once elsewhere): a writer on another
    connection takes the lock while the looker's transaction is still open."""
    upload = _upload(user)
    with transaction.atomic():
        held, row = locks.look_and_read(upload.pk)
        assert held is False and row.pk == upload.pk
        holder = Holder(upload.pk)
        holder.start()
        assert holder.acquired.wait(2), f"the look kept the lock: {holder.error!r}"
        holder.release.set()
        holder.join(10)
        assert holder.error is None, holder.error


def test_looks_in_a_loop_never_keep_a_writer_out(user):
    """A look holds the lock shared for an instant: a writer that tries exactly then waits one
    poll and gets it, never a 423. 200 looks on one connection against 50 takes on another."""
    upload = _upload(user)
    stop = threading.Event()
    errors: list[BaseException] = []

    def look() -> None:
        try:
            for _ in range(200):
                if stop.is_set():
                    break
                assert locks.look_and_read(upload.pk)[1] is not None
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)
        finally:
            connection.close()

    looker = threading.Thread(target=look, daemon=True)
    looker.start()
    try:
        for _ in range(50):
            with locks.upload_lock(upload.pk, timeout=2):
                pass
    finally:
        stop.set()
        looker.join(10)
    assert not errors, errors


def test_a_lock_taken_with_reload_reads_the_row_under_it(user):
    upload = _upload(user)
    UploadSession.objects.filter(pk=upload.pk).update(offset=7, status="failed")
    with locks.upload_lock(upload.pk, timeout=0, reload=upload):
        assert (upload.offset, upload.status) == (7, "failed")
        assert locks.is_held(upload.pk)
    assert not locks.is_held(upload.pk)


def test_a_lock_taken_with_reload_waits_for_the_holder_then_reads_what_it_committed(user):
    upload = _upload(user)
    holder = Holder(upload.pk)
    with holder:
        UploadSession.objects.filter(pk=upload.pk).update(offset=9)  # the holder's commit
        threading.Timer(0.2, holder.release.set).start()
        with locks.upload_lock(upload.pk, timeout=5, ask_release=False, reload=upload):
            assert upload.offset == 9


def test_a_lock_taken_with_reload_of_a_deleted_row_raises_and_is_released(user):
    upload = _upload(user)
    UploadSession.objects.filter(pk=upload.pk).delete()
    with pytest.raises(UploadSession.DoesNotExist):
        with locks.upload_lock(upload.pk, timeout=0, reload=upload):
            pytest.fail("the body ran for a row that is gone")
    assert not locks.is_held(upload.pk)


def test_a_busy_lock_taken_with_reload_still_times_out(user):
    upload = _upload(user)
    with Holder(upload.pk), pytest.raises(UploadBusy):
        with locks.upload_lock(upload.pk, timeout=0.2, ask_release=False, reload=upload):
            pytest.fail("two holders of one upload lock")


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


# --- Committing the offset and releasing in one round trip (migration 0005) ---------------------

postgresql_only = pytest.mark.skipif("connection.vendor != 'postgresql'", reason="PostgreSQL's own functions")


def _commit(upload: UploadSession, old: int, new: int, **options) -> int | None:
    from django.utils import timezone

    now = timezone.now()
    return locks.commit_offset(upload.pk, old=old, new=new, now=now, expires_at=now, **options)


@postgresql_only
def test_commit_offset_commits_then_releases_in_one_statement(user):
    from django.test.utils import CaptureQueriesContext

    upload = _upload(user)
    with CaptureQueriesContext(connection) as queries:
        with locks.upload_lock(upload.pk, timeout=0) as held:
            before = len(queries)
            assert _commit(upload, 0, 6, durable=True, then_release=held) == 1
            assert len(queries) == before + 1 and held.released
            assert not locks.is_held(upload.pk)
            after = len(queries)
    assert len(queries) == after  # the context did not unlock a second time
    assert UploadSession.objects.get(pk=upload.pk).offset == 6


@postgresql_only
def test_a_waiter_given_the_lock_by_commit_offset_reads_the_committed_offset(user):
    # The whole point of the procedure: the next holder's read comes after the commit, never between.
    upload = _upload(user)
    holder_has_it, waiter_started = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with locks.upload_lock(upload.pk, timeout=5) as held:
                holder_has_it.set()
                waiter_started.wait(5)
                time.sleep(0.1)  # the waiter is polling for the lock
                assert _commit(upload, 0, 8, durable=True, then_release=held) == 1
                time.sleep(0.3)  # still inside the context: the waiter needs none of this
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    assert holder_has_it.wait(5)
    waiter_started.set()
    started = time.monotonic()
    with locks.upload_lock(upload.pk, timeout=5, ask_release=False, reload=upload):
        assert upload.offset == 8
        assert time.monotonic() - started < 0.35
    thread.join(5)
    assert not errors, errors


@postgresql_only
def test_a_commit_offset_that_fails_leaves_the_lock_to_its_context(user):
    from django.db import IntegrityError

    upload = _upload(user)  # size 10: an offset of 11 breaks a check constraint
    with locks.upload_lock(upload.pk, timeout=0) as held:
        with pytest.raises(IntegrityError):
            _commit(upload, 0, 11, durable=True, then_release=held)
        assert not held.released and locks.is_held(upload.pk)
    assert not locks.is_held(upload.pk)
    assert UploadSession.objects.get(pk=upload.pk).offset == 0


@postgresql_only
def test_a_commit_offset_of_a_moved_offset_changes_nothing_and_still_releases(user):
    upload = _upload(user, offset=3)
    with locks.upload_lock(upload.pk, timeout=0) as held:
        assert _commit(upload, 0, 6, durable=True, then_release=held) == 0
        assert held.released and not locks.is_held(upload.pk)
    assert UploadSession.objects.get(pk=upload.pk).offset == 3


@postgresql_only
def test_a_commit_offset_without_release_keeps_the_lock(user):
    upload = _upload(user)
    with locks.upload_lock(upload.pk, timeout=0) as held:
        assert _commit(upload, 0, 2, durable=True) == 1
        assert not held.released and locks.is_held(upload.pk)
    assert not locks.is_held(upload.pk)


@postgresql_only
def test_a_commit_that_need_not_be_durable_changes_only_its_own_transaction(user):
    # UPLOADS_FSYNC=0: that commit skips the WAL flush; the session's own setting is untouched.
    upload = _upload(user)
    assert _commit(upload, 0, 5, durable=False) == 1
    assert UploadSession.objects.get(pk=upload.pk).offset == 5
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


def test_commit_offset_is_left_to_the_caller_in_a_transaction_or_without_postgresql(user):
    from django.db import transaction

    upload = _upload(user)
    with transaction.atomic(), locks.upload_lock(upload.pk, timeout=0) as held:
        assert _commit(upload, 0, 5, durable=True, then_release=held) is None  # a procedure may not COMMIT here
        assert not held.released
    if connection.vendor != "postgresql":
        with locks.upload_lock(upload.pk, timeout=0) as held:
            assert _commit(upload, 0, 5, durable=True, then_release=held) is None
            assert held.key is None and not held.released
    assert UploadSession.objects.get(pk=upload.pk).offset == 0


# --- The lock taken in the statement that reads the request's token (migration 0006) -------------


def _read_with_token(key: str):
    """A `read` as `authentication.read_with_token` makes it, for the token `key`."""
    from rest_framework.authtoken.models import Token

    from uploads import rows

    def read(*parts):
        _token, *results = rows.together(rows.Part(Token, equals=(("key", key),), related="user"), *parts)
        return results

    return read


def _lock_and_read(key: str, upload_id):
    from uploads import authentication

    return locks.lock_and_read_with(_read_with_token(key), upload_id, owner=authentication.TOKEN_USER)


def test_the_lock_is_taken_ahead_only_for_the_owner_of_an_unfinished_upload(user, other_user):
    from rest_framework.authtoken.models import Token

    mine, theirs = Token.objects.create(user=user).key, Token.objects.create(user=other_user).key
    upload = _upload(user)
    postgres = connection.vendor == "postgresql"

    held, row = _lock_and_read(mine, upload.pk)
    assert row.pk == upload.pk and row.owner_id == user.pk
    if postgres:
        assert held is not None and locks.is_held(upload.pk)
        locks.release(held)
        locks.release(held)  # twice is once
    else:  # flock: the engine takes it as usual
        assert held is None
    assert not locks.is_held(upload.pk)

    for key in (theirs, "no-such-token"):
        held, row = _lock_and_read(key, upload.pk)
        assert held is None and row.pk == upload.pk and not locks.is_held(upload.pk)
    assert _lock_and_read(mine, uuid.uuid4()) == (None, None)

    UploadSession.objects.filter(pk=upload.pk).update(offset=10, status="complete")
    held, row = _lock_and_read(mine, upload.pk)
    assert held is None and row.status == "complete" and not locks.is_held(upload.pk)


@postgresql_only
def test_a_busy_upload_is_read_but_not_taken_ahead(user):
    from rest_framework.authtoken.models import Token

    mine = Token.objects.create(user=user).key
    upload = _upload(user)
    with Holder(upload.pk):
        UploadSession.objects.filter(pk=upload.pk).update(offset=4)
        held, row = _lock_and_read(mine, upload.pk)
        assert held is None and row.offset == 4
    assert not locks.is_held(upload.pk)


@postgresql_only
def test_a_lock_taken_ahead_is_adopted_without_a_query_and_released_after(user):
    from django.test.utils import CaptureQueriesContext
    from rest_framework.authtoken.models import Token

    upload = _upload(user)
    held, row = _lock_and_read(Token.objects.create(user=user).key, upload.pk)
    with CaptureQueriesContext(connection) as queries:
        with locks.upload_lock(upload.pk, timeout=0, held=held) as adopted:
            assert adopted is held and len(queries) == 0
    assert len(queries) == 1 and held.released and not locks.is_held(upload.pk)


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


# --- Release requests (TUS.md N7: the newest request for an upload wins) ------------------------

# The watcher polls every WATCH_SECONDS; this is how long tests wait for it to have looked again.
WATCHER_ROUNDS = 4 * locks.WATCH_SECONDS


def test_a_waiter_asks_the_holder_to_release():
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        assert not storage.release_requested(upload_id)
        with pytest.raises(UploadBusy):
            with locks.upload_lock(upload_id, timeout=0.3):
                pytest.fail("two holders of one upload lock")
        assert storage.release_requested(upload_id)


def test_the_release_request_appears_while_the_waiter_waits():
    # Asked at the start of the wait, not only when it gives up: the holder can let go in time.
    upload_id = uuid.uuid4()
    seen_at: list[float] = []
    errors: list[BaseException] = []
    got_lock = threading.Event()

    def waiter() -> None:
        try:
            with locks.upload_lock(upload_id, timeout=5):
                got_lock.set()
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)
        finally:
            connection.close()

    with Holder(upload_id) as holder:
        thread = threading.Thread(target=waiter, daemon=True)
        started = time.monotonic()
        thread.start()
        while time.monotonic() < started + 2:
            if storage.release_requested(upload_id):
                seen_at.append(time.monotonic())
                break
            time.sleep(0.01)
        assert not got_lock.is_set()
        holder.release.set()
        thread.join(5)
        assert not thread.is_alive()
    assert errors == []
    assert got_lock.is_set()
    assert seen_at, "no release request while the waiter waited"
    assert seen_at[0] - started < 1.0


def test_a_waiter_without_ask_release_does_not_ask():
    # Cleanup must never interrupt a client that is uploading.
    upload_id = uuid.uuid4()
    with Holder(upload_id):
        with pytest.raises(UploadBusy):
            with locks.upload_lock(upload_id, timeout=0.3, ask_release=False):
                pass
        assert not storage.release_requested(upload_id)


def test_a_free_lock_asks_nobody():
    upload_id = uuid.uuid4()
    with locks.upload_lock(upload_id, timeout=0):
        assert not storage.release_requested(upload_id)
    assert not storage.release_requested(upload_id)


def test_acquiring_clears_a_stale_release_request():
    # A request left behind by a waiter that gave up was aimed at an earlier holder: the new
    # holder must not be interrupted by it.
    upload_id = uuid.uuid4()
    storage.request_release(upload_id)
    assert storage.release_requested(upload_id)
    with locks.upload_lock(upload_id, timeout=0):
        assert not storage.release_requested(upload_id)


def test_acquiring_clears_a_stale_release_request_without_ask_release():
    upload_id = uuid.uuid4()
    storage.request_release(upload_id)
    with locks.upload_lock(upload_id, timeout=0, ask_release=False):
        assert not storage.release_requested(upload_id)


def test_a_waiter_that_gets_the_lock_clears_its_own_request():
    upload_id = uuid.uuid4()
    holder = Holder(upload_id)
    with holder:
        threading.Timer(0.3, holder.release.set).start()
        with locks.upload_lock(upload_id, timeout=5):
            assert holder.release.is_set()
            assert not storage.release_requested(upload_id)


# The watcher tests below touch files only: a plain (rolled back) test database is enough, and much
# cheaper than the module's transactional flush.
watcher_only = pytest.mark.django_db


class Callback:
    """Records each call and the thread it ran on."""

    def __init__(self, duration: float = 0.0) -> None:
        self.duration = duration
        self.calls: list[tuple[str, float]] = []
        self.called = threading.Event()
        self.finished = threading.Event()

    def __call__(self) -> None:
        self.calls.append((threading.current_thread().name, time.monotonic()))
        self.called.set()
        time.sleep(self.duration)
        self.finished.set()


@watcher_only
def test_release_on_request_calls_back_from_the_watcher_thread():
    upload_id = uuid.uuid4()
    callback = Callback()
    with locks.release_on_request(upload_id, callback):
        time.sleep(WATCHER_ROUNDS)
        assert callback.calls == []  # nobody asked
        asked_at = time.monotonic()
        storage.request_release(upload_id)
        assert callback.called.wait(2), "the watcher never called back"
        assert callback.calls[0][1] - asked_at < 1.0
        time.sleep(WATCHER_ROUNDS)  # the release file is still there: it must not call again
    assert len(callback.calls) == 1
    thread_name = callback.calls[0][0]
    assert thread_name != threading.current_thread().name
    assert thread_name == "uploads-release-watcher"


@watcher_only
def test_release_on_request_calls_back_for_a_request_made_before_the_block():
    # A waiter may ask between the holder taking the lock and starting to stream.
    upload_id = uuid.uuid4()
    callback = Callback()
    storage.request_release(upload_id)
    with locks.release_on_request(upload_id, callback):
        assert callback.called.wait(2)
    assert len(callback.calls) == 1


@watcher_only
def test_release_on_request_is_per_upload():
    asked, other = uuid.uuid4(), uuid.uuid4()
    asked_callback, other_callback = Callback(), Callback()
    with locks.release_on_request(asked, asked_callback), locks.release_on_request(other, other_callback):
        storage.request_release(asked)
        assert asked_callback.called.wait(2)
        time.sleep(WATCHER_ROUNDS)
        assert other_callback.calls == []
        storage.request_release(other)
        assert other_callback.called.wait(2)
    assert len(asked_callback.calls) == 1 and len(other_callback.calls) == 1


@watcher_only
def test_release_on_request_never_calls_back_after_the_block():
    upload_id = uuid.uuid4()
    callback = Callback()
    with locks.release_on_request(upload_id, callback):
        pass
    storage.request_release(upload_id)
    time.sleep(WATCHER_ROUNDS)
    assert callback.calls == []


@watcher_only
@pytest.mark.parametrize("delay", [0.0, 0.03, 0.06, 0.09, 0.12])
def test_release_on_request_callback_is_not_running_once_the_block_has_exited(delay):
    # The callback shuts a socket down: once the block is left, the connection may serve the next
    # request, so a call must either have finished before the exit returns or never happen.
    upload_id = uuid.uuid4()
    callback = Callback(duration=0.05)
    exited = threading.Event()
    calls_after_exit: list[float] = []

    def recording() -> None:
        if exited.is_set():
            calls_after_exit.append(time.monotonic())
        callback()
        if exited.is_set():
            calls_after_exit.append(time.monotonic())

    with locks.release_on_request(upload_id, recording):
        storage.request_release(upload_id)
        time.sleep(delay)  # leave the block at different moments of the watcher's poll
    exited.set()
    assert not callback.called.is_set() or callback.finished.is_set(), "the callback was still running"
    time.sleep(WATCHER_ROUNDS)
    assert calls_after_exit == []
    assert len(callback.calls) <= 1


@watcher_only
def test_release_on_request_without_a_callback_is_a_no_op():
    upload_id = uuid.uuid4()
    with locks.release_on_request(upload_id, None) as value:
        storage.request_release(upload_id)
        time.sleep(WATCHER_ROUNDS)
    assert value is None
    assert storage.release_requested(upload_id)  # left alone: nobody consumed it


@watcher_only
def test_a_failing_callback_does_not_stop_the_watcher():
    # One upload's broken interrupt must not leave every other upload unwatched.
    broken, healthy = uuid.uuid4(), uuid.uuid4()
    callback = Callback()

    def fail() -> None:
        raise RuntimeError("interrupt failed")

    with locks.release_on_request(broken, fail):
        storage.request_release(broken)
        time.sleep(WATCHER_ROUNDS)
    with locks.release_on_request(healthy, callback):
        storage.request_release(healthy)
        assert callback.called.wait(2), "the watcher died with the failing callback"


def test_a_newer_request_takes_over_from_a_streaming_holder():
    # End to end: the holder streams inside release_on_request; a waiter asks, the watcher
    # interrupts the holder, it lets go, and the waiter gets the upload long before its timeout.
    upload_id = uuid.uuid4()
    interrupted = threading.Event()
    holding = threading.Event()
    errors: list[BaseException] = []

    def holder() -> None:
        try:
            with locks.upload_lock(upload_id, timeout=5):
                with locks.release_on_request(upload_id, interrupted.set):
                    holding.set()
                    interrupted.wait(10)  # "reading the body" until interrupted
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            errors.append(exc)
        finally:
            connection.close()

    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    assert holding.wait(5)
    started = time.monotonic()
    with locks.upload_lock(upload_id, timeout=5):
        waited = time.monotonic() - started
        assert interrupted.is_set()
        assert not storage.release_requested(upload_id)
    thread.join(5)
    assert not thread.is_alive()
    assert errors == []
    assert waited < 1.5
